"""Adds and Subs of a constant that quantizes to zero keep their input's encoding.

Such an op is an identity once quantized (PP-OCRv4's affine blocks add biases of 1e-6 that the
constant's own grid rounds to 0), and the HTP treats it as one: its graph optimizer drops the Add,
and a Conv that read the Add's output then reads the Add's *input* codes under the Add's output
encoding, so that every value is misread wherever the two encodings differ (tools/HTP.md finding
23; probes on v68 and v73; a Mul reading it gets the input's own encoding right). Giving the
output its input's encoding makes the op what it is, an identity, on the device and in the
simulation alike, and loses nothing: ``x + 0`` needs no other grid.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.large import initializer_array
from ..graph.targets import QuantTargets
from .encoding import Encoding, fake_quantize


def with_zero_sums_sharing_encodings(
    model: onnx.ModelProto, targets: QuantTargets, activations: dict[str, Encoding], constants: dict[str, Encoding]
) -> dict[str, Encoding]:
    """``activations`` with the output of each Add or Sub whose constant operand quantizes to zero
    (in its encoding from ``constants``, encode.constants) given its other input's encoding, when
    both have the same bitwidth; the output's aliases follow."""
    values = {init.name: init for init in model.graph.initializer if init.name in constants}
    shared: dict[str, Encoding] = {}
    for node in model.graph.node:
        if node.op_type not in ("Add", "Sub") or len(node.input) != 2 or not node.output:
            continue
        output = node.output[0]
        constant = [name for name in node.input if name in values]
        other = [name for name in node.input if name not in values]
        if (len(constant) != 1 or len(other) != 1 or output not in activations or output in targets.squashed
                or output in targets.masks):  # a mask's constants take its encoding (encode.constants)
            continue
        source = shared.get(other[0], activations.get(other[0]))
        if source is None or source.bitwidth != activations[output].bitwidth:
            continue
        quantized = fake_quantize(initializer_array(values[constant[0]]).astype(np.float32), constants[constant[0]])
        if not np.any(quantized):
            shared[output] = source
    if not shared:
        return activations
    aliases = {alias: shared[root] for alias, root in targets.aliases.items() if root in shared}
    return {**activations, **shared, **aliases}
