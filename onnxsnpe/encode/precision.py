"""Which tensors a mixed-precision choice puts at 16 bits: the raised ones, and what they require.

HTP runs a 16-bit weight only with 16-bit activations and a symmetric weight encoding (A16W16;
SNPE.md section 4, QAIRT's HTP op supplement): raising a weight raises the activation its layer
multiplies and the layer's output with it (the output after a squashed Relu/Clip, the tensor that
exists on the device). Activations raise alone (A16W8 is supported everywhere on HTP).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..graph.targets import QuantTargets


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
