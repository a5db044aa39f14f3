"""The HTP's 16-bit HardSigmoid (beta 1/2), on its fixed output grid 2^-16 (tools/HTP.md findings 17, 55).

With ``u - z`` the centered 16-bit input codes, the output code is

    clamp(floor((u - z) A + 2^15 + 1/2)),  A = float32(alpha s_x) 2^16,

the slope rounded to float32 and the product exact: bit for bit on every input code of six probes
(alpha 0.2 and 1/6, input ranges [-6, 4] to [-0.7, 0.9]), where rounding the float32 value of
``alpha x + 1/2`` (what onnxruntime computes) missed 8 to 40 of 65,536 codes, and up to 20,583 with
the float32 rounding of the sum itself. Probes with beta 0.3 and 0.61 do not follow ``65536 beta``:
only beta 1/2 (PP-OCR's, ONNX's default) is lowered. An 8-bit output computed on this grid is then
converted as fake_quant.fixed_grid_narrowed_nodes says.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.conversions import HTP_FIXED_16_BIT
from ...graph.ops import node_attributes
from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, output_encoding, with_output_codes

ALPHA, BETA = 0.2, 0.5
"""ONNX's HardSigmoid defaults."""


def lower_hard_sigmoid16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A HardSigmoid with a 16-bit input and beta 1/2 whose output the HTP computes on 2^-16 (its own
    16-bit output, or an 8-bit one converted after), as the module docstring says; None otherwise."""
    attrs = node_attributes(node)
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    if (node.op_type != "HardSigmoid" or attrs.get("beta", BETA) != BETA or not of_bitwidth(16, x_enc, y_enc)
            or y_enc != HTP_FIXED_16_BIT["HardSigmoid"]):
        return None
    f32 = np.float32
    slope = float(f32(f32(attrs.get("alpha", ALPHA)) * f32(x_enc.scale))) * 2.0**16
    p = f"{node.output[0]}{SUFFIX}/"
    nodes, inits = centered_codes(node.input[0], x_enc, p + "x")
    inits += [numpy_helper.from_array(np.array(slope), p + "slope"),
              numpy_helper.from_array(np.array(2.0**15 + 0.5), p + "middle")]
    make = helper.make_node
    nodes += [make("Cast", [p + "x"], [p + "x64"], to=onnx.TensorProto.DOUBLE),
              make("Mul", [p + "x64", p + "slope"], [p + "real"]),  # exact: 17 bits times 24
              make("Add", [p + "real", p + "middle"], [p + "real_half"])]
    return with_output_codes(nodes, inits, p, y_enc, p + "real_half", node.output[0])
