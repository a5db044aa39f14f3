"""What one tensor's statistics hold: min and max always, a histogram or AIMET's PDF when a method needs it.

Statistics update from batches and merge exactly, so runs over parts of the data combine into one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .histogram import Histogram
from .kernels import value_range
from .pdf import TfEnhancedObserver

HISTOGRAM_METHODS = frozenset({"percentile", "mse"})


class MinMaxObserver:
    """Running minimum and maximum of a tensor over all samples seen."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of values into the running statistics."""
        if values.size:
            self.update_range(float(values.min()), float(values.max()), int(values.size))

    def update_range(self, low: float, high: float, count: int) -> None:
        """Fold in a batch known by its min, max and number of values; ValueError on NaN or Inf."""
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("NaN or Inf values")
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        self.count += count

    def merge(self, other: MinMaxObserver) -> None:
        """Combine with statistics gathered over other samples."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count


class TensorStats:
    """What the range methods need for one tensor: min/max, and a histogram or PDF if asked for.

    With a ``floor`` (a tensor carrying an attention mask), values at or below it are masked
    positions: they are left out, so the statistics describe the real values only.
    """

    def __init__(self, methods: Iterable[str] = ("minmax",), floor: float | None = None) -> None:
        methods = set(methods)
        self.floor = floor
        self.minmax = MinMaxObserver()
        self.histogram = Histogram() if methods & HISTOGRAM_METHODS else None
        self.tf_enhanced = TfEnhancedObserver() if "tf_enhanced" in methods else None

    @property
    def min(self) -> float:
        return self.minmax.min

    @property
    def max(self) -> float:
        return self.minmax.max

    @property
    def count(self) -> int:
        return self.minmax.count

    def update(self, batch: np.ndarray) -> None:
        """Fold in one batch (first axis: samples, in dataset order). ValueError on NaN or Inf."""
        if self.floor is not None:
            for sample in batch:
                self._update(_unmasked(sample, self.floor))
            return
        self._update(batch)

    def _update(self, batch: np.ndarray) -> None:
        flat = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        # The histogram and PDF kernels find the batch's range in their own pass over the values.
        batch_range = self.histogram.update(flat) if self.histogram is not None else None
        if self.tf_enhanced is not None:
            pdf_range = self.tf_enhanced.update(batch)
            batch_range = batch_range or pdf_range
        low, high = batch_range or (float(end) + 0.0 for end in value_range(flat))  # + 0.0: no -0.0
        self.minmax.update_range(low, high, flat.size)

    def spawn(self) -> TensorStats:
        """Empty statistics for the same methods that merge into these (the PDF keeps its grid)."""
        spawned = TensorStats(floor=self.floor)
        spawned.histogram = Histogram(self.histogram.max_bins) if self.histogram is not None else None
        spawned.tf_enhanced = self.tf_enhanced.spawn() if self.tf_enhanced is not None else None
        return spawned

    @property
    def order_matters(self) -> bool:
        """Whether the next sample's place in the order still matters (a PDF without its grid)."""
        return self.tf_enhanced is not None and self.tf_enhanced.x_left is None

    def merge(self, other: TensorStats) -> None:
        """Combine with the statistics of a run over other samples (later in dataset order)."""
        self.minmax.merge(other.minmax)
        for mine, theirs in ((self.histogram, other.histogram), (self.tf_enhanced, other.tf_enhanced)):
            if (mine is None) != (theirs is None):
                raise ValueError("cannot merge statistics collected for different methods")
            if mine is not None:
                mine.merge(theirs)


def _unmasked(sample: np.ndarray, floor: float) -> np.ndarray:
    """One sample's values above ``floor``, as a batch of one; ValueError on NaN."""
    flat = np.asarray(sample, dtype=np.float32).reshape(-1)
    if np.isnan(flat).any():
        raise ValueError("NaN values")
    return flat[flat > floor][np.newaxis]
