"""High-bias absorption: move a constant per-channel offset out of the tensor between two Convs.

Nagel et al. 2019, section 4.2. For two Convs A and B joined by nothing or by a Relu, with B
unpadded (every output of B reads only real values of the tensor between), subtracting ``beta_c``
from A's bias and adding ``sum over B's kernel of W_B[o, c] * beta_c`` to B's bias computes the same
function, as long as the Relu stays linear on what was removed:

- joined by nothing, any ``beta`` is exact; ``beta_c`` is the centre of channel ``c``'s range on the
  calibration samples, so every channel is centred on zero and the tensor's one (per-tensor) range
  only has to cover the widest channel, not the spread of their offsets;
- joined by a Relu, ``relu(h - beta) = relu(h) - beta`` wherever ``h >= beta >= 0``; ``beta_c`` is
  channel ``c``'s smallest pre-activation value on the calibration samples (when positive), so the
  function is the same on every calibration sample and differs only on an input that drives a
  channel below anything calibration saw (by at most ``beta_c`` there). AIMET takes ``beta`` from a
  BatchNorm's statistics instead (``beta - 3 gamma``), which the folded deploy graph no longer has.

A pair is absorbed only where its tensor's range (what its 8-bit per-tensor encoding has to cover,
zero included) shrinks by at least ``MIN_SHRINK``; elsewhere it is left as it is. Padded second
Convs are left alone: the zeros a padding adds would become ``-beta`` after the shift.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.large import initializer_array
from ..graph.ops import node_attributes
from ..graph.runtime import make_session

MIN_SHRINK = 0.05
"""The least relative narrowing of the tensor's range for which a pair is absorbed (a choice)."""


@dataclass(frozen=True)
class Absorption:
    """One absorbed pair: the tensor whose range shrank, and its range before and after."""

    tensor: str
    second_weight: str
    through_relu: bool
    range_before: tuple[float, float]
    range_after: tuple[float, float]

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "second": self.second_weight, "through_relu": self.through_relu,
                "range_before": list(self.range_before), "range_after": list(self.range_after)}


@dataclass(frozen=True)
class _Candidate:
    first: onnx.NodeProto
    second: onnx.NodeProto
    through_relu: bool
    depthwise_second: bool


def absorb_high_biases(
    model: onnx.ModelProto, second_weights: dict[str, bool], samples: Iterable[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, list[Absorption]]:
    """A copy of ``model`` with the offsets of the Conv pairs ending at ``second_weights`` (weight name
    -> depthwise) absorbed where it narrows their tensor's range (module docstring), and the absorptions.
    ``samples``: the calibration samples the channel ranges are measured on (streamed, one pass)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    candidates = _candidates(copy, second_weights)
    if not candidates:
        return copy, []
    outputs = [c.first.output[0] for c in candidates]
    lows, highs = _channel_ranges(copy, outputs, samples)
    inits = {init.name: init for init in copy.graph.initializer}
    absorbed = []
    for candidate in candidates if lows else []:  # no samples, no ranges: nothing to absorb
        low, high = lows[candidate.first.output[0]], highs[candidate.first.output[0]]
        beta, before, after = _offsets(low, high, candidate.through_relu)
        if after[1] - after[0] > (1 - MIN_SHRINK) * (before[1] - before[0]):
            continue
        _move(copy, inits, candidate, beta)
        absorbed.append(Absorption(candidate.first.output[0], candidate.second.input[1], candidate.through_relu,
                                   before, after))
    return copy, absorbed


def _offsets(low: np.ndarray, high: np.ndarray, through_relu: bool) -> tuple[np.ndarray, tuple, tuple]:
    """Each channel's offset and the range (zero included) of the tensor between, before and after."""
    if through_relu:
        beta = np.maximum(low, 0.0)
        before = (0.0, float(max(high.max(), 0.0)))
        after = (0.0, float(max((high - beta).max(), 0.0)))
    else:
        beta = (low + high) / 2
        before = (float(min(low.min(), 0.0)), float(max(high.max(), 0.0)))
        half = float(((high - low) / 2).max())
        after = (-half, half)
    return beta, before, after


def _move(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], candidate: _Candidate,
          beta: np.ndarray) -> None:
    """Subtract ``beta`` from the first Conv's bias and add what it carried to the second's."""
    first_bias = inits[candidate.first.input[2]]
    values = initializer_array(first_bias).astype(np.float64) - beta
    first_bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), first_bias.name))
    weight = initializer_array(inits[candidate.second.input[1]]).astype(np.float64)
    kernel_sums = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
    carried = kernel_sums[:, 0] * beta if candidate.depthwise_second else kernel_sums @ beta
    second = candidate.second
    if len(second.input) > 2 and second.input[2]:
        bias = inits[second.input[2]]
        updated = initializer_array(bias).astype(np.float64) + carried
        bias.CopyFrom(numpy_helper.from_array(updated.astype(np.float32), bias.name))
    else:
        name = f"{second.output[0]}_absorbed_bias"
        model.graph.initializer.append(numpy_helper.from_array(carried.astype(np.float32), name))
        while len(second.input) < 2:
            second.input.append("")
        second.input.append(name)


def _candidates(model: onnx.ModelProto, second_weights: dict[str, bool]) -> list[_Candidate]:
    """The pairs that can be absorbed: the first Conv has a bias of its own, the second no padding, and
    nothing but one Relu (or nothing) between."""
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    readers: dict[str, int] = {}
    producers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        for name in node.output:
            producers[name] = node
    candidates = []
    for second in graph.node:
        if second.op_type != "Conv" or len(second.input) < 2 or second.input[1] not in second_weights:
            continue
        if not _unpadded(second) or (len(second.input) > 2 and second.input[2] and readers[second.input[2]] > 1):
            continue
        between = producers.get(second.input[0])
        through_relu = between is not None and between.op_type == "Relu"
        first = producers.get(between.input[0]) if through_relu else between
        if first is None or first.op_type != "Conv" or len(first.input) < 3 or not first.input[2]:
            continue
        if readers.get(first.output[0]) != 1 or readers.get(second.input[0]) != 1:
            continue  # the tensor between feeds another node too, which would see the shift
        if first.input[2] not in inits or readers[first.input[2]] > 1:
            continue
        candidates.append(_Candidate(first, second, through_relu, second_weights[second.input[1]]))
    return candidates


def _unpadded(node: onnx.NodeProto) -> bool:
    attributes = node_attributes(node)
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad in ("NOTSET", "VALID") and not any(attributes.get("pads", []))


def _channel_ranges(model: onnx.ModelProto, outputs: list[str], samples: Iterable[dict[str, np.ndarray]]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per channel (axis 1) smallest and largest value of each of ``outputs`` over ``samples``."""
    session = make_session(model, outputs)
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    for sample in samples:
        for name, value in zip(outputs, session.run(outputs, sample), strict=True):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            low, high = value.min(axis=axes).astype(np.float64), value.max(axis=axes).astype(np.float64)
            lows[name] = np.minimum(lows[name], low) if name in lows else low
            highs[name] = np.maximum(highs[name], high) if name in highs else high
    return lows, highs
