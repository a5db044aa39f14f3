"""A nearest Resize of a 16-bit tensor written in another 16-bit encoding: requantized with a 15-bit multiplier.

Only the Concat gives such a Resize its own encoding (model.concat_encodings: the HTP writes a Concat
input that only the Concat reads straight in the Concat's encoding). PP-OCRv4 det at A16 upsamples
three of its four neck outputs by 8, 4 and 2 into ``p2o.Concat.1``; the HTP's codes there are
``floor((q - z_in) m + 1/2) + z_out`` with ``m = s_in / s_out`` rounded to 15 significant bits:
every value of the three segments (614,400 values of the Concat, 5,032 off with exact rounding, 0 with
this; tools/HTP.md finding 56). The copies themselves are exact, so the Resize runs on the codes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...graph.ops import node_attributes
from .codes import SUFFIX, Context, Lowered, centered_codes, of_bitwidth, output_encoding, with_output_codes

SIGNIFICANT_BITS = 15
"""Significant bits of the requantization multiplier."""


def lower_resize16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A nearest-neighbour Resize between two different 16-bit encodings, as the module docstring says;
    None for any other Resize (one that keeps its input's encoding changes nothing)."""
    attrs = node_attributes(node)
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    if node.op_type != "Resize" or attrs.get("mode", b"nearest") not in (b"nearest", "nearest") \
            or not of_bitwidth(16, x_enc, y_enc) or x_enc == y_enc:
        return None
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale))
    unit = 2.0 ** (np.floor(np.log2(ratio)) - (SIGNIFICANT_BITS - 1))
    multiplier = float(np.floor(ratio / unit + 0.5) * unit)
    p = f"{node.output[0]}{SUFFIX}/"
    nodes, inits = centered_codes(node.input[0], x_enc, p + "x")
    resize = onnx.NodeProto()
    resize.CopyFrom(node)
    resize.input[0], resize.output[0], resize.name = p + "x", p + "resized", p + "Resize"
    inits += [numpy_helper.from_array(np.array(multiplier), p + "multiplier"),
              numpy_helper.from_array(np.array(0.5 - y_enc.offset), p + "zero_point_half")]
    make = onnx.helper.make_node
    nodes += [resize, make("Cast", [p + "resized"], [p + "resized64"], to=onnx.TensorProto.DOUBLE),
              make("Mul", [p + "resized64", p + "multiplier"], [p + "real"]),
              make("Add", [p + "real", p + "zero_point_half"], [p + "real_half"])]
    return with_output_codes(nodes, inits, p, y_enc, p + "real_half", node.output[0])
