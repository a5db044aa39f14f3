"""The HTP's 8-bit LayerNormalization over its last axis (uint8 input, output and gamma, int32 beta).

Decoded from a helper's emulator probes (tools/HTP.md finding 36: MiniLM-L6's 13 LayerNorms on 128
rows each, 638,976 values on v68 and v73, and 20 generated probes on v68, some on v73 too: every
value). Per row of ``N``
centered input codes ``c`` (exact integers):

- ``D = 64 c - floor(64 sum(c) / N)``: the mean is taken to 1/64 of a code, floored;
- ``var = sum(c^2) / N - (sum(c) / N)^2``, in codes;
- ``y = rsqrt(float32(var + eps / s_x^2))`` by the magic-constant method (``0x5f3759df`` minus half the
  float's bits) and two Newton steps in float32, ``y += y (1/2 - (x/2) y y)``: its error, up to 4.6e-6,
  shows in the outputs (an exact reciprocal square root misses one value in 10^5 to 10^6);
- ``K = floor(y 2^16 s_gamma / s_out)``, the row's integer multiplier;
- ``out = clamp(floor(D g K / 2^22 + 1/2) + B + z_out)`` with ``g`` the centered gamma codes and
  ``B = round_half_away(beta_code s_beta / s_out)``, beta in whole output steps.

The 16-bit LayerNorm (v73, a signed symmetric gamma) is another kernel: layer_norm16.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding, quantize, round_half_away
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, output_encoding, reduction, with_output_codes

MEAN_FRACTION = 64
"""The row mean is floored to 1/64 of an input code."""
MAGIC = 0x5F3759DF
"""The reciprocal square root's starting point: this constant minus half the float32's bits."""
NEWTON_STEPS = 2
MULTIPLIER_BITS = 16
"""``K`` carries ``y s_gamma / s_out`` with 16 fraction bits."""
PRODUCT_SHIFT = 22
"""``D g K`` is in units of 2^-22 output steps (6 bits of ``D``'s fraction and ``K``'s 16)."""
FLOAT32_MIN = float(np.finfo(np.float32).tiny)
"""The smallest normal float32: the reciprocal square root's argument is kept at or above it."""


def rsqrt_reference(x: np.ndarray) -> np.ndarray:
    """The HTP's reciprocal square root of positive normal float32 ``x`` (module docstring), in numpy."""
    x = np.asarray(x, dtype=np.float32)
    y = (np.uint32(MAGIC) - (x.view(np.uint32) >> np.uint32(1))).view(np.float32)
    half = x * np.float32(0.5)
    for _ in range(NEWTON_STEPS):
        y = y + y * (np.float32(0.5) - half * y * y)
    return y


@dataclass(frozen=True)
class LayerNormOperands:
    """What a LayerNorm lowering reads: the encodings, the gamma codes and beta in output steps."""

    x: Encoding
    y: Encoding
    features: int
    gamma_codes: np.ndarray
    """Centered (signed) gamma codes, float64."""
    beta_steps: np.ndarray
    """``round_half_away(beta_code s_beta / s_out)``: beta in whole output steps, float64."""
    s_x: float
    s_gamma: float
    s_out: float
    epsilon: float
    consumed: set[str]
    """The gamma and beta, which the lowering computes from their codes."""


def layer_norm_operands(node: onnx.NodeProto, context: Context, bitwidth: int) -> LayerNormOperands | None:
    """The operands of a LayerNormalization over the last axis at ``bitwidth`` (input and output) with
    constant per-feature gamma (uint8 asymmetric at 8 bits, int16 symmetric at 16, as onnxruntime-qnn
    takes them) and beta (a 32-bit bias encoding); None for anything else."""
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0]) or []
    if len(node.input) < 3 or not of_bitwidth(bitwidth, x_enc, y_enc) or not shape or not isinstance(shape[-1], int):
        return None
    if bitwidth == 16 and (x_enc.is_symmetric or y_enc.is_symmetric):  # probed on uint16 codes only
        return None
    if node_attributes(node).get("axis", -1) % len(shape) != len(shape) - 1:
        return None
    gamma, beta = node.input[1], node.input[2]
    g_enc, b_enc = context.params.get(gamma), context.params.get(beta)
    if not (isinstance(g_enc, Encoding) and g_enc.bitwidth == bitwidth and g_enc.is_symmetric == (bitwidth == 16)
            and isinstance(b_enc, Encoding) and b_enc.bitwidth == 32):
        return None
    if gamma not in context.constants or beta not in context.constants:
        return None
    features = shape[-1]
    g_values = initializer_array(context.constants[gamma]).reshape(-1)
    b_values = initializer_array(context.constants[beta]).reshape(-1)
    if g_values.size != features or b_values.size != features:
        return None
    s_x, s_gamma, s_beta, s_out = (float(np.float32(e.scale)) for e in (x_enc, g_enc, b_enc, y_enc))
    return LayerNormOperands(
        x_enc, y_enc, features, (quantize(g_values, g_enc) + g_enc.offset).astype(np.float64),
        round_half_away((quantize(b_values, b_enc) + b_enc.offset).astype(np.float64) * s_beta / s_out),
        s_x, s_gamma, s_out, float(node_attributes(node).get("epsilon", 1e-5)), {gamma, beta})


def lower_layer_norm(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit LayerNormalization (layer_norm_operands) as the HTP computes it; None for anything else."""
    ln = layer_norm_operands(node, context, 8)
    if ln is None:
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = centered_codes(node.input[0], ln.x, p + "codes32")
    inits += [
        numpy_helper.from_array(np.array(float(ln.features)), p + "features"),
        numpy_helper.from_array(np.array(float(MEAN_FRACTION)), p + "fraction"),
        numpy_helper.from_array(np.array(ln.epsilon / ln.s_x**2), p + "epsilon"),
        numpy_helper.from_array(np.array(2.0**MULTIPLIER_BITS * ln.s_gamma / ln.s_out), p + "multiplier"),
        numpy_helper.from_array(ln.gamma_codes, p + "gamma"),
        numpy_helper.from_array(np.array(2.0**-PRODUCT_SHIFT), p + "unit"),
        numpy_helper.from_array(ln.beta_steps - ln.y.offset + 0.5, p + "beta_shifted"),  # B + z_out + 1/2
    ]
    row_sum, sum_inits = reduction("ReduceSum", p + "codes", p + "sum", [-1], True, context.opset)
    square_sum, square_inits = reduction("ReduceSum", p + "squares", p + "square_sum", [-1], True, context.opset)
    inits += sum_inits + square_inits
    chain += [
        make("Cast", [p + "codes32"], [p + "codes"], to=onnx.TensorProto.DOUBLE),
        row_sum,
        make("Mul", [p + "codes", p + "codes"], [p + "squares"]),
        square_sum,
        make("Mul", [p + "sum", p + "fraction"], [p + "sum64"]),
        make("Div", [p + "sum64", p + "features"], [p + "mean64_exact"]),
        make("Floor", [p + "mean64_exact"], [p + "mean64"]),
        make("Mul", [p + "codes", p + "fraction"], [p + "codes64"]),
        make("Sub", [p + "codes64", p + "mean64"], [p + "deviation"]),
        make("Div", [p + "sum", p + "features"], [p + "mean"]),
        make("Mul", [p + "mean", p + "mean"], [p + "mean_square"]),
        make("Div", [p + "square_sum", p + "features"], [p + "square_mean"]),
        make("Sub", [p + "square_mean", p + "mean_square"], [p + "variance"]),
        make("Add", [p + "variance", p + "epsilon"], [p + "rsqrt_argument"]),
    ]
    rsqrt_chain, rsqrt_inits = rsqrt_nodes(p + "rsqrt_argument", p + "rsqrt", p)
    chain += rsqrt_chain
    inits += rsqrt_inits
    chain += [
        make("Mul", [p + "rsqrt", p + "multiplier"], [p + "multiplier_exact"]),
        make("Floor", [p + "multiplier_exact"], [p + "row_multiplier"]),
        make("Mul", [p + "deviation", p + "gamma"], [p + "scaled"]),
        make("Mul", [p + "scaled", p + "row_multiplier"], [p + "product"]),
        make("Mul", [p + "product", p + "unit"], [p + "normalized"]),
        make("Add", [p + "normalized", p + "beta_shifted"], [p + "shifted"]),
    ]
    nodes, inits, _ = with_output_codes(chain, inits, p, ln.y, p + "shifted", node.output[0])
    return nodes, inits, ln.consumed


def exponent_nodes(
    x: str, exponent: str, power: str, p: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``floor(log2 x)`` of positive float64 ``x`` exactly, and ``2^`` that: a logarithm
    guesses it and comparisons with the neighbouring powers of two correct the guess (ONNX has no
    frexp). Names the nodes' intermediates with prefix ``p``."""
    make = helper.make_node
    double = onnx.TensorProto.DOUBLE
    inits = [numpy_helper.from_array(np.array(2.0), p + "two"),
             numpy_helper.from_array(np.array(1 / math.log(2)), p + "log2e")]
    nodes = [
        make("Log", [x], [p + "log"]),
        make("Mul", [p + "log", p + "log2e"], [p + "log2"]),
        make("Floor", [p + "log2"], [p + "exponent_guess"]),
        make("Pow", [p + "two", p + "exponent_guess"], [p + "power_guess"]),
        make("Less", [x, p + "power_guess"], [p + "too_high"]),
        make("Cast", [p + "too_high"], [p + "too_high64"], to=double),
        make("Sub", [p + "exponent_guess", p + "too_high64"], [p + "exponent_low"]),
        make("Pow", [p + "two", p + "exponent_low"], [p + "power_low"]),
        make("Mul", [p + "power_low", p + "two"], [p + "power_next"]),
        make("Less", [x, p + "power_next"], [p + "below_next"]),
        make("Not", [p + "below_next"], [p + "too_low"]),
        make("Cast", [p + "too_low"], [p + "too_low64"], to=double),
        make("Add", [p + "exponent_low", p + "too_low64"], [exponent]),
        make("Pow", [p + "two", exponent], [power]),
    ]
    return nodes, inits


def rsqrt_nodes(argument: str, output: str, p: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing rsqrt_reference of float64 ``argument`` (rounded to float32) into float64 ``output``.

    ONNX has no bit cast, so the float32's bits ``(e + 127) 2^23 + m 2^23`` are computed from its
    exponent ``e`` (a logarithm, corrected by comparing with powers of two) and mantissa ``m``, and the
    starting point's bits turned back the same way, all exact in float64; the Newton steps run in
    float32, rounding after each operation as the HTP does."""
    make = helper.make_node
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    nodes, inits = exponent_nodes(p + "x64", p + "exponent", p + "power", p)
    inits += [
        numpy_helper.from_array(np.array(FLOAT32_MIN, dtype=np.float32), p + "rsqrt_floor"),
        numpy_helper.from_array(np.array(1.0), p + "one"),
        numpy_helper.from_array(np.array(127.0), p + "bias"),
        numpy_helper.from_array(np.array(2.0**23), p + "mantissa_unit"),
        numpy_helper.from_array(np.array(2.0**-23), p + "mantissa_step"),
        numpy_helper.from_array(np.array(0.5), p + "half64"),
        numpy_helper.from_array(np.array(float(MAGIC)), p + "magic"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), p + "half32"),
    ]
    nodes = [
        make("Cast", [argument], [p + "x_raw"], to=single),
        make("Max", [p + "x_raw", p + "rsqrt_floor"], [p + "x"]),
        make("Cast", [p + "x"], [p + "x64"], to=double),
        *nodes,
        make("Div", [p + "x64", p + "power"], [p + "significand"]),
        make("Sub", [p + "significand", p + "one"], [p + "mantissa"]),
        make("Mul", [p + "mantissa", p + "mantissa_unit"], [p + "mantissa_bits"]),
        make("Add", [p + "exponent", p + "bias"], [p + "biased"]),
        make("Mul", [p + "biased", p + "mantissa_unit"], [p + "exponent_bits"]),
        make("Add", [p + "exponent_bits", p + "mantissa_bits"], [p + "bits"]),
        make("Mul", [p + "bits", p + "half64"], [p + "half_bits_exact"]),
        make("Floor", [p + "half_bits_exact"], [p + "half_bits"]),
        make("Sub", [p + "magic", p + "half_bits"], [p + "start_bits"]),
        make("Mul", [p + "start_bits", p + "mantissa_step"], [p + "start_exponent_exact"]),
        make("Floor", [p + "start_exponent_exact"], [p + "start_biased"]),
        make("Mul", [p + "start_biased", p + "mantissa_unit"], [p + "start_exponent_bits"]),
        make("Sub", [p + "start_bits", p + "start_exponent_bits"], [p + "start_mantissa_bits"]),
        make("Mul", [p + "start_mantissa_bits", p + "mantissa_step"], [p + "start_mantissa"]),
        make("Add", [p + "start_mantissa", p + "one"], [p + "start_significand"]),
        make("Sub", [p + "start_biased", p + "bias"], [p + "start_exponent"]),
        make("Pow", [p + "two", p + "start_exponent"], [p + "start_power"]),
        make("Mul", [p + "start_power", p + "start_significand"], [p + "start64"]),
        make("Cast", [p + "start64"], [p + "y0"], to=single),
        make("Mul", [p + "x", p + "half32"], [p + "half_x"]),
    ]
    estimate = p + "y0"
    for step in range(NEWTON_STEPS):
        q = f"{p}newton{step}_"
        nodes += [
            make("Mul", [p + "half_x", estimate], [q + "a"]),
            make("Mul", [q + "a", estimate], [q + "b"]),
            make("Sub", [p + "half32", q + "b"], [q + "c"]),
            make("Mul", [estimate, q + "c"], [q + "d"]),
            make("Add", [estimate, q + "d"], [q + "y"]),
        ]
        estimate = q + "y"
    nodes.append(make("Cast", [estimate], [output], to=double))
    return nodes, inits
