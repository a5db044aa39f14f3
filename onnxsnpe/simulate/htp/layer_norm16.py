"""The HTP's 16-bit LayerNormalization over its last axis (uint16 input and output, a signed symmetric
16-bit gamma, an int32 beta), which only v73 and later run.

Decoded from a helper's emulator probes (tools/HTP.md finding 43). Per row of ``N`` raw (uncentered)
input codes ``q``, exact integers:

- the mean ``m`` is computed in the HVX's qf32 arithmetic from the row sum ``S`` split in 16-bit halves,
  ``(S >> 16) float32(65536 / N) + (S & 0xFFFF) float32(1 / N)``, each product and the sum rounded as
  qf32 rounds (``qf32_round``), then converted to float32; it is mostly one float32 step off ``S / N``;
- ``D = q - m`` exactly; ``var = (N sum(q^2) - S^2) / N^2`` exactly, in codes;
- ``R = float32(1 / sqrt(var + eps / s_x^2)) float32(s_gamma / s_out)``, carried by a 16-bit multiplier
  ``K = round_half_even(R 2^(15 - e))`` with ``e = floor(log2 R)`` (``2^15 <= K < 2^16``: a ``K``
  rounding to ``2^15`` becomes 65535 at the exponent below, one rounding to ``2^16`` saturates);
- ``out = clamp(floor(D g K 2^(e - 15) + 1/2) + B + z_out)`` with ``g`` the gamma codes and ``B =
  round_half_away(beta_code s_beta / s_out)``; a constant row (``var = 0``) gives ``clamp(B + z_out)``.

On the helper's probes and MiniLM-L6's embedding LayerNorm (2,752,000 outputs) this misses 1,505
values, one step, where exact float then rounding misses 438,452: the misses lie in rows whose
``R 2^(15 - e)`` falls within about a float32 step of a half-integer (the exact order of the
reciprocal square root and the multiplier was not found). Exact while ``N <= 1448`` (``N sum(q^2)``
in float64).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .codes import SUFFIX, Context, Lowered, centered_codes, reduction, with_output_codes
from .layer_norm import exponent_nodes, layer_norm_operands

QF32_FRACTION_BITS = 23
"""A qf32 significand's fraction bits at its exponent."""
MULTIPLIER_BITS = 15
"""``K`` has 16 significant bits: ``2^15 <= K <= 2^16 - 1``."""
NO_EXPONENT = -1000.0
"""The exponent given a zero qf32 product: below any other, so adding it changes nothing."""


def qf32_round(value: str, exponent: str, out: str, out_exponent: str, out_binade: str,
               p: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes rounding positive float64 ``value`` (below ``2^(exponent + 2)``) as a qf32 result of
    exponent ``exponent`` is rounded, into ``out``, its qf32 exponent ``out_exponent`` and
    ``out_binade``, which is ``floor(log2 out)`` for a value from ``2^exponent`` on.

    Below ``2^(exponent + 1)`` the qf32 step is ``u = 2^(exponent - 23)`` and the multiples of ``4u``
    are not representable: the value goes to the nearest other multiple of ``u`` (``4ku + 1.5u`` and
    ``4ku`` itself to ``4ku + u``, ``4ku + 2.5u`` to ``4ku + 2u``, which is written with the exponent
    one higher). From ``2^(exponent + 1)`` the exponent is one higher and the value goes to the
    nearest odd multiple of ``2u`` (ties to the one at ``8ku + 2u``). Inexact results thus keep a
    nonzero last bit ("jamming")."""
    make = helper.make_node
    double = onnx.TensorProto.DOUBLE
    values = {"two": 2.0, "one": 1.0, "four": 4.0, "quarter": 0.25, "half": 0.5, "t1": 1.5, "t2": 2.5,
              "fraction": float(-QF32_FRACTION_BITS)}
    inits = [numpy_helper.from_array(np.array(v), p + k) for k, v in values.items()]
    nodes = [
        make("Add", [exponent, p + "one"], [p + "next"]),
        make("Pow", [p + "two", p + "next"], [p + "next_power"]),
        make("GreaterOrEqual", [value, p + "next_power"], [p + "over_bool"]),
        make("Cast", [p + "over_bool"], [p + "over"], to=double),
        make("Add", [exponent, p + "over"], [out_binade]),
        make("Add", [out_binade, p + "fraction"], [p + "unit_exponent"]),
        make("Pow", [p + "two", p + "unit_exponent"], [p + "unit"]),
        make("Div", [value, p + "unit"], [p + "units"]),
        make("Mul", [p + "units", p + "quarter"], [p + "quads_exact"]),
        make("Floor", [p + "quads_exact"], [p + "quads"]),
        make("Mul", [p + "quads", p + "four"], [p + "base"]),
        make("Sub", [p + "units", p + "base"], [p + "rest"]),
        # thresholds: 1.5 and 2.5 below 2^(exponent + 1), 2 and 2 from it (steps 1, 2, 3 or 1, 3)
        make("Mul", [p + "over", p + "half"], [p + "shift"]),
        make("Add", [p + "t1", p + "shift"], [p + "first"]),
        make("Sub", [p + "t2", p + "shift"], [p + "second"]),
        make("Greater", [p + "rest", p + "first"], [p + "past_first_bool"]),
        make("Greater", [p + "rest", p + "second"], [p + "past_second_bool"]),
        make("Cast", [p + "past_first_bool"], [p + "past_first"], to=double),
        make("Cast", [p + "past_second_bool"], [p + "past_second"], to=double),
        make("Add", [p + "past_first", p + "past_second"], [p + "past"]),
        make("Add", [p + "past", p + "one"], [p + "step"]),
        make("Add", [p + "base", p + "step"], [p + "rounded_units"]),
        make("Mul", [p + "rounded_units", p + "unit"], [out]),
        # the exponent: one higher from 2^(exponent + 1), and for a result at 4ku + 2u
        make("Sub", [p + "past_first", p + "past_second"], [p + "middle"]),
        make("Sub", [p + "one", p + "over"], [p + "below"]),
        make("Mul", [p + "middle", p + "below"], [p + "middle_below"]),
        make("Add", [out_binade, p + "middle_below"], [out_exponent]),
    ]
    return nodes, inits


def _qf32_product(factor: str, constant: float, out: str, out_exponent: str, out_log: str,
                  p: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes for the qf32 product of a nonnegative integer-valued float64 ``factor`` (below 2^24) and a
    positive float32 ``constant``: the value, its qf32 exponent and ``floor(log2)`` of the value (a
    zero factor gives 0 with exponents below any other)."""
    make = helper.make_node
    constant_exponent = float(math.frexp(constant)[1] - 1)
    values = {"constant": constant, "constant_exponent": constant_exponent, "one": 1.0, "zero": 0.0,
              "none": NO_EXPONENT}
    inits = [numpy_helper.from_array(np.array(v), p + k) for k, v in values.items()]
    exponent, exponent_inits = exponent_nodes(p + "positive", p + "factor_exponent", p + "factor_power", p + "e_")
    rounding, rounding_inits = qf32_round(p + "exact", p + "base", p + "rounded", p + "rounded_exponent",
                                          p + "binade", p + "r_")
    nodes = [
        make("Max", [factor, p + "one"], [p + "positive"]),
        *exponent,
        make("Add", [p + "factor_exponent", p + "constant_exponent"], [p + "base"]),
        make("Mul", [factor, p + "constant"], [p + "exact"]),  # exact: at most 48 significant bits
        *rounding,
        make("Equal", [factor, p + "zero"], [p + "is_zero"]),
        make("Where", [p + "is_zero", p + "zero", p + "rounded"], [out]),
        make("Where", [p + "is_zero", p + "none", p + "rounded_exponent"], [out_exponent]),
        make("Where", [p + "is_zero", p + "none", p + "binade"], [out_log]),
    ]
    return nodes, exponent_inits + rounding_inits + inits


def mean_nodes(row_sum: str, features: int, mean: str, p: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing the HTP's row mean (module docstring) of the exact float64 ``row_sum`` of
    ``features`` uint16 codes into float64 ``mean`` (a float32 value)."""
    make = helper.make_node
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    high_factor = float(np.float32(65536.0 / features))
    low_factor = float(np.float32(1) / np.float32(features))
    inits = [numpy_helper.from_array(np.array(v), p + k)
             for k, v in {"inv65536": 2.0**-16, "k65536": 65536.0}.items()]
    high, high_inits = _qf32_product(p + "sum_high", high_factor, p + "high", p + "high_exponent", p + "high_log",
                                     p + "h_")
    low, low_inits = _qf32_product(p + "sum_low", low_factor, p + "low", p + "low_exponent", p + "low_log", p + "l_")
    total, total_inits = qf32_round(p + "total", p + "aligned", p + "mean_qf32", p + "mean_exponent",
                                    p + "mean_binade", p + "t_")
    nodes = [
        make("Mul", [row_sum, p + "inv65536"], [p + "sum_high_exact"]),
        make("Floor", [p + "sum_high_exact"], [p + "sum_high"]),
        make("Mul", [p + "sum_high", p + "k65536"], [p + "sum_high_part"]),
        make("Sub", [row_sum, p + "sum_high_part"], [p + "sum_low"]),
        *high,
        *low,
        # the qf32 sum's exponent: the larger-exponent operand's binade, or the other's exponent if higher
        make("Greater", [p + "high_exponent", p + "low_exponent"], [p + "high_leads"]),
        make("Max", [p + "high_log", p + "low_exponent"], [p + "high_led"]),
        make("Max", [p + "low_log", p + "high_exponent"], [p + "low_led"]),
        make("Where", [p + "high_leads", p + "high_led", p + "low_led"], [p + "aligned"]),
        # float64 keeps every bit of the sum that the rounding's decisions read (the low product is
        # below 1/16 of the qf32 step wherever its last bits fall outside float64's 53)
        make("Add", [p + "high", p + "low"], [p + "total"]),
        *total,
        make("Cast", [p + "mean_qf32"], [p + "mean32"], to=single),
        make("Cast", [p + "mean32"], [mean], to=double),
    ]
    return nodes, inits + high_inits + low_inits + total_inits


def lower_layer_norm16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A 16-bit LayerNormalization (layer_norm_operands) on v73 or later, as the module docstring says;
    None for anything else."""
    ln = layer_norm_operands(node, context, 16)
    if ln is None or context.arch < 73:
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    chain, inits = centered_codes(node.input[0], ln.x, p + "codes32")
    values = {"input_zero_point": float(-ln.x.offset), "features": float(ln.features),
              "features_squared": float(ln.features)**2, "epsilon": ln.epsilon / ln.s_x**2, "one": 1.0, "zero": 0.0,
              "ratio": float(np.float32(ln.s_gamma / ln.s_out)),
              "two": 2.0, "multiplier_bits": float(MULTIPLIER_BITS), "lowest": 2.0**MULTIPLIER_BITS,
              "highest": 2.0 ** (MULTIPLIER_BITS + 1) - 1}
    inits += [numpy_helper.from_array(np.array(v), p + k) for k, v in values.items()]
    inits += [numpy_helper.from_array(ln.gamma_codes, p + "gamma"),
              numpy_helper.from_array(ln.beta_steps - ln.y.offset + 0.5, p + "beta_shifted")]  # B + z_out + 1/2
    row_sum, sum_inits = reduction("ReduceSum", p + "codes", p + "sum", [-1], True, context.opset)
    square_sum, square_inits = reduction("ReduceSum", p + "squares", p + "square_sum", [-1], True, context.opset)
    mean, mean_inits = mean_nodes(p + "sum", ln.features, p + "mean", p + "m_")
    exponent, exponent_inits = exponent_nodes(p + "gain", p + "gain_exponent", p + "gain_power", p + "g_")
    inits += sum_inits + square_inits + mean_inits + exponent_inits
    chain += [
        make("Cast", [p + "codes32"], [p + "centered"], to=double),
        make("Add", [p + "centered", p + "input_zero_point"], [p + "codes"]),
        row_sum,
        make("Mul", [p + "codes", p + "codes"], [p + "squares"]),
        square_sum,
        *mean,
        make("Sub", [p + "codes", p + "mean"], [p + "deviation"]),
        make("Mul", [p + "square_sum", p + "features"], [p + "scaled_square_sum"]),
        make("Mul", [p + "sum", p + "sum"], [p + "sum_squared"]),
        make("Sub", [p + "scaled_square_sum", p + "sum_squared"], [p + "spread"]),
        make("Div", [p + "spread", p + "features_squared"], [p + "variance"]),
        make("Add", [p + "variance", p + "epsilon"], [p + "rsqrt_argument"]),
        make("Sqrt", [p + "rsqrt_argument"], [p + "root"]),
        make("Div", [p + "one", p + "root"], [p + "rsqrt64"]),
        make("Cast", [p + "rsqrt64"], [p + "rsqrt32"], to=single),
        make("Cast", [p + "rsqrt32"], [p + "rsqrt"], to=double),
        make("Mul", [p + "rsqrt", p + "ratio"], [p + "gain"]),
        *exponent,
        # K = round(R 2^(15 - e)): 2^15 becomes 65535 at the exponent below, 2^16 saturates
        make("Sub", [p + "multiplier_bits", p + "gain_exponent"], [p + "gain_shift"]),
        make("Pow", [p + "two", p + "gain_shift"], [p + "gain_scale"]),
        make("Mul", [p + "gain", p + "gain_scale"], [p + "multiplier_exact"]),
        make("Round", [p + "multiplier_exact"], [p + "multiplier_rounded"]),
        make("Equal", [p + "multiplier_rounded", p + "lowest"], [p + "at_lowest"]),
        make("Min", [p + "multiplier_rounded", p + "highest"], [p + "multiplier_capped"]),
        make("Where", [p + "at_lowest", p + "highest", p + "multiplier_capped"], [p + "multiplier"]),
        make("Cast", [p + "at_lowest"], [p + "at_lowest64"], to=double),
        make("Add", [p + "gain_shift", p + "at_lowest64"], [p + "product_shift"]),
        make("Neg", [p + "product_shift"], [p + "unit_exponent"]),
        make("Pow", [p + "two", p + "unit_exponent"], [p + "unit"]),
        make("Mul", [p + "deviation", p + "gamma"], [p + "scaled"]),
        make("Mul", [p + "scaled", p + "multiplier"], [p + "product"]),
        make("Mul", [p + "product", p + "unit"], [p + "normalized_any"]),
        make("Equal", [p + "variance", p + "zero"], [p + "constant_row"]),
        make("Where", [p + "constant_row", p + "zero", p + "normalized_any"], [p + "normalized"]),
        make("Add", [p + "normalized", p + "beta_shifted"], [p + "shifted"]),
    ]
    nodes, inits, _ = with_output_codes(chain, inits, p, ln.y, p + "shifted", node.output[0])
    return nodes, inits, ln.consumed
