"""The HTP's 8-bit Softmax over two values (a two-class output, such as PP-OCR's direction classifier).

Over a last axis of two, the HTP computes the second value as a sigmoid of the code difference and
the first as what is left of 255 (tools/HTP.md finding 26, a helper's probes: 80,000 outputs, every
one; float softmax then rounding missed 839): ``out1 = floor(255 sigmoid(s (q1 - q0)) + 1/2)``,
``out0 = 255 - out1`` (so two equal inputs give 127 and 128), for the output encoding Softmax has,
``[0, 1]`` in steps of 1/255. Longer rows run other kernels, not lowered here (their exponential is a
fixed-point table the probes did not pin exactly).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph.ops import node_attributes
from .codes import SUFFIX, Context, Lowered, centered_codes, int8, output_encoding, with_output_codes

LEVELS = 255
"""The output codes of an 8-bit Softmax on [0, 1]."""


def lower_softmax(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """A two-value 8-bit Softmax over its last axis, with the [0, 1] output encoding, as the HTP computes it."""
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0]) or []
    axis = node_attributes(node).get("axis", -1 if context.opset >= 13 else 1)
    if not int8(x_enc, y_enc) or not shape or shape[-1] != 2 or axis % len(shape) != len(shape) - 1:
        return None
    if y_enc.offset != 0 or not np.isclose(y_enc.scale, 1 / LEVELS, rtol=1e-6):
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = centered_codes(node.input[0], x_enc, p + "codes32")
    inits += [
        numpy_helper.from_array(np.array([[-1.0], [1.0]]), p + "difference"),  # q1 - q0 as a product
        numpy_helper.from_array(np.array(float(np.float32(x_enc.scale))), p + "in_scale"),
        numpy_helper.from_array(np.array(float(LEVELS)), p + "levels"),
        numpy_helper.from_array(np.array(0.5), p + "half"),
        numpy_helper.from_array(np.array(LEVELS + 0.5), p + "rest"),
    ]
    chain += [
        make("Cast", [p + "codes32"], [p + "codes"], to=onnx.TensorProto.DOUBLE),
        make("MatMul", [p + "codes", p + "difference"], [p + "steps"]),
        make("Mul", [p + "steps", p + "in_scale"], [p + "argument"]),
        make("Sigmoid", [p + "argument"], [p + "sigmoid"]),
        make("Mul", [p + "sigmoid", p + "levels"], [p + "scaled"]),
        make("Add", [p + "scaled", p + "half"], [p + "second"]),  # out1 + 1/2 before the floor
        make("Floor", [p + "second"], [p + "second_code"]),
        make("Sub", [p + "rest", p + "second_code"], [p + "first"]),  # 255 - out1, + 1/2
        make("Concat", [p + "first", p + "second"], [p + "shifted"], axis=-1),
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])
