"""Ranges for the tensors that carry an additive attention mask (graph/masks.py).

Their statistics hold only the real (unmasked) values. On the device a masked position is clamped
to the bottom of its tensor's encoding, so the bottom must lie far enough below the real scores
that Softmax gives masked positions no weight. The tensor fed to a Softmax of axis length n, with
b-bit output, gets its range widened downwards by

    K = ln(2 n (2^b - 1)):

a masked score K below the smallest real one carries at most exp(-K) of the weight of any real
position, so all n together stay under half a step of the Softmax output. Every other tensor of
the chain (the mask itself, e.g. Where(mask, 0, -inf), whose real values are all 0) reaches down by
that sink's whole width, so that a masked position added to any real score clamps to the sink's
bottom. *Ours*: no Qualcomm document says how SNPE treats mask constants (SNPE.md section 4); this
keeps the model's function at the price of a wider range.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..graph.masks import MaskedTensor


def softmax_margin(length: int, bitwidth: int) -> float:
    """How far below the real scores masked positions must sit for a Softmax of ``length`` values
    and a ``bitwidth``-bit output to give them under half an output step in all."""
    return math.log(2 * max(length, 1) * (2**bitwidth - 1))


def masked_ranges(
    ranges: dict[str, tuple[float, float]],
    masks: dict[str, MaskedTensor],
    bitwidth_of: Callable[[str], int],
) -> dict[str, tuple[float, float]]:
    """``ranges`` (of the real values; [0, 0] where every value was masked) with every masked tensor's
    low end moved down as above."""
    widths: dict[str, float] = {}
    for mask in masks.values():
        for sink in mask.sinks:
            low, high = ranges[sink.tensor]
            widths[sink.tensor] = high - low + softmax_margin(sink.length, bitwidth_of(sink.softmax_output))
    adjusted = dict(ranges)
    for name, mask in masks.items():
        low, high = ranges[name]
        width = max(widths[sink.tensor] for sink in mask.sinks)
        adjusted[name] = (min(low, high - width), high)
    return adjusted
