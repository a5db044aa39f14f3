"""Integer codes and the HTP's requantization, shared by the lowered ops (see model.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import ChannelEncodings, Encoding, ParamEncoding, quantize, round_half_away
from ...graph.large import initializer_array
from ...graph.targets import QuantTargets

INT8_LOW, INT8_HIGH = -128, 127


SUFFIX = "__onnxsnpe_htp"
Lowered = tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]]
"""A lowered op: its nodes, their initializers, and the params it consumed (quantized in the nodes)."""


@dataclass(frozen=True)
class Context:
    """What a lowering reads besides its node: the encodings, the graph's constants and tensor shapes,
    the graph itself, its opset and the HTP architecture computed as (68 or 73: v73 and later
    requantize 8-bit convolutions differently, linear.v73_conv_constants)."""

    targets: QuantTargets
    activations: dict[str, Encoding]
    params: dict[str, ParamEncoding]
    constants: dict[str, onnx.TensorProto]
    shapes: dict[str, list[int | None]]
    graph: onnx.GraphProto
    opset: int
    arch: int = 68
    converted: dict[str, Encoding] = field(default_factory=dict)
    """The 8-bit encodings of the inputs the node reads converted to 16 bits (``activations`` holds
    their 16-bit grid: encode/conversions.py)."""

INVERSE_SCALE = "_inverse_scale"
"""The name ending of centered_codes' constant (code_passing.py finds its nodes by it)."""


def requant_constants(
    multiplier: np.ndarray, zero_point: int, precise: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HTP's requantization of real multipliers ``M``: the factor ``2^-k``, ``m`` and the added offset.

    The offset here is ``round(z / M)`` without a bias; requant_offset computes it as the HTP does.
    ``precise`` is the strided depthwise kernel's variant: no truncation, 15 significant bits, an exact
    tie rounded up (a 16-bit probe channel at 20460.5 units, tools/HTP.md finding 48).
    """
    multiplier = np.asarray(multiplier, dtype=np.float64)
    offset = round_half_away(zero_point / multiplier)
    if precise:
        exponent = 2.0 ** np.floor(np.log2(multiplier))
        return np.ones_like(multiplier), np.floor(multiplier / exponent * 2.0**14 + 0.5) / 2.0**14 * exponent, offset
    shift = np.maximum(0.0, np.floor(-np.log2(multiplier)) - 3)
    return 2.0**-shift, float16_ties_up(multiplier * 2.0**shift), offset


def float16_ties_up(value: np.ndarray) -> np.ndarray:
    """Positive ``value`` rounded to float16 (11 significant bits, subnormals below 2^-14, infinity past
    its largest), an exact tie upwards: the HTP's multiplier (a channel whose ``M 2^k`` lies halfway,
    EfficientNet-Lite0's block 12 depthwise channel 148 per channel, computes with the larger one;
    tools/HTP.md finding 39), where numpy's float16 rounds ties to even."""
    value = np.asarray(value, dtype=np.float64)
    with np.errstate(divide="ignore"):
        unit = 2.0 ** np.maximum(np.floor(np.log2(value)) - 10, -24)
    rounded = np.floor(value / unit + 0.5) * unit
    return np.where(rounded > float(np.finfo(np.float16).max), np.inf, rounded)


def requant_offset(
    in_scale: float,
    w_scale: float | np.ndarray,
    out_scale: float,
    zero_point: int,
    steps: np.ndarray,
    bias_codes: np.ndarray | None = None,
    bias_scale: float | np.ndarray = 1.0,
) -> np.ndarray:
    """The integer the HTP adds to each channel's accumulator: bias and output zero point in one.

    ``round(b * s_b / (s_in * s_w * step) + z / M)``, rounded half away from zero once for the sum (a
    re-expressed channel's bias is a fraction of its step; the half added in float32:
    float32_round_half_away), every operation in float32:
    ``base = s_in * s_w``, bias term ``(b * s_b) / (base * step)``, zero-point term
    ``z / (base / s_out) / step``. Bit-exact on 7,680 probed channels with int8 weights; on
    re-expressed channels 21 of 3,838 probes with biases of 10^5 to 10^6 steps differ by one
    (sums within float32 noise of a tie).

    Per-channel weight scales enter relative to the largest one, ``s_w = s_max * r`` with
    ``r = s_w / s_max`` in float32 (tools/HTP.md, "Per-channel weights"): ``base = s_in * s_max``,
    zero-point term ``z / ((base / s_out) * r) / step``, and the bias as gridded_bias gives it,
    added in float32 (finding 25). With one scale ``r`` is 1 and this is the per-tensor rule above.
    """
    f32 = np.float32
    steps = np.asarray(steps, dtype=f32)
    w_scale = np.asarray(w_scale, dtype=f32)
    largest = w_scale.max()
    ratio = w_scale / largest
    base = f32(in_scale) * largest
    total = zero_point_share(in_scale, w_scale, out_scale, zero_point) / steps
    if bias_codes is not None and gridded(in_scale, w_scale, steps, bias_scale):
        total = (total + gridded_bias(bias_codes, in_scale, w_scale)).astype(f32)
    elif bias_codes is not None:
        total = total + (np.asarray(bias_codes, dtype=f32) * f32(bias_scale)) / (base * steps) / ratio
    return float32_round_half_away(total)


def float32_round_half_away(value: np.ndarray) -> np.ndarray:
    """``value`` (float32) rounded half away from zero as the HTP rounds its folded offset: the half added
    in float32, ``sign(v) floor(float32(|v| + 1/2))``. From 2^23 float32 has no half, so an odd integer
    rounds to the even one above it (16-bit activations, where the offset passes 2^23: 17 channels of
    EfficientNet-Lite0, PP-OCRv4 det, rec and cls at 255 modulo 256, each a block of 2^8 off before;
    tools/HTP.md finding 51). Below 2^23 it is round_half_away."""
    value = np.asarray(value, dtype=np.float32)
    return np.sign(value).astype(np.float64) * np.floor((np.abs(value) + np.float32(0.5)).astype(np.float32)
                                                        .astype(np.float64))


def zero_point_share(in_scale: float, w_scale: float | np.ndarray, out_scale: float, zero_point: int) -> np.ndarray:
    """The output zero point in accumulator steps, ``z / M`` per channel in float32 as the HTP takes it:
    ``z / ((base / s_out) r)`` with ``base = s_in s_max`` and ``r = s_w / s_max`` (requant_offset)."""
    f32 = np.float32
    w_scale = np.asarray(w_scale, dtype=f32)
    largest = w_scale.max()
    return (f32(zero_point) / ((f32(f32(in_scale) * largest) / f32(out_scale)) * (w_scale / largest))).astype(f32)


def precise_offset(in_scale: float, w_scale: np.ndarray, out_scale: float, zero_point: int, per_channel: bool,
                   bias_codes: np.ndarray | None = None, bias_scale: float | np.ndarray = 1.0) -> np.ndarray:
    """The integer offset of the precise doubly strided depthwise kernel (16-bit activations), bias and
    output zero point, per output channel.

    A bias whose scale is not ``s_in s_w`` is first re-coded at it (``f32(code s_b)`` over
    ``f32(s_in s_w)`` in float64, rounded half away). With per-channel weights the bias is then taken
    as finding 25 takes it, ``a = f32(code base)`` with ``base = f32(s_in s_max)``, on the tensor's
    grid ``S = f32(max |a| 2^-28)``; per tensor it is its own value ``a = f32(code s_b)``. Either is brought back
    by multiplying by the float32 reciprocal ``f32(1 / base)``, where the other kernels divide by
    ``base``, and rounded to the nearest integer.
    The output zero point's share (requant_offset's float32 ``z / ((base / s_out) r)``) is rounded
    apart and added: decoded per tensor, per channel the best of the orders tried (tools/HTP.md
    finding 48).
    """
    f32 = np.float32
    w_scale = np.asarray(w_scale, dtype=f32)
    base = f32(f32(in_scale) * w_scale.max())
    total = round_half_away(zero_point_share(in_scale, w_scale, out_scale, zero_point).astype(np.float64))
    if bias_codes is None:
        return total
    codes = np.asarray(bias_codes, dtype=np.float64)
    step = (f32(in_scale) * w_scale).astype(f32)
    scale = np.asarray(bias_scale, dtype=f32)
    if not np.allclose(bias_scale, step, rtol=1e-5):  # re-coded at s_in s_w first
        real = (codes.astype(f32) * scale).astype(f32)
        codes, scale = round_half_away(real.astype(np.float64) / step.astype(np.float64)), step
    if per_channel and w_scale.size > 1:  # finding 25: the codes at base, on the tensor's grid
        values = bias_on_grid(codes, base)
    else:  # per tensor: the bias's own value, code s_b (no grid)
        values = (codes.astype(f32) * scale).astype(f32)
    return total + np.rint((values * (f32(1) / base)).astype(f32).astype(np.float64))


def gridded(in_scale: float, w_scale: float | np.ndarray, steps: np.ndarray, bias_scale: float | np.ndarray) -> bool:
    """Whether the HTP puts a Conv's bias on one tensor-wide grid (gridded_bias): per-channel weights
    (scales that differ: the 16-bit lowerings pass a per-tensor scale once per channel), none of them
    re-expressed, and a bias in int32 codes at ``s_in s_w`` (to a few float32 steps, as the encode
    stage makes it; not a float bias passed as values)."""
    return (np.size(w_scale) > 1 and np.ptp(w_scale) > 0 and bool(np.all(np.asarray(steps) == 1))
            and np.allclose(bias_scale, np.float32(in_scale) * np.asarray(w_scale, dtype=np.float32), rtol=1e-5))


def gridded_bias(bias_codes: np.ndarray, in_scale: float, w_scale: np.ndarray) -> np.ndarray:
    """A per-channel Conv's bias in each channel's accumulator steps as the HTP takes it (v68 and v73,
    8- and 16-bit activations; tools/HTP.md finding 25), float32 and not yet rounded.

    The HTP re-codes the whole int32 bias tensor on one grid: each code taken at the largest
    channel's step ``base = s_in s_max`` (``a = code base``, whatever the channel's own scale),
    rounded half to even to a multiple of ``S = max |a| 2^-28``, and divided back by ``base``, every
    operation in float32. A channel's bias thus depends on the largest bias of the tensor, and a code
    whose float32 round trip lands just under an integer loses a step where it is truncated (v73).
    """
    f32 = np.float32
    base = f32(f32(in_scale) * np.asarray(w_scale, dtype=f32).max())
    return (bias_on_grid(bias_codes, base) / base).astype(f32)


def bias_on_grid(bias_codes: np.ndarray, base: np.float32) -> np.ndarray:
    """Bias codes taken at ``base`` and rounded half to even to a multiple of ``max |a| 2^-28``, in float32
    (gridded_bias's tensor-wide grid; all zeros stay zeros)."""
    f32 = np.float32
    values = (np.asarray(bias_codes).astype(f32) * base).astype(f32)
    largest = np.abs(values).max(initial=0)
    if largest == 0:
        return values
    grid = f32(largest * f32(2.0**-28))
    return (np.rint((values * (f32(1) / grid)).astype(f32)).astype(f32) * grid).astype(f32)


def constant_bias(name: str, context: Context,
                  repeat: int = 1) -> tuple[np.ndarray | None, float | np.ndarray, set[str]]:
    """A Conv/Gemm's constant bias ``name`` as the lowerings take it: its int32 codes and their
    scale(s) when it has an encoding (then consumed: the returned set), else its values with scale 1;
    each repeated ``repeat`` times (a ConvTranspose's bias for each kernel position). (None, 1.0,
    set()) without a constant bias."""
    if name not in context.constants:
        return None, 1.0, set()
    values = initializer_array(context.constants[name]).astype(np.float64).reshape(-1)
    enc = context.params.get(name)
    scale: float | np.ndarray = 1.0
    if enc is not None:
        per_channel = isinstance(enc, ChannelEncodings)
        values = quantize(values, enc) + (enc.offsets() if per_channel else enc.offset)
        scale = enc.scales() if per_channel else enc.scale
    return np.repeat(values, repeat), np.repeat(scale, repeat) if np.ndim(scale) else scale, \
        {name} if enc is not None else set()


def dequantizing_mul(chain: list[onnx.NodeProto], output: str) -> onnx.NodeProto | None:
    """The last node of a lowered ``chain`` when it is the Mul that dequantizes the op's codes into
    ``output`` (integer_op, with_output_codes end so), else None."""
    last = chain[-1]
    return last if last.op_type == "Mul" and list(last.output) == [output] else None


def integer_op(
    p: str,
    inputs: list[tuple[str, Encoding, str]],
    op: onnx.NodeProto,
    constants: tuple[np.ndarray, np.ndarray, np.ndarray],
    tail: tuple[int, ...],
    y_enc: Encoding,
    output: str,
    rounding: np.ndarray | None = None,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes turning ``inputs`` into codes, running ``op`` on them and requantizing as the HTP does.

    The code is ``floor(t m + 1/2) - z_out`` with ``t`` the truncated accumulator; ``rounding``, per
    channel, replaces ``1/2 - z_out`` where the output zero point is not in the offset (v73's Conv)."""
    factor, offset = (np.asarray(v, dtype=np.float32).reshape((-1, *tail)) for v in (constants[0], constants[2]))
    mantissa = np.asarray(constants[1], dtype=np.float64).reshape((-1, *tail))
    inits = [numpy_helper.from_array(offset, p + "offset")]
    make = helper.make_node
    chain = []
    for tensor, enc, codes in inputs:
        nodes, code_inits = centered_codes(tensor, enc, codes)
        chain += nodes
        inits += code_inits
    chain += [op, make("Add", [p + "acc", p + "offset"], [p + "shifted"])]
    # The Floor stays even without low bits to drop (factor 1): onnxruntime would fold a Mul right
    # after the Conv (and its Add) into the Conv's weights, rounding them.
    if np.all(factor == 1):
        chain.append(make("Floor", [p + "shifted"], [p + "truncated"]))
    else:
        inits.append(numpy_helper.from_array(factor, p + "factor"))
        chain += [make("Mul", [p + "shifted", p + "factor"], [p + "scaled"]),
                  make("Floor", [p + "scaled"], [p + "truncated"])]
    if rounding is not None or not exact_in_float32(mantissa):
        half = np.array(0.5 + y_enc.offset) if rounding is None else np.asarray(rounding, np.float64).reshape(
            (-1, *tail))
        inits += [numpy_helper.from_array(mantissa, p + "mantissa"), numpy_helper.from_array(half, p + "half")]
        chain += [
            make("Cast", [p + "truncated"], [p + "truncated64"], to=onnx.TensorProto.DOUBLE),
            make("Mul", [p + "truncated64", p + "mantissa"], [p + "real"]),  # exact in float64, not float32
            make("Add", [p + "real", p + "half"], [p + "real_half"]),  # exact where the code is in range
        ]
        chain, inits, _ = with_output_codes(chain, inits, p, y_enc, p + "real_half", output, centered=True)
        return chain, inits
    zero_point = -y_enc.offset
    inits += [
        numpy_helper.from_array(mantissa.astype(np.float32), p + "mantissa"),
        numpy_helper.from_array(np.array(0.5 - zero_point, dtype=np.float32), p + "half"),
        numpy_helper.from_array(np.array(-zero_point, dtype=np.float32), p + "low"),
        numpy_helper.from_array(np.array(y_enc.levels - zero_point, dtype=np.float32), p + "high"),
        numpy_helper.from_array(np.array(y_enc.scale, dtype=np.float32), p + "out_scale"),
    ]
    chain += [  # floor(t m + 1/2) - z in one floor, clamped to the centered code range
        make("Mul", [p + "truncated", p + "mantissa"], [p + "real"]),
        make("Add", [p + "real", p + "half"], [p + "real_half"]),
        make("Floor", [p + "real_half"], [p + "rounded"]),
        make("Clip", [p + "rounded", p + "low", p + "high"], [p + "code_centered"]),
        make("Mul", [p + "code_centered", p + "out_scale"], [output]),
    ]
    return chain, inits


def exact_in_float32(mantissa: np.ndarray) -> bool:
    """Whether ``floor(t * m + 1/2 - z)`` computed in float32 gives the clamped 8-bit code exactly.

    With ``m`` of 11 significant bits (a float16) and at least 1/16, an in-range code needs
    ``|t| < 256 / m <= 4096``: ``t * m`` has at most 23 significant bits and, with ``1/2 - z``
    (``z`` <= 255) added, stays an integer multiple of m's last bit below 2^24 of them, so every step
    is exact. Out of range, float32's monotone rounding keeps the value beyond the clamp. The
    15-bit multipliers (strided depthwise) fail this and run in float64.
    """
    m = np.asarray(mantissa, dtype=np.float64)
    return bool(np.all(m.astype(np.float16).astype(np.float64) == m) and m.min() >= 1 / 16 and m.max() < 2.0**10)


def with_output_codes(
    chain: list[onnx.NodeProto], inits: list[onnx.TensorProto], p: str, y_enc: Encoding, shifted: str, output: str,
    centered: bool = False,
) -> Lowered:
    """Append the requantized output to ``chain``: ``output = (clamp(floor(shifted)) - z_out) * s_out``.

    ``shifted`` is the float64 output code plus one half, so the floor rounds ties up as the HTP
    does; the code is clamped to the encoding's range and dequantized in float32. With ``centered``
    the caller has subtracted ``z_out`` already (where that is exact: an integer off an exact sum),
    and the clamp moves by it instead, one pass fewer. Returns the lowering (nodes, initializers, no
    params consumed).
    """
    make = helper.make_node
    zero_point = -y_enc.offset
    low, high = (-zero_point, y_enc.levels - zero_point) if centered else (0, y_enc.levels)
    inits = [
        *inits,
        numpy_helper.from_array(np.array(low, dtype=np.float32), p + "low"),
        numpy_helper.from_array(np.array(high, dtype=np.float32), p + "high"),
        numpy_helper.from_array(np.array(y_enc.scale, dtype=np.float32), p + "out_scale"),
    ]
    code = p + ("code_centered" if centered else "code")
    chain = [
        *chain,
        make("Floor", [shifted], [p + "rounded64"]),
        make("Cast", [p + "rounded64"], [p + "rounded"], to=onnx.TensorProto.FLOAT),
        make("Clip", [p + "rounded", p + "low", p + "high"], [code]),
    ]
    if not centered:
        inits.append(numpy_helper.from_array(np.array(zero_point, dtype=np.float32), p + "zero_point"))
        chain.append(make("Sub", [code, p + "zero_point"], [p + "code_centered"]))
    chain.append(make("Mul", [p + "code_centered", p + "out_scale"], [output]))
    return chain, inits, set()


def int8(*encodings: Encoding | None) -> bool:
    """Whether every encoding is there and 8-bit, as most of the HTP arithmetic modelled here needs
    (16-bit: wide.py, elementwise.add16_constants, GlobalAveragePool)."""
    return of_bitwidth(8, *encodings)


def of_bitwidth(bitwidth: int, *encodings: Encoding | None) -> bool:
    """Whether every encoding is there and has ``bitwidth`` bits."""
    return all(enc is not None and enc.bitwidth == bitwidth for enc in encodings)


def binary_operands(
    node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding], params: dict[str, ParamEncoding],
    bitwidth: int = 8,
) -> tuple[list[Encoding], Encoding] | None:
    """The encodings of a two-input node's operands (activations or params) and of its output,
    if all have ``bitwidth`` bits."""
    if len(node.input) != 2:
        return None
    encs = [activations.get(name) or params.get(name) for name in node.input]
    y_enc = output_encoding(node, targets, activations)
    return (encs, y_enc) if of_bitwidth(bitwidth, *encs, y_enc) else None


def is_scalar(name: str, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``name`` is a one-element constant."""
    return name in constants and int(np.prod(constants[name].dims)) == 1


def output_encoding(node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding]) -> Encoding | None:
    """The encoding a node's output is requantized to: its own, or that of the Relu/Clip squashed into it."""
    return activations.get(targets.squashed.get(node.output[0], node.output[0]))


def centered_codes(tensor: str, enc: Encoding, codes: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``codes = round(tensor / scale)``: an on-grid tensor's integer codes minus its zero point.

    The tensor holds float32 ``c * scale`` for integer codes ``|c| < 2^16``; times float32
    ``1 / scale`` it is within a few float32 steps of ``c``, so rounding gives ``c`` exactly, and
    onnxruntime's Mul is cheaper than its Div.
    """
    scale = numpy_helper.from_array(np.array(1 / np.float32(enc.scale), dtype=np.float32), codes + INVERSE_SCALE)
    nodes = [
        helper.make_node("Mul", [tensor, scale.name], [codes + "_real"]),
        helper.make_node("Round", [codes + "_real"], [codes]),
    ]
    return nodes, [scale]


AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18}
"""The opset from which each reduction takes its axes as an input instead of an attribute."""


def reduction(op_type: str, data: str, output: str, axes: list[int], keepdims: bool,
              opset: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``op_type`` node over ``axes`` in the form ``opset`` takes, and the initializer of its axes."""
    if opset >= AXES_AS_INPUT[op_type]:
        axes_init = numpy_helper.from_array(np.array(axes, dtype=np.int64), output + "_axes")
        return helper.make_node(op_type, [data, axes_init.name], [output], keepdims=int(keepdims)), [axes_init]
    return helper.make_node(op_type, [data], [output], axes=axes, keepdims=int(keepdims)), []
