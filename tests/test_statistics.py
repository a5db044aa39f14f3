"""Streaming statistics: exact histograms, independence of order and batching, merging, the onnxruntime pass."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxsnpe.encode.ranges import activation_encodings
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.stats.collect import batch_dynamic_copy, collect_statistics
from onnxsnpe.stats.exposure import ExposedSession
from onnxsnpe.stats.folding import OutputFold
from onnxsnpe.stats.histogram import Histogram, fitting_exponent
from onnxsnpe.stats.kernels import key_range, key_values, value_range
from onnxsnpe.stats.tensor_stats import TensorStats

from .conftest import conv_model
from .test_exposure import two_conv_model

METHODS = ("minmax", "percentile", "mse")


def assert_same_histogram(a: Histogram, b: Histogram) -> None:
    def state(h: Histogram) -> tuple:
        return h.exponent, h.first, h.zeros, h.count, h.min, h.max

    assert state(a) == state(b)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_histogram_counts_are_exact() -> None:
    rng = np.random.default_rng(0)
    bulk = np.clip(rng.normal(0, 3, 20_000), -7, 12)
    values = np.concatenate([bulk, np.zeros(500), [-7.25, 12.5]]).astype(np.float32)
    hist = Histogram(max_bins=1024)
    hist.update(values)
    nonzero = values[values != 0].astype(np.float64)
    expected, _ = np.histogram(nonzero, bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.zeros == 500 and hist.count == values.size
    assert (hist.min, hist.max) == (-7.25, 12.5)
    assert len(hist.counts) <= 1024 and hist.edges[0] <= -7.25 and hist.edges[-1] > 12.5
    assert hist.width == 2.0 ** fitting_exponent(-7.25, 12.5, 1024)
    assert (12.5 + 7.25) / hist.width > 1024 / 2 - 2  # resolution: at least about half the bins used


def test_histogram_rejects_nan_and_inf() -> None:
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            Histogram().update(np.array([1.0, bad], dtype=np.float32))


def test_histogram_of_only_zeros_then_growth() -> None:
    hist = Histogram()
    hist.update(np.zeros(10, np.float32))
    hist.update(np.array([1e-30, 3.0e3], dtype=np.float32))
    whole = Histogram()
    whole.update(np.concatenate([np.zeros(10), [1e-30, 3.0e3]]).astype(np.float32))
    assert_same_histogram(hist, whole)


finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite_float32, min_size=1, max_size=300))
def test_key_range_is_numpys_min_and_max(values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)
    low, high = key_range(array.view(np.int32), np.int32(2**31 - 1), np.int32(-(2**31)))
    assert key_values(low, high) == value_range(array) == (array.min(), array.max())
    minmax = TensorStats(["minmax"])
    minmax.update(array)
    assert (minmax.min, minmax.max) == (array.min(), array.max())
    hist = Histogram()
    assert hist.update(array) == (float(array.min()), float(array.max()))
    assert not any(np.signbit(end) for end in (hist.min, hist.max) if end == 0)  # -0.0 reported as 0.0


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_key_range_shows_nan_and_inf(bad: float) -> None:
    array = np.array([1.0, -3.0, bad, 2.0], dtype=np.float32)
    low, high = key_range(array.view(np.int32), np.int32(2**31 - 1), np.int32(-(2**31)))
    assert not all(np.isfinite(key_values(low, high))) and not all(np.isfinite(value_range(array)))


def test_values_outside_the_grid_leave_no_partial_counts() -> None:
    """A batch reaching past the grid is counted again on the grown grid, not twice."""
    hist = Histogram(max_bins=64)
    hist.update(np.linspace(-1, 1, 101, dtype=np.float32))
    exponent = hist.exponent
    wide = np.array([0.5, 0.25, 40.0, -0.75, 0.0], dtype=np.float32)
    assert hist.update(wide) == (-0.75, 40.0)
    assert hist.exponent > exponent
    whole = Histogram(max_bins=64)
    whole.update(np.concatenate([np.linspace(-1, 1, 101, dtype=np.float32), wide]))
    assert_same_histogram(hist, whole)
    assert hist.counts.sum() + hist.zeros == hist.count == 106


chunks = st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), sizes=chunks, scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_histogram_independent_of_order_batching_and_merging(seed: int, sizes: list[int], scale: float) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.standard_t(2, sum(sizes)) * scale).astype(np.float32)
    values[rng.random(values.size) < 0.3] = 0.0
    whole = Histogram(max_bins=256)
    whole.update(values)
    shuffled = rng.permutation(values)
    streamed, left, right = Histogram(max_bins=256), Histogram(max_bins=256), Histogram(max_bins=256)
    for part in np.split(shuffled, np.cumsum(sizes)[:-1]):
        streamed.update(part)
    half = len(sizes) // 2
    cut = int(np.sum(sizes[:half]))
    left.update(values[:cut]) if cut else None
    right.update(values[cut:])
    right.merge(left)
    assert_same_histogram(streamed, whole)
    assert_same_histogram(right, whole)


def _encodings(stats: dict[str, TensorStats], targets, method: str) -> dict:
    return activation_encodings(stats, targets, method, 8)


@pytest.fixture
def deploy(tmp_path):
    model, _ = prepare_deploy_model(load_model(conv_model(tmp_path / "m.onnx")), {"x": (1, 3, 8, 8)})
    return model


def _samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("method", [*METHODS, "tf_enhanced"])
def test_encodings_independent_of_batch_size(deploy, method: str) -> None:
    targets = find_targets(deploy)
    samples = _samples(11)
    results = [
        _encodings(collect_statistics(deploy, targets.activations, samples, [method], batch_size=size), targets, method)
        for size in (1, 3, 8)
    ]
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("method", METHODS)
def test_encodings_independent_of_order(deploy, method: str) -> None:
    targets = find_targets(deploy)
    samples = _samples(9)
    forward = collect_statistics(deploy, targets.activations, samples, [method], batch_size=4)
    backward = collect_statistics(deploy, targets.activations, samples[::-1], [method], batch_size=2)
    assert _encodings(forward, targets, method) == _encodings(backward, targets, method)


@pytest.mark.parametrize("method", METHODS)
def test_partial_runs_merge_into_one(deploy, method: str) -> None:
    targets = find_targets(deploy)
    samples = _samples(10)
    whole = collect_statistics(deploy, targets.activations, samples, [method])
    first = collect_statistics(deploy, targets.activations, samples[:3], [method])
    second = collect_statistics(deploy, targets.activations, samples[3:], [method])
    for name in targets.activations:
        first[name].merge(second[name])
        assert first[name].count == whole[name].count
        if method != "minmax":
            assert_same_histogram(first[name].histogram, whole[name].histogram)
    assert _encodings(first, targets, method) == _encodings(whole, targets, method)


def test_tf_enhanced_runs_with_other_first_samples_do_not_merge(deploy) -> None:
    """AIMET's grid comes from the first sample, so a run over later samples has another grid."""
    targets = find_targets(deploy)
    samples = _samples(6)
    first = collect_statistics(deploy, targets.activations, samples[:3], ["tf_enhanced"])
    rest = collect_statistics(deploy, targets.activations, samples[3:], ["tf_enhanced"])
    with pytest.raises(ValueError, match="first sample"):
        first[targets.activations[1]].merge(rest[targets.activations[1]])


def test_batched_statistics_match_the_static_model(deploy) -> None:
    targets = find_targets(deploy)
    samples = _samples(5)
    dynamic = batch_dynamic_copy(deploy)
    assert dynamic is not None
    reshapes = [n for n in dynamic.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(
        onnx.numpy_helper.to_array(next(i for i in dynamic.graph.initializer if i.name == n.input[1]))[0] == 0
        for n in reshapes
    )
    batched = collect_statistics(deploy, targets.activations, samples, batch_size=5)
    single = collect_statistics(deploy, targets.activations, samples, batch_size=1)
    for name in targets.activations:
        assert (batched[name].min, batched[name].max, batched[name].count) == (
            single[name].min, single[name].max, single[name].count
        )


def test_models_that_do_not_batch_fall_back_to_one_sample_at_a_time() -> None:
    """A Reshape that folds the batch into features: the batched copy computes something else."""
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("ReduceSum", ["flat"], ["total"], keepdims=1),
        helper.make_node("Mul", ["x", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mixing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    rng = np.random.default_rng(2)
    samples = [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(6)]
    batched = collect_statistics(model, ["total", "y"], samples, batch_size=3)
    single = collect_statistics(model, ["total", "y"], samples, batch_size=1)
    for name in ("total", "y"):
        assert (batched[name].min, batched[name].max) == pytest.approx((single[name].min, single[name].max))


def test_a_first_axis_that_is_not_a_batch_is_one_sample_to_the_pdf() -> None:
    """A tensor of static shape [2, 4] (a recurrent state) run one sample at a time: its PDF grid
    comes from the whole tensor, as AIMET's one update per batch, not from its first row."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["state"], ["y"])], "state",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    state = np.array([[0.1, 0.2, 0.3, 0.4], [10.0, 20.0, 30.0, 40.0]], np.float32)
    stats = collect_statistics(model, ["state", "y"], [{"state": state}], ["tf_enhanced"], workers=1)
    for name in ("state", "y"):
        whole = TensorStats(["tf_enhanced"])
        whole.update(np.maximum(state, 0)[np.newaxis])
        assert stats[name].tf_enhanced.spec == whole.tf_enhanced.spec
        assert stats[name].tf_enhanced.spec[0] > 0.01  # a grid spanning the second row, not 0.4 / 512


def test_inputs_are_observed_from_the_feed_and_every_sample_is_consumed(deploy) -> None:
    samples = _samples(4)
    seen = []

    def tee():
        for sample in samples:
            seen.append(sample)
            yield sample

    stats = collect_statistics(deploy, ["x"], tee(), ["mse"])
    assert len(seen) == 4 and stats["x"].count == 4 * 3 * 8 * 8
    assert stats["x"].max == max(float(s["x"].max()) for s in samples)
    assert collect_statistics(deploy, [], iter(samples)) == {}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", ["minmax", "percentile", "tf_enhanced"])
def test_nan_activations_are_reported(deploy, method: str, workers: int) -> None:
    targets = find_targets(deploy)
    samples = _samples(12)
    samples[7]["x"][0, 0, 0, 0] = np.nan
    with pytest.raises(OnnxSnpeError, match="NaN or Inf"):
        collect_statistics(deploy, targets.activations, samples, [method], batch_size=1, workers=workers)


def _state(stats: TensorStats) -> tuple:
    hist, pdf = stats.histogram, stats.tf_enhanced
    return (
        stats.min, stats.max, stats.count,
        None if hist is None else (hist.exponent, hist.first, hist.zeros, hist.counts.tolist()),
        None if pdf is None else (pdf.x_left.tolist(), pdf.counts.tolist(), pdf.elements),
    )


@pytest.fixture
def spread_out(monkeypatch) -> None:
    """Statistics updates and folds are slow in the calling thread, so that the other workers get
    batches too (the test model runs so fast that one thread could take them all)."""
    for owner, name in ((TensorStats, "update"), (OutputFold, "fold")):
        monkeypatch.setattr(owner, name, _slow_in_the_calling_thread(getattr(owner, name)))


def _slow_in_the_calling_thread(method):
    def slowed(self, *args):
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.01)
        return method(self, *args)

    return slowed


@pytest.mark.parametrize("batch_size", [1, 2])
def test_workers_side_by_side_give_the_statistics_of_one(deploy, spread_out, batch_size: int) -> None:
    targets = find_targets(deploy)
    samples = _samples(13)
    methods = ["minmax", "percentile", "tf_enhanced"]
    one = collect_statistics(deploy, targets.activations, samples, methods, batch_size, workers=1)
    for workers in (2, 4):
        many = collect_statistics(deploy, targets.activations, samples, methods, batch_size, workers=workers)
        assert all(_state(many[name]) == _state(one[name]) for name in targets.activations)


def test_an_error_reading_samples_stops_every_worker(deploy, spread_out) -> None:
    """The samples' own errors (a bad input file) come out of the call, whichever worker read it."""
    targets = find_targets(deploy)
    samples = _samples(12)
    read = []

    def failing():
        for index, sample in enumerate(samples):
            if index == 7:
                raise OnnxSnpeError("bad sample: x7.npy")
            read.append(index)
            yield sample

    with pytest.raises(OnnxSnpeError, match=r"x7\.npy"):
        collect_statistics(deploy, targets.activations, failing(), ["percentile"], workers=2)
    assert read == list(range(7))


def test_pdf_grid_comes_from_the_first_nonzero_sample_whatever_the_workers(deploy, spread_out) -> None:
    """Samples run alone until every PDF has its grid (here: after three all-zero samples)."""
    samples = [{"x": np.zeros((1, 3, 8, 8), np.float32)} for _ in range(3)] + _samples(8)
    one = collect_statistics(deploy, ["x"], samples, ["tf_enhanced"], workers=1)
    two = collect_statistics(deploy, ["x"], samples, ["tf_enhanced"], workers=2)
    assert _state(two["x"]) == _state(one["x"])
    alone = collect_statistics(deploy, ["x"], samples[3:4], ["tf_enhanced"], workers=1)
    np.testing.assert_array_equal(two["x"].tf_enhanced.x_left, alone["x"].tf_enhanced.x_left)


def test_a_pdf_that_never_gets_its_grid_does_not_hold_the_others_back(deploy, spread_out) -> None:
    """A masked tensor whose kept values are always empty (as MiniLM's additive masks are zero where
    they keep anything) never fixes its PDF grid: the other tensors are still folded by the workers
    side by side, and the result is the one of a single worker; a tensor whose grid comes from a
    later sample (x here: zeros first) takes its samples in dataset order whichever worker ran them."""
    targets = find_targets(deploy)
    samples = [{"x": np.zeros((1, 3, 8, 8), np.float32)} for _ in range(2)] + _samples(10)
    floors = {name: 1e9 for name in targets.activations[-1:]}  # every value at or below the floor
    folded: list = []
    original = OutputFold.fold
    OutputFold.fold = _counting(original, folded)
    try:
        one = collect_statistics(deploy, targets.activations, samples, ["tf_enhanced"], workers=1, floors=floors)
        folded.clear()
        two = collect_statistics(deploy, targets.activations, samples, ["tf_enhanced"], workers=2, floors=floors)
    finally:
        OutputFold.fold = original
    assert len(folded) == len(samples) - 1  # all but the first run, which runs alone
    assert one[targets.activations[-1]].tf_enhanced.x_left is None
    assert one["x"].tf_enhanced.x_left is not None
    assert all(_state(two[name]) == _state(one[name]) for name in targets.activations[:-1])


@pytest.mark.parametrize("methods", [["minmax"], ["percentile"], ["tf_enhanced"], ["mse", "tf_enhanced"]])
def test_folded_samples_give_the_statistics_of_tensor_by_tensor_updates(monkeypatch, methods) -> None:
    """Samples folded in one call per kind of statistic, from onnxruntime's blocked layout with a
    padded last block (24 channels in blocks of 16 or 8), equal updates tensor by tensor on the NCHW
    tensors of an ordinary session; with a sample that grows the histograms' grids midway and one
    of zeros."""
    model = two_conv_model(24)
    observed = ["stem", "stem_relu", "mid", "sum", "out"]
    rng = np.random.default_rng(7)
    samples = [{"x": rng.normal(size=(1, 3, 12, 12)).astype(np.float32)} for _ in range(9)]
    samples[5]["x"] *= 40
    samples[6]["x"][:] = 0
    folded = []
    monkeypatch.setattr(OutputFold, "fold", _counting(OutputFold.fold, folded))
    stats = collect_statistics(model, observed, samples, methods, workers=1)
    assert len(folded) == len(samples) - 1  # all but the first, which runs alone
    session = make_session(model, observed)
    reference = {name: TensorStats(methods) for name in observed}
    for sample in samples:
        for name, values in zip(observed, session.run(observed, sample), strict=True):
            reference[name].update(values)
    for name in observed:
        assert _state(stats[name]) == _state(reference[name]), name


def _counting(method, calls: list):
    def counted(self, *args):
        calls.append(self)
        return method(self, *args)

    return counted


def test_stats_for_other_methods_do_not_merge() -> None:
    with pytest.raises(ValueError, match="different methods"):
        TensorStats(["minmax"]).merge(TensorStats(["mse"]))



def test_a_session_that_cannot_write_into_reused_arrays_falls_back(tiny_model, monkeypatch):
    """When onnxruntime refuses the reused output arrays (shapes that change, or declared shapes the
    run disagrees with), calibration goes on with ordinary runs and gives the same statistics."""
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    samples = [{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(6)]
    expected = collect_statistics(deploy, targets.activations, samples, ["mse"], workers=2)
    calls = []

    def refuse(self, feed, arrays):
        calls.append(1)
        raise RuntimeError("Got invalid dimensions for output: Got: 1 Expected: 20")

    monkeypatch.setattr(ExposedSession, "run_into", refuse)
    got = collect_statistics(deploy, targets.activations, samples, ["mse"], workers=2)
    assert calls, "the reused arrays were tried"
    for name in targets.activations:
        assert (got[name].min, got[name].max, got[name].count) == (expected[name].min, expected[name].max,
                                                                    expected[name].count)
        np.testing.assert_array_equal(got[name].histogram.counts, expected[name].histogram.counts)
