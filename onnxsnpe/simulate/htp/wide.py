"""Conv and Gemm with 16-bit activations and 8-bit weights (A16W8) as the HTP emulator computes them.

Probed on single ops (tools/HTP.md, "16-bit activations"; tools/probe_a16w8.py): with ``u`` the
uncentered 16-bit input codes (the zero point ``z`` included, padding at ``z``), int8 weights ``w``
(re-expressed per channel as at 8 bits, linear.int8_weights) and ``M = s_in * s_w / s_out``, the
output code is

    clamp(floor(t * m + 1/2)),  t = floor(sum(u w) / 2^8) + floor(C / 2^8) - round(z sum(w) / 2^8),
    m = float16(M 2^8),  C = round(B + z_out / M),

``M`` in float32 as at 8 bits (linear.channel_multipliers; finding 52), its float16 ties up,
``B`` the bias in accumulator steps, ``C`` rounding half away from zero: the input sum loses its
low 8 bits, the bias and the output zero point are folded into one integer as at 8 bits and
truncated the same way, and the input zero point's share is rounded apart, exact ties up (tools/HTP.md
finding 49: half away from zero missed negative ties on v68). ``C`` is computed in float32 in the
8-bit rule's order (codes.requant_offset), which at 16 bits (``z_out / M`` up to 2^27, float32 steps
of 1 to 8) decides ``floor(C / 2^8)`` in the channels whose ``C`` lies a step or two below a
multiple of 2^8: on the four models' A16W8 Convs it fits the emulator where float64 does not, and it
brought four probes to bit for bit (tools/HTP.md "The A16W8 offset in float32"); its rounding adds the
half in float32, which past 2^23 takes an odd ``C`` to the even integer above (finding 51: every
channel of the four models then fits, 38,534). A bias beyond int32
at the step ``s_in * s_w`` saturates there, whatever wider scale its encoding was given. A depthwise
Conv strided in both directions keeps its weight codes as they are, drops no bits and has a 15-bit
multiplier, as at 8 bits; with per-channel weights its accumulator (bias and output zero point
included) is held shifted left by ``sh_c = e_c - min(e)`` over its group of 32 output channels
(``e_c = floor(log2 M_c)``) in a 32-bit register that wraps (register_shifts; tools/HTP.md finding
33). Bit for bit on 14 of 15 Conv probes, 8 of 9 depthwise and 9 of 9 doubly strided depthwise,
per-tensor and per-channel weights, M from 2^-13 to 2^-6; not decoded: a channel whose weights were
re-expressed (two probes, up to 25 steps off there). Exact float rounding, which
this replaces, is off by up to hundreds of steps (the float16 multiplier's error times 16-bit codes).

``sum(u w)`` reaches 2^29, beyond float32's exact integers, and onnxruntime has no float64 Conv,
so the codes are split: in two bytes where the filters are small enough (_byte_chain, the sums
combined in float32), otherwise in digits of ``d`` bits, small enough that each digit's Conv stays
exact in float32 (``2^d * |w| * fan-in <= 2^24``), combined in float64 (digit_chain).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import ChannelEncodings, Encoding, fake_quantize, round_half_away
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import (
    SUFFIX,
    Context,
    Lowered,
    centered_codes,
    constant_bias,
    float16_ties_up,
    of_bitwidth,
    output_encoding,
    precise_offset,
    requant_constants,
    requant_offset,
    with_output_codes,
)
from .linear import as_block_conv, channel_multipliers, int8_weights, transpose_blocks, v73_bias
from .pad_bytes import padding_correction

SHIFT = 8
"""Bits the HTP drops from the A16W8 accumulator."""
INT32_LOW, INT32_HIGH = -(2.0**31), 2.0**31 - 1
Requant = np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]
"""A 16-bit Conv's requantization: v68's multiplier per channel, or v73_wide_requant's (d, m, r)."""


def lower_a16w8_conv(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The A16W8 Conv, Gemm (``x W^T + b``) or MatMul by a constant 2-D weight (as the Gemm ``x (W^T)^T``:
    tools/HTP.md finding 42) in the arithmetic of the module docstring, or None where it does not
    apply. A ConvTranspose whose kernel equals its stride runs as at 8 bits: a 1x1 Conv with ``C_out k
    k`` output channels in this arithmetic, then depth-to-space (tools/HTP.md finding 15)."""
    if node.op_type not in ("Conv", "Gemm", "ConvTranspose", "MatMul") or len(node.input) < 2 \
            or node.input[1] not in context.constants:
        return None
    gemm = (node_attributes(node).get(key, default) for key, default in
            (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)))
    if node.op_type == "Gemm" and tuple(gemm) != (1.0, 1.0, 0, 1):
        return None  # Gemm lowered as y = x W^T + b only
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    w_enc = context.params.get(node.input[1])
    weight = initializer_array(context.constants[node.input[1]])
    blocks = transpose_blocks(node, weight.shape)
    matmul = node.op_type == "MatMul"
    if (not of_bitwidth(16, x_enc, y_enc) or not of_bitwidth(8, w_enc)
            or weight.ndim != (2 if node.op_type in ("Gemm", "MatMul") else 4)
            or (node.op_type == "ConvTranspose" and not blocks)):
        return None
    # the output channels: a ConvTranspose's or MatMul's axis 1, a Conv's or transposed Gemm's 0
    axis = 1 if blocks or matmul else 0
    per_channel = isinstance(w_enc, ChannelEncodings)
    if per_channel and w_enc.axis != axis:
        return None
    w_scale = np.float32(w_enc.scales()) if per_channel else np.full(weight.shape[axis], np.float32(w_enc.scale))
    along = tuple(-1 if k == axis else 1 for k in range(weight.ndim))
    codes = np.round(fake_quantize(weight, w_enc).astype(np.float64) / w_scale.astype(np.float64).reshape(along))
    if matmul:  # output channels first, as a transposed Gemm's (_stored puts them back for the MatMul)
        codes = codes.T
    original = node
    if blocks:  # the 1x1 Conv, then depth-to-space
        codes = as_block_conv(codes)
        w_scale = np.repeat(w_scale, blocks**2)
        output = node.output[0]
        node = helper.make_node("Conv", list(node.input[:2]), [f"{output}{SUFFIX}/blocks"], kernel_shape=[1, 1],
                                name=f"{output}{SUFFIX}/Conv")
    attrs = node_attributes(node)
    strided_depthwise = (attrs.get("group", 1) > 1 and weight.shape[1] == 1
                         and all(stride > 1 for stride in attrs.get("strides", [1]))
                         and _exponent_spread(x_enc, y_enc, w_scale) <= PRECISE_EXPONENT_SPREAD)
    if strided_depthwise:  # as at 8 bits: the codes as they are, no truncation, a 15-bit multiplier
        steps, shift = np.ones(codes.shape[0]), 0
    else:  # channels that do not fit int8 re-expressed, as at 8 bits
        codes, steps = int8_weights(codes, 0)
        shift = SHIFT
    step = float(np.float32(x_enc.scale)) * w_scale.astype(np.float64) * steps  # an accumulator step
    multiplier = step / float(np.float32(y_enc.scale))
    if strided_depthwise:
        _, mantissa, _ = requant_constants(multiplier, 0, precise=True)
    else:  # M in float32 as at 8 bits (finding 46), which a float16 tie decides (finding 52)
        mantissa = float16_ties_up(channel_multipliers(x_enc.scale, w_scale, y_enc.scale) * steps * 2.0**shift)
    if not np.all(np.isfinite(mantissa)) or mantissa.min() <= 0:
        return None
    register = register_shifts(multiplier) if strided_depthwise else None
    # a ConvTranspose's bias for each kernel position
    bias_codes, bias_scale, bias_consumed = constant_bias(original.input[2] if len(original.input) > 2 else "",
                                                           context, max(blocks, 1) ** 2)
    consumed = {node.input[1]} | bias_consumed
    bias = np.zeros(codes.shape[0]) if bias_codes is None else bias_codes * np.asarray(bias_scale,
                                                                                         dtype=np.float64) / step
    zero_point, out_zero_point = -x_enc.offset, -y_enc.offset
    zero_sum = zero_point * codes.sum(axis=tuple(range(1, codes.ndim)))
    requant: Requant = mantissa
    if context.arch >= 73 and not strided_depthwise:  # findings 20, 27: the bias apart, truncated
        b73 = np.clip(v73_bias(x_enc.scale, w_scale, steps, bias_codes, bias_scale), INT32_LOW, INT32_HIGH)
        constant = np.trunc(b73 / 2.0**SHIFT) - np.floor(zero_sum / 2.0**SHIFT + 0.5)
        requant = v73_wide_requant(x_enc.scale, w_scale, y_enc.scale, steps)
    else:
        # bias and output zero point folded into one integer in float32 as at 8 bits (module
        # docstring); an int32 bias code of step s_in * s_w at most, whatever wider scale the bias
        # encoding has: the HTP saturates there (measured: a channel of near-zero weights with a bias
        # of 7), those channels in float64 as before
        if strided_depthwise:  # the precise kernel's own offset (codes.precise_offset)
            folded = precise_offset(x_enc.scale, w_scale, y_enc.scale, out_zero_point, per_channel, bias_codes,
                                    bias_scale)
        else:
            folded = requant_offset(x_enc.scale, w_scale, y_enc.scale, out_zero_point, steps, bias_codes,
                                    bias_scale)
        saturated = np.abs(bias * steps) > INT32_HIGH
        if saturated.any():
            clipped = np.clip(bias * steps, INT32_LOW, INT32_HIGH) / steps
            folded = np.where(saturated, round_half_away(clipped + out_zero_point / multiplier), folded)
        constant = np.floor(folded / 2.0**shift) - np.floor(zero_sum / 2.0**shift + 0.5)  # ties up (finding 49)
    largest_sum = float(np.abs(codes).reshape(codes.shape[0], -1).sum(axis=1).max())  # of |w| over a filter
    if shift == SHIFT and largest_sum <= BYTE_SPLIT_LIMIT:
        chain, inits = _byte_chain(node, x_enc, y_enc, codes, zero_sum, constant, requant)
    else:
        bits = digit_bits(int(np.prod(codes.shape[1:])), float(np.abs(codes).max()))
        if bits is None:
            return None
        correction = padding_correction(node, codes, zero_point, context.shapes.get(node.input[0])) \
            if strided_depthwise else None
        chain, inits = digit_chain(node, x_enc, y_enc, codes, bits, zero_sum, constant, requant, shift, register,
                                   correction)
    if blocks:  # each block of k x k output pixels comes from one input pixel
        chain.append(helper.make_node("DepthToSpace", [node.output[0]], [original.output[0]], blocksize=blocks,
                                      mode="CRD"))
    return chain, inits, consumed


V73_MULTIPLIER_BITS = 22
"""Significant bits of v73's 16-bit requantization multiplier."""


def v73_wide_requant(in_scale: float, w_scale: np.ndarray, out_scale: float, steps: np.ndarray, point: int = 15,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HTP v73's 16-bit requantization per output channel (tools/HTP.md finding 20): the factor ``d``
    and multiplier ``m`` with ``v = floor(t d)`` and ``code - z_out = floor(v m + r)``, and ``r``.

    With ``F = floor(-log2 M)`` and ``q = floor(M32 2^(F + 22) + 1/2)`` (22 bits of the float32
    multiplier ``M32``, each channel's weight scale taken relative to the largest one), the HTP
    computes ``floor((floor(t 2^(P - F)) + 1/2) q / 2^29 + z_out + 1/2)``, ``P`` = ``point``: 15
    for A16W8, 23 for A16W16. For ``F <= P`` the shift is exact and folds into ``m``; beyond,
    ``d = 2^(P - F)`` drops low bits first.
    """
    f32 = np.float32
    scales = np.asarray(w_scale, dtype=f32)
    top = scales.max()
    m32 = (f32(f32(f32(in_scale) * top) / f32(out_scale)) * (scales / top).astype(f32)).astype(f32)
    m32 = (m32 * steps.astype(f32)).astype(f32).astype(np.float64)
    exact = float(f32(in_scale)) * scales.astype(np.float64) * steps / float(f32(out_scale))
    exponent = np.floor(-np.log2(exact))
    q = np.floor(m32 * 2.0 ** (exponent + V73_MULTIPLIER_BITS) + 0.5)
    down = np.where(exponent > point, 2.0 ** (point - exponent), 1.0)
    mantissa = q * 2.0**-29 * np.where(exponent > point, 1.0, 2.0 ** (point - exponent))
    return down, mantissa, q * 2.0**-30 + 0.5


REGISTER_GROUP = 32
"""Output channels whose accumulators share one exponent reference in the precise kernel's register."""


def register_shifts(multiplier: np.ndarray) -> np.ndarray:
    """How far left the precise doubly strided depthwise kernel holds each channel's accumulator in its
    32-bit register: ``floor(log2 M_c)`` less the least of it over the channel's group of REGISTER_GROUP
    output channels (channels 32 g to 32 g + 31). Decoded by wrapped values of EfficientNet-Lite0's
    block 3 under five channel orders and generated probes (tools/HTP.md finding 33)."""
    exponent = np.floor(np.log2(multiplier))
    shifts = np.empty_like(exponent)
    for start in range(0, exponent.size, REGISTER_GROUP):
        group = slice(start, start + REGISTER_GROUP)
        shifts[group] = exponent[group] - exponent[group].min()
    return shifts


PRECISE_EXPONENT_SPREAD = 8
"""The widest spread of the channels' multiplier exponents ``floor(log2 M_c)`` for which the HTP runs a
doubly strided depthwise Conv with its precise kernel; beyond it, the truncating one (probes, tools/HTP.md
"The doubly strided depthwise kernel at 16 bits")."""


def _exponent_spread(x_enc: Encoding, y_enc: Encoding, w_scale: np.ndarray) -> float:
    """max - min over channels of ``floor(log2 M_c)``, ``M_c = s_in s_w[c] / s_out`` (0 per tensor)."""
    multiplier = float(np.float32(x_enc.scale)) * w_scale.astype(np.float64) / float(np.float32(y_enc.scale))
    exponents = np.floor(np.log2(multiplier[multiplier > 0])) if np.any(multiplier > 0) else np.zeros(1)
    return float(exponents.max() - exponents.min())


def digit_bits(fan_in: int, largest_weight: float) -> int | None:
    """Bits per digit of the centered input codes so that each digit's Conv sum is an exact float32
    integer: ``2^d * |w| * fan_in <= 2^24`` (None for a fan-in too large even for one bit)."""
    bits = int(np.floor(np.log2(2.0**24 / (max(largest_weight, 1.0) * fan_in))))
    return bits if bits >= 1 else None


BYTE_SPLIT_LIMIT = 2.0**15
"""The largest sum of |w| over a filter for which _byte_chain's float32 sums are exact integers:
a byte times it stays below 2^23, leaving room for the constants."""


def _byte_chain(node: onnx.NodeProto, x_enc: Encoding, y_enc: Encoding, codes: np.ndarray, zero_sum: np.ndarray,
                constant: np.ndarray, requant: Requant) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes when the shift is 8 and the filters are small enough (BYTE_SPLIT_LIMIT): the centered
    codes split in bytes ``c = 2^8 hi + lo`` (``lo`` in [0, 2^8)) and the input zero point's share
    ``z sum(w) = 2^8 q + r``, so that ``floor(sum(u w) / 2^8) = conv(hi) + q + floor((conv(lo) + r) / 2^8)``
    with the Convs' sums and the carry exact float32 integers; the constants (``z_out / M`` passes
    2^24 when M is small) and the multiplication by ``m`` run in float64."""
    p = f"{node.output[0]}{SUFFIX}/"
    channel = _channel_shape(node, codes)
    whole, rest = np.divmod(zero_sum, 2.0**SHIFT)
    nodes, inits = centered_codes(node.input[0], x_enc, p + "x")
    inits += [
        numpy_helper.from_array(_stored(node, codes).astype(np.float32), p + "w"),
        numpy_helper.from_array(np.array(2.0**-SHIFT, dtype=np.float32), p + "down"),
        numpy_helper.from_array(np.array(2.0**SHIFT, dtype=np.float32), p + "up"),
        numpy_helper.from_array(rest.astype(np.float32).reshape(channel), p + "rest"),
    ]
    make = helper.make_node
    nodes += [make("Mul", [p + "x", p + "down"], [p + "x_down"]),
              make("Floor", [p + "x_down"], [p + "byte_high"]),  # exact: a power-of-two scaling of an integer
              make("Mul", [p + "byte_high", p + "up"], [p + "byte_high_up"]),
              make("Sub", [p + "x", p + "byte_high_up"], [p + "byte_low"])]
    for part in ("byte_high", "byte_low"):
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[:], conv.output[:]
        conv.input.extend([p + part, p + "w"])
        conv.output.append(p + part + "_sum")
        conv.name = p + part + "_conv"
        nodes.append(conv)
    nodes += [make("Add", [p + "byte_low_sum", p + "rest"], [p + "byte_low_rest"]),
              make("Mul", [p + "byte_low_rest", p + "down"], [p + "byte_low_down"]),
              make("Floor", [p + "byte_low_down"], [p + "carry"]),
              make("Add", [p + "byte_high_sum", p + "carry"], [p + "truncated"]),
              make("Cast", [p + "truncated"], [p + "truncated64"], to=onnx.TensorProto.DOUBLE)]
    tail, tail_inits, centered = _requantized(p, p + "truncated64", whole + constant, requant, y_enc, channel)
    chain, inits, _ = with_output_codes(nodes + tail, inits + tail_inits, p, y_enc, p + "real_half",
                                        node.output[0], centered)
    return chain, inits


def digit_chain(node: onnx.NodeProto, x_enc: Encoding, y_enc: Encoding,
                codes: np.ndarray | list[tuple[np.ndarray, float]], digit_bits: int, zero_sum: np.ndarray,
                constant: np.ndarray, requant: Requant, shift: int, register: np.ndarray | None = None,
                correction: np.ndarray | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes: the codes split in digits, a Conv per digit (and per weight part: ``codes`` may be
    a list of (part, factor) whose weighted sum is the weights, each part small enough for
    ``digit_bits``), their sum, the truncation and the requantization, in float64 from the sums on;
    ``register``: the channels' register_shifts, where the accumulator wraps; ``correction``: an
    addition to the accumulator per output position (pad_bytes.padding_correction)."""
    p = f"{node.output[0]}{SUFFIX}/"
    parts = [(codes, 1.0)] if isinstance(codes, np.ndarray) else codes
    names = [p + "w"] if len(parts) == 1 else [f"{p}w{k}" for k in range(len(parts))]
    channel = _channel_shape(node, parts[0][0])
    nodes, inits = centered_codes(node.input[0], x_enc, p + "x")
    inits += [numpy_helper.from_array(_stored(node, part).astype(np.float32), name)
              for (part, _), name in zip(parts, names, strict=True)]
    inits += [
        numpy_helper.from_array(np.array(2.0**-digit_bits, dtype=np.float32), p + "digit_down"),
        numpy_helper.from_array(np.array(2.0**digit_bits, dtype=np.float32), p + "digit_up"),
        numpy_helper.from_array(zero_sum.reshape(channel) + (0 if correction is None else correction), p + "zero_sum"),
        numpy_helper.from_array(np.array(2.0**-shift), p + "shift"),
    ]
    make = helper.make_node
    rest, position, weighted = p + "x", 0, []
    while True:  # lowest digit first; the last one keeps the sign (|top| * |w| * fan-in stays within 2^24)
        digit = f"{p}digit{position}"
        top = 2.0 ** (16 - digit_bits * position) <= 2.0**digit_bits
        if top:
            nodes.append(make("Identity", [rest], [digit]))
        else:
            nodes += [make("Mul", [rest, p + "digit_down"], [digit + "_down"]),
                      make("Floor", [digit + "_down"], [digit + "_rest"]),  # exact: a power-of-two scaling
                      make("Mul", [digit + "_rest", p + "digit_up"], [digit + "_up"]),
                      make("Sub", [rest, digit + "_up"], [digit])]
        for (_, factor), name in zip(parts, names, strict=True):
            term = digit + name[len(p) + 1:]  # digit, or digit and weight part
            conv = onnx.NodeProto()
            conv.CopyFrom(node)
            del conv.input[:], conv.output[:]
            conv.input.extend([digit, name])
            conv.output.append(term + "_sum")
            conv.name = term + "_conv"
            weight = numpy_helper.from_array(np.array(2.0 ** (digit_bits * position) * factor), term + "_weight")
            inits.append(weight)
            nodes += [conv, make("Cast", [term + "_sum"], [term + "_sum64"], to=onnx.TensorProto.DOUBLE),
                      make("Mul", [term + "_sum64", weight.name], [term + "_weighted"])]
            weighted.append(term + "_weighted")
        if top:
            break
        rest, position = digit + "_rest", position + 1
    nodes += [make("Sum", [*weighted, p + "zero_sum"], [p + "input_sum"]),  # sum(u w), exact in float64
              make("Mul", [p + "input_sum", p + "shift"], [p + "input_shifted"]),
              make("Floor", [p + "input_shifted"], [p + "truncated"])]
    tail, tail_inits, centered = _requantized(p, p + "truncated", constant, requant, y_enc, channel, register)
    chain, inits, _ = with_output_codes(nodes + tail, inits + tail_inits, p, y_enc, p + "real_half",
                                        node.output[0], centered)
    return chain, inits


def _channel_shape(node: onnx.NodeProto, codes: np.ndarray) -> tuple[int, ...]:
    """The shape that puts per-output-channel constants on the node's output channel axis: axis 1 of
    a Conv's or Gemm's output, the last axis of a MatMul's (whatever its rank)."""
    return (-1,) if node.op_type == "MatMul" else (1, -1) + (1,) * (codes.ndim - 2)


def _stored(node: onnx.NodeProto, codes: np.ndarray) -> np.ndarray:
    """Weight codes (output channels first) as ``node`` reads them: a MatMul's as [in, out]."""
    return codes.T if node.op_type == "MatMul" else codes


def _requantized(p: str, truncated: str, constant: np.ndarray, requant: Requant, y_enc: Encoding,
                 channel: tuple[int, ...], register: np.ndarray | None = None,
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], bool]:
    """Nodes making ``p + "real_half"``, the float64 output code plus one half, from the truncated
    sum ``t`` (float64), the per-channel integer ``constant`` ``c`` and ``requant``: v68's multiplier
    ``m`` per channel or v73_wide_requant's triple; and
    whether it is centered (with_output_codes). ``(t + c) m + 1/2 - z_out`` is computed as
    ``t m + (c m + 1/2 - z_out)``, one pass fewer, where the folded constant is exact in float64
    (always, for the encodings seen): ``t m`` is exact (an int32 times 11 to 15 significant bits),
    so the sum is the exact value wherever the code is in range, and beyond it float64's monotone
    rounding keeps it beyond the clamp, as before. With v73's factor ``d``, multiplier ``m`` and
    rounding constant ``r`` the centered code is ``floor(floor((t + c) d) m + r)``
    instead: ``t + c`` below 2^31 times a 22-bit ``q`` stays exact in float64. With ``register``
    shifts (some above 0), ``t + c`` wraps first (_wrapped_register)."""
    make = helper.make_node
    if isinstance(requant, tuple):
        down, multiplier, rounding = requant
        inits = [numpy_helper.from_array(constant.reshape(channel), p + "constant"),
                 numpy_helper.from_array(multiplier.reshape(channel), p + "mantissa"),
                 numpy_helper.from_array(rounding.reshape(channel), p + "rounding")]
        nodes = [make("Add", [truncated, p + "constant"], [p + "t"])]
        shifted = p + "t"
        if np.any(down != 1):  # channels whose multiplier is below 2^-15 lose low bits first
            inits.append(numpy_helper.from_array(down.reshape(channel), p + "v73_down"))  # _byte_chain has "down"
            nodes += [make("Mul", [p + "t", p + "v73_down"], [p + "t_down"]), make("Floor", [p + "t_down"], [p + "v"])]
            shifted = p + "v"
        nodes += [make("Mul", [shifted, p + "mantissa"], [p + "real"]),
                  make("Add", [p + "real", p + "rounding"], [p + "real_half"])]
        return nodes, inits, True
    mantissa = requant
    wraps = register is not None and bool(np.any(register > 0))
    if not wraps and _exact_fold(constant, mantissa, 0.5 + y_enc.offset):
        folded = constant * mantissa + (0.5 + y_enc.offset)
        inits = [numpy_helper.from_array(mantissa.reshape(channel), p + "mantissa"),
                 numpy_helper.from_array(folded.reshape(channel), p + "constant")]
        return [make("Mul", [truncated, p + "mantissa"], [p + "real"]),
                make("Add", [p + "real", p + "constant"], [p + "real_half"])], inits, True
    inits = [numpy_helper.from_array(constant.reshape(channel), p + "constant"),  # float64: up to z_out / M
             numpy_helper.from_array(mantissa.reshape(channel), p + "mantissa"),
             numpy_helper.from_array(np.array(0.5), p + "half")]
    nodes = [make("Add", [truncated, p + "constant"], [p + "t"])]
    held = p + "t"
    if wraps:
        wrapped, wrapped_inits = _wrapped_register(p, held, register, channel)
        nodes, inits, held = nodes + wrapped, inits + wrapped_inits, p + "t_held"
    return [*nodes, make("Mul", [held, p + "mantissa"], [p + "real"]),
            make("Add", [p + "real", p + "half"], [p + "real_half"])], inits, False


def _wrapped_register(p: str, t: str, shifts: np.ndarray, channel: tuple[int, ...],
                      ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes making ``p + "t_held"``: the integer ``t`` (float64) as the HTP's 32-bit register holds
    it at ``t 2^sh``, wrapped into [-2^31, 2^31) and scaled back, ``r - 2^32 floor((r + 2^31) / 2^32)``
    with ``r = t 2^sh`` (exact while ``|t| 2^sh < 2^52``; the low ``sh`` bits stay 0)."""
    make = helper.make_node
    inits = [numpy_helper.from_array((2.0**shifts).reshape(channel), p + "register_up"),
             numpy_helper.from_array((2.0**-shifts).reshape(channel), p + "register_down"),
             numpy_helper.from_array(np.array(2.0**31), p + "register_half"),
             numpy_helper.from_array(np.array(2.0**-32), p + "register_down32"),
             numpy_helper.from_array(np.array(2.0**32), p + "register_span")]
    nodes = [make("Mul", [t, p + "register_up"], [p + "register"]),
             make("Add", [p + "register", p + "register_half"], [p + "register_lifted"]),
             make("Mul", [p + "register_lifted", p + "register_down32"], [p + "register_turns"]),
             make("Floor", [p + "register_turns"], [p + "register_wraps"]),
             make("Mul", [p + "register_wraps", p + "register_span"], [p + "register_wrapped_by"]),
             make("Sub", [p + "register", p + "register_wrapped_by"], [p + "register_wrapped"]),
             make("Mul", [p + "register_wrapped", p + "register_down"], [p + "t_held"])]
    return nodes, inits


def _exact_fold(constant: np.ndarray, mantissa: np.ndarray, half: float) -> bool:
    """Whether ``constant * mantissa + half`` is exact in float64 for every channel: integers below
    2^38 times multipliers of at most 15 significant bits are exact products, and Knuth's two-sum
    gives the addition's rounding error."""
    fraction, _ = np.frexp(mantissa)
    if not (np.all(constant == np.round(constant)) and np.abs(constant).max(initial=0) < 2.0**38
            and np.all(np.ldexp(fraction, 15) == np.round(np.ldexp(fraction, 15)))):
        return False
    product = constant * mantissa
    total = product + half
    added = total - product
    error = (product - (total - added)) + (half - added)
    return bool(np.all(error == 0))
