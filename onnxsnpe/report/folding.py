"""Folding one evaluation sample's tensors into the per-tensor figures, in one compiled call.

The report compares every quantized activation of the simulated model with FP32's, sample by
sample: sums of squares (signal, noise, their product, the simulated power), the sum and maximum of
absolute errors, the values the encoding clips and a histogram of the FP32 values. Done tensor by
tensor in numpy that took about a dozen array passes and calls per tensor per sample (4,000 Python
calls a sample on EfficientNet-Lite0, two thirds of a ``quantize`` run); here one compiled call per
sample does it all, releasing the GIL so that workers fold side by side: the error sums of a tensor
whose values are all finite in one vectorized pass, the histogram in chunks that stay in cache.

The figures are those of the numpy computation they replace (report/metrics.py's
TensorComparison.update, ``np.histogram(np.clip(ref, lo, hi), 64, (lo, hi))`` with NumPy 2's
float32 promotion) up to the order of the float64 sums within a sample (tested).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

SUMS = 5
"""Per tensor and sample: signal, noise, reference . simulated, simulated power, sum of |error|."""


class TensorBins:
    """The fixed per-tensor parameters of a fold: histogram grids and clipping thresholds.

    ``ranges`` are each tensor's histogram range (lo, hi); ``thresholds`` the values below and above
    which a reference value counts as clipped. They are rounded to float32 as numpy compares a
    float32 array with a Python float.
    """

    def __init__(self, ranges: list[tuple[float, float]], thresholds: list[tuple[float, float]], bins: int) -> None:
        self.bins = bins
        self.bounds = np.array([[lo, hi, below, above] for (lo, hi), (below, above) in zip(ranges, thresholds,
                                                                                          strict=True)],
                               dtype=np.float32).reshape(-1, 4)
        # per tensor: np.linspace's origin and step (its edges are float32(j * step + origin)), and
        # the reciprocal of np.histogram's bin width
        self.grids = np.array([[lo, (hi - lo) / bins, bins / (hi - lo)] for lo, hi in ranges],
                              dtype=np.float64).reshape(-1, 3)


class Accumulator:
    """One worker's running figures for every tensor: histograms, clipped counts, maximum errors,
    value counts (order-free, so they add up across workers) and the current sample's float sums
    (added in sample order by the caller, so results do not depend on how samples were shared out)."""

    def __init__(self, tensors: int, bins: int) -> None:
        self.histograms = np.zeros((tensors, bins), dtype=np.int64)
        self.counts = np.zeros((tensors, 3), dtype=np.int64)  # clipped, values, finite values
        self.max_errors = np.zeros(tensors, dtype=np.float64)
        self.sums = np.zeros((tensors, SUMS), dtype=np.float64)

    def merge(self, other: Accumulator) -> None:
        """Add another worker's order-free figures."""
        self.histograms += other.histograms
        self.counts += other.counts
        np.maximum(self.max_errors, other.max_errors, out=self.max_errors)


def typed_arrays(arrays: list[np.ndarray]) -> List:
    """The flat float32 views of ``arrays`` as a typed list for :func:`fold_sample` (made once per
    set of reused arrays: building it costs Python work per tensor)."""
    return List([np.ravel(array) for array in arrays] or [np.zeros(1, dtype=np.float32)])


def fold(bins: TensorBins, references: List, simulated: List, into: Accumulator) -> None:
    """Fold one sample: ``references[k]`` and ``simulated[k]`` are tensor k's flat float32 values."""
    fold_sample(references, simulated, bins.bounds, bins.grids, into.histograms, into.counts, into.max_errors,
                into.sums)


CHUNK = 1024
LANES = 4
"""Histogram tallies counted side by side (fold_sample)."""
"""Values per chunk: their histogram slots are computed (vectorized), counted, and their errors summed
while the chunk is in cache."""


@numba.njit(nogil=True, cache=True, boundscheck=False)
def fold_sample(references, simulated, bounds, grids, histograms, counts, max_errors,
                sums):  # pragma: no cover - compiled
    """Every tensor's figures for one sample (see the module docstring); ``sums`` is overwritten with
    this sample's float sums, the rest accumulates.

    Reference values that are not finite (masked attention positions) are left out of the error
    sums, as TensorComparison does, but counted in the histogram (clipped to its ends) and the
    clipped share, as the numpy code did.
    """
    bins = histograms.shape[1]
    slots = np.empty(CHUNK, dtype=np.int32)
    scratch = np.empty(CHUNK, dtype=np.float64)  # a chunk's |errors|, for _finite_errors
    # the last slot takes NaNs, which numpy leaves out; LANES tallies counted in turn, so that runs of
    # values in one bin (a ReLU's zeros) do not wait on one counter
    tally = np.zeros((LANES, bins + 1), dtype=np.int64)
    errors = np.zeros(SUMS + 1)
    for k in range(len(references)):
        ref = references[k]
        sim = simulated[k]
        tally[:, :] = 0
        errors[:] = 0.0
        clipped = 0
        finite = 0
        whole = _finite_errors(ref, sim, errors, scratch)  # all finite: the errors in one vectorized pass
        if whole:
            finite += ref.shape[0]
        for start in range(0, ref.shape[0], CHUNK):
            end = min(start + CHUNK, ref.shape[0])
            clipped += _slots(ref[start:end], bounds[k], grids[k], bins, slots)
            count = end - start
            for i in range(0, count - count % LANES, LANES):
                for lane in range(LANES):
                    tally[lane, slots[i + lane]] += 1
            for i in range(count - count % LANES, count):
                tally[0, slots[i]] += 1
            if not whole:
                finite += _errors(ref[start:end], sim[start:end], errors)
        for lane in range(LANES):
            histograms[k] += tally[lane, :bins]
        sums[k] = errors[:SUMS]
        max_errors[k] = max(max_errors[k], errors[SUMS])
        counts[k, 0] += clipped
        counts[k, 1] += ref.shape[0]
        counts[k, 2] += finite


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _slots(values, bounds, grid, bins, slots):  # pragma: no cover - compiled
    """The bin of each of ``values`` as np.histogram(np.clip(values, lo, hi), bins, (lo, hi)) finds it
    (NaN: ``bins``) into ``slots``; returns how many lie beyond the clipping thresholds.

    ``bounds`` is a row of TensorBins.bounds, ``grid`` of TensorBins.grids. numpy divides by the
    width, then moves the guess by one bin where the float32 edges (np.linspace:
    ``float32(j * step + origin)``) say so. Here the guess multiplies by the float32 reciprocal (a few
    float32 steps from numpy's, so at most one bin off, which the same correction undoes) and the
    edges are computed rather than looked up, so the loop vectorizes; the bins are numpy's (tested).
    A chunk comes as a view (not an offset into the whole tensor): LLVM vectorizes that loop, halving
    its time."""
    low, high, below, above = bounds[0], bounds[1], bounds[2], bounds[3]
    origin, step, scale = grid[0], grid[1], np.float32(grid[2])
    last = np.int32(bins - 1)
    nan_slot = np.int32(bins)
    clipped = 0
    for i in range(values.shape[0]):
        r = values[i]
        clipped += (r < below) | (r > above)
        c = min(max(r, low), high)
        j = min(np.int32((c - low) * scale), last)
        j -= np.int32(c < np.float32(np.float64(j) * step + origin))
        j += np.int32((j != last) & (c >= np.float32(np.float64(j + 1) * step + origin)))
        slots[i] = j if r == r else nan_slot
    return clipped


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _errors(ref, sim, errors):  # pragma: no cover - compiled
    """Add the float64 sums over the finite values of ``ref`` (a chunk, as a view) to ``errors``
    (signal, noise, dot, simulated power, sum of |error|; then the largest |error|) and return their
    count. The sums are reassociated so that they vectorize: rounding differs from a sequential sum
    in the last bits."""
    signal = noise = dot = power = absolute = 0.0
    largest = errors[SUMS]
    finite = 0
    for i in range(ref.shape[0]):
        keep = np.isfinite(ref[i])
        rd = np.float64(ref[i]) if keep else 0.0
        sd = np.float64(sim[i]) if keep else 0.0
        err = sd - rd
        signal += rd * rd
        noise += err * err
        dot += rd * sd
        power += sd * sd
        absolute += abs(err)
        largest = max(largest, abs(err))
        finite += keep
    _add_sums(errors, signal, noise, dot, power, absolute, largest)
    return finite


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _finite_errors(ref, sim, errors, scratch):  # pragma: no cover - compiled
    """_errors over a whole tensor in one vectorized pass that assumes every reference value finite,
    and whether they all were: only then are its sums added to ``errors`` (else the caller sums chunk
    by chunk, keeping the positions whose reference is finite). They all were exactly when the sum of
    their squares is finite (a float32 squared stays far below float64's overflow, even summed 2^31
    times), one test after the loop: a test of each value's exponent bits in the loop slowed the pass
    three times under some of LLVM's CPU models (rocketlake, sapphirerapids: 12 ms instead of 4 for 7 M
    values), its mix of 32-bit and 64-bit lanes left unvectorized. Without fast-math's no-NaN and
    no-Inf assumptions the test cannot be optimized away. The largest error is an integer maximum
    over the bits of each chunk's |errors| (written to ``scratch``): non-negative floats order as
    their bits do, and unlike a float maximum it vectorizes (five times faster)."""
    signal = noise = dot = power = absolute = 0.0
    top = np.int64(0)
    bits = scratch.view(np.int64)
    for start in range(0, ref.shape[0], CHUNK):
        end = min(start + CHUNK, ref.shape[0])
        r, s = ref[start:end], sim[start:end]
        for i in range(end - start):
            rd = np.float64(r[i])
            sd = np.float64(s[i])
            err = sd - rd
            signal += rd * rd
            noise += err * err
            dot += rd * sd
            power += sd * sd
            absolute += abs(err)
            scratch[i] = abs(err)
        for i in range(end - start):
            top = max(top, bits[i])
    if not np.isfinite(signal):
        return False
    largest = np.empty(1, dtype=np.int64)
    largest[0] = top
    _add_sums(errors, signal, noise, dot, power, absolute, max(errors[SUMS], largest.view(np.float64)[0]))
    return True


@numba.njit(nogil=True, cache=True, inline="always")
def _add_sums(errors, signal, noise, dot, power, absolute, largest):  # pragma: no cover - compiled
    """Add a pass's sums to ``errors`` and set its largest error."""
    errors[0] += signal
    errors[1] += noise
    errors[2] += dot
    errors[3] += power
    errors[4] += absolute
    errors[SUMS] = largest
