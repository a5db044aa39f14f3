"""tf_enhanced against a line-by-line transcription of AIMET's TF-enhanced analyzer (SNPE.md section 5),
and against encodings and histograms recorded from aimet-onnx 2.42 itself.

The reference below follows quic/aimet ``TfEnhancedEncodingAnalyzer`` (the search) with plain loops
and the same float32 (C++ ``float``) and float64 (``double``) steps, so that the vectorized
implementation is checked bit for bit. Its histogram is the one aimet-onnx 2.42's compiled
``UpdatePdf`` keeps, as measured through its ``libpymo`` (tools/HTP.md, "TF-enhanced"): 1536
buckets over the first sample's range widened 3x, starting at the multiple of the bucket size at
or below the widened range's low end, a value in bucket ``floor(x / size) - first``. (The public source this test
first transcribed had 512 buckets over the widened range and rounded ``x / size - left0 / size``
in float32; aimet-onnx 2.42 does not compute that, and 17 of 61 EfficientNet-Lite0 tensors ended
more than 2 steps from its encodings.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.encode.tf_enhanced import tf_enhanced_range
from onnxsnpe.stats.pdf import TfEnhancedObserver

F = np.float32
PDF_SIZE = 1536


def cpp_round(x: float) -> float:
    """std::round: half away from zero."""
    whole = math.floor(abs(x))
    return math.copysign(whole + (abs(x) - whole >= 0.5), x)


class ReferencePdf:
    """AIMET's PDF struct and UpdatePdf, one batch (here: one sample) per call."""

    def __init__(self) -> None:
        self.x_left: list[float] = []
        self.pdf = [0.0] * PDF_SIZE
        self.iterations = 0

    def update(self, data: np.ndarray) -> None:
        data = data.astype(np.float32).ravel()
        if not self.x_left:
            min_val, max_val = F(data.min()), F(data.max())
            if min_val == 0 and max_val == 0:
                return
            if min_val == max_val:
                max_val = max(max_val, F(min_val + F(0.01)))
            center = F((max_val + min_val) / F(2))
            wide_min = F(center - F(F(3) * F(center - min_val)))
            wide_max = F(center + F(F(3) * F(max_val - center)))
            self.size = (float(wide_max) - float(wide_min)) / PDF_SIZE
            self.first = math.floor(float(wide_min) / self.size)
            self.x_left = [(self.first + i) * self.size for i in range(PDF_SIZE)]
        histogram = [0] * PDF_SIZE
        for value in data:
            index = math.floor(float(value) / self.size) - self.first
            if 0 <= index < PDF_SIZE:
                histogram[index] += 1
        for i in range(PDF_SIZE):
            prob = histogram[i] / len(data)
            self.pdf[i] = (self.pdf[i] * self.iterations + prob) / (self.iterations + 1)
        self.iterations += 1


def reference_encoding(ref: ReferencePdf, bw: int) -> tuple[float, float]:
    """TfEnhancedEncodingAnalyzer::computeEncoding, asymmetric branch."""
    x_left, pdf = ref.x_left, ref.pdf
    # _findRangeOfAggregateStats
    min_val, max_val = F(x_left[0]), F(x_left[PDF_SIZE - 1])
    for i in range(PDF_SIZE):
        if pdf[i] > 0:
            min_val = F(x_left[i])
            break
    for i in range(PDF_SIZE - 1, 0, -1):
        if pdf[i] > 0:
            max_val = F(x_left[i])
            break
    min_val, max_val = min(min_val, F(0)), max(max_val, F(0))
    max_val = max(max_val, F(min_val + F(0.01)))
    num_steps = F(2**bw - 1)
    # _pickTestCandidatesAsymmetric
    observed_delta = F((float(max_val) - float(min_val)) / float(num_steps))
    observed_offset = int(cpp_round(float(F(min_val / observed_delta))))
    observed_min = F(observed_delta * F(observed_offset))
    observed_max = F(observed_delta * F(F(observed_offset) + num_steps))
    candidates = []
    f = F(1.0 / 16)
    while f <= 1 + 1.0 / 16:
        for i in range(21):
            test_delta = F(f * observed_delta)
            test_offset = int(-float(num_steps) + float(num_steps) / 20.0 * i)
            # _clampToObservedMinMax
            test_min = F(test_delta * F(test_offset))
            test_max = F(test_delta * F(F(test_offset) + num_steps))
            if test_min < observed_min and test_max > observed_max:
                continue
            test_min, test_max = max(observed_min, test_min), min(observed_max, test_max)
            if test_min == test_max:
                continue
            test_delta = F((float(test_max) - float(test_min)) / float(num_steps))
            test_offset = int(cpp_round(float(F(test_min / test_delta))))
            candidates.append((test_delta, test_offset))
        f = F(f + F(1.0 / 16))
    candidates.append((observed_delta, observed_offset))
    # _findBestCandidate with _quantAndSatCost
    best_cost, best = np.finfo(np.float64).max, None
    pdf_start, pdf_step = F(x_left[0]), x_left[1] - x_left[0]
    for delta, offset in candidates:
        low = F(delta * F(offset))
        high = F(delta * F(F(offset) + num_steps))
        min_ind = min(max(0, math.floor(float(F(low - pdf_start)) / pdf_step)), PDF_SIZE - 1)
        max_ind = min(max(0, math.floor(float(F(high - pdf_start)) / pdf_step)), PDF_SIZE - 1)
        min_mid = F(float(pdf_start) + min_ind * pdf_step + pdf_step / 2)
        max_mid = F(float(pdf_start) + max_ind * pdf_step + pdf_step / 2)
        sat_bottom = sat_top = quant = 0.0
        for i in range(min_ind):
            mid = float(pdf_start) + i * pdf_step + pdf_step / 2
            sat_bottom += pdf[i] * (mid - float(min_mid)) ** 2
        for i in range(max_ind, PDF_SIZE):
            mid = float(pdf_start) + i * pdf_step + pdf_step / 2
            sat_top += pdf[i] * (mid - float(max_mid)) ** 2
        for i in range(min_ind, max_ind):
            value = F(float(pdf_start) + i * pdf_step + pdf_step / 2)
            quantized = int(cpp_round(float(F(F(value / delta) - F(offset)))))
            dequantized = F(delta * F(quantized + offset))
            quant += pdf[i] * float(F(value - dequantized)) ** 2
        cost = 3.0 * (sat_bottom + sat_top) + quant
        if cost < best_cost:
            best_cost, best = cost, (delta, offset)
    delta, offset = best
    return float(F(delta * F(offset))), float(F(delta * F(F(offset) + num_steps)))


def _samples(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    shape = (4, 700)
    if kind == "uniform":
        data = rng.uniform(-1.0, 3.0, shape)
    elif kind == "gaussian":
        data = rng.normal(0.5, 2.0, shape)
    elif kind == "relu":
        data = np.maximum(rng.normal(0.0, 1.0, shape), 0.0)
    else:  # heavy-tailed with outliers, and a first sample of zeros that AIMET skips
        data = rng.standard_t(2, shape)
        data[1, :5] = [40.0, -35.0, 60.0, 55.0, -80.0]
        data[0] = 0.0
    return list(data.astype(np.float32))


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "relu", "heavy"])
@pytest.mark.parametrize("bitwidth", [4, 8, 16])  # 4 bits: clipping trade-offs show
def test_matches_transcription_of_aimet(kind: str, bitwidth: int) -> None:
    samples = _samples(kind, np.random.default_rng(7))
    ours, ref = TfEnhancedObserver(), ReferencePdf()
    for sample in samples:
        ours.update_sample(sample)
        ref.update(sample)
    assert ours.x_left is not None
    np.testing.assert_array_equal(ours.x_left, ref.x_left)
    np.testing.assert_allclose(ours.pdf(), ref.pdf, rtol=1e-12, atol=1e-15)
    low, high = tf_enhanced_range(ours, bitwidth)
    ref_low, ref_high = reference_encoding(ref, bitwidth)
    assert (low, high) == (ref_low, ref_high)
    # the SNPE encoding of AIMET's choice keeps AIMET's offset
    delta = (high - low) / (2**bitwidth - 1)
    assert asymmetric_encoding(low, high, bitwidth).offset == round(low / delta)


def test_batches_are_fed_sample_by_sample() -> None:
    samples = _samples("gaussian", np.random.default_rng(3))
    one, batched = TfEnhancedObserver(), TfEnhancedObserver()
    for sample in samples:
        one.update_sample(sample)
    batched.update(np.stack(samples[:3]))
    batched.update(np.stack(samples[3:]))
    np.testing.assert_array_equal(one.counts, batched.counts)
    assert tf_enhanced_range(one, 8) == tf_enhanced_range(batched, 8)


def test_first_sample_fixes_the_grid() -> None:
    """Order dependence by definition: values beyond 3x the first sample's range are dropped."""
    small, big = np.linspace(-1, 1, 100, dtype=np.float32), np.linspace(-100, 100, 100, dtype=np.float32)
    forward, backward = TfEnhancedObserver(), TfEnhancedObserver()
    for sample in (small, big):
        forward.update_sample(sample)
    for sample in (big, small):
        backward.update_sample(sample)
    assert tf_enhanced_range(forward, 8)[1] < 5 < tf_enhanced_range(backward, 8)[1]


def test_only_zeros_gives_aimets_default_range() -> None:
    observer = TfEnhancedObserver()
    observer.update_sample(np.zeros(10, np.float32))
    assert tf_enhanced_range(observer, 8) == (-1.0, 1.0)
    assert tf_enhanced_range(TfEnhancedObserver(), 8) is None


def test_merge_needs_the_same_grid() -> None:
    a, b, empty = TfEnhancedObserver(), TfEnhancedObserver(), TfEnhancedObserver()
    a.update_sample(np.arange(10, dtype=np.float32))
    b.update_sample(np.arange(20, dtype=np.float32))
    with pytest.raises(ValueError, match="first sample"):
        a.merge(b)
    empty.merge(a)
    np.testing.assert_array_equal(empty.counts, a.counts)
    assert tf_enhanced_range(empty, 8) == tf_enhanced_range(a, 8)


def test_samples_report_their_exact_range_dropped_values_included() -> None:
    """The bucket kernel finds each sample's min and max in its own pass (they feed minmax)."""
    observer = TfEnhancedObserver()
    first = np.linspace(-1, 1, 100, dtype=np.float32)
    assert observer.update_sample(first) == (-1.0, 1.0)
    beyond = np.array([0.5, -250.0, 0.25, 1e6, -0.0], dtype=np.float32)  # mostly outside the grid
    assert observer.update_sample(beyond) == (-250.0, 1e6)
    assert observer.update(np.stack([first, -first])) == (-1.0, 1.0)
    nan = observer.update_sample(np.array([1.0, np.nan], dtype=np.float32))
    assert nan is not None and not all(np.isfinite(nan))
    assert observer.update_sample(np.zeros(0, np.float32)) is None
    zeros = TfEnhancedObserver().update_sample(-np.zeros(4, np.float32))
    assert zeros == (0.0, 0.0) and not np.signbit(zeros[0])


def _aimet_cases():
    """The sample sequences whose results AIMET_2_42 records."""
    rng = np.random.default_rng(11)
    yield "grows_past_first", [np.linspace(-1, 3, 1000), np.linspace(-10, 10, 1000)]
    yield "far_outliers_dropped", [np.linspace(-1, 3, 1000), np.linspace(-100, 100, 1000)]
    yield "positive_only", [np.linspace(0.5, 0.7, 1000)]
    yield "constant_then_spread", [np.full(8, 2.0), np.linspace(1.9, 2.1, 64)]
    yield "zeros_skipped", [np.zeros(16), rng.normal(size=500), rng.normal(size=500) * 3]
    yield "gaussian_batches", [rng.normal(size=2000) * s for s in (1.0, 1.5, 0.5, 2.5)]


AIMET_2_42 = {
    # name: (encoding min, max, first left edge, bucket size, lowest and highest non-empty bucket), as
    # aimet-onnx 2.42's libpymo.BlockTensorQuantizer (tf_enhanced, 8 bits, asymmetric) reports them
    # after updateStats on each array as float32, computeEncodings and getStatsHistogram
    "grows_past_first": (-4.984987735748291, 7.007199764251709, -5.0, 0.0078125, 0, 1535),
    "far_outliers_dropped": (-4.910294055938721, 6.902205944061279, -5.0, 0.0078125, 12, 1524),
    "positive_only": (0.0, 0.6999999284744263, 0.29960935714188963, 0.00039062497671693563, 513, 1025),
    "constant_then_spread": (0.0, 2.017458915710449, 1.9899981021881104, 1.9531231373548508e-05, 105, 1406),
    "zeros_skipped": (-8.302962303161621, 7.736851215362549, -9.210361577570438, 0.012531104187171849, 73, 1353),
    "gaussian_batches": (-7.245564937591553, 9.550971984863281, -10.300544301668804, 0.013697532316049532, 212, 1451),
}


@pytest.mark.parametrize("name", list(AIMET_2_42))
def test_matches_aimet_onnx_2_42(name: str) -> None:
    """Histogram grid and encoding as aimet-onnx 2.42 computes them (recorded from the package itself)."""
    arrays = dict(_aimet_cases())[name]
    observer = TfEnhancedObserver()
    for array in arrays:
        observer.update_sample(np.asarray(array, np.float32))
    low, high, left, size, first, last = AIMET_2_42[name]
    nonzero = np.flatnonzero(observer.pdf())
    assert (observer.x_left[0], observer.x_left[1] - observer.x_left[0]) == pytest.approx((left, size), rel=1e-9)
    assert (nonzero[0], nonzero[-1]) == (first, last)
    assert tf_enhanced_range(observer, 8) == pytest.approx((low, high), rel=1e-6, abs=1e-7)


def test_calibration_observes_the_network_with_its_weights_quantized(tmp_path, tiny_model, npy_folder) -> None:
    """As AIMET's calibration runs it (weight quantizers on): tf_enhanced's PDFs are those of the
    deploy model with the exported weights fake-quantized, alone or beside another method (which
    still observes the FP32 model)."""
    from onnxsnpe import export
    from onnxsnpe.encode.quantized_weights import quantized_weights
    from onnxsnpe.stages import Settings, calibrate, prepare, weight_set
    from onnxsnpe.stats.collect import collect_statistics

    prepared = prepare(tiny_model, npy_folder, None, None, None, None)
    weights = weight_set(prepared, Settings(method="tf_enhanced"))
    runs = []
    for k, methods in enumerate((["tf_enhanced"], ["tf_enhanced", "minmax"])):
        with export.StagedOutput(tmp_path / f"out{k}") as staged:
            runs.append(calibrate(prepared, staged, methods, False, weights=weights))
    samples, tensors = list(prepared.calib_set), prepared.targets.activations
    quantized = collect_statistics(quantized_weights(prepared.deploy, weights), tensors, samples, ["tf_enhanced"])
    fp32 = collect_statistics(prepared.deploy, tensors, samples, ["tf_enhanced"])
    for name in tensors:
        for run in runs:
            np.testing.assert_array_equal(run[name].tf_enhanced.counts, quantized[name].tf_enhanced.counts)
        assert runs[1][name].max == fp32[name].max  # minmax beside it: the FP32 model
    assert any(not np.array_equal(quantized[n].tf_enhanced.counts, fp32[n].tf_enhanced.counts) for n in tensors)
