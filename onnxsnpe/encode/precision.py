"""Which tensors a mixed-precision choice puts at 16 bits: the raised ones, and what they require.

HTP runs a 16-bit weight only with 16-bit activations and a symmetric weight encoding (A16W16;
SNPE.md section 4, QAIRT's HTP op supplement): raising a weight raises the activation its layer
multiplies and the layer's output with it (the output after a squashed Relu/Clip, the tensor that
exists on the device). Activations raise alone (A16W8 is supported everywhere on HTP).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..graph.targets import QuantTargets

INT16_WEIGHT_CAP, INT16_STRIDED_CAP = 32639, 32511
"""The largest positive int16 weight code HTP v73 multiplies with as it is: codes above it compute
as INT16_WEIGHT_CAP, or as INT16_STRIDED_CAP in a strided Conv whose filters span several input
values (int16_weight_cap; tools/HTP.md finding 20). Negative codes are kept, -32768 included."""


def int16_weight_cap(attributes: dict, weight_shape: tuple[int, ...]) -> int:
    """The cap of a 16-bit Conv weight of ``weight_shape`` (O x I/group x kH x kW) with these node
    attributes: INT16_STRIDED_CAP for a depthwise Conv strided in either direction and for a strided
    Conv with a kernel beyond 1x1 over several input channels per group (probed: 3x3 stride 2), else
    INT16_WEIGHT_CAP (a 1x1 or one-input-channel strided Conv, every unstrided one)."""
    strided = any(stride > 1 for stride in attributes.get("strides", [1]))
    depthwise = attributes.get("group", 1) > 1 and len(weight_shape) > 1 and weight_shape[1] == 1
    spatial = int(np.prod(weight_shape[2:])) > 1
    several_inputs = len(weight_shape) > 1 and weight_shape[1] >= 2
    return INT16_STRIDED_CAP if strided and (depthwise or (spatial and several_inputs)) else INT16_WEIGHT_CAP


def sixteen_bit_tensors(targets: QuantTargets, raised: Iterable[str]) -> tuple[set[str], set[str]]:
    """The activations (roots) and the weights at 16 bits when ``raised`` (names of either) are raised."""
    raised = list(raised)
    encoded = set(targets.activations)
    weights = {name for name in raised if name in targets.weight_layers}
    activations = {targets.root(name) for name in raised if name not in weights}
    for weight in weights:
        layer_input, layer_output = targets.weight_layers[weight]
        for tensor in (layer_input, targets.squashed.get(layer_output, layer_output)):
            if targets.root(tensor) in encoded:
                activations.add(targets.root(tensor))
    unknown = activations - encoded
    if unknown:
        raise ValueError(f"not an encoded activation or weight: {', '.join(sorted(unknown))}")
    return activations, weights
