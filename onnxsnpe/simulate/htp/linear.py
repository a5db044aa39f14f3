"""Conv, ConvTranspose, Gemm and MatMul in the HTP's integer arithmetic (int8 weights, truncating requantization)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import ChannelEncodings, Encoding, ParamEncoding, fake_quantize, round_half_away
from ...graph.large import initializer_array, slabs
from ...graph.ops import LINEAR_OPS, node_attributes
from .codes import (
    INT8_HIGH,
    INT8_LOW,
    SUFFIX,
    Context,
    Lowered,
    constant_bias,
    gridded,
    gridded_bias,
    int8,
    integer_op,
    output_encoding,
    requant_constants,
    requant_offset,
)

STEP_RESOLUTION = 2048
"""HTP rounds the per-channel step of a re-expressed weight channel to this many parts of one."""


def int8_weights(codes: np.ndarray, axis: int, in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """HTP's int8 weights for integer weight codes ``q + offset``: the int8 values (in ``codes``'
    dtype; ``in_place``: written over ``codes``) and per-channel steps.

    ``axis`` is the output-channel axis. A channel whose codes fit int8 keeps them with step 1.
    """
    values = codes if in_place else np.array(codes, copy=True)
    moved = np.moveaxis(values, axis, 0)  # a view: channels re-expressed in place
    steps = np.ones(moved.shape[0])
    flat = moved.reshape(moved.shape[0], -1)  # for the channels' extremes in one call each
    lows, highs = flat.min(axis=1), flat.max(axis=1)
    for channel in np.flatnonzero((lows < INT8_LOW) | (highs > INT8_HIGH)):
        low, high = float(lows[channel]), float(highs[channel])
        steps[channel] = np.round(STEP_RESOLUTION * max(low / INT8_LOW, high / INT8_HIGH)) / STEP_RESOLUTION
        row = moved[channel]
        row[...] = round_half_away(row.astype(np.float64) / steps[channel])
    return values, steps


def weight_codes(weight: np.ndarray, enc: ParamEncoding, scale_along: float | np.ndarray, axis: int) -> np.ndarray:
    """The integer codes ``q + offset`` of an 8-bit weight as int16, computed slab by slab along an
    axis other than the output channels' ``axis`` (a large weight never has a float64 copy)."""
    codes = np.empty(weight.shape, dtype=np.int16)
    for index in slabs(weight.shape, axis):
        codes[index] = np.round(fake_quantize(weight[index], enc).astype(np.float64) / scale_along)
    return codes


def stored_codes(values: np.ndarray, name: str) -> tuple[onnx.TensorProto, onnx.NodeProto]:
    """Integer weight values as the smallest integer initializer that holds them, and the Cast that
    makes them the float operand ``name`` (onnxruntime folds it; a large model's session reads the
    small integers from their file, graph/large.session_options)."""
    dtype = np.int8 if values.min() >= INT8_LOW and values.max() <= INT8_HIGH else np.int16
    stored = numpy_helper.from_array(values.astype(dtype, copy=False), name + "_int")
    return stored, helper.make_node("Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT)


def weight_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    """The output-channel axis of a linear op's constant weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node_attributes(node).get("transB", 0) else 1
    return len(weight.dims) - 1


def lower_linear(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The integer-code version of a Conv/Gemm/MatMul node, or None when it stays as it is."""
    if node.op_type not in LINEAR_OPS or len(node.input) < 2:
        return None
    attrs = node_attributes(node)
    if node.op_type == "ConvTranspose" and attrs.get("group", 1) != 1:
        return None
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (
        1.0, 1.0, 0
    ):
        return None
    x, w = node.input[0], node.input[1]
    x_enc = context.activations.get(x)
    y_enc = output_encoding(node, context.targets, context.activations)
    if node.op_type == "MatMul" and w not in context.constants and int8(y_enc):
        return _lower_dynamic_matmul(node, context.activations, y_enc)
    w_enc = context.params.get(w)
    if w not in context.constants or not int8(x_enc, y_enc, w_enc):
        return None

    weight = initializer_array(context.constants[w])
    axis = weight_axis(node, context.constants[w])
    per_channel = isinstance(w_enc, ChannelEncodings)
    if per_channel and w_enc.axis != axis:
        return None
    w_scale = np.float32(w_enc.scales()) if per_channel else np.float32(w_enc.scale)  # one per output channel
    scale_along = w_enc.along(w_scale.astype(np.float64), weight.ndim) if per_channel else w_enc.scale
    codes = weight_codes(weight, w_enc, scale_along, axis)
    depthwise = node.op_type == "Conv" and attrs.get("group", 1) > 1 and weight.shape[1] == 1
    strided_depthwise = depthwise and all(s > 1 for s in attrs.get("strides", [1]))
    blocks = transpose_blocks(node, weight.shape)
    if blocks:
        codes = as_block_conv(codes)
        axis = 0
        # one scale per channel and kernel position; a one-channel weight stays one scale (no bias grid)
        w_scale = np.repeat(w_scale, blocks**2) if per_channel and w_scale.size > 1 else w_scale
    if strided_depthwise or (node.op_type == "ConvTranspose" and not blocks):
        w_int, steps = codes, np.ones(codes.shape[axis])
    else:
        w_int, steps = int8_weights(codes, axis, in_place=True)  # codes are this function's own
    bias_name = node.input[2] if len(node.input) > 2 else ""
    has_bias = bias_name in context.constants
    bias, bias_scale, bias_consumed = constant_bias(bias_name, context, max(blocks, 1) ** 2)
    consumed = {w} | bias_consumed
    rounding = None
    v73_rule = context.arch >= 73 and (node.op_type in ("Conv", "Gemm") or blocks) and not strided_depthwise
    multiplier = channel_multipliers(x_enc.scale, w_scale, y_enc.scale) * steps
    if v73_rule:
        factor, mantissa, offset, rounding = v73_conv_constants(multiplier, x_enc.scale, w_scale, steps, bias,
                                                                bias_scale)
    else:
        factor, mantissa, _ = requant_constants(multiplier, -y_enc.offset, precise=strided_depthwise)
        offset = requant_offset(x_enc.scale, w_scale, y_enc.scale, -y_enc.offset, steps, bias, bias_scale)
    bias_int = np.zeros(steps.size)  # the bias is part of ``offset``

    tail = (1,) * (weight.ndim - 2) if node.op_type.startswith("Conv") else ()  # channel constants broadcast over space
    p = f"{node.output[0]}{SUFFIX}/"
    stored, cast = stored_codes(w_int, p + "w")
    inits = [stored]
    linear = onnx.NodeProto()
    linear.CopyFrom(node)
    del linear.input[:], linear.output[:]
    if blocks:
        linear = helper.make_node("Conv", [], [], kernel_shape=[1, 1])
    linear.input.extend([p + "x", p + "w"])
    if has_bias or node.op_type == "Gemm":
        inits.append(numpy_helper.from_array(bias_int.astype(np.float32), p + "b"))
        linear.input.append(p + "b")
    linear.output.append(p + "acc")
    linear.name = p + node.op_type
    output = p + "blocks" if blocks else node.output[0]
    chain, more = integer_op(p, [(x, x_enc, p + "x")], linear, (factor, mantissa, offset), tail, y_enc, output,
                             rounding)
    chain.insert(0, cast)
    if blocks:  # each block of k x k output pixels comes from one input pixel
        chain.append(helper.make_node("DepthToSpace", [output], [node.output[0]], blocksize=blocks, mode="CRD"))
    return chain, inits + more, consumed


def channel_multipliers(in_scale: float, w_scales: float | np.ndarray, out_scale: float) -> np.ndarray:
    """The requantization multipliers ``M`` as the HTP computes them, in float32 and per channel relative
    to the largest weight scale: ``f32(f32(f32(s_in s_max) / s_out) f32(s_w / s_max))`` (tools/HTP.md
    finding 29 on v73; finding 46: v68 too, and per tensor ``f32(f32(s_in s_w) / s_out)``, which a
    float16 tie of ``M`` decides)."""
    f32 = np.float32
    w_scales = np.asarray(w_scales, dtype=f32)
    largest = f32(np.max(w_scales))
    relative = (w_scales / largest).astype(f32)
    largest_m = f32(f32(f32(in_scale) * largest) / f32(out_scale))
    return (largest_m * relative).astype(f32).astype(np.float64)


def v73_conv_constants(
    multiplier: np.ndarray, in_scale: float, w_scale: float | np.ndarray, steps: np.ndarray,
    bias_codes: np.ndarray | None, bias_scale: float | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How HTP v73 and later requantize an 8-bit Conv, Gemm or kernel-equals-stride ConvTranspose (as its
    1x1 Conv: finding 27): factor ``2^-k``, multiplier ``m``, offset ``B`` and the constant added after
    the product, per output channel (tools/HTP.md, finding 19).

    ``code = floor((floor((acc + B) / 2^k) + 1/2) m + z_out + 1/2)`` with ``k = floor(-log2 M) - 3``
    (negative for ``M >= 2^-3``: no truncation then), ``m = round(M 2^(k + 15)) / 2^15`` (15
    fractional bits, ties rounded up) and ``B`` the bias alone in accumulator steps, ``float32(b s_b) / float32(s_in
    s_w)`` (divided by a re-expressed channel's step) truncated toward zero. Unlike v68 the output
    zero point is added after the product, and the truncated accumulator counts from the middle of
    its bin. Bit-exact on ``tools/probe_conv8.py --htp-arch 73``'s symmetric-weight probes (six
    shapes, 42,009 in-range outputs); per-channel weights with the bias grid of finding 25 too (30
    seeds), and one re-expressed channel 119 of 42,045 off.
    """
    multiplier = np.asarray(multiplier, dtype=np.float64)
    shift = np.floor(-np.log2(multiplier)) - 3
    mantissa = np.floor(multiplier * 2.0 ** (shift + 15) + 0.5) / 2.0**15  # ties up (finding 29)
    offset = v73_bias(in_scale, w_scale, steps, bias_codes, bias_scale)
    return 2.0**-shift, mantissa, offset, mantissa / 2 + 0.5


def v73_bias(in_scale: float, w_scale: float | np.ndarray, steps: np.ndarray, bias_codes: np.ndarray | None,
             bias_scale: float | np.ndarray) -> np.ndarray:
    """The bias in accumulator steps as HTP v73 and later take it, per output channel: ``float32(b s_b)
    / float32(s_in s_w)`` (divided by a re-expressed channel's step) truncated toward zero; with
    per-channel weights codes.gridded_bias truncated toward zero (tools/HTP.md finding 25)."""
    f32 = np.float32
    if bias_codes is None:
        return np.zeros(steps.shape)
    if gridded(in_scale, w_scale, steps, bias_scale):
        return np.trunc(gridded_bias(bias_codes, in_scale, w_scale).astype(np.float64))
    bias = (np.asarray(bias_codes).astype(f32) * np.asarray(bias_scale, dtype=f32)).astype(f32)
    steps_in = (bias / (f32(in_scale) * np.asarray(w_scale, dtype=f32)) / steps.astype(f32)).astype(f32)
    return np.trunc(steps_in).astype(np.float64)


def as_block_conv(weight: np.ndarray) -> np.ndarray:
    """A kernel-equals-stride ConvTranspose's weight ``[C_in, C_out, k, k]`` as the 1x1 Conv weight
    ``[C_out k k, C_in, 1, 1]`` the HTP runs (output channel ``c k k + i k + j``, depth-to-space CRD)."""
    return weight.reshape(weight.shape[0], -1).T.reshape(-1, weight.shape[0], 1, 1)


def transpose_blocks(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    """The kernel size ``k`` of a 2-D ConvTranspose whose kernel equals its stride (no overlap, no padding), else 0.

    The HTP runs it as a 1x1 convolution with ``C_out * k * k`` output channels followed by a
    depth-to-space, and re-expresses the int8 weights per (output channel, kernel position).
    """
    attrs = node_attributes(node)
    if node.op_type != "ConvTranspose" or len(shape) != 4 or shape[2] != shape[3] or attrs.get("group", 1) != 1:
        return 0
    k = shape[2]
    plain = (
        list(attrs.get("strides", [1, 1])) == [k, k]
        and not any(attrs.get("pads", [0] * 4))
        and all(d == 1 for d in attrs.get("dilations", [1, 1]))
        and not any(attrs.get("output_padding", [0, 0]))
        and "output_shape" not in attrs
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
    )
    return k if plain and k > 1 else 0


def _lower_dynamic_matmul(
    node: onnx.NodeProto, activations: dict[str, Encoding], y_enc: Encoding
) -> Lowered | None:
    """MatMul of two 8-bit activations on integer codes, requantized per tensor."""
    a_enc, b_enc = activations.get(node.input[0]), activations.get(node.input[1])
    if not int8(a_enc, b_enc):
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    multiplier = float(np.float32(a_enc.scale)) * float(np.float32(b_enc.scale)) / float(np.float32(y_enc.scale))
    factor, mantissa, _ = requant_constants(np.array([multiplier]), -y_enc.offset)
    constants = (factor, mantissa, requant_offset(a_enc.scale, b_enc.scale, y_enc.scale, -y_enc.offset, np.ones(1)))
    product = helper.make_node("MatMul", [p + "a", p + "b"], [p + "acc"], name=p + "MatMul")
    inputs = [(node.input[0], a_enc, p + "a"), (node.input[1], b_enc, p + "b")]
    chain, inits = integer_op(p, inputs, product, constants, (), y_enc, node.output[0])
    return chain, inits, set()
