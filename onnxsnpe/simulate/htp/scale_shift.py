"""A Mul by a per-channel constant followed by an Add of one, which the HTP computes as one BatchNorm.

The QNN HTP backend fuses ``Add(Mul(x, a), b)`` into a per-channel scale and shift when ``a`` and ``b``
are constant vectors over the last axis of ``x`` (shape ``[C]`` or ``[1, ..., 1, C]``, ``C > 1``) and
``x`` and the Mul's output are each the first operand: the Add's output is then computed from
``x``'s codes with the 8-bit BatchNormalization rule (channelwise.scale_shift_constants), as if the
Mul's output were never rounded, even where that output is also read elsewhere or exposed (it is
then computed apart as well). Probed on the emulator (tools/HTP.md finding 58): every such pair is
bit for bit with the rule at ranks 2 to 4, while a Sub, an Add before the Mul, a constant first
operand, a scalar ``a`` or ``b``, a full-shape constant or a ``[C, 1, 1]`` one over NCHW channels keep
the two ops apart. The PP-OCRv4 recogniser's layer norms end in such pairs (their gamma and beta).
"""

from __future__ import annotations

import onnx

from ...encode.encoding import Encoding
from ...graph.large import initializer_array
from .channelwise import quantized_values, scale_shift_codes, scale_shift_constants
from .codes import SUFFIX, Context, Lowered, int8, output_encoding


def last_axis_vector(tensor: onnx.TensorProto, channels: int | None) -> bool:
    """Whether a constant is ``[C]`` or ``[1, ..., 1, C]`` with ``C = channels > 1``."""
    dims = list(tensor.dims)
    return channels is not None and channels > 1 and len(dims) >= 1 and dims[-1] == channels \
        and all(d == 1 for d in dims[:-1])


def lower_scale_shift(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit ``Add(Mul(x, a), b)`` the HTP fuses (module docstring), computed from ``x``'s codes; else None."""
    if node.op_type != "Add" or len(node.input) != 2 or node.input[1] not in context.constants:
        return None
    mul = next((other for other in context.graph.node if node.input[0] in other.output), None)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2 or mul.input[1] not in context.constants \
            or mul.input[0] in context.constants:
        return None
    x_name, scale_name, shift_name = mul.input[0], mul.input[1], node.input[1]
    shape = context.shapes.get(x_name) or []
    channels = shape[-1] if len(shape) >= 2 else None
    if not all(last_axis_vector(context.constants[name], channels) for name in (scale_name, shift_name)):
        return None
    x_enc, y_enc = context.activations.get(x_name), output_encoding(node, context.targets, context.activations)
    scale_enc, shift_enc = context.params.get(scale_name), context.params.get(shift_name)
    per_tensor = isinstance(scale_enc, Encoding) and isinstance(shift_enc, Encoding)
    if not (per_tensor and int8(x_enc, y_enc, scale_enc, shift_enc)):
        return None
    scale, shift = (quantized_values(initializer_array(context.constants[name]).reshape(-1), enc)
                    for name, enc in ((scale_name, scale_enc), (shift_name, shift_enc)))
    constants = scale_shift_constants(scale, shift, x_enc.scale, y_enc.scale, -y_enc.offset)
    if constants is None:
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    chain, inits, _ = scale_shift_codes(x_name, x_enc, y_enc, constants, (channels,), p, node.output[0])
    used = {name for other in context.graph.node if other is not node for name in other.input}
    return chain, inits, {shift_name} - used
