"""AIMET's TF-enhanced statistics: the per-tensor PDF that SNPE's enhanced quantizer searches.

SNPE's own quantizer is closed source; AIMET's TF-enhanced analyzer is its public twin
(SNPE.md section 5; quic/aimet ``UpdatePdf``). This module keeps its statistics, including its
float32/float64 mix and its quirks (the search over them is encode/tf_enhanced.py):

- A histogram of 1536 buckets fixed by the first sample that is not all zeros: each bucket is
  1/1536 of that sample's [min, max] widened 3x around its centre (so about 1/512 of the sample's
  range), and the buckets start at the multiple of that size at or below the widened range's low
  end (so zero is a bucket edge). Values outside are dropped but still count in the sample's
  size. A value goes to bucket ``floor(x / size) - first`` (float64).
- Each sample's bucket counts divided by its size, averaged over samples, make the PDF.

This is what aimet-onnx 2.42's compiled analyzer does (measured through its own ``libpymo``:
tools/HTP.md, "TF-enhanced"); AIMET's older public source had 512 buckets over the widened range,
with the bucket of ``round(x / size - left0 / size)`` in float32.

The result depends on which sample comes first, by definition, as with SNPE reading ``data.txt`` in
order: samples are fed one at a time in dataset order, so the batch size does not matter, but the
order does. Two observers merge only if they share the grid (the same first sample).
"""

from __future__ import annotations

import numba
import numpy as np

from .kernels import CHUNK, LANES, key_range, key_values, tally_slots

PDF_SIZE = 1536
AIMET_MIN_RANGE = 0.01
"""AIMET widens a first sample whose min equals its max by this much before fixing the grid."""

_F32 = np.float32
FLOAT32_LOWEST = _F32(np.finfo(np.float32).min)
FLOAT32_HIGHEST = _F32(np.finfo(np.float32).max)


class TfEnhancedObserver:
    """AIMET's per-tensor PDF: bucket counts over a grid fixed by the first non-zero sample."""

    def __init__(self) -> None:
        self.x_left: np.ndarray | None = None  # float64 left edges of the PDF_SIZE buckets
        self.spec: tuple[float, float] | None = None  # (bucket size, index of the first bucket): see grid
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
            self.spec = initial_grid(low, high)
            self.x_left = left_edges(*self.spec)
        return self.settle(flat.size, _bucket_counts(flat, *self.grid, self.counts))

    @property
    def grid(self) -> tuple[float, float]:
        """The bucketing kernel's view of the fixed grid: (bucket size, index of the first bucket), float64."""
        return self.spec

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
        spawned.spec = self.spec
        return spawned

    def merge(self, other: TfEnhancedObserver) -> None:
        """Add another observer's samples; both must have fixed the same grid (or one none)."""
        self.updated |= other.updated
        if other.x_left is None:
            return
        if self.x_left is None:
            self.x_left, self.spec = other.x_left.copy(), other.spec
        elif self.spec != other.spec:
            raise ValueError("tf_enhanced statistics merge only when both runs start from the same first sample")
        self.counts += other.counts
        self.elements += other.elements

    def pdf(self) -> np.ndarray:
        """Bucket probabilities: the average of the per-sample PDFs (samples of a tensor have one size)."""
        return self.counts / max(self.elements, 1)


def initial_grid(low: float, high: float) -> tuple[float, float]:
    """(bucket size, index of the first bucket) from a first sample's min and max: the range widened
    3x around its centre (float32), split in PDF_SIZE buckets (float64); the first bucket the one
    holding the widened range's low end."""
    low, high = _F32(low), _F32(high)
    with np.errstate(over="ignore"):
        if low == high:
            high = max(high, _F32(low + _F32(AIMET_MIN_RANGE)))
        center = _F32((high + low) / 2)
        wide_low = max(FLOAT32_LOWEST, _F32(center - 3 * _F32(center - low)))
        wide_high = min(FLOAT32_HIGHEST, _F32(center + 3 * _F32(high - center)))
        size = (np.float64(wide_high) - np.float64(wide_low)) / PDF_SIZE
    return float(size), float(np.floor(np.float64(wide_low) / size))


def left_edges(size: float, first: float) -> np.ndarray:
    """Left edges of the PDF_SIZE buckets of the grid (size, first), float64."""
    return (first + np.arange(PDF_SIZE, dtype=np.float64)) * size


@numba.njit(nogil=True, cache=True, inline="always")
def round_half_away_f32(x):  # pragma: no cover - compiled
    """encoding.round_half_away for one float32 in compiled code (C++ ``std::round``)."""
    magnitude = abs(x)
    whole = np.floor(magnitude)
    return np.copysign(whole + (np.float32(1.0) if magnitude - whole >= np.float32(0.5) else np.float32(0.0)), x)


def bucket_index(value: np.ndarray, start: np.float32, step: np.float64) -> np.ndarray:
    """``clamp(floor((value - start) / step), 0, 511)`` with AIMET's float32 subtraction."""
    index = np.floor((value - start).astype(np.float64) / step)
    return np.clip(np.nan_to_num(index, nan=0.0), 0, PDF_SIZE - 1).astype(np.int64)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bucket_counts(values, size, first, counts):  # pragma: no cover - compiled
    """AIMET's ``GetHistogram``: bucket ``floor(x / size) - first`` in float64.

    Values outside the PDF_SIZE buckets (and NaN) are dropped. Per chunk, a vectorized loop computes the
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
            index = np.floor(np.float64(chunk[k]) / size) - first
            slots[k] = np.uint32(index) if (index >= 0 and index < PDF_SIZE) else np.uint32(drop)
        low, high = key_range(keys[start : start + CHUNK], low, high)
        tally_slots(slots, chunk.shape[0], parts, values, start + CHUNK)
    for lane in range(LANES):
        for b in range(PDF_SIZE):
            counts[b] += parts[lane, b]
    return key_values(low, high)


@numba.njit(nogil=True, cache=True)
def bucket_counts_pieces(pieces, sizes, firsts, counts, results):  # pragma: no cover - compiled
    """``_bucket_counts`` of every piece in one call: piece k into ``counts[k]`` on the grid
    ``(sizes[k], firsts[k])``; ``results[k]`` gets its (min, max), for :meth:`TfEnhancedObserver.settle`."""
    for k in range(len(pieces)):
        results[k, 0], results[k, 1] = _bucket_counts(pieces[k], sizes[k], firsts[k], counts[k])
