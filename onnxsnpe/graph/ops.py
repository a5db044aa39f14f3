"""The op families SNPE's converter treats alike (SNPE.md section 4), and reading a node's attributes."""

import onnx
from onnx import helper

SQUASHING_PRODUCERS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul", "Div"}
)
"""Ops a following activation is squashed into."""

SQUASHED_ACTIVATIONS = frozenset({"Relu", "Clip"})

DATA_MOVEMENT = frozenset(
    {
        "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Split", "Slice",
        "Pad", "MaxPool", "Identity", "DepthToSpace", "SpaceToDepth", "Dropout", "Expand", "Tile",
    }
)
"""Ops whose output reuses the encoding of their (first) input."""

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops that multiply by a weight operand (a constant one, or a second activation for MatMul)."""
WIDE_WEIGHT_OPS = LINEAR_OPS | {"LayerNormalization"}
"""Ops whose 16-bit static operand (a weight, a LayerNorm's gamma) only HTP v73 and later compute
(SNPE.md section 4; tools/HTP.md finding 36 for LayerNorm: v68 refuses it)."""


def standard_opset(model: onnx.ModelProto) -> int:
    """The version of the standard (ai.onnx) domain a model imports, which decides the meaning of its
    ops' attributes and which ops exist; 1 for a model that imports none (onnx's checker then lets it
    hold no standard op, so no choice depends on it)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values (strings stay bytes, as onnx gives them)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
