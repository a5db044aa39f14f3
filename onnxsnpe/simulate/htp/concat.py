"""A 16-bit Concat of 8-bit inputs converted to 16 bits, as the HTP computes it.

The HTP folds each input's 8 -> 16-bit conversion into the Concat and requantizes the input from
its centered 8-bit code ``c`` with a 16-bit mantissa: ``clamp(floor(c B + z_out + 1/2))``, ``B =
rint(M 2^k) / 2^k`` with ``2^15 <= rint(M 2^k) < 2^16`` and ``M = float32(float32(s_in) /
float32(s_out))`` (tools/HTP.md finding 35: PP-OCRv4 det's ``p2o.Concat.1`` under automatic mixed
precision and generated probes). A Concat with a genuinely 16-bit input is not probed and stays float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, output_encoding, with_output_codes


def sixteen_bit_mantissa(multiplier: float) -> float:
    """``M`` rounded to 16 significant bits, ``rint(M 2^k) / 2^k`` (exact in float64)."""
    shift = 15 - int(np.floor(np.log2(multiplier)))
    return float(np.rint(multiplier * 2.0**shift) / 2.0**shift)


def lower_concat16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The Concat in the module docstring's arithmetic, or None unless its output is 16-bit and every
    input an 8-bit activation converted to it."""
    y_enc = output_encoding(node, context.targets, context.activations)
    if not of_bitwidth(16, y_enc) or not node.input or any(name not in context.converted for name in node.input):
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    chain: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    parts = []
    for index, name in enumerate(node.input):
        enc = context.converted[name]
        codes = f"{p}in{index}"
        nodes, constants = centered_codes(name, enc, codes)
        ratio = sixteen_bit_mantissa(float(np.float32(np.float32(enc.scale) / np.float32(y_enc.scale))))
        inits += [*constants, numpy_helper.from_array(np.array(ratio), codes + "_ratio")]
        chain += [*nodes, helper.make_node("Cast", [codes], [codes + "64"], to=onnx.TensorProto.DOUBLE),
                  helper.make_node("Mul", [codes + "64", codes + "_ratio"], [codes + "_scaled"])]
        parts.append(codes + "_scaled")
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
    inits.append(numpy_helper.from_array(np.array(0.5 - y_enc.offset), p + "zero_point_half"))
    chain += [helper.make_node("Concat", parts, [p + "joined"], axis=axis),
              helper.make_node("Add", [p + "joined", p + "zero_point_half"], [p + "real_half"])]
    return with_output_codes(chain, inits, p, y_enc, p + "real_half", node.output[0])
