"""The HTP's 16-bit Gelu (a fused GELU: graph/fusions.py), in the fixed point a helper's probes decoded.

At 8 bits the HTP's Gelu is exact GELU then rounding, which the float chain already gives. At 16 bits
it is (tools/HTP.md finding 38; v68 and v73 alike), with ``c`` the centered input code:

- ``u = round(|c| rho)``, ``rho = s_x / sqrt 2 * 2^14`` to a 15-bit mantissa: ``|x| / sqrt 2`` in Q14;
- ``erf`` in Q11 per unit segment of ``u / 2^14``, by Horner in ``u`` with products shifted by 16:
  segment 0 truncates its inner shifts, segment 1 rounds all three (both exact on every probe);
  segments 2 and 3 (``|x| >= 2 sqrt 2``) are cubics fitted to the probes (not decoded: 0.5-3% of the
  codes of a probe reaching them off, up to 14 steps); from ``u >= 4`` the table's end, 4095;
- ``k = 2048 + e`` for ``x >= 0`` and ``max(0, 4096 - 2048 - e)`` below: Phi in Q12;
- ``w = round_half_away(c k / 2^12)``: the output first on the input's grid;
- ``|w| M`` shifted right by ``S`` (``M / 2^S`` the step ratio ``s_x / s_y`` to a 15-bit mantissa):
  truncated for ``S <= 15``, otherwise rounded from the 15th bit; then ``z_y`` added with ``w``'s sign.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding
from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, with_output_codes

SEGMENT_FIT = {2: (0.9959356734488427, 0.014359333559816107, -0.016645228172528278, 0.006342069344285332),
               3: (1.0000916911952564, -0.0025850998110275997, 0.006035744822869059, -0.004275151381539786)}
"""erf on segments 2 and 3 of ``u / 2^14`` as a cubic in the segment's fraction (fitted, not decoded)."""
Q14 = 2**14
HALF_SHIFT = 2**15


def mantissa15(value: float) -> tuple[int, int]:
    """``value`` as ``M / 2^S`` with a 15-bit mantissa ``M``, rounded half up."""
    exponent = math.floor(math.log2(value))
    shift = 14 - exponent
    return math.floor(value * 2.0**shift + 0.5), shift


def lower_gelu16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The last node of a fused GELU whose input and output are 16-bit, as the HTP computes it; None otherwise."""
    fusion = context.targets.fusions.get(node.output[0]) if node.output else None
    if fusion is None or fusion.op_type != "Gelu":
        return None
    x_enc, y_enc = context.activations.get(fusion.input), context.activations.get(fusion.output)
    if not of_bitwidth(16, x_enc, y_enc) or x_enc.is_symmetric or y_enc.is_symmetric:
        return None
    return _gelu16(fusion.input, fusion.output, x_enc, y_enc)


def _gelu16(x: str, y: str, x_enc: Encoding, y_enc: Encoding) -> Lowered:
    p = f"{y}{SUFFIX}/"
    make = helper.make_node
    s_x, s_y = float(np.float32(x_enc.scale)), float(np.float32(y_enc.scale))
    rho_m, rho_s = mantissa15(s_x / math.sqrt(2) * Q14)
    ratio_m, ratio_s = mantissa15(float(np.float32(np.float32(s_x) / np.float32(s_y))))
    chain, inits = centered_codes(x, x_enc, p + "codes32")
    constants = {"rho": rho_m / 2.0**rho_s, "inv14": 2.0**-14, "inv16": 2.0**-16, "half16": float(HALF_SHIFT),
                 "zero": 0.0, "one": 1.0, "two": 2.0, "end": 4.0 * Q14, "full": 4095.0, "center": 2048.0,
                 "q12": 4096.0, "inv12": 2.0**-12, "m": float(ratio_m), "half": 0.5,
                 "zero_point_half": 0.5 - y_enc.offset}
    inits += [numpy_helper.from_array(np.array(v), p + k) for k, v in constants.items()]

    def shifted(product: str, rounded: bool, out: str) -> list[onnx.NodeProto]:
        """``out = (product [+ 2^15]) >> 16``."""
        nodes = [make("Add", [product, p + "half16"], [out + "_r"])] if rounded else []
        return [*nodes, make("Mul", [out + "_r" if rounded else product, p + "inv16"], [out + "_f"]),
                make("Floor", [out + "_f"], [out])]

    def constant(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(float(value)), p + name))
        return p + name

    chain += [
        make("Cast", [p + "codes32"], [p + "c"], to=onnx.TensorProto.DOUBLE),
        make("Abs", [p + "c"], [p + "abs"]),
        make("Mul", [p + "abs", p + "rho"], [p + "u_f"]),
        make("Add", [p + "u_f", p + "half"], [p + "u_r"]),
        make("Floor", [p + "u_r"], [p + "u"]),
        make("Mul", [p + "u", p + "inv14"], [p + "seg_f"]),
        make("Floor", [p + "seg_f"], [p + "seg"]),
        # segment 0: a2 = -5413 + (-19971 u >> 16); a1 = 9495 + (a2 u >> 16); e = (a1 u + 2^15) >> 16
        make("Mul", [p + "u", constant("s0_c2", -19971)], [p + "s0_p2"]),
        *shifted(p + "s0_p2", False, p + "s0_t2"),
        make("Add", [p + "s0_t2", constant("s0_a2", -5413)], [p + "s0_a2v"]),
        make("Mul", [p + "s0_a2v", p + "u"], [p + "s0_p1"]),
        *shifted(p + "s0_p1", False, p + "s0_t1"),
        make("Add", [p + "s0_t1", constant("s0_a1", 9495)], [p + "s0_a1v"]),
        make("Mul", [p + "s0_a1v", p + "u"], [p + "s0_p0"]),
        *shifted(p + "s0_p0", True, p + "e0"),
        # segment 1: a2 = -27869 + round(19199 u); a1 = 13768 + round(a2 u); e = -277 + round(a1 u), each >> 16
        make("Mul", [p + "u", constant("s1_c2", 19199)], [p + "s1_p2"]),
        *shifted(p + "s1_p2", True, p + "s1_t2"),
        make("Add", [p + "s1_t2", constant("s1_a2", -27869)], [p + "s1_a2v"]),
        make("Mul", [p + "s1_a2v", p + "u"], [p + "s1_p1"]),
        *shifted(p + "s1_p1", True, p + "s1_t1"),
        make("Add", [p + "s1_t1", constant("s1_a1", 13768)], [p + "s1_a1v"]),
        make("Mul", [p + "s1_a1v", p + "u"], [p + "s1_p0"]),
        *shifted(p + "s1_p0", True, p + "s1_t0"),
        make("Add", [p + "s1_t0", constant("s1_a0", -277)], [p + "e1"]),
    ]
    for segment, (c0, c1, c2, c3) in SEGMENT_FIT.items():
        q = f"{p}s{segment}_"
        chain += [
            make("Sub", [p + "seg_f", constant(f"s{segment}_base", segment)], [q + "t"]),
            make("Mul", [q + "t", constant(f"s{segment}_c3", c3)], [q + "h3"]),
            make("Add", [q + "h3", constant(f"s{segment}_c2", c2)], [q + "h2"]),
            make("Mul", [q + "h2", q + "t"], [q + "g2"]),
            make("Add", [q + "g2", constant(f"s{segment}_c1", c1)], [q + "h1"]),
            make("Mul", [q + "h1", q + "t"], [q + "g1"]),
            make("Add", [q + "g1", constant(f"s{segment}_c0", c0)], [q + "h0"]),
            make("Mul", [q + "h0", constant(f"s{segment}_q11", 2048.0)], [q + "scaled"]),
            make("Add", [q + "scaled", p + "half"], [q + "shifted"]),
            make("Floor", [q + "shifted"], [f"{p}e{segment}"]),
        ]
    chain += [
        make("Equal", [p + "seg", p + "zero"], [p + "is0"]),
        make("Equal", [p + "seg", p + "one"], [p + "is1"]),
        make("Equal", [p + "seg", p + "two"], [p + "is2"]),
        make("Where", [p + "is2", p + "e2", p + "e3"], [p + "e23"]),
        make("Where", [p + "is1", p + "e1", p + "e23"], [p + "e123"]),
        make("Where", [p + "is0", p + "e0", p + "e123"], [p + "e"]),
        make("Add", [p + "e", p + "center"], [p + "kp_all"]),
        make("Less", [p + "u", p + "end"], [p + "in_table"]),
        make("Where", [p + "in_table", p + "kp_all", p + "full"], [p + "kp"]),
        make("Sub", [p + "q12", p + "kp"], [p + "kn_raw"]),
        make("Max", [p + "kn_raw", p + "zero"], [p + "kn"]),
        make("Less", [p + "c", p + "zero"], [p + "negative"]),
        make("Where", [p + "negative", p + "kn", p + "kp"], [p + "k"]),
        # w = round_half_away(c k / 2^12), on the input's grid
        make("Mul", [p + "abs", p + "k"], [p + "wk"]),
        make("Add", [p + "wk", p + "center"], [p + "wk_r"]),
        make("Mul", [p + "wk_r", p + "inv12"], [p + "w_f"]),
        make("Floor", [p + "w_f"], [p + "w_abs"]),
        make("Mul", [p + "w_abs", p + "m"], [p + "a"]),
    ]
    if ratio_s <= 15:
        chain += [make("Mul", [p + "a", constant("inv_s", 2.0**-ratio_s)], [p + "v_f"]),
                  make("Floor", [p + "v_f"], [p + "v"])]
    else:
        chain += [make("Mul", [p + "a", constant("inv15", 2.0**-15)], [p + "a15_f"]),
                  make("Floor", [p + "a15_f"], [p + "a15"]),
                  make("Add", [p + "a15", constant("round_bit", 2.0 ** (ratio_s - 16))], [p + "a15_r"]),
                  make("Mul", [p + "a15_r", constant("inv_rest", 2.0 ** -(ratio_s - 15))], [p + "v_f"]),
                  make("Floor", [p + "v_f"], [p + "v"])]
    chain += [
        make("Neg", [p + "v"], [p + "v_neg"]),
        make("Where", [p + "negative", p + "v_neg", p + "v"], [p + "signed"]),
        make("Add", [p + "signed", p + "zero_point_half"], [p + "shifted"]),  # an integer: the floor keeps it
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", y)
