"""The 16-bit Mul of two activations, or of one and a constant, as the HTP computes it (tools/HTP.md
findings 31 and 60).

A helper's emulator probes (329 generated Muls, 105 M output codes, every one equal) fit one
integer recipe. With ``M = f32(f32(s_a s_b) / s_y)``, ``k = max(0, floor(log2 M) + 4)`` (0 unless
``M >= 1/8``) and the multiplier ``m = rint(M 2^(34 - k))`` (ties to even, below 2^31):

    N = 2^16 + 65535 (z_a + z_b) - 2 z_a z_b
    R = floor((N m + 2^30) / 2^31)
    X = floor(((c_a c_b + N) m - R 2^31 + 2^33) / 2^34)
    code = clamp(z_y + X 2^k)

``c`` the centered codes ``q - z``: the product carries the constant ``N`` through the
multiplication and takes off its rounded share ``R`` (at 1/8 of an output step), so the result is
exact rounding but for a per-encoding offset under 1/16 of a step (0.6-8% of codes differ from
exact rounding). Computed here in int64, exact while the products stay below 2^62, checked when the
model is built: a multiplier ``M`` of about 1/32 or more (an output range thousands of times
narrower than the products') keeps the float computation, the shifted regime ``M >= 1/8`` with it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding, quantize
from ...graph.large import initializer_array
from .codes import SUFFIX, Context, Lowered, binary_operands, centered_codes, with_output_codes

INT64_SAFE = 2**62
"""The bound every int64 intermediate stays below."""


def mul16_constants(scales: tuple[float, float], zero_points: tuple[int, int], out_scale: float,
                    ) -> tuple[int, int, int, int] | None:
    """The multiplier ``m``, ``N`` and ``R`` of the module docstring (``k`` is 0), and a multiple of
    2^34 that lifts the floor's numerator above zero (int64 Div truncates toward zero); or None when
    the numerator could leave int64, which every ``M >= 1/8`` (where ``k > 0``) does."""
    f32 = np.float32
    multiplier = float(f32(f32(f32(scales[0]) * f32(scales[1])) / f32(out_scale)))
    if not multiplier > 0 or not math.isfinite(multiplier):
        return None
    m = int(np.rint(multiplier * 2.0**34))
    z_a, z_b = zero_points
    n = 2**16 + 65535 * (z_a + z_b) - 2 * z_a * z_b  # at least 2^16 for codes in [0, 65535]
    r = (n * m + 2**30) >> 31
    reach = (65535**2 + n) * m  # the largest |(c_a c_b + N) m|
    lift = (reach // 2**34 + 3) * 2**34
    if reach + lift + r * 2**31 + 2**33 >= INT64_SAFE:
        return None
    return m, n, r, lift


def lower_mul16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A Mul of two 16-bit tensors (activations, or one a constant with a 16-bit per-tensor encoding)
    into a 16-bit output, in the HTP's integer recipe (module docstring), or None."""
    operands = binary_operands(node, context.targets, context.activations, context.params, bitwidth=16)
    constant = [name in context.constants for name in node.input]
    if operands is None or all(constant) or not all(isinstance(enc, Encoding) for enc in operands[0]):
        return None
    encs, y_enc = operands
    constants = mul16_constants((encs[0].scale, encs[1].scale), (-encs[0].offset, -encs[1].offset), y_enc.scale)
    if constants is None:
        return None
    m, n, r, lift = constants
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    wide = []
    for index, (name, enc) in enumerate(zip(node.input, encs, strict=True)):
        if constant[index]:  # its codes, as the QDQ model quantizes it
            codes = quantize(initializer_array(context.constants[name]), enc) + enc.offset
            inits.append(numpy_helper.from_array(codes.astype(np.int64), f"{p}{index}/wide"))
        else:
            nodes, code_inits = centered_codes(name, enc, f"{p}{index}/centered")
            chain += [*nodes, make("Cast", [f"{p}{index}/centered"], [f"{p}{index}/wide"], to=onnx.TensorProto.INT64)]
            inits += code_inits
        wide.append(f"{p}{index}/wide")
    inits += [
        numpy_helper.from_array(np.array(n, dtype=np.int64), p + "n"),
        numpy_helper.from_array(np.array(m, dtype=np.int64), p + "m"),
        numpy_helper.from_array(np.array(2**33 - r * 2**31 + lift, dtype=np.int64), p + "half"),
        numpy_helper.from_array(np.array(2**34, dtype=np.int64), p + "unit"),
        numpy_helper.from_array(np.array(-y_enc.offset + 0.5 - lift // 2**34, dtype=np.float64), p + "zero_half"),
    ]
    chain += [
        make("Mul", wide, [p + "product"]),
        make("Add", [p + "product", p + "n"], [p + "carried"]),
        make("Mul", [p + "carried", p + "m"], [p + "scaled"]),
        make("Add", [p + "scaled", p + "half"], [p + "lifted"]),
        make("Div", [p + "lifted", p + "unit"], [p + "floored"]),  # positive: truncation is the floor
        make("Cast", [p + "floored"], [p + "floored64"], to=onnx.TensorProto.DOUBLE),
        make("Add", [p + "floored64", p + "zero_half"], [p + "real_half"]),
    ]
    chain, inits, _ = with_output_codes(chain, inits, p, y_enc, p + "real_half", node.output[0])
    return chain, inits, set()
