"""What follows from a configuration's activation and weight encodings, in the order the HTP needs.

Choosing the activation ranges and the weight encodings is a configuration's own business (a range
method, per-tensor or per-channel, raised tensors); everything after that is fixed, and its order
matters: the HTP's fixed 16-bit outputs replace calibrated ones before constants are encoded
against them; a constant that quantizes to zero makes its Add share its input's encoding; a bias
the HTP could not hold at ``s_in * s_w`` widens its weight's scale before the biases are encoded at
it. The pipeline and the agreement tools both call this, so the order is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph.targets import QuantTargets
from .constants import constant_encodings
from .encoding import Encoding
from .ranges import bias_encodings, widened_for_biases, with_htp_fixed_encodings
from .zero_constants import with_zero_sums_sharing_encodings


@dataclass(frozen=True)
class CompletedEncodings:
    """Activation, weight, constant and bias encodings after completion."""

    activations: dict[str, Encoding]
    weights: dict[str, Encoding]
    constants: dict[str, Encoding]
    biases: dict[str, Encoding]


def completed_encodings(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    weights: dict[str, Encoding],
    bias_bitwidth: int = 32,
) -> CompletedEncodings:
    """The encodings the HTP computes with, from calibrated ``activations`` and chosen ``weights``
    (module docstring); 8-bit static operands, ``bias_bitwidth`` biases (a LayerNormalization's
    bias at its gamma's encoding, a constant's)."""
    activations = with_htp_fixed_encodings(deploy, targets, activations)
    constants = constant_encodings(deploy, targets, weights, 8, activations)
    activations = with_zero_sums_sharing_encodings(deploy, targets, activations, constants)
    if bias_bitwidth == 32:  # a bias the HTP could not hold at s_in * s_w widens its weight's scale
        weights = widened_for_biases(deploy, targets, activations, weights)
    biases = bias_encodings(deploy, targets, activations, {**constants, **weights}, bias_bitwidth)
    return CompletedEncodings(activations, weights, constants, biases)
