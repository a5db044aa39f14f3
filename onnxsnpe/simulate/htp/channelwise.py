"""Standalone BatchNormalization, GlobalAveragePool, AveragePool and ReduceMean in the HTP's integer arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding, quantize, round_half_away
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import (
    SUFFIX,
    Context,
    Lowered,
    centered_codes,
    int8,
    of_bitwidth,
    output_encoding,
    reduction,
    requant_constants,
    with_output_codes,
)


def _minmax_codes(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Centered 8-bit codes and step of ``values`` under a min-max encoding over [min(v, 0), max(v, 0)].

    Step ``(max - min) / 255`` in float32 (max at least min + 1e-4), zero point rounded half to even,
    codes rounded half away from zero from float64 values.
    """
    f32 = np.float32
    low = f32(values.min())
    high = max(f32(values.max()), f32(low + f32(1e-4)), f32(0))
    low = min(low, f32(0))
    step = f32((high - low) / f32(255))
    zero_point = float(np.round(np.clip(-low / step, 0, 255)))
    codes = np.clip(round_half_away(values / float(step) + zero_point), 0, 255)
    return codes - zero_point, float(step)


def quantized_values(values: np.ndarray, enc: Encoding) -> np.ndarray:
    """A constant as its 8-bit codes stand for it: ``(code + offset)`` times the float32 scale, in float64."""
    return (quantize(values, enc) + enc.offset).astype(np.float64) * float(np.float32(enc.scale))


def batch_norm_constants(
    values: list[np.ndarray], encodings: list[Encoding], epsilon: float, in_scale: float, out_scale: float,
    out_zero_point: int,
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """HTP's 8-bit BatchNormalization: per-channel weight codes, offsets ``C``, multiplier ``m`` and constant.

    ``values`` are scale, B, mean and var with their 8-bit ``encodings``. They are dequantized
    (float64) and folded to ``a = scale / sqrt(var + eps)`` and ``b = B - mean * a``, which
    scale_shift_constants applies.
    """
    gamma, beta, mean, var = (quantized_values(v, e) for v, e in zip(values, encodings, strict=True))
    folded_scale = gamma / np.sqrt(var + float(np.float32(epsilon)))
    return scale_shift_constants(folded_scale, beta - mean * folded_scale, in_scale, out_scale, out_zero_point)


def scale_shift_constants(
    scale: np.ndarray, shift: np.ndarray, in_scale: float, out_scale: float, out_zero_point: int,
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """The HTP's 8-bit per-channel ``x * a + b`` (a BatchNormalization, or a Mul and Add it fuses:
    scale_shift.py): weight codes, offsets ``C``, multiplier ``m`` and constant.

    ``a`` (``scale``) and ``b`` (``shift``) are quantized again, each per tensor with a min-max
    encoding (_minmax_codes): codes ``w`` and ``c``, steps ``s_a`` and ``s_b``. The output code is
    ``floor((x * w + C) * m + 0.5 + 2^(9 - s))`` for the centered input code ``x``, ``M = s_in *
    s_a / s_out``, ``m = M`` rounded to 15 significant bits (``s = 14 - floor(log2 M)`` fraction
    bits) and ``C = round(c * s_b / (s_in * s_a)) + round(z_out / M)`` (each rounded half away from
    zero). The ``2^(9 - s)`` is the product rounded to a multiple of ``2^(10 - s)`` first. Bit-exact
    on every code of 133 probes (2,128 channels) with ``2^-10.7 <= M <= 2^-1.2``. Outside ``2^-11
    <= M < 2^-1`` (``s`` from 16 to 25) the rule fails (saturated channels below, a smaller
    constant above; not decoded): None.
    """
    weights, w_step = _minmax_codes(scale)
    bias, b_step = _minmax_codes(shift)
    base = float(np.float32(in_scale)) * w_step
    ratio = base / float(np.float32(out_scale))
    bits = 14 - int(np.floor(np.log2(ratio)))
    if not 16 <= bits <= 25:
        return None
    multiplier = float(np.round(ratio * 2.0**bits)) * 2.0**-bits
    offsets = round_half_away(bias * b_step / base) + round_half_away(np.array(out_zero_point / ratio))
    return weights, offsets, multiplier, 0.5 + 2.0 ** (9 - bits)


def scale_shift_codes(
    x_name: str, x_enc: Encoding, y_enc: Encoding, constants: tuple[np.ndarray, np.ndarray, float, float],
    channel_shape: tuple[int, ...], p: str, output: str,
) -> Lowered:
    """The nodes applying scale_shift_constants to the codes of ``x_name``, its weight codes and offsets
    shaped ``channel_shape`` to broadcast against it, ending in ``output``."""
    weights, offsets, multiplier, constant = constants
    make = helper.make_node
    chain, inits = centered_codes(x_name, x_enc, p + "codes")
    inits += [
        numpy_helper.from_array(weights.astype(np.float32).reshape(channel_shape), p + "w"),
        numpy_helper.from_array(offsets.astype(np.float64).reshape(channel_shape), p + "offset"),
        numpy_helper.from_array(np.array(multiplier), p + "multiplier"),
        numpy_helper.from_array(np.array(constant), p + "constant"),
    ]
    chain += [
        make("Mul", [p + "codes", p + "w"], [p + "acc"]),  # |acc| <= 255^2: exact
        make("Cast", [p + "acc"], [p + "acc64"], to=onnx.TensorProto.DOUBLE),
        make("Add", [p + "acc64", p + "offset"], [p + "sum"]),
        make("Mul", [p + "sum", p + "multiplier"], [p + "product"]),  # exact in float64
        make("Add", [p + "product", p + "constant"], [p + "shifted"]),
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", output)


def lower_batch_norm(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An inference BatchNormalization with 8-bit encodings on integer codes (batch_norm_constants)."""
    if len(node.input) != 5 or len(node.output) != 1 or node_attributes(node).get("training_mode", 0):
        return None
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    names = list(node.input[1:])
    encs = [context.params.get(name) for name in names]
    rank = len(context.shapes.get(node.input[0], []))
    if rank < 3 or any(name not in context.constants for name in names):
        return None
    if not int8(x_enc, y_enc, *encs):
        return None
    values = [initializer_array(context.constants[name]).astype(np.float32).reshape(-1) for name in names]
    constants_ = batch_norm_constants(
        values, encs, node_attributes(node).get("epsilon", 1e-5), x_enc.scale, y_enc.scale, -y_enc.offset
    )
    if constants_ is None:
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    chain, inits, _ = scale_shift_codes(node.input[0], x_enc, y_enc, constants_, (-1, *(1,) * (rank - 2)), p,
                                        node.output[0])
    used = [name for other in context.graph.node if other is not node for name in other.input]
    return chain, inits, {name for name in names if name not in used}


def lower_global_average_pool(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit (or 16-bit) GlobalAveragePool over N x C x H x W on codes: ``floor(S * m + z_out + 0.5)``.

    ``S`` is the sum of the centered input codes over H x W and ``m`` the multiplier
    ``s_in / (s_out * H * W)`` rounded to 15 significant bits (requant_constants' precise variant).
    Bit-exact on 71,132 probed outputs (3x3, 7x7 and 12x12 inputs, random encodings); exact
    rounding of the float mean differs in 17 of them. With 16-bit input and output (the sum in
    float64) the HTP adds a little more before the floor (global_average_pool16_extra).
    """
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0], [])
    if not (int8(x_enc, y_enc) or of_bitwidth(16, x_enc, y_enc)):
        return None
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale)) / (shape[2] * shape[3])
    _, multiplier, _ = requant_constants(np.array(ratio), 0, precise=True)
    extra = global_average_pool16_extra(float(multiplier), shape[2] * shape[3]) if x_enc.bitwidth == 16 else 0.0
    return _mean_of_codes(node, context, x_enc, y_enc, [2, 3], True, float(multiplier), extra=extra)


def global_average_pool16_extra(multiplier: float, count: int) -> float:
    """What a 16-bit GlobalAveragePool over ``count`` values a channel adds to ``z_out + 1/2`` before
    its floor.

    With ``m = M 2^(e - 14)`` (``M`` the 15-bit mantissa) and ``k = floor(log2 count)``: nothing when
    ``e >= -1``; ``2^k`` units of ``m``'s last bit, ``2^(k + e - 14)``, when ``e <= -2`` and ``k + e >=
    -3``; a whole half when ``k + e <= -4``. tools/HTP.md finding 57: sums just below and above
    rounding boundaries, 2 x 2 to 40 x 40 values a channel, every output of 72 probes. Some large
    inputs (many channels, or 80 x 80 with 24) take another kernel with a float multiplier, by a
    criterion not pinned; this rule is kept for them.
    """
    exponent = int(np.floor(np.log2(multiplier)))
    if exponent >= -1 or count < 2:
        return 0.0
    bits = int(np.floor(np.log2(count)))
    return 2.0 ** (bits + exponent - 14) if bits + exponent >= -3 else 0.5


def lower_average_pool(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit 2-D AveragePool whose kernel equals its strides, unpadded, tiling its input exactly, on
    codes as GlobalAveragePool: ``floor(S m + z_out + 1/2)`` with ``S`` each window's sum of centered
    codes and ``m = s_in / (s_out n)`` rounded to 15 significant bits (tools/HTP.md finding 28: 52
    probes of kernels 3x2, 1x2, 3x3, 2x1 and 3x1 bit for bit; exact rounding of the mean was off in
    10 of the first 36 probes, 2x2 included). A
    2x2 kernel is left to the float computation (two of four probes one step off with this rule)."""
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0], [])
    attributes = node_attributes(node)
    kernel = list(attributes.get("kernel_shape", []))
    if not int8(x_enc, y_enc) or len(shape) != 4 or len(kernel) != 2 or kernel == [2, 2]:
        return None
    if list(attributes.get("strides", [1, 1])) != kernel or any(attributes.get("pads", [0] * 4)):
        return None
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        return None
    height, width = shape[2:]
    if not all(isinstance(d, int) and d > 0 for d in shape) or height % kernel[0] or width % kernel[1]:
        return None
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale)) / (kernel[0] * kernel[1])
    _, multiplier, _ = requant_constants(np.array(ratio), 0, precise=True)
    windows = [shape[0], shape[1], height // kernel[0], kernel[0], width // kernel[1], kernel[1]]
    return _mean_of_codes(node, context, x_enc, y_enc, [3, 5], False, float(multiplier), tiles=windows)


REDUCE_MEAN_KERNELS = {(3, (2,)): "int16", (3, (1,)): "rounded", (4, (3,)): "int16", (4, (1,)): "int16",
                       (4, (2, 3)): "int16"}
"""The (rank, reduced axes) of the 8-bit ReduceMeans probed, and how each scales (reduce_mean_multiplier)."""


def reduce_mean_multiplier(ratio: float, kernel: str) -> float:
    """The HTP's multiplier for an 8-bit ReduceMean's sum of centered codes, ``ratio = s_in / (s_out * n)``.

    Both kernels keep 15 significant bits. The "rounded" one (a rank-3 tensor reduced over axis 1)
    rounds the mantissa as GlobalAveragePool does; the "int16" one (every other probed case)
    scales the mantissa in [1/2, 1) by 32767, int16's largest value, and then applies it as if
    scaled by 2^15: ``m = round(x * 32767 / 32768) * 2^(e - 14)`` with ``x = ratio * 2^(14 - e)``,
    ``e = floor(log2 ratio)``, so m sits up to one 15-bit step below the rounded value
    (tools/HTP.md, finding 18).
    """
    exponent = 2.0 ** np.floor(np.log2(ratio))
    mantissa = ratio / exponent * 2.0**14
    if kernel == "int16":
        mantissa *= 32767 / 32768
    return float(np.floor(mantissa + 0.5)) / 2.0**14 * exponent


def lower_reduce_mean(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit ReduceMean on codes: ``floor(S * m + z_out + 0.5)`` with ``S`` the sum of the centered
    input codes over the reduced axes and ``m`` reduce_mean_multiplier's, for the (rank, axes) of
    REDUCE_MEAN_KERNELS with static reduced dimensions. Bit-exact on 54 probes that sweep every sum
    (938,000 outputs in range; one output of a probe that averages 3 values differs), two of them on
    v73; exact rounding of the mean differs in 0.1 to 0.5% of them. 16-bit ReduceMean follows neither
    kernel and stays in float."""
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0], [])
    if not int8(x_enc, y_enc) or not shape:
        return None
    attributes = node_attributes(node)
    axes = attributes.get("axes")
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in context.constants:
            return None
        axes = initializer_array(context.constants[node.input[1]]).tolist()
    if not axes or attributes.get("noop_with_empty_axes", 0):
        return None
    axes = tuple(sorted(a % len(shape) for a in axes))
    kernel = REDUCE_MEAN_KERNELS.get((len(shape), axes))
    reduced = [shape[a] for a in axes]
    if kernel is None or not all(isinstance(d, int) and d > 0 for d in reduced):
        return None
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale)) / int(np.prod(reduced))
    return _mean_of_codes(node, context, x_enc, y_enc, list(axes), bool(attributes.get("keepdims", 1)),
                          reduce_mean_multiplier(ratio, kernel))


def _mean_of_codes(node: onnx.NodeProto, context: Context, x_enc: Encoding, y_enc: Encoding, axes: list[int],
                   keepdims: bool, multiplier: float, tiles: list[int] | None = None, extra: float = 0.0) -> Lowered:
    """The chain of an average on codes: the centered codes (reshaped to ``tiles`` when given) summed
    over ``axes`` in float64 (sums of 16-bit codes pass float32's exact integers), times
    ``multiplier``, plus ``z_out + 1/2 + extra``, floored."""
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = centered_codes(node.input[0], x_enc, p + "codes32")
    chain.append(make("Cast", [p + "codes32"], [p + "codes"], to=onnx.TensorProto.DOUBLE))
    inits += [
        numpy_helper.from_array(np.array(multiplier), p + "multiplier"),
        numpy_helper.from_array(np.array(-y_enc.offset + 0.5 + extra), p + "constant"),
    ]
    summed = p + "codes"
    if tiles is not None:
        inits.append(numpy_helper.from_array(np.array(tiles, dtype=np.int64), p + "tiles"))
        chain.append(make("Reshape", [p + "codes", p + "tiles"], [p + "tiled"]))
        summed = p + "tiled"
    total, axes_inits = reduction("ReduceSum", summed, p + "sum", axes, keepdims, context.opset)
    chain += [
        total,
        make("Mul", [p + "sum", p + "multiplier"], [p + "product"]),
        make("Add", [p + "product", p + "constant"], [p + "shifted"]),
    ]
    return with_output_codes(chain, inits + axes_inits, p, y_enc, p + "shifted", node.output[0])
