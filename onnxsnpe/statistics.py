"""Streaming statistics of every tensor SNPE quantizes, from onnxruntime runs.

Each tensor has an observer updated once per sample; the activations are dropped right after,
so memory does not grow with the number of samples. Observers merge, so partial runs combine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from .errors import OnnxSnpeError
from .runtime import make_session


class MinMaxObserver:
    """Running minimum and maximum of a tensor over all samples seen."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of values into the running statistics."""
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("NaN or Inf values")
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        self.count += int(values.size)

    def merge(self, other: MinMaxObserver) -> None:
        """Combine with statistics gathered over other samples."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count


Observer = MinMaxObserver


def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    samples: Iterable[dict[str, np.ndarray]],
    observer_factory: Callable[[], Observer] = MinMaxObserver,
) -> dict[str, Observer]:
    """Run ``model`` over ``samples`` and observe each of ``tensors``."""
    session = make_session(model, tensors)
    names = [o.name for o in session.get_outputs()]
    wanted = [i for i, name in enumerate(names) if name in set(tensors)]
    observers = {name: observer_factory() for name in tensors}
    for sample in samples:
        values = session.run(None, sample)
        for index in wanted:
            name = names[index]
            try:
                observers[name].update(values[index])
            except ValueError as exc:
                raise OnnxSnpeError(f"tensor '{name}' takes {exc} on the calibration data") from exc
    return observers
