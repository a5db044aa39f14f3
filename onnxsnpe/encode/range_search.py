"""Ranges chosen from a :class:`~onnxsnpe.histogram.Histogram`: percentile clipping and the MSE search.

The histogram is read as a distribution: exact zeros are a point mass at 0, every other bin spreads
its count uniformly over the part of the bin inside the observed [min, max].
"""

from __future__ import annotations

import numba
import numpy as np

from ..stats.histogram import Histogram
from .encoding import MIN_RANGE, asymmetric_encoding

MSE_GRID = 512
"""Candidate clipping points per end of the range for the MSE search."""


def percentile_range(hist: Histogram, percentile: float) -> tuple[float, float]:
    """The values at percentiles ``100 - percentile`` and ``percentile`` (numpy's linear method).

    Each lies within one bin width of the exact value; percentile 100 gives the exact min and max.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile}")
    return _quantile(hist, 1.0 - percentile / 100.0), _quantile(hist, percentile / 100.0)


def _quantile(hist: Histogram, fraction: float) -> float:
    rank = fraction * (hist.count - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    low, high = _value_at_rank(hist, below), _value_at_rank(hist, above)
    return low + (high - low) * (rank - below)


def _value_at_rank(hist: Histogram, rank: int) -> float:
    """The value of the ``rank``-th smallest element (0-based), up to its position within its bin."""
    if rank <= 0:
        return hist.min
    if rank >= hist.count - 1:
        return hist.max
    lows, highs, counts = _segments(hist)
    cumulative = np.cumsum(counts)
    segment = int(np.searchsorted(cumulative, rank, side="right"))
    before = cumulative[segment] - counts[segment]
    position = (rank - before + 0.5) / counts[segment]
    value = lows[segment] + (highs[segment] - lows[segment]) * position
    return float(min(max(value, hist.min), hist.max))


def _segments(hist: Histogram) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins clamped to [min, max], in order, with the zero point mass inserted where zero lies."""
    edges = np.clip(hist.edges, hist.min, hist.max)
    at = -hist.first  # bin index of [0, width): zeros go just before it
    lows = np.concatenate([edges[:at], [0.0], edges[at:-1]])
    highs = np.concatenate([edges[1 : at + 1], [0.0], edges[at + 1 :]])
    counts = np.concatenate([hist.counts[:at], [hist.zeros], hist.counts[at:]])
    return lows, highs, counts


def mse_range(hist: Histogram, bitwidth: int, grid: int = MSE_GRID) -> tuple[float, float]:
    """The [lo, hi] minimising the expected squared error of SNPE's quantization over the histogram.

    Candidates: ``lo = min * i / grid`` and ``hi = max * j / grid`` for i, j = 1..grid (an end that
    does not cross zero stays at zero); every pair is searched. The error of a range is
    - clipping: the exact expected ``(x - lo)^2`` below lo and ``(x - hi)^2`` above hi under the
      bin-uniform density;
    - rounding: ``scale^2 / 12`` for each non-zero value inside, the mean squared rounding error of
      values spread over a step (exact zeros add nothing: zero is always on SNPE's grid). Unlike
      point evaluations at bin centres this does not alias when bins and steps have similar widths.
    All pairs are scored with ``scale = (hi - lo) / (2^bw - 1)``; then the pairs around the best,
    as far as the encoding's shift of the range (up to half a step, to put zero on the grid) can
    matter, are scored again at the bounds and scale of their actual ``asymmetric_encoding``.
    """
    if hist.count == 0:
        raise ValueError("empty histogram")
    levels = 2**bitwidth - 1
    fractions = np.arange(1, grid + 1, dtype=np.float64) / grid
    lows = hist.min * fractions if hist.min < 0 else np.zeros(1)
    highs = hist.max * fractions if hist.max > 0 else np.zeros(1)
    dist = _Distribution(hist)
    below, clip_low = dist.below(lows)
    above, clip_high = dist.above(highs)
    i, j = _first_best_pair(lows, highs, below, clip_low, above, clip_high, dist.nonzero, float(levels))
    step = max(highs[j] - lows[i], MIN_RANGE) / levels
    rows = _around(i, len(lows), step / 2, abs(hist.min) / grid)
    cols = _around(j, len(highs), step / 2, abs(hist.max) / grid)
    pairs = [(r, c) for r in rows for c in cols]
    encodings = [asymmetric_encoding(lows[r], highs[c], bitwidth) for r, c in pairs]
    exact = dist.error(*(np.array([getattr(e, k) for e in encodings]) for k in ("min", "max", "scale")))
    r, c = pairs[int(np.argmin(exact))]
    return float(lows[r]), float(highs[c])


@numba.njit(nogil=True, cache=True)
def _first_best_pair(lows, highs, below, clip_low, above, clip_high, nonzero, levels):  # pragma: no cover - compiled
    """Row-major first (i, j) minimising :meth:`_Distribution.error` of [lows[i], highs[j]] with
    scale ``max(highs[j] - lows[i], MIN_RANGE) / levels``, with the same float64 operations in the
    same order as the vectorized formula, without its grid-sized temporaries."""
    best, best_i, best_j = np.inf, 0, 0
    for i in range(lows.shape[0]):
        for j in range(highs.shape[0]):
            scale = max(highs[j] - lows[i], MIN_RANGE) / levels
            inside = max(nonzero - below[i] - above[j], 0.0)
            error = clip_low[i] + clip_high[j] + inside * (scale * scale) / 12.0
            if error < best:
                best, best_i, best_j = error, i, j
    return best_i, best_j


def _around(index: int, size: int, shift: float, spacing: float) -> np.ndarray:
    """Grid indices within ``shift`` plus two grid steps of ``index``: all, or 17 evenly spread."""
    if size == 1:
        return np.zeros(1, dtype=np.int64)
    reach = int(np.ceil(shift / spacing)) + 2
    stride = -(-reach // 8)
    near = np.concatenate([index + np.arange(-reach, reach + 1, stride), [index]])
    return np.unique(np.clip(near, 0, size - 1))


class _Distribution:
    """Prefix sums over the non-zero bins for O(1) clipping errors at any threshold."""

    def __init__(self, hist: Histogram) -> None:
        edges = np.clip(hist.edges, hist.min, hist.max)
        self.lefts, self.rights = edges[:-1], edges[1:]
        self.counts = hist.counts.astype(np.float64)
        self.nonzero = float(self.counts.sum())
        mids = (self.lefts + self.rights) / 2
        lengths = self.rights - self.lefts
        self.s0 = np.concatenate([[0.0], np.cumsum(self.counts)])
        self.s1 = np.concatenate([[0.0], np.cumsum(self.counts * mids)])
        self.s2 = np.concatenate([[0.0], np.cumsum(self.counts * (mids**2 + lengths**2 / 12))])

    def error(self, low: np.ndarray, high: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Expected total squared error (clipping plus rounding) of ranges [low, high] with steps scale."""
        below, clip_low = self.below(np.asarray(low, dtype=np.float64).ravel())
        above, clip_high = self.above(np.asarray(high, dtype=np.float64).ravel())
        shape = np.broadcast_shapes(np.shape(low), np.shape(high))
        below, clip_low = below.reshape(np.shape(low)), clip_low.reshape(np.shape(low))
        above, clip_high = above.reshape(np.shape(high)), clip_high.reshape(np.shape(high))
        inside = np.maximum(self.nonzero - below - above, 0.0)
        return np.broadcast_to(clip_low + clip_high + inside * scale**2 / 12.0, shape)

    def above(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count of values above each threshold and the sum of ``(x - t)^2`` over them."""
        k = np.clip(np.searchsorted(self.rights, t, side="right"), 0, len(self.counts) - 1)  # bin holding t
        full0 = self.s0[-1] - self.s0[k + 1]
        full1 = self.s1[-1] - self.s1[k + 1]
        full2 = self.s2[-1] - self.s2[k + 1]
        part, part_error = self._partial(k, self.rights[k] - t)
        return full0 + part, full2 - 2 * t * full1 + t**2 * full0 + part_error

    def below(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count of values below each threshold and the sum of ``(t - x)^2`` over them."""
        k = np.clip(np.searchsorted(self.lefts, t, side="left") - 1, 0, len(self.counts) - 1)
        full0, full1, full2 = self.s0[k], self.s1[k], self.s2[k]
        part, part_error = self._partial(k, t - self.lefts[k])
        return full0 + part, full2 - 2 * t * full1 + t**2 * full0 + part_error

    def _partial(self, k: np.ndarray, beyond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mass of bin k lying ``beyond`` past the threshold, and its squared distance to it."""
        length = self.rights[k] - self.lefts[k]
        beyond = np.clip(beyond, 0.0, length)
        share = np.divide(beyond, length, out=np.zeros_like(beyond), where=length > 0)
        return self.counts[k] * share, self.counts[k] * share * beyond**2 / 3
