"""Add, Sub and Mul of 8-bit tensors in the HTP's fixed point."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding, fake_quantize, quantize, round_half_away
from ...graph.large import initializer_array
from .codes import SUFFIX, Context, Lowered, binary_operands, centered_codes, is_scalar, with_output_codes


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
    encodings; with Add's ``n``, 5 of 12 differed). Either way ``n`` drops by one where the larger
    multiplier would reach ``2^14``, which a Sub whose larger ratio is exactly a power of two meets
    (18 exhaustive probes at ratios 1, 2 and 0.5 bit for bit, up to 2,525 values off before); an
    Add's multipliers stay below ``2^14`` unless one ratio is nearly 0.
    """
    ratios = [float(np.float32(s)) / float(np.float32(out_scale)) for s in scales]
    spread = sum(ratios) if sign > 0 else max(ratios)
    bits = int(min(15, 14 - np.ceil(np.log2(spread))))
    if np.round(max(ratios) * 2.0**bits) >= 2**14:  # as at 16 bits, a bit less where the larger multiplier
        bits -= 1  # would reach 2^14: a Sub whose larger ratio is a power of two (tools/HTP.md finding 14)
    multipliers = (float(np.round(ratios[0] * 2.0**bits) / 2.0**bits),
                   sign * float(np.round(ratios[1] * 2.0**bits) / 2.0**bits))
    grid = 2.0 ** (bits - 8)
    constant = out_zero_point - sum(z * m for z, m in zip(zero_points, multipliers, strict=True))
    return bits, multipliers, float(round_half_away(np.array(constant * grid)) / grid)


def is_scalar_sum(node: onnx.NodeProto, context: Context) -> bool:
    """Whether ``node`` is an 8-bit Add or Sub of a one-element constant, which lower_add leaves to
    the float computation and the HTP rounds ties to even (tools/HTP.md finding 22: every exact tie
    of eight probes, and MiniLM-L6's GELU ``erf + 1``, whose every output is a tie, bit for bit)."""
    if node.op_type not in ("Add", "Sub") or not any(is_scalar(name, context.constants) for name in node.input):
        return False
    output = context.targets.squashed.get(node.output[0], node.output[0])
    encoding = context.activations.get(output)
    return encoding is not None and encoding.bitwidth == 8


def lower_add(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit Add or Sub computed in HTP's fixed point (add_constants), in float64 to stay exact; a
    16-bit one likewise (add16_operands).

    An 8-bit Add or Sub of a one-element constant is left to the float computation: on the emulator
    it rounds as exactly as float does (tools/HTP.md finding 13: 159 of 160 probes of every code bit
    for bit, in either order; folding the constant into a fixed point with ``n`` from the other
    operand, as this did before, 58 of 80).
    """
    wide = add16_operands(node, context)
    if wide is not None:
        return _fixed_point_sum(node, *wide)
    operands = binary_operands(node, context.targets, context.activations, context.params)
    if operands is None or any(is_scalar(name, context.constants) for name in node.input):
        return None
    encs, y_enc = operands
    sign = -1.0 if node.op_type == "Sub" else 1.0
    _, multipliers, constant = add_constants(
        (encs[0].scale, encs[1].scale), (-encs[0].offset, -encs[1].offset), y_enc.scale, -y_enc.offset, sign
    )
    operands = list(zip(node.input, encs, multipliers, strict=True))
    return _fixed_point_sum(node, operands, constant, y_enc)


def add16_constants(
    scales: tuple[float, float], zero_points: tuple[int, int], out_scale: float, out_zero_point: int,
    sign: float = 1.0,
) -> tuple[int, tuple[float, float], float]:
    """HTP's Add (``sign`` 1) or Sub (-1) of two 16-bit tensors: fraction bits ``n``, multipliers and
    constant of ``floor(q_a m_a + q_b m_b + c + 1/2)`` on raw codes q, as add_constants at 8 bits.

    ``n = min(16, 15 - ceil(log2(max(r_a, r_b))))`` from the larger ratio alone, one less where the
    larger multiplier would reach ``2^15`` (a ratio of exactly 1, as an Add of a constant whose output
    range is its input's shifted has, or a power of two), ``m = round(r 2^n) / 2^n``
    (``m_b`` negated for Sub) and the zero points' constant ``z_out - z_a m_a - z_b m_b`` rounded up to
    a multiple of ``2^-(n - 1)``, one bit coarser than the multipliers (tools/HTP.md, "16-bit
    activations", findings 7 and 12: every one of 65,536 codes of 16 probes of two activations, Add
    and Sub, bit for bit; the constant unrounded misses the values a step of ``2^-n`` below a tie in
    the probes where it is odd).
    """
    ratios = [float(np.float32(s)) / float(np.float32(out_scale)) for s in scales]
    bits = int(min(16, 15 - np.ceil(np.log2(max(ratios)))))
    if np.round(max(ratios) * 2.0**bits) >= 2**15:  # the multipliers fit 15 bits: a ratio of 1, a power
        bits -= 1  # of two or one just below it takes a bit less (finding 12)
    steps = [float(np.round(ratio * 2.0**bits)) for ratio in ratios]
    steps[1] *= sign
    constant = out_zero_point * 2.0**bits - zero_points[0] * steps[0] - zero_points[1] * steps[1]  # exact integers
    return bits, (steps[0] / 2.0**bits, steps[1] / 2.0**bits), float(np.ceil(constant / 2) * 2 / 2.0**bits)


def add16_operands(
    node: onnx.NodeProto, context: Context
) -> tuple[list[tuple[str, Encoding, float]], float, Encoding] | None:
    """The operands (name, encoding, multiplier), constant and output encoding of a 16-bit Add or Sub
    (add16_constants) into a 16-bit output, or None: of two activations, or of an activation and a
    constant (either order) in its 16-bit encoding.

    A one-element constant is an operand whose code never changes: its term joins the constant. With
    a constant operand, Sub adds the subtrahend's mirrored codes, ``2^16 - 1 - q`` with zero point
    ``2^16 - 1 - z``, instead of subtracting (finding 12: 31 of 31 probes with a scalar and 20 of 20
    with a per-channel vector bit for bit, either order; subtracting fits 10 of 15 and 15 of 20);
    ``(2^16 - 1 - q) m`` of an activation is ``-q m`` plus a constant.
    """
    if node.op_type not in ("Add", "Sub"):
        return None
    operands = binary_operands(node, context.targets, context.activations, context.params, bitwidth=16)
    if operands is None:
        return None
    encs, y_enc = operands
    scalars = [is_scalar(name, context.constants) for name in node.input]
    constants = [name in context.constants for name in node.input]
    if all(constants):
        return None
    zero_points = [-enc.offset for enc in encs]
    codes = [round(fake_quantize(initializer_array(context.constants[name]), enc).item() / float(np.float32(enc.scale)))
             - enc.offset if scalar else None for name, enc, scalar in zip(node.input, encs, scalars, strict=True)]
    mirrored = node.op_type == "Sub" and any(constants)
    if mirrored:
        levels = encs[1].levels
        zero_points[1] = levels - zero_points[1]
        codes[1] = None if codes[1] is None else levels - codes[1]
    sign = -1.0 if node.op_type == "Sub" and not mirrored else 1.0
    _, multipliers, constant = add16_constants((encs[0].scale, encs[1].scale), (zero_points[0], zero_points[1]),
                                               y_enc.scale, -y_enc.offset, sign)
    terms = []
    for index, (name, enc, multiplier, code) in enumerate(zip(node.input, encs, multipliers, codes, strict=True)):
        if code is not None:
            constant += code * multiplier
        elif mirrored and index == 1:
            terms.append((name, enc, -multiplier))
            constant += encs[1].levels * multiplier
        else:
            terms.append((name, enc, multiplier))
    return terms, constant, y_enc


def _fixed_point_sum(node: onnx.NodeProto, operands: list[tuple[str, Encoding, float]], constant: float,
                     y_enc: Encoding) -> Lowered:
    """``floor(sum(q_i m_i) + c + 1/2)`` on the operands' raw codes, in float64, requantized."""
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
        nodes, code_inits = centered_codes(name, enc, q + "centered")
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
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])


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


def lower_mul(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit Mul on centered integer codes, requantized as the HTP does (mul_constants).

    Operands are activations or constants with 8-bit param encodings (broadcast as in the model);
    products of centered codes are exact in float32, the requantization runs in float64.
    """
    operands = binary_operands(node, context.targets, context.activations, context.params)
    if operands is None or all(name in context.constants for name in node.input):
        return None
    encs, y_enc = operands
    scalars = [is_scalar(name, context.constants) for name in node.input]
    operands = list(zip(node.input, encs, strict=True))
    if any(scalars):  # folded into the multiplier
        (const_name, const_enc), operand = operands[scalars.index(True)], operands[1 - scalars.index(True)]
        code = int(quantize(initializer_array(context.constants[const_name]), const_enc).item()) + const_enc.offset
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
        if name in context.constants:  # the stored codes, centered
            codes = quantize(initializer_array(context.constants[name]), enc) + enc.offset
            inits.append(numpy_helper.from_array(codes.astype(np.float32), q + "centered"))
        else:
            nodes, code_inits = centered_codes(name, enc, q + "centered")
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
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])
