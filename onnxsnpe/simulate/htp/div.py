"""The 8-bit Div of two activations as the HTP computes it, approximately (tools/HTP.md finding 59).

Emulator probes (all 65,536 code pairs at 34 encodings, tools/fit_div_reciprocals.py) show the
HTP dividing by the divisor's centered integer code ``c``, not by its value: with ``a`` the
numerator's centered code and ``K = s_a / (s_b s_y)``,

    v = round_13(a * r(|c|) * sign(c) * K),    code = clamp(floor(v + z_y + 1/2))

where ``r(c)`` is within about 5e-4 of ``1 / c`` (its error has the shape of a quadratic
interpolated per quarter of the mantissa range) and ``round_13`` keeps 13 significant bits. Neither
part is decoded exactly: ``r`` is a table measured per code (RECIPROCAL_ERROR), and on eight
held-out probes the model misses 437 of 522,240 codes where float division then rounding misses
2,162 (each one step, at an exact value within 0.1 of a half step). A zero divisor gives the top
code for ``a >= 0``, the bottom one otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .codes import SUFFIX, Context, Lowered, binary_operands, centered_codes, with_output_codes

RECIPROCAL_ERROR = (
    0, 0, 2045, -440, 1195, 1820, 85, -140, -285, 2060, -150, 2245, -480, 850, 0,
    455, 4515, -460, -4255, 2180, 3205, -460, -3250, 2245, 2300, -600, -2120, 850, 1515, 0,
    -1180, -415, 3940, 4515, 2820, -460, -3305, -4255, -3500, 2045, 3600, 3205, 1775, -475, -2440,
    -3060, -1915, 1865, 1800, 1950, 755, -655, -1120, -2900, -1930, 850, 975, 1365, 795, -110,
    -960, -1065, -1395, -10, 2585, 4130, 5140, 4495, 3730, 2820, 890, -390, -2070, -3335, -4560,
    -4355, -4230, -3340, -875, 2490, 3660, 3390, 3745, 3205, 2115, 1990, 485, -420, -1425, -2440,
    -2630, -2840, -2860, -2080, -875, 1980, 1600, 1750, 2350, 1950, 2195, 755, -585, -600, -1190,
    -1095, -1765, -2090, -2370, -1980, -1045, 700, 1310, 1055, 1685, 1375, 605, 700, 380, -45,
    280, -1130, -1300, -1115, -630, -1390, -610, -185, 1445, 2495, 2940, 3635, 4270, 4485, 4725,
    4570, 4185, 4095, 2935, 2760, 1755, 925, 630, -285, -1595, -2000, -3490, -3355, -4140, -4250,
    -4915, -4455, -5340, -4340, -3950, -3140, -2120, -875, -10, 2075, 2240, 3660, 3280, 3630, 3915,
    3810, 2930, 3315, 2700, 2175, 2375, 1775, 1555, 230, -95, -215, -1210, -1305, -1370, -2135,
    -2135, -2630, -3090, -2995, -2765, -2860, -2665, -2485, -1910, -765, 985, 1980, 1795, 1600, 1780,
    1945, 2530, 2460, 1650, 1950, 1405, 2030, 1405, 970, 425, -260, -500, -600, -1175, -1445,
    -1075, -1075, -1705, -1565, -2165, -1715, -2615, -2675, -1060, -1500, -1265, -560, -520, 560, 1055,
    1305, 1630, 1075, 1080, 2135, 1605, 1595, 1180, 960, 155, 700, 390, 595, -615, 0,
    -90, 100, -175, -1090, -835, -1300, -700, -1165, -1375, -630, -1395, -975, -1285, -495, -170,
)
"""``r(c) c - 1`` for c = 1 to 255, in units of 10^-7 (fitted to the probes; 0 where they leave it free)."""
SIGNIFICANT_BITS = 13
"""The bits ``v`` keeps (its rounding: the Veltkamp split in float64, to nearest)."""
ZERO_DIVISOR = 2.0**40
"""A value beyond every output range, signed as the numerator, for a zero divisor."""


def reciprocals() -> np.ndarray:
    """``sign(c) r(|c|)`` for c = -255 to 255 (index ``c + 255``), 0 at c = 0."""
    magnitudes = np.arange(1, 256, dtype=np.float64)
    positive = (1 + np.array(RECIPROCAL_ERROR, dtype=np.float64) * 1e-7) / magnitudes
    return np.concatenate([-positive[::-1], [0.0], positive])


def lower_div(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit Div of two activations (neither a constant) in the module docstring's arithmetic, or None."""
    operands = binary_operands(node, context.targets, context.activations, context.params)
    if operands is None or any(name in context.constants for name in node.input):
        return None
    (a_enc, b_enc), y_enc = operands
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for index, (name, enc) in enumerate(zip(node.input, (a_enc, b_enc), strict=True)):
        nodes, code_inits = centered_codes(name, enc, f"{p}{index}/centered")
        chain += nodes
        inits += code_inits
    ratio = float(np.float32(a_enc.scale)) / (float(np.float32(b_enc.scale)) * float(np.float32(y_enc.scale)))
    inits += [
        numpy_helper.from_array(reciprocals() * ratio, p + "reciprocals"),
        numpy_helper.from_array(np.array(255, dtype=np.int64), p + "table_zero"),
        numpy_helper.from_array(np.array(2.0 ** (53 - SIGNIFICANT_BITS) + 1), p + "split"),
        numpy_helper.from_array(np.array(0.0), p + "zero"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), p + "zero_code"),
        numpy_helper.from_array(np.array(ZERO_DIVISOR), p + "top"),
        numpy_helper.from_array(np.array(-ZERO_DIVISOR), p + "bottom"),
        numpy_helper.from_array(np.array(-y_enc.offset + 0.5), p + "zero_half"),
    ]
    chain += [
        make("Cast", [f"{p}1/centered"], [p + "divisor"], to=onnx.TensorProto.INT64),
        make("Add", [p + "divisor", p + "table_zero"], [p + "index"]),
        make("Gather", [p + "reciprocals", p + "index"], [p + "reciprocal"]),
        make("Cast", [f"{p}0/centered"], [p + "numerator"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [p + "numerator", p + "reciprocal"], [p + "value"]),
        make("Mul", [p + "value", p + "split"], [p + "spread"]),
        make("Sub", [p + "spread", p + "value"], [p + "excess"]),
        make("Sub", [p + "spread", p + "excess"], [p + "v13"]),  # v to 13 significant bits
        make("Equal", [p + "divisor", p + "zero_code"], [p + "by_zero"]),
        make("GreaterOrEqual", [p + "numerator", p + "zero"], [p + "not_negative"]),
        make("Where", [p + "not_negative", p + "top", p + "bottom"], [p + "saturated"]),
        make("Where", [p + "by_zero", p + "saturated", p + "v13"], [p + "quotient"]),
        make("Add", [p + "quotient", p + "zero_half"], [p + "real_half"]),
    ]
    chain, inits, _ = with_output_codes(chain, inits, p, y_enc, p + "real_half", node.output[0])
    return chain, inits, set()
