"""The simulator with the QNN HTP backend's integer arithmetic where it differs from exact math.

simulate.build_simulation_model computes every op in float and rounds its output exactly. The HTP
does not, and the differences (each under one output step) grow through a network. Measured with
onnxruntime-qnn's HTP emulator on single-op QDQ models (tools/HTP.md has the evidence), for 8-bit
activations and weights:

- Rounding: requantized outputs round ties up (``floor(v + 0.5)``), not away from zero; only the
  Quantize of a float graph input rounds half away from zero.
- Conv, ConvTranspose, Gemm, MatMul (constant or two activations): with ``M = s_in * s_w / s_out``
  and ``acc`` the integer accumulator of centered codes, the output code is
  ``clamp(floor(t * m + 0.5))``, ``t = floor((acc + C) / 2^k)``, ``k = max(0, floor(-log2 M) - 3)``,
  ``m = float16(M * 2^k)``: the accumulator loses its low bits (up to 1/8 of an output step, always
  downwards) and the multiplier has 11 significant bits. ``C = round(bias + z_out / M)`` folds the
  bias (in accumulator steps) and the output zero point into one integer, computed in float32 and
  rounded half away from zero once (requant_offset). Depthwise convolutions strided in both
  directions use ``k = 0`` and a 15-bit multiplier.
- Weights are multiplied as int8 with zero offset. An asymmetric uint8 weight encoding is
  re-expressed per output channel (Conv, Gemm, MatMul): a channel whose codes ``q + offset`` fit in
  [-128, 127] keeps them; otherwise it gets the step ``s = max(-min/128, max/127)`` rounded to
  1/2048 and codes ``round_half_away(code / s)``; its accumulator step is ``s_in * s_w * s``, so its
  bias in accumulator steps is ``bias_code / s``, a fraction that C rounds together with the zero
  point. Doubly strided depthwise convolutions and ConvTranspose keep the codes as they are, except
  a ConvTranspose whose kernel equals its stride: it runs as a 1x1 Conv with ``C_out * k * k``
  output channels and depth-to-space, re-expressed per (output channel, kernel position).
- GlobalAveragePool sums the centered codes and multiplies by ``s_in / (s_out * n)`` rounded to 15
  significant bits.
- Add and Sub run in fixed point on raw codes: see add_constants.
- Mul of two 8-bit tensors (activations or quantized constants) multiplies the centered codes and
  requantizes with a 15-bit multiplier and a constant that depends on the zero points: see
  mul_constants.
- BatchNormalization (left standalone by the graph preparation) is folded into a per-channel scale
  and bias that are quantized again to 8 bits, then applied to the codes: see batch_norm_constants.
- A Concat input that only the Concat reads is computed with the Concat's encoding (_concat_encodings).

Other ops keep the exact float computation. The integer ops accumulate codes in float32 (exact while
partial sums stay below 2^24); requantization products and the fixed-point Add run in float64, where
they are exact (float32 rounds ``t * m`` across a tie now and then).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .encoding import Encoding, fake_quantize, quantize, round_half_away
from .simulate import SUFFIX as FQ_SUFFIX
from .simulate import build_simulation_model
from .targets import QuantTargets

INT8_LOW, INT8_HIGH = -128, 127
STEP_RESOLUTION = 2048
"""HTP rounds the per-channel step of a re-expressed weight channel to this many parts of one."""
SUFFIX = "__onnxsnpe_htp"
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ROUNDING_NODES = ("abs", "whole", "frac", "down", "up", "rabs", "sign", "round")
"""Outputs of the round-half-away-from-zero nodes in simulate.fake_quant_nodes' chain."""


def int8_weights(codes: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """HTP's int8 weights for integer weight codes ``q + offset``: the int8 values and per-channel steps.

    ``axis`` is the output-channel axis. A channel whose codes fit int8 keeps them with step 1.
    """
    moved = np.moveaxis(np.asarray(codes, dtype=np.float64), axis, 0)
    values = moved.copy()
    steps = np.ones(moved.shape[0])
    for channel, row in enumerate(moved):
        low, high = float(row.min()), float(row.max())
        if low >= INT8_LOW and high <= INT8_HIGH:
            continue
        steps[channel] = np.round(STEP_RESOLUTION * max(low / INT8_LOW, high / INT8_HIGH)) / STEP_RESOLUTION
        values[channel] = round_half_away(row / steps[channel])
    return np.moveaxis(values, 0, axis), steps


def requant_constants(
    multiplier: np.ndarray, zero_point: int, precise: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HTP's requantization of real multipliers ``M``: the factor ``2^-k``, ``m`` and the added offset.

    The offset here is ``round(z / M)`` without a bias; requant_offset computes it as the HTP does.
    ``precise`` is the strided depthwise kernel's variant: no truncation, 15 significant bits.
    """
    multiplier = np.asarray(multiplier, dtype=np.float64)
    offset = round_half_away(zero_point / multiplier)
    if precise:
        exponent = 2.0 ** np.floor(np.log2(multiplier))
        return np.ones_like(multiplier), np.round(multiplier / exponent * 2.0**14) / 2.0**14 * exponent, offset
    shift = np.maximum(0.0, np.floor(-np.log2(multiplier)) - 3)
    mantissa = (multiplier * 2.0**shift).astype(np.float16).astype(np.float64)
    return 2.0**-shift, mantissa, offset


def requant_offset(
    in_scale: float,
    w_scale: float,
    out_scale: float,
    zero_point: int,
    steps: np.ndarray,
    bias_codes: np.ndarray | None = None,
    bias_scale: float = 1.0,
) -> np.ndarray:
    """The integer the HTP adds to each channel's accumulator: bias and output zero point in one.

    ``round(b * s_b / (s_in * s_w * step) + z / M)``, rounded half away from zero once for the sum
    (a re-expressed channel's bias is a fraction of its step), every operation in float32:
    ``base = s_in * s_w``, bias term ``(b * s_b) / (base * step)``, zero-point term
    ``z / (base / s_out) / step``. Bit-exact on 7,680 probed channels with int8 weights; on
    re-expressed channels 21 of 3,838 probes with biases of 10^5 to 10^6 steps differ by one
    (sums within float32 noise of a tie).
    """
    f32 = np.float32
    steps = np.asarray(steps, dtype=f32)
    base = f32(in_scale) * f32(w_scale)
    total = (f32(zero_point) / (base / f32(out_scale))) / steps
    if bias_codes is not None:
        total = total + (np.asarray(bias_codes, dtype=f32) * f32(bias_scale)) / (base * steps)
    return round_half_away(total.astype(np.float64))


def htp_simulation_model(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """simulate.build_simulation_model, with the ops the module docstring lists computed as the HTP does.

    Only ops whose inputs, weights and output have 8-bit encodings are lowered; everything else is
    simulated as before. Returns the model and the output map.
    """
    model = onnx.ModelProto()
    model.CopyFrom(deploy)
    graph = model.graph
    activations = _concat_encodings(graph, activations)
    constants = {init.name: init for init in graph.initializer}
    lowered_params: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    opset = next((o.version for o in deploy.opset_import if o.domain in ("", "ai.onnx")), 13)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info]}
    for node in graph.node:
        if node.op_type in ("Add", "Sub"):
            lowered = _lower_add(node, targets, activations, params, constants)
        elif node.op_type == "Mul":
            lowered = _lower_mul(node, targets, activations, params, constants)
        elif node.op_type == "GlobalAveragePool":
            lowered = _lower_global_average_pool(node, targets, activations, shapes, opset)
        elif node.op_type == "BatchNormalization":
            lowered = _lower_batch_norm(node, targets, activations, params, constants, shapes, graph)
        else:
            lowered = _lower_linear(node, targets, activations, params, constants)
        if lowered is None:
            nodes.append(node)
            continue
        chain, inits, consumed = lowered
        nodes.extend(chain)
        graph.initializer.extend(inits)
        lowered_params.update(consumed)
    del graph.node[:]
    graph.node.extend(nodes)
    remaining = {name: enc for name, enc in params.items() if name not in lowered_params}
    sim, output_map = build_simulation_model(model, targets, activations, remaining)
    inputs = {v.name for v in deploy.graph.input}
    _round_half_up(sim.graph, [name for name in targets.activations if name not in inputs])
    return sim, output_map


def _concat_encodings(graph: onnx.GraphProto, activations: dict[str, Encoding]) -> dict[str, Encoding]:
    """``activations`` with each Concat input that only the Concat reads given the Concat's 8-bit encoding.

    The HTP writes such a producer's output straight into the concatenation, requantized once to
    the Concat's encoding: PP-OCR det's ``p2o.Add.277`` (scale 8.37) feeding ``p2o.Concat.1``
    (scale 17.25) is exactly an Add with the Concat's output encoding, and 2% of its values differ
    from requantizing the Add's own codes.
    """
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    produced = {name for node in graph.node for name in node.output}
    updated = dict(activations)
    for node in graph.node:
        enc = activations.get(node.output[0]) if node.op_type == "Concat" else None
        if not _int8(enc):
            continue
        for name in node.input:
            own = activations.get(name)
            if name in produced and name not in outputs and readers.get(name) == 1 and _int8(own):
                updated[name] = enc
    return updated


def _round_half_up(graph: onnx.GraphProto, tensors: list[str]) -> None:
    """Make the fake quantization of ``tensors`` round ties up (``floor(v + 0.5)``), as HTP ops do.

    Rewrites the rounding part of simulate.fake_quant_nodes' chain; graph inputs keep rounding
    half away from zero, as the HTP's Quantize of a float input does.
    """
    chains = {f"{name}{FQ_SUFFIX}/": name for name in tensors}
    kept = []
    for node in graph.node:
        output = node.output[0] if node.output else ""
        prefix, _, part = output.rpartition("/")
        if prefix + "/" in chains and part in ROUNDING_NODES:
            if part == "round":
                kept.append(helper.make_node("Add", [prefix + "/c", prefix + "/half"], [prefix + "/shifted"]))
                kept.append(helper.make_node("Floor", [prefix + "/shifted"], [output]))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def add_constants(
    scales: tuple[float, float],
    zero_points: tuple[int, int],
    out_scale: float,
    out_zero_point: int,
    sign: float = 1.0,
) -> tuple[int, tuple[float, float], float]:
    """HTP's fixed-point Add of two 8-bit tensors: fraction bits ``n``, multipliers and constant.

    The output code is ``floor(q_a * m_a + q_b * m_b + c + 0.5)`` on raw codes q, with
    ``m = round(s / s_out * 2^n) / 2^n`` and ``c`` (the zero points' contribution, computed with
    those multipliers) rounded half away from zero to ``2^-(n - 8)``;
    ``n = min(15, 14 - ceil(log2(r_a + r_b)))`` where ``r = s / s_out``. Bit-exact on all
    256 x 256 input pairs of 68 probed encodings. ``sign = -1`` gives Sub, whose ``n`` comes from
    the larger ratio alone, ``min(15, 14 - ceil(log2(max(r_a, r_b))))`` (bit-exact on 52 probed
    encodings; with Add's ``n``, 5 of 12 differed).
    """
    ratios = [float(np.float32(s)) / float(np.float32(out_scale)) for s in scales]
    spread = sum(ratios) if sign > 0 else max(ratios)
    bits = int(min(15, 14 - np.ceil(np.log2(spread))))
    multipliers = (float(np.round(ratios[0] * 2.0**bits) / 2.0**bits),
                   sign * float(np.round(ratios[1] * 2.0**bits) / 2.0**bits))
    grid = 2.0 ** (bits - 8)
    constant = out_zero_point - sum(z * m for z, m in zip(zero_points, multipliers, strict=True))
    return bits, multipliers, float(round_half_away(np.array(constant * grid)) / grid)


def _lower_add(
    node: onnx.NodeProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    constants: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """An 8-bit Add computed in HTP's fixed point (add_constants), in float64 to stay exact.

    A one-element constant operand is folded into the constant term at the multiplier's precision,
    ``2^-n`` with ``n`` from the other operand alone (measured on 11 probed encodings, 2 of them
    off by one step in one of 256 values).
    """
    operands = _binary_operands(node, targets, activations, params)
    if operands is None:
        return None
    encs, y_enc = operands
    scalars = [_is_scalar(name, constants) for name in node.input]
    if scalars[0] or (scalars[1] and node.output[0] in targets.squashed):
        return None  # with a Relu/Clip after it, an Add of a scalar rounds exactly (measured)
    sign = -1.0 if node.op_type == "Sub" else 1.0  # x - c with a scalar c: assumed, not probed
    if scalars[1]:
        value = fake_quantize(numpy_helper.to_array(constants[node.input[1]]), encs[1]).item()
        ratio = float(np.float32(encs[0].scale)) / float(np.float32(y_enc.scale))
        bits = int(min(15, 14 - np.ceil(np.log2(ratio))))
        multiplier = float(np.round(ratio * 2.0**bits) / 2.0**bits)
        term = -y_enc.offset + encs[0].offset * multiplier + sign * value / float(np.float32(y_enc.scale))
        operands = [(node.input[0], encs[0], multiplier)]
        constant = float(round_half_away(np.array(term * 2.0**bits)) / 2.0**bits)
    else:
        _, multipliers, constant = add_constants(
            (encs[0].scale, encs[1].scale), (-encs[0].offset, -encs[1].offset), y_enc.scale, -y_enc.offset, sign
        )
        operands = list(zip(node.input, encs, multipliers, strict=True))
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    double = onnx.TensorProto.DOUBLE
    inits = [
        numpy_helper.from_array(np.array(constant + 0.5), p + "constant"),
    ]
    chain = []
    terms = []
    for index, (name, enc, multiplier) in enumerate(operands):
        q = f"{p}{index}/"
        nodes, code_inits = _centered_codes(name, enc, q + "centered")
        inits += [
            *code_inits,
            numpy_helper.from_array(np.array(-enc.offset, dtype=np.float32), q + "zero_point"),
            numpy_helper.from_array(np.array(multiplier), q + "multiplier"),
        ]
        chain += [
            *nodes,
            make("Add", [q + "centered", q + "zero_point"], [q + "code"]),
            make("Cast", [q + "code"], [q + "code64"], to=double),
            make("Mul", [q + "code64", q + "multiplier"], [q + "term"]),
        ]
        terms.append(q + "term")
    if len(terms) == 2:
        chain.append(make("Add", terms, [p + "sum"]))
    else:
        chain.append(make("Identity", terms, [p + "sum"]))
    chain += [
        make("Add", [p + "sum", p + "constant"], [p + "shifted"]),
    ]
    return _with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])


def mul_constants(
    scales: tuple[float, float], zero_points: tuple[int, int], out_scale: float, out_zero_point: int
) -> tuple[float, float] | None:
    """HTP's Mul of two 8-bit tensors: the multiplier ``m`` and the constant ``d``, or None if ``M >= 1``.

    The output code is ``floor((q_a - z_a) * (q_b - z_b) * m + z_out + d + 0.5)``, in fixed point
    with ``s`` fraction bits: ``m = round(M * 2^s) / 2^s`` for ``M = s_a * s_b / s_out`` (float32
    scales), ``s = min(14 - e, 22)`` where ``2^e <= M < 2^(e+1)`` (15 significant bits, fewer
    below ``M = 2^-8``). The zero points enter through ``j = round((2ab + a + b) / 256)`` (ties up),
    ``a = z_a - 128``, ``b = z_b - 128``: the HTP adds ``256 j m`` rounded to a multiple of
    ``2^(15 - s)`` instead of its exact value, so ``d = round(256 j m / 2^(15 - s)) * 2^(15 - s) - 256 j m``
    (zero when either zero point is 128). That constant, ``z_out`` included, is a 16-bit integer in
    units of ``2^(15 - s)``: when it would not fit, ``s`` drops by one. Bit-exact on all 256 x 256
    code pairs of 724 probed encodings with ``M < 1`` (activation x activation and activation x
    constant); ``M >= 1`` follows another rule (not decoded).
    """
    ratio = float(np.float32(scales[0])) * float(np.float32(scales[1])) / float(np.float32(out_scale))
    if ratio >= 1.0:
        return None
    a, b = zero_points[0] - 128, zero_points[1] - 128
    j = int(np.floor((2 * a * b + a + b) / 256 + 0.5))
    bits = min(14 - int(np.floor(np.log2(ratio))), 22)
    while True:
        mantissa = int(np.floor(ratio * 2.0**bits + 0.5))
        rounded = int(np.floor(256 * j * mantissa / 2**15 + 0.5))  # 256 j m in units of 2^(15 - bits)
        if mantissa < 1 << 15 and -(1 << 15) <= out_zero_point * 2 ** (bits - 15) + rounded < 1 << 15:
            break
        bits -= 1
    offset = (rounded * 2**15 - 256 * j * mantissa) * 2.0**-bits
    return mantissa * 2.0**-bits, offset


def scalar_mul_constants(
    scale: float, const_scale: float, const_code: int, out_scale: float
) -> tuple[float, float] | None:
    """HTP's Mul of an 8-bit tensor by a one-element 8-bit constant: multiplier and constant, or None.

    ``const_code`` is the constant's centered code ``c = q_b - z_b``. The HTP folds it into the
    multiplier: the output code is ``floor((q_a - z_a) * m + z_out + d + 0.5)`` with
    ``m = M * c`` rounded to 15 significant bits (``M = s_a * s_b / s_out``, float32 scales) and
    ``d = 2^(15 - s)`` (``s`` as in mul_constants) for a positive constant, 0 for a negative one.
    Bit-exact on 314 of 319 probes (all 256 codes) with ``M < 2^-4`` (PP-OCR's scalar Mul have
    ``M`` close to 1/255); larger ``M`` follows another rule (about half the probes differ).
    """
    ratio = float(np.float32(scale)) * float(np.float32(const_scale)) / float(np.float32(out_scale))
    if ratio >= 1.0:
        return None
    folded = ratio * const_code
    if folded == 0:
        return 0.0, 0.0
    exponent = int(np.floor(np.log2(abs(folded))))
    multiplier = float(np.round(folded * 2.0 ** (14 - exponent)) * 2.0 ** (exponent - 14))
    bits = min(14 - int(np.floor(np.log2(ratio))), 22)
    return multiplier, 2.0 ** (15 - bits) if const_code > 0 else 0.0


def _lower_mul(
    node: onnx.NodeProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    constants: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """An 8-bit Mul on centered integer codes, requantized as the HTP does (mul_constants).

    Operands are activations or constants with 8-bit param encodings (broadcast as in the model);
    products of centered codes are exact in float32, the requantization runs in float64.
    """
    operands = _binary_operands(node, targets, activations, params)
    if operands is None or all(name in constants for name in node.input):
        return None
    encs, y_enc = operands
    scalars = [_is_scalar(name, constants) for name in node.input]
    operands = list(zip(node.input, encs, strict=True))
    if any(scalars):  # folded into the multiplier
        (const_name, const_enc), operand = operands[scalars.index(True)], operands[1 - scalars.index(True)]
        code = int(quantize(numpy_helper.to_array(constants[const_name]), const_enc).item()) + const_enc.offset
        constants_ = scalar_mul_constants(operand[1].scale, const_enc.scale, code, y_enc.scale)
        operands = [operand]
    else:
        constants_ = mul_constants(
            (encs[0].scale, encs[1].scale), (-encs[0].offset, -encs[1].offset), y_enc.scale, -y_enc.offset
        )
    if constants_ is None:
        return None
    multiplier, offset = constants_
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    inits = [
        numpy_helper.from_array(np.array(multiplier), p + "multiplier"),
        numpy_helper.from_array(np.array(-y_enc.offset + offset + 0.5), p + "constant"),
    ]
    chain = []
    centered = []
    for index, (name, enc) in enumerate(operands):
        q = f"{p}{index}/"
        if name in constants:  # the stored codes, centered
            codes = quantize(numpy_helper.to_array(constants[name]), enc) + enc.offset
            inits.append(numpy_helper.from_array(codes.astype(np.float32), q + "centered"))
        else:
            nodes, code_inits = _centered_codes(name, enc, q + "centered")
            chain += nodes
            inits += code_inits
        centered.append(q + "centered")
    product = make("Mul" if len(centered) == 2 else "Identity", centered, [p + "product"])
    chain += [
        product,  # |product| <= 255^2: exact
        make("Cast", [p + "product"], [p + "product64"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [p + "product64", p + "multiplier"], [p + "real"]),
        make("Add", [p + "real", p + "constant"], [p + "shifted"]),
    ]
    return _with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])


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


def batch_norm_constants(
    values: list[np.ndarray], encodings: list[Encoding], epsilon: float, in_scale: float, out_scale: float,
    out_zero_point: int,
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """HTP's 8-bit BatchNormalization: per-channel weight codes, offsets ``C``, multiplier ``m`` and constant.

    ``values`` are scale, B, mean and var with their 8-bit ``encodings``. They are dequantized
    (float64), folded to ``a = scale / sqrt(var + eps)`` and ``b = B - mean * a``, and ``a`` and ``b``
    are quantized again, each per tensor with a min-max encoding (_minmax_codes): codes ``w`` and
    ``c``, steps ``s_a`` and ``s_b``. The output code is ``floor((x * w + C) * m + 0.5 + 2^(9 - s))``
    for the centered input code ``x``, ``M = s_in * s_a / s_out``, ``m = M`` rounded to 15
    significant bits (``s = 14 - floor(log2 M)`` fraction bits) and ``C = round(c * s_b / (s_in *
    s_a)) + round(z_out / M)`` (each rounded half away from zero). The ``2^(9 - s)`` is the
    product rounded to a multiple of ``2^(10 - s)`` first. Bit-exact on every code of 133 probes
    (2,128 channels) with ``2^-10.7 <= M <= 2^-1.2``. Outside ``2^-11 <= M < 2^-1`` (``s`` from 16
    to 25) the rule fails (saturated channels below, a smaller constant above; not decoded): None.
    """
    real = [(quantize(v, e) + e.offset).astype(np.float64) * float(np.float32(e.scale))
            for v, e in zip(values, encodings, strict=True)]
    gamma, beta, mean, var = real
    folded_scale = gamma / np.sqrt(var + float(np.float32(epsilon)))
    weights, w_step = _minmax_codes(folded_scale)
    bias, b_step = _minmax_codes(beta - mean * folded_scale)
    base = float(np.float32(in_scale)) * w_step
    ratio = base / float(np.float32(out_scale))
    bits = 14 - int(np.floor(np.log2(ratio)))
    if not 16 <= bits <= 25:
        return None
    multiplier = float(np.round(ratio * 2.0**bits)) * 2.0**-bits
    offsets = round_half_away(bias * b_step / base) + round_half_away(np.array(out_zero_point / ratio))
    return weights, offsets, multiplier, 0.5 + 2.0 ** (9 - bits)


def _lower_batch_norm(
    node: onnx.NodeProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    constants: dict[str, onnx.TensorProto],
    shapes: dict[str, list[int]],
    graph: onnx.GraphProto,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """An inference BatchNormalization with 8-bit encodings on integer codes (batch_norm_constants)."""
    if len(node.input) != 5 or len(node.output) != 1 or _attrs(node).get("training_mode", 0):
        return None
    x_enc = activations.get(node.input[0])
    y_enc = _output_encoding(node, targets, activations)
    names = list(node.input[1:])
    encs = [params.get(name) for name in names]
    rank = len(shapes.get(node.input[0], []))
    if rank < 3 or any(name not in constants for name in names):
        return None
    if not _int8(x_enc, y_enc, *encs):
        return None
    values = [numpy_helper.to_array(constants[name]).astype(np.float32).reshape(-1) for name in names]
    constants_ = batch_norm_constants(
        values, encs, _attrs(node).get("epsilon", 1e-5), x_enc.scale, y_enc.scale, -y_enc.offset
    )
    if constants_ is None:
        return None
    weights, offsets, multiplier, constant = constants_
    tail = (1,) * (rank - 2)
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = _centered_codes(node.input[0], x_enc, p + "codes")
    inits += [
        numpy_helper.from_array(weights.astype(np.float32).reshape((-1, *tail)), p + "w"),
        numpy_helper.from_array(offsets.astype(np.float64).reshape((-1, *tail)), p + "offset"),
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
    chain, inits, _ = _with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])
    used = [name for other in graph.node if other is not node for name in other.input]
    return chain, inits, {name for name in names if name not in used}


def _lower_global_average_pool(
    node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding], shapes: dict[str, list[int]],
    opset: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """An 8-bit GlobalAveragePool over N x C x H x W on integer codes: ``floor(S * m + z_out + 0.5)``.

    ``S`` is the sum of the centered input codes over H x W and ``m`` the multiplier
    ``s_in / (s_out * H * W)`` rounded to 15 significant bits (requant_constants' precise variant).
    Bit-exact on 71,132 probed outputs (3x3, 7x7 and 12x12 inputs, random encodings); exact
    rounding of the float mean differs in 17 of them.
    """
    x_enc = activations.get(node.input[0])
    y_enc = _output_encoding(node, targets, activations)
    shape = shapes.get(node.input[0], [])
    if not _int8(x_enc, y_enc):
        return None
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale)) / (shape[2] * shape[3])
    _, multiplier, _ = requant_constants(np.array(ratio), 0, precise=True)
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = _centered_codes(node.input[0], x_enc, p + "codes")
    inits += [
        numpy_helper.from_array(np.array(float(multiplier)), p + "multiplier"),
        numpy_helper.from_array(np.array(-y_enc.offset + 0.5), p + "constant"),
    ]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), p + "axes"))
        chain.append(make("ReduceSum", [p + "codes", p + "axes"], [p + "sum"], keepdims=1))
    else:
        chain.append(make("ReduceSum", [p + "codes"], [p + "sum"], axes=[2, 3], keepdims=1))
    chain += [
        make("Cast", [p + "sum"], [p + "sum64"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [p + "sum64", p + "multiplier"], [p + "product"]),
        make("Add", [p + "product", p + "constant"], [p + "shifted"]),
    ]
    return _with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])


def _weight_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    """The output-channel axis of a linear op's constant weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attrs(node).get("transB", 0) else 1
    return len(weight.dims) - 1


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _lower_linear(
    node: onnx.NodeProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    constants: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """The integer-code version of a Conv/Gemm/MatMul node, or None when it stays as it is."""
    if node.op_type not in LINEAR_OPS or len(node.input) < 2:
        return None
    attrs = _attrs(node)
    if node.op_type == "ConvTranspose" and attrs.get("group", 1) != 1:
        return None
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (
        1.0, 1.0, 0
    ):
        return None
    x, w = node.input[0], node.input[1]
    x_enc = activations.get(x)
    y_enc = _output_encoding(node, targets, activations)
    if node.op_type == "MatMul" and w not in constants and _int8(y_enc):
        return _lower_dynamic_matmul(node, activations, y_enc)
    w_enc = params.get(w)
    if w not in constants or not _int8(x_enc, y_enc, w_enc):
        return None

    weight = numpy_helper.to_array(constants[w])
    codes = np.round(fake_quantize(weight, w_enc).astype(np.float64) / w_enc.scale)
    axis = _weight_axis(node, constants[w])
    depthwise = node.op_type == "Conv" and attrs.get("group", 1) > 1 and weight.shape[1] == 1
    strided_depthwise = depthwise and all(s > 1 for s in attrs.get("strides", [1]))
    blocks = _transpose_blocks(node, weight.shape)
    if blocks:  # [C_in, C_out, k, k] -> a 1x1 Conv with C_out * k * k output channels
        codes = codes.reshape(weight.shape[0], -1).T.reshape(-1, weight.shape[0], 1, 1)
        axis = 0
    if strided_depthwise or (node.op_type == "ConvTranspose" and not blocks):
        w_int, steps = codes, np.ones(codes.shape[axis])
    else:
        w_int, steps = int8_weights(codes, axis)
    base = float(np.float32(x_enc.scale)) * float(np.float32(w_enc.scale))
    consumed = {w}
    bias_codes, bias_scale = None, 1.0
    has_bias = len(node.input) > 2 and node.input[2] in constants
    if has_bias:
        bias_codes = numpy_helper.to_array(constants[node.input[2]]).reshape(-1)
        b_enc = params.get(node.input[2])
        if b_enc is not None:  # the int32 codes
            consumed.add(node.input[2])
            bias_codes, bias_scale = quantize(bias_codes, b_enc) + b_enc.offset, b_enc.scale
        bias_codes = np.repeat(bias_codes, max(blocks, 1) ** 2)
    factor, mantissa, _ = requant_constants(
        base * steps / float(np.float32(y_enc.scale)), -y_enc.offset, precise=strided_depthwise
    )
    offset = requant_offset(x_enc.scale, w_enc.scale, y_enc.scale, -y_enc.offset, steps, bias_codes, bias_scale)
    bias_int = np.zeros(steps.size)  # the bias is part of ``offset``

    tail = (1,) * (weight.ndim - 2) if node.op_type.startswith("Conv") else ()  # channel constants broadcast over space
    p = f"{node.output[0]}{SUFFIX}/"
    inits = [numpy_helper.from_array(w_int.astype(np.float32), p + "w")]
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
    chain, more = _integer_op(p, [(x, x_enc, p + "x")], linear, (factor, mantissa, offset), tail, y_enc, output)
    if blocks:  # each block of k x k output pixels comes from one input pixel
        chain.append(helper.make_node("DepthToSpace", [output], [node.output[0]], blocksize=blocks, mode="CRD"))
    return chain, inits + more, consumed


def _transpose_blocks(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    """The kernel size ``k`` of a 2-D ConvTranspose whose kernel equals its stride (no overlap, no padding), else 0.

    The HTP runs it as a 1x1 convolution with ``C_out * k * k`` output channels followed by a
    depth-to-space, and re-expresses the int8 weights per (output channel, kernel position).
    """
    attrs = _attrs(node)
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
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]] | None:
    """MatMul of two 8-bit activations on integer codes, requantized per tensor."""
    a_enc, b_enc = activations.get(node.input[0]), activations.get(node.input[1])
    if not _int8(a_enc, b_enc):
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    multiplier = float(np.float32(a_enc.scale)) * float(np.float32(b_enc.scale)) / float(np.float32(y_enc.scale))
    factor, mantissa, _ = requant_constants(np.array([multiplier]), -y_enc.offset)
    constants = (factor, mantissa, requant_offset(a_enc.scale, b_enc.scale, y_enc.scale, -y_enc.offset, np.ones(1)))
    product = helper.make_node("MatMul", [p + "a", p + "b"], [p + "acc"], name=p + "MatMul")
    inputs = [(node.input[0], a_enc, p + "a"), (node.input[1], b_enc, p + "b")]
    chain, inits = _integer_op(p, inputs, product, constants, (), y_enc, node.output[0])
    return chain, inits, set()


def _integer_op(
    p: str,
    inputs: list[tuple[str, Encoding, str]],
    op: onnx.NodeProto,
    constants: tuple[np.ndarray, np.ndarray, np.ndarray],
    tail: tuple[int, ...],
    y_enc: Encoding,
    output: str,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes turning ``inputs`` into codes, running ``op`` on them and requantizing as the HTP does."""
    factor, offset = (np.asarray(v, dtype=np.float32).reshape((-1, *tail)) for v in (constants[0], constants[2]))
    mantissa = np.asarray(constants[1], dtype=np.float64).reshape((-1, *tail))
    inits = [
        numpy_helper.from_array(offset, p + "offset"),
        numpy_helper.from_array(factor, p + "factor"),
        numpy_helper.from_array(mantissa, p + "mantissa"),
        numpy_helper.from_array(np.array(0.5), p + "half"),
    ]
    make = helper.make_node
    chain = []
    for tensor, enc, codes in inputs:
        nodes, code_inits = _centered_codes(tensor, enc, codes)
        chain += nodes
        inits += code_inits
    chain += [
        op,
        make("Add", [p + "acc", p + "offset"], [p + "shifted"]),
        make("Mul", [p + "shifted", p + "factor"], [p + "scaled"]),
        make("Floor", [p + "scaled"], [p + "truncated"]),
        make("Cast", [p + "truncated"], [p + "truncated64"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [p + "truncated64", p + "mantissa"], [p + "real"]),  # exact in float64, not float32
        make("Add", [p + "real", p + "half"], [p + "real_half"]),
    ]
    chain, inits, _ = _with_output_codes(chain, inits, p, y_enc, p + "real_half", output)
    return chain, inits


def _with_output_codes(
    chain: list[onnx.NodeProto], inits: list[onnx.TensorProto], p: str, y_enc: Encoding, shifted: str, output: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], set[str]]:
    """Append the requantized output to ``chain``: ``output = (clamp(floor(shifted)) - z_out) * s_out``.

    ``shifted`` is the float64 output code plus one half, so the floor rounds ties up as the HTP
    does; the code is clamped to the 8-bit range and dequantized in float32. Returns the lowering
    (nodes, initializers, no params consumed).
    """
    make = helper.make_node
    inits = [
        *inits,
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), p + "low"),
        numpy_helper.from_array(np.array(y_enc.levels, dtype=np.float32), p + "high"),
        numpy_helper.from_array(np.array(-y_enc.offset, dtype=np.float32), p + "zero_point"),
        numpy_helper.from_array(np.array(y_enc.scale, dtype=np.float32), p + "out_scale"),
    ]
    chain = [
        *chain,
        make("Floor", [shifted], [p + "rounded64"]),
        make("Cast", [p + "rounded64"], [p + "rounded"], to=onnx.TensorProto.FLOAT),
        make("Clip", [p + "rounded", p + "low", p + "high"], [p + "code"]),
        make("Sub", [p + "code", p + "zero_point"], [p + "code_centered"]),
        make("Mul", [p + "code_centered", p + "out_scale"], [output]),
    ]
    return chain, inits, set()


def _int8(*encodings: Encoding | None) -> bool:
    """Whether every encoding is there and 8-bit: the HTP arithmetic modelled here is 8-bit only."""
    return all(enc is not None and enc.bitwidth == 8 for enc in encodings)


def _binary_operands(
    node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding], params: dict[str, Encoding]
) -> tuple[list[Encoding], Encoding] | None:
    """The encodings of a two-input node's operands (activations or params) and of its output,
    if all are 8-bit."""
    if len(node.input) != 2:
        return None
    encs = [activations.get(name) or params.get(name) for name in node.input]
    y_enc = _output_encoding(node, targets, activations)
    return (encs, y_enc) if _int8(*encs, y_enc) else None


def _is_scalar(name: str, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``name`` is a one-element constant."""
    return name in constants and int(np.prod(constants[name].dims)) == 1


def _output_encoding(node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding]) -> Encoding | None:
    """The encoding a node's output is requantized to: its own, or that of the Relu/Clip squashed into it."""
    return activations.get(targets.squashed.get(node.output[0], node.output[0]))


def _centered_codes(tensor: str, enc: Encoding, codes: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``codes = round(tensor / scale)``: an on-grid tensor's integer codes minus its zero point."""
    scale = numpy_helper.from_array(np.array(enc.scale, dtype=np.float32), codes + "_scale")
    nodes = [
        helper.make_node("Div", [tensor, scale.name], [codes + "_real"]),
        helper.make_node("Round", [codes + "_real"], [codes]),
    ]
    return nodes, [scale]
