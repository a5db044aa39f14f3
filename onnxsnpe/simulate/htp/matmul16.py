"""The HTP's MatMul of two 16-bit activations (attention scores and context), as a helper's probes on
v73 decoded it (tools/HTP.md finding 44).

With ``A`` [..., M, K] and ``B`` [..., K, N] (uint16 codes ``u_a``, ``u_b``), the HTP:

- narrows ``B`` to an 8-bit grid: ``j = floor((255 u_b + 33279 - 512 Z) / 2^16)`` with ``Z =
  ceil(255 z_b / 512)`` (the zero point converted with 7 fraction bits), clamped to ``[-z8, 255 - z8]``,
  ``z8 = floor((Z + 64) / 128)``;
- re-expresses each column of ``j`` (over ``K``, per head) that leaves int8 with the step ``max(min /
  -128, max / 127)`` rounded to 1/2048, dividing through a 16-bit reciprocal: ``floor((j round(2^16 /
  step) + 2^15) / 2^16)``;
- multiplies the uncentered ``u_a`` by ``j``, drops the sum's 8 low bits and takes away ``floor(z_a
  sum(j) / 2^8 + 1/2)``: ``T``;
- requantizes ``floor((T + 2^-8) m_c + z_out + 1/2)``, ``m_c = float32(m step_c)``, ``m =
  float32(float32(s_a s_b) 257 2^8) / s_out``: as if the truncated sum kept one dropped bit, an
  empirical shift (finding 54): bit for bit where both inputs are 8-bit tensors converted to 16 bits
  (MiniLM-L6's first scores MatMul under auto precision 43 -> 0 of 49,152 off; 147,456 random values
  on its encodings 140 -> 0), on the general 16-bit probes 12 -> 10 of 12,288, which no constant
  shift fits exactly.

The model's ``s_b`` stays the 16-bit step: the narrowed step is ``257 s_b``. On the helper's probes
(scratch /work/scratch/s17/h_mm16, mm16rule.py, verify.py, 48 probe files) 14,400,807 of 14,409,856
codes were bit for bit with a float32 requantization, none more than one step off; every miss lay
within 0.01 of a tie (the shift above takes a few of them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..fake_quant import NARROW_ROUNDING
from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, output_encoding, reduction, with_output_codes

STEP_RESOLUTION = 2048
"""A re-expressed column's step is a multiple of 1/2048."""


def lower_matmul16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A MatMul of two asymmetric 16-bit activations with a 16-bit output, on v73 or later (where it
    was probed), as the module docstring says; None otherwise."""
    if node.op_type != "MatMul" or node.input[1] in context.constants or context.arch < 73:
        return None
    a_enc, b_enc = context.activations.get(node.input[0]), context.activations.get(node.input[1])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[1])
    if (not of_bitwidth(16, a_enc, b_enc, y_enc) or any(e.is_symmetric for e in (a_enc, b_enc, y_enc))
            or not shape or len(shape) < 2):
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    z_a, z_b = -a_enc.offset, -b_enc.offset
    converted = -((-255 * z_b) // 512)  # ceil(255 z_b / 512)
    z8 = (converted + 64) // 128
    f32 = np.float32
    multiplier = f32(f32(f32(f32(a_enc.scale) * f32(b_enc.scale)) * f32(257 * 256)) / f32(y_enc.scale))
    values = {"za": float(z_a), "zb": float(z_b), "k255": 255.0,
              "narrow_offset": float(NARROW_ROUNDING - 512 * converted),
              "inv65536": 2.0**-16, "j_low": float(-z8), "j_high": float(255 - z8), "int8_low": -128.0,
              "int8_high": 127.0, "neg128": -1 / 128, "inv127": 1 / 127, "res": float(STEP_RESOLUTION),
              "inv_res": 1 / STEP_RESOLUTION, "one": 1.0, "half": 0.5, "inv256": 2.0**-8,
              "two16": 2.0**16, "two15": 2.0**15}
    inits = [numpy_helper.from_array(np.array(v), p + k) for k, v in values.items()]
    inits += [numpy_helper.from_array(np.array(multiplier, dtype=np.float32), p + "m"),
              numpy_helper.from_array(np.array(-y_enc.offset + 0.5), p + "zero_point_half"),
              numpy_helper.from_array(np.array(2.0**-8), p + "last_bit")]
    a_codes, a_inits = centered_codes(node.input[0], a_enc, p + "ca")
    b_codes, b_inits = centered_codes(node.input[1], b_enc, p + "cb")
    k_axis = len(shape) - 2
    least, least_axes = reduction("ReduceMin", p + "j", p + "j_min", [k_axis], True, context.opset)
    most, most_axes = reduction("ReduceMax", p + "j", p + "j_max", [k_axis], True, context.opset)
    column_sum, sum_axes = reduction("ReduceSum", p + "jr", p + "j_sum", [k_axis], True, context.opset)
    inits += [*a_inits, *b_inits, *least_axes, *most_axes, *sum_axes]

    chain = [
        *a_codes, *b_codes,
        make("Cast", [p + "ca"], [p + "ca64"], to=double), make("Add", [p + "ca64", p + "za"], [p + "ua"]),
        make("Cast", [p + "cb"], [p + "cb64"], to=double), make("Add", [p + "cb64", p + "zb"], [p + "ub"]),
        # B narrowed to its 8-bit grid, centered, clamped
        make("Mul", [p + "ub", p + "k255"], [p + "ub255"]),
        make("Add", [p + "ub255", p + "narrow_offset"], [p + "nb"]),
        make("Mul", [p + "nb", p + "inv65536"], [p + "nb_scaled"]), make("Floor", [p + "nb_scaled"], [p + "j_raw"]),
        make("Clip", [p + "j_raw", p + "j_low", p + "j_high"], [p + "j"]),
        # each column beyond int8 re-expressed with a step on 1/2048
        least, most,
        make("Less", [p + "j_min", p + "int8_low"], [p + "under"]),
        make("Greater", [p + "j_max", p + "int8_high"], [p + "over"]),
        make("Or", [p + "under", p + "over"], [p + "beyond"]),
        make("Mul", [p + "j_min", p + "neg128"], [p + "step_low"]),
        make("Mul", [p + "j_max", p + "inv127"], [p + "step_high"]),
        make("Max", [p + "step_low", p + "step_high"], [p + "step_exact"]),
        make("Mul", [p + "step_exact", p + "res"], [p + "step_units"]),
        make("Round", [p + "step_units"], [p + "step_round"]),
        make("Mul", [p + "step_round", p + "inv_res"], [p + "step_grid"]),
        make("Where", [p + "beyond", p + "step_grid", p + "one"], [p + "step"]),
        # divided through a 16-bit reciprocal: floor((j round(2^16 / step) + 2^15) / 2^16) (j itself where step is 1)
        make("Div", [p + "two16", p + "step"], [p + "reciprocal_exact"]),
        make("Round", [p + "reciprocal_exact"], [p + "reciprocal"]),
        make("Mul", [p + "j", p + "reciprocal"], [p + "j_scaled"]),
        make("Add", [p + "j_scaled", p + "two15"], [p + "j_half"]),
        make("Mul", [p + "j_half", p + "inv65536"], [p + "j_down"]), make("Floor", [p + "j_down"], [p + "jr"]),
        # the product, its 8 low bits dropped, the input zero point's share apart
        make("MatMul", [p + "ua", p + "jr"], [p + "acc"], name=p + "MatMul"),
        make("Mul", [p + "acc", p + "inv256"], [p + "acc_down"]), make("Floor", [p + "acc_down"], [p + "acc_floor"]),
        column_sum, make("Mul", [p + "j_sum", p + "za"], [p + "zero_share"]),
        make("Mul", [p + "zero_share", p + "inv256"], [p + "zero_share_down"]),
        make("Add", [p + "zero_share_down", p + "half"], [p + "zero_share_half"]),
        make("Floor", [p + "zero_share_half"], [p + "zero_term"]),  # ties up
        make("Sub", [p + "acc_floor", p + "zero_term"], [p + "t"]),
        # requantized from the truncated sum plus 2^-8 (finding 54, empirical), a float32 multiplier per column
        make("Cast", [p + "step"], [p + "step32"], to=single),
        make("Mul", [p + "step32", p + "m"], [p + "m_column"]),
        make("Cast", [p + "m_column"], [p + "m_column64"], to=double),
        make("Add", [p + "t", p + "last_bit"], [p + "t_up"]),
        make("Mul", [p + "t_up", p + "m_column64"], [p + "y64"]),
        make("Add", [p + "y64", p + "zero_point_half"], [p + "shifted"]),
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])
