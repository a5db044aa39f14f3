"""SNPE's enhanced quantizer (``snpe-dlc-quantize --use_enhanced_quantizer``) as AIMET implements it.

SNPE's own quantizer is closed source; AIMET's TF-enhanced analyzer is its public twin
(SNPE.md section 5; quic/aimet ``TfEnhancedEncodingAnalyzer`` and ``UpdatePdf``). This module
reproduces it, including its float32/float64 mix and its quirks:

- A 512-bucket histogram over a range fixed by the first sample that is not all zeros: that
  sample's [min, max], widened 3x around its centre. Values outside are dropped but still count
  in the sample's size. A value goes to bucket ``round(x / size - left0 / size)``.
- Each sample's bucket counts divided by its size, averaged over samples, make the PDF.
- Candidates: 17 scales ``f * d0`` (f = 1/16 ... 17/16) times 21 offsets, each clamped to the
  observed range, plus the observed range itself; the cost is 3 x saturation + quantization error
  at bucket midpoints; the first strictly lowest cost wins.

The result depends on which sample comes first, by definition, as with SNPE reading ``data.txt`` in
order: samples are fed one at a time in dataset order, so the batch size does not matter, but the
order does. Two observers merge only if they share the grid (the same first sample).
"""

from __future__ import annotations

import numba
import numpy as np

from .encoding import MIN_RANGE, round_half_away
from .kernels import CHUNK, LANES, key_range, key_values, tally_slots

PDF_SIZE = 512
GAMMA = 3.0
"""Weight of the saturation (clipping) cost against the quantization cost."""

_F32 = np.float32
_LOWEST = _F32(np.finfo(np.float32).min)
_HIGHEST = _F32(np.finfo(np.float32).max)


class TfEnhancedObserver:
    """AIMET's per-tensor PDF: bucket counts over a grid fixed by the first non-zero sample."""

    def __init__(self) -> None:
        self.x_left: np.ndarray | None = None  # float64 left edges of the 512 buckets
        self.counts = np.zeros(PDF_SIZE, dtype=np.int64)
        self.elements = 0  # values in all samples since the grid was fixed, dropped ones included
        self.updated = False  # any sample seen, even if all were zeros

    def update(self, batch: np.ndarray) -> tuple[float, float] | None:
        """Feed a batch sample by sample along its first axis, in order; returns its (min, max)."""
        if batch.ndim == 0 or batch.shape[0] == 1:
            return self.update_sample(batch)
        ranges = [self.update_sample(s) for s in batch.reshape(batch.shape[0], -1)]
        ranges = [r for r in ranges if r is not None]
        return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None

    def update_sample(self, sample: np.ndarray) -> tuple[float, float] | None:
        """Add one sample (any shape) to the PDF, as AIMET's ``UpdatePdf`` does for one batch.

        Returns the sample's (min, max), NaN or Inf included (for the caller to reject), None if it
        is empty.
        """
        flat = np.ascontiguousarray(sample, dtype=np.float32).reshape(-1)
        self.updated = True
        if flat.size == 0:
            return None
        if self.x_left is None:
            low, high = flat.min(), flat.max()
            if not (np.isfinite(low) and np.isfinite(high)) or (low == 0 and high == 0):
                return float(low) + 0.0, float(high) + 0.0  # AIMET waits for a sample not all zeros
            self.x_left = initial_grid(low, high)
        return self.settle(flat.size, _bucket_counts(flat, *self.grid, self.counts))

    @property
    def grid(self) -> tuple[np.float32, np.float32]:
        """The bucketing kernel's view of the fixed grid: (bucket size, first left edge / size), float32."""
        size = _F32(self.x_left[1] - self.x_left[0])
        return size, _F32(_F32(self.x_left[0]) / size)

    def settle(self, size: int, counted: tuple) -> tuple[float, float]:
        """Account for a sample of ``size`` values whose buckets the kernel has counted on :attr:`grid`;
        ``counted`` is its (min, max), returned as Python floats (NaN or Inf included)."""
        self.updated = True
        self.elements += size
        return float(counted[0]) + 0.0, float(counted[1]) + 0.0

    def spawn(self) -> TfEnhancedObserver:
        """An empty observer on this one's grid, for samples whose counts merge into this one."""
        spawned = TfEnhancedObserver()
        spawned.x_left = None if self.x_left is None else self.x_left.copy()
        return spawned

    def merge(self, other: TfEnhancedObserver) -> None:
        """Add another observer's samples; both must have fixed the same grid (or one none)."""
        self.updated |= other.updated
        if other.x_left is None:
            return
        if self.x_left is None:
            self.x_left = other.x_left.copy()
        elif not np.array_equal(self.x_left, other.x_left):
            raise ValueError("tf_enhanced statistics merge only when both runs start from the same first sample")
        self.counts += other.counts
        self.elements += other.elements

    def pdf(self) -> np.ndarray:
        """Bucket probabilities: the average of the per-sample PDFs (samples of a tensor have one size)."""
        return self.counts / max(self.elements, 1)

    def chosen_range(self, bitwidth: int) -> tuple[float, float] | None:
        """The [min, max] AIMET's asymmetric TF-enhanced search picks; None if nothing was seen.

        Only zeros seen: [-1, 1], as AIMET returns.
        """
        if self.x_left is None:
            return (-1.0, 1.0) if self.updated else None
        return search(self.x_left, self.pdf(), bitwidth)


def initial_grid(low: float, high: float) -> np.ndarray:
    """Bucket left edges from a first sample's min and max: the range widened 3x around its centre."""
    low, high = _F32(low), _F32(high)
    with np.errstate(over="ignore"):
        if low == high:
            high = max(high, _F32(low + _F32(MIN_RANGE)))
        center = _F32((high + low) / 2)
        low = max(_LOWEST, _F32(center - 3 * _F32(center - low)))
        high = min(_HIGHEST, _F32(center + 3 * _F32(high - center)))
    size = (np.float64(high) - np.float64(low)) / PDF_SIZE
    return np.float64(low) + np.arange(PDF_SIZE, dtype=np.float64) * size


def search(x_left: np.ndarray, pdf: np.ndarray, bitwidth: int) -> tuple[float, float]:
    """AIMET's asymmetric candidate search over a PDF; returns the winning [min, max]."""
    steps = _F32(2**bitwidth - 1)
    observed_min, observed_max = _aggregate_range(x_left, pdf)
    delta, offset = _candidates(observed_min, observed_max, steps)
    best = int(np.argmin(_costs(x_left, pdf, steps, delta, offset)))  # first of equal costs wins
    d, o = delta[best], _F32(offset[best])
    with np.errstate(over="ignore"):
        return float(max(_LOWEST, _F32(d * o))), float(min(_HIGHEST, _F32(d * _F32(o + steps))))


def _aggregate_range(x_left: np.ndarray, pdf: np.ndarray) -> tuple[np.float32, np.float32]:
    """Left edges of the lowest and highest non-empty buckets, widened to include 0 and MIN_RANGE."""
    nonzero = np.flatnonzero(pdf > 0)
    low = _F32(x_left[nonzero[0]]) if nonzero.size else _F32(x_left[0])
    top = nonzero[nonzero > 0]  # AIMET's downward scan stops before bucket 0
    high = _F32(x_left[top[-1]]) if top.size else _F32(x_left[-1])
    low, high = min(low, _F32(0)), max(high, _F32(0))
    return low, max(high, _F32(low + _F32(MIN_RANGE)))


def _candidates(observed_min: np.float32, observed_max: np.float32, steps: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The (delta, offset) pairs AIMET tests: 17 deltas x 21 offsets clamped, plus the observed one.

    AIMET's two loops (f = 1/16 ... 17/16 outer, 21 offsets inner), vectorized in the same order
    with the same float32 steps; fmax/fmin keep std::max's answer where a product overflows.
    """
    observed_delta = _F32((np.float64(observed_max) - np.float64(observed_min)) / np.float64(steps))
    observed_offset = int(round_half_away(_F32(observed_min / observed_delta)))
    with np.errstate(over="ignore"):
        observed_min = max(_LOWEST, _F32(observed_delta * _F32(observed_offset)))
        observed_max = min(_HIGHEST, _F32(observed_delta * _F32(observed_offset + steps)))
    fractions = (np.arange(1, 18) / 16).astype(np.float32)  # k/16: exact in float32, as AIMET's f += 1/16
    delta = np.repeat(fractions * observed_delta, 21)
    offset = np.tile((-np.float64(steps) + np.float64(steps) / 20.0 * np.arange(21)).astype(np.int64), 17)  # C++ cast
    offset_f = offset.astype(np.float32)
    with np.errstate(over="ignore"):
        test_min = np.fmax(_LOWEST, delta * offset_f)
        test_max = np.fmin(_HIGHEST, delta * (offset_f + steps))
    covers = (test_min < observed_min) & (test_max > observed_max)  # such a candidate is skipped
    test_min, test_max = np.fmax(observed_min, test_min), np.fmin(observed_max, test_max)
    kept = ~covers & (test_min != test_max)  # and so is one that collapses
    test_min, test_max = test_min[kept], test_max[kept]
    delta = ((test_max.astype(np.float64) - test_min.astype(np.float64)) / np.float64(steps)).astype(np.float32)
    offset = round_half_away(test_min / delta).astype(np.int64)
    return np.append(delta, observed_delta).astype(np.float32), np.append(offset, observed_offset).astype(np.int64)


def _costs(x_left: np.ndarray, pdf: np.ndarray, steps: np.float32, delta: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """3 x saturation + quantization cost of every candidate, summed in bucket order in float64."""
    start = _F32(x_left[0])
    step = np.float64(x_left[1] - x_left[0])
    offset_f = offset.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        low_index = _bucket_index(delta * offset_f, start, step)
        high_index = _bucket_index(delta * (offset_f + steps), start, step)
    return _candidate_costs(start, step, pdf.astype(np.float64), delta, offset_f, low_index, high_index)


@numba.njit(nogil=True, cache=True, inline="always")
def _round_half_away(x):  # pragma: no cover - compiled
    """encoding.round_half_away for one float32 in compiled code (C++ ``std::round``)."""
    magnitude = abs(x)
    whole = np.floor(magnitude)
    return np.copysign(whole + (np.float32(1.0) if magnitude - whole >= np.float32(0.5) else np.float32(0.0)), x)


@numba.njit(nogil=True, cache=True)
def _candidate_costs(start, step, pdf, delta, offset, low_index, high_index):  # pragma: no cover - compiled
    """AIMET's cost loops: per candidate, buckets below its range cost their squared distance to the
    lowest bucket's midpoint, buckets from the highest one up to its midpoint, the rest their
    quantization error at the midpoint (float32 arithmetic, squared in float64); each term is
    weighted by the PDF and added in bucket order."""
    costs = np.empty(delta.shape[0])
    origin = np.float64(start)
    for c in range(delta.shape[0]):
        d, o = delta[c], offset[c]
        low_mid = np.float64(np.float32(origin + low_index[c] * step + step / 2))
        high_mid = np.float64(np.float32(origin + high_index[c] * step + step / 2))
        saturation_low = saturation_high = quantization = 0.0
        for b in range(PDF_SIZE):
            mid = origin + b * step + step / 2
            below, above = b < low_index[c], b >= high_index[c]
            if below:
                distance = mid - low_mid
                saturation_low += pdf[b] * (distance * distance)
            if above:
                distance = mid - high_mid
                saturation_high += pdf[b] * (distance * distance)
            if not (below or above):
                value = np.float32(mid)
                scaled = np.float32(np.float32(value / d) - o)
                code = _round_half_away(scaled)
                error = np.float64(np.float32(value - np.float32(d * np.float32(code + o))))
                quantization += pdf[b] * (error * error)
        costs[c] = GAMMA * (saturation_low + saturation_high) + quantization
    return costs


def _bucket_index(value: np.ndarray, start: np.float32, step: np.float64) -> np.ndarray:
    """``clamp(floor((value - start) / step), 0, 511)`` with AIMET's float32 subtraction."""
    index = np.floor((value - start).astype(np.float64) / step)
    return np.clip(np.nan_to_num(index, nan=0.0), 0, PDF_SIZE - 1).astype(np.int64)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bucket_counts(values, size, offset, counts):  # pragma: no cover - compiled
    """AIMET's ``GetHistogram``: bucket ``round(x / size - offset)`` in float32, half away from zero.

    Values outside the 512 buckets (and NaN) are dropped. Per chunk, a vectorized loop computes the
    buckets, the chunk's key range is folded in (kernels.key_range), then interleaved
    sub-histograms count the buckets. Returns the (min, max) of all the values, NaN or Inf included.
    """
    drop = PDF_SIZE
    parts = np.zeros((LANES, PDF_SIZE + 1), dtype=np.int64)
    slots = np.empty(CHUNK, dtype=np.uint32)  # see histogram._count
    keys = values.view(np.int32)
    low, high = np.int32(2**31 - 1), np.int32(-(2**31))
    n = values.shape[0]
    for start in range(0, n, CHUNK):
        chunk = values[start : start + CHUNK]  # indexed from 0: see histogram._count
        for k in range(chunk.shape[0]):
            shifted = chunk[k] / size - offset  # float32 arithmetic throughout
            rounded = _round_half_away(shifted)
            slots[k] = np.uint32(rounded) if (rounded >= 0 and rounded < PDF_SIZE) else np.uint32(drop)
        low, high = key_range(keys[start : start + CHUNK], low, high)
        tally_slots(slots, chunk.shape[0], parts, values, start + CHUNK)
    for lane in range(LANES):
        for b in range(PDF_SIZE):
            counts[b] += parts[lane, b]
    return key_values(low, high)


@numba.njit(nogil=True, cache=True)
def bucket_counts_pieces(pieces, sizes, offsets, counts, results):  # pragma: no cover - compiled
    """``_bucket_counts`` of every piece in one call: piece k into ``counts[k]`` on the grid
    ``(sizes[k], offsets[k])``; ``results[k]`` gets its (min, max), for :meth:`TfEnhancedObserver.settle`."""
    for k in range(len(pieces)):
        results[k, 0], results[k, 1] = _bucket_counts(pieces[k], sizes[k], offsets[k], counts[k])
