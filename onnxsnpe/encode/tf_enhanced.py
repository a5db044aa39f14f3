"""SNPE's enhanced quantizer (``snpe-dlc-quantize --use_enhanced_quantizer``) as AIMET implements it.

SNPE's own quantizer is closed source; AIMET's TF-enhanced analyzer is its public twin
(SNPE.md section 5; quic/aimet ``TfEnhancedEncodingAnalyzer``). This module reproduces its search
over the PDF that stats/pdf.py collects, including its float32/float64 mix and its quirks
(checked against aimet-onnx 2.42: fed aimet's own histograms, this search returns its encodings
for all 110 EfficientNet-Lite0 tensors; tools/HTP.md, "TF-enhanced"):
candidates are 17 scales ``f * d0`` (f = 1/16 ... 17/16) times 21 offsets, each clamped to the
observed range, plus the observed range itself; the cost is 3 x saturation + quantization error
at bucket midpoints; the first strictly lowest cost wins.
"""

from __future__ import annotations

import numba
import numpy as np

from ..stats.pdf import FLOAT32_HIGHEST, FLOAT32_LOWEST, TfEnhancedObserver, bucket_index, round_half_away_f32
from .encoding import MIN_RANGE, round_half_away

_F32 = np.float32
GAMMA = 3.0
"""Weight of the saturation (clipping) cost against the quantization cost."""


def tf_enhanced_range(observer: TfEnhancedObserver, bitwidth: int) -> tuple[float, float] | None:
    """The [min, max] AIMET's asymmetric TF-enhanced search picks; None if nothing was seen.

    Only zeros seen: [-1, 1], as AIMET returns.
    """
    if observer.x_left is None:
        return (-1.0, 1.0) if observer.updated else None
    return search(observer.x_left, observer.pdf(), bitwidth)


def search(x_left: np.ndarray, pdf: np.ndarray, bitwidth: int) -> tuple[float, float]:
    """AIMET's asymmetric candidate search over a PDF; returns the winning [min, max]."""
    steps = _F32(2**bitwidth - 1)
    observed_min, observed_max = _aggregate_range(x_left, pdf)
    delta, offset = _candidates(observed_min, observed_max, steps)
    best = int(np.argmin(_costs(x_left, pdf, steps, delta, offset)))  # first of equal costs wins
    d, o = delta[best], _F32(offset[best])
    with np.errstate(over="ignore"):
        return float(max(FLOAT32_LOWEST, _F32(d * o))), float(min(FLOAT32_HIGHEST, _F32(d * _F32(o + steps))))


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
        observed_min = max(FLOAT32_LOWEST, _F32(observed_delta * _F32(observed_offset)))
        observed_max = min(FLOAT32_HIGHEST, _F32(observed_delta * _F32(observed_offset + steps)))
    fractions = (np.arange(1, 18) / 16).astype(np.float32)  # k/16: exact in float32, as AIMET's f += 1/16
    delta = np.repeat(fractions * observed_delta, 21)
    offset = np.tile((-np.float64(steps) + np.float64(steps) / 20.0 * np.arange(21)).astype(np.int64), 17)  # C++ cast
    offset_f = offset.astype(np.float32)
    with np.errstate(over="ignore"):
        test_min = np.fmax(FLOAT32_LOWEST, delta * offset_f)
        test_max = np.fmin(FLOAT32_HIGHEST, delta * (offset_f + steps))
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
        low_index = bucket_index(delta * offset_f, start, step)
        high_index = bucket_index(delta * (offset_f + steps), start, step)
    occupied = np.flatnonzero(pdf > 0)  # empty buckets add exact zeros: skipping them changes no sum
    return _candidate_costs(start, step, pdf.astype(np.float64), occupied, delta, offset_f, low_index, high_index)


@numba.njit(nogil=True, cache=True)
def _candidate_costs(start, step, pdf, occupied, delta, offset, low_index, high_index):  # pragma: no cover - compiled
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
        for b in occupied:
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
                code = round_half_away_f32(scaled)
                error = np.float64(np.float32(value - np.float32(d * np.float32(code + o))))
                quantization += pdf[b] * (error * error)
        costs[c] = GAMMA * (saturation_low + saturation_high) + quantization
    return costs
