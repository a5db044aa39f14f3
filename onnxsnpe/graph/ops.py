"""The op families SNPE's converter treats alike (SNPE.md section 4)."""

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
