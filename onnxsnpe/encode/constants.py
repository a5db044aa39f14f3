"""Encodings of the float constants SNPE quantizes beyond weights and biases (SNPE.md section 4)."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.large import initializer_array
from ..graph.load import FLOAT_TYPES
from ..graph.targets import QuantTargets
from .conversions import operating_bitwidth
from .encoding import Encoding, ParamEncoding, asymmetric_encoding, symmetric_encoding

STRUCTURAL_INPUTS = {
    "Clip": {1, 2},
    "Pad": {1, 2, 3},
    "Resize": {1, 2, 3},
    "Upsample": {1},
    "Reshape": {1},
    "Expand": {1},
    "Tile": {1},
    "Slice": {1, 2, 3, 4},
    "ConstantOfShape": {0},
}
"""Float constant inputs that are settings rather than data (never quantized on the device)."""


def constant_encodings(
    model: onnx.ModelProto,
    targets: QuantTargets,
    params: dict[str, ParamEncoding],
    bitwidth: int = 8,
    activations: dict[str, Encoding] | None = None,
) -> dict[str, Encoding]:
    """Min-max encodings of the float constants that feed quantized ops but have no param encoding.

    SNPE's quantizer gives every static input of a quantized op (the constant operand of an Add or
    Mul, a LayerNorm gamma, a Pow exponent) an encoding from its own min and max; a QNN graph has
    to carry them quantized too, or the op would run in float. Biases covered by ``targets`` are
    skipped even when ``params`` lacks them (e.g. float biases). The constants of a node that makes
    an attention mask (the 0 and -inf of ``Where(mask, 0, -inf)``) take that mask's encoding from
    ``activations``: their own min and max would be infinite or meaningless. A Gather's table takes
    the encoding of the rows gathered from it (the table's own range: ranges.fixed_range_tensors),
    so that both share one grid. *Inferred* for SNPE:
    this is what its converter does with static tensors, not confirmed by a source.

    A constant read by an op that computes in 16 bits (conversions.operating_bitwidth: its output is
    16-bit in ``activations``, or for a Div its input or output) is encoded with 16 bits
    (``bitwidth`` elsewhere): the HTP emulator refuses some 16-bit graphs whose elementwise ops
    have 8-bit constants (a Div by an 8-bit constant before a GlobalAveragePool fails graph
    finalization with QNN_COMMON_ERROR_MEM_ALLOC; with a 16-bit constant it runs, as do the three
    PP-OCR models at A16, which all failed before; tools/HTP.md, "16-bit activations"). A LayerNorm's
    gamma read at 16 bits is signed symmetric, as the HTP requires (SNPE.md section 4; asymmetric,
    onnxruntime-qnn leaves the LayerNorm to the CPU: tools/HTP.md finding 36); at 8 bits it shares
    its input's unsigned type.
    """
    activations = activations or {}
    bias_names = {ref.bias for ref in targets.biases}
    fused = targets.fused_node_outputs()  # a fused op's constants are not the device's
    values = {init.name: init for init in model.graph.initializer if init.data_type in FLOAT_TYPES}
    widths: dict[str, int] = {}  # the widest bitwidth among the ops reading each constant
    for node in model.graph.node:
        width = operating_bitwidth(node, targets, activations)
        structural = STRUCTURAL_INPUTS.get(node.op_type, set())
        for index, name in enumerate(node.input):
            if index in structural or name not in values or width is None:
                continue
            if width > widths.get(name, bitwidth):
                widths[name] = width
    found: dict[str, Encoding] = {}
    for node in model.graph.node:
        if node.output and node.output[0] in fused:
            continue
        structural = STRUCTURAL_INPUTS.get(node.op_type, set())
        for index, name in enumerate(node.input):
            if name not in values or name in params or name in bias_names or name in found:
                continue
            if index in structural:
                continue
            if node.output[0] in activations and (node.output[0] in targets.masks
                                                  or (node.op_type == "Gather" and index == 0)):
                found[name] = activations[node.output[0]]  # a table keeps its gathered rows' grid
                continue
            array = initializer_array(values[name])
            width = widths.get(name, bitwidth)
            if node.op_type == "LayerNormalization" and index == 1 and width == 16:
                found[name] = symmetric_encoding(float(np.abs(array).max()), 16)
            else:
                found[name] = asymmetric_encoding(float(array.min()), float(array.max()), width)
    return found
