"""The compiled, parallel evaluation gives the figures of the per-tensor numpy computation it replaced,
on a real model (EfficientNet-Lite0, real image crops), to float rounding; histograms and counts exactly."""

import numpy as np
import pytest

from onnxsnpe.data.datasets import ImageOptions, open_dataset
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model, model_inputs
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.report.evaluation import HISTOGRAM_BINS, evaluate
from onnxsnpe.report.folding import Accumulator, TensorBins, fold, typed_arrays
from onnxsnpe.report.metrics import OutputComparison, TensorComparison, inner
from onnxsnpe.simulate.arithmetic import simulation_model
from onnxsnpe.simulate.fake_quant import SWITCH_INPUT, build_simulation_model

from .conftest import SHARED, minmax_encodings, shared_model


def reference_figures(deploy, targets, activations, params, observed, samples, isolated_samples):
    """The evaluation as it was computed before the compiled fold: tensor by tensor, sample by sample,
    in numpy (float64 einsum sums, np.histogram of the clipped values), one thread."""
    names = list(targets.activations)
    outputs = [o.name for o in deploy.graph.output]
    fp32 = make_session(deploy, names)
    ref_names = [o.name for o in fp32.get_outputs()]
    simulated, sim_map = simulation_model(deploy, targets, activations, params, "htp")
    session = make_session(simulated, [sim_map[n] for n in names])
    isolated, iso_map = build_simulation_model(deploy, targets, activations, {}, switchable=True)
    isolated_session = make_session(isolated)
    figures = {n: {"cumulative": TensorComparison(n), "clipped": 0, "count": 0, "signal": 0.0, "noise": 0.0,
                   "histogram": np.zeros(HISTOGRAM_BINS, dtype=np.int64)} for n in names}
    comparisons = [OutputComparison(o) for o in outputs]
    for index, sample in enumerate(samples):
        ref_values = dict(zip(ref_names, fp32.run(None, sample), strict=True))
        sim_values = session.run([sim_map[n] for n in [*outputs, *names]], sample)
        for comparison, sim in zip(comparisons, sim_values, strict=False):
            comparison.update(ref_values[comparison.name], sim)
        for name, sim in zip(names, sim_values[len(outputs):], strict=True):
            fig, ref, enc = figures[name], ref_values[name], activations[name]
            fig["cumulative"].update(ref, sim)
            half = 0.5 * enc.scale
            fig["clipped"] += int(np.count_nonzero((ref < enc.min - half) | (ref > enc.max + half)))
            fig["count"] += int(ref.size)
            lo, hi = min(observed[name][0], enc.min), max(observed[name][1], enc.max)
            hi = hi if hi > lo else lo + 1.0
            fig["histogram"] += np.histogram(np.clip(ref, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi))[0]
        if index >= isolated_samples:
            continue
        ref_outputs = [ref_values[o].astype(np.float64) for o in outputs]
        for position, name in enumerate(names):
            switch = np.zeros(len(names), dtype=bool)
            switch[position] = True
            got = isolated_session.run([iso_map[o] for o in outputs], {**sample, SWITCH_INPUT: switch})
            for ref, value in zip(ref_outputs, got, strict=True):
                err = value.astype(np.float64) - ref
                figures[name]["signal"] += inner(ref, ref)
                figures[name]["noise"] += inner(err, err)
    return comparisons, figures


@pytest.fixture(scope="module")
def efficientnet():
    path = shared_model("efficientnet_lite0.onnx")
    model = load_model(path)
    options = ImageOptions(resize=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = open_dataset(SHARED / "images", model_inputs(model), options, None, 6)
    data.load(0)
    deploy, _ = prepare_deploy_model(model, dict(data.shapes))
    samples = list(data)
    targets, observed, activations, params = minmax_encodings(deploy, samples[:3])  # the rest clips somewhere
    return deploy, targets, activations, params, observed, samples


def test_evaluation_equals_the_per_tensor_numpy_computation(efficientnet):
    deploy, targets, activations, params, observed, samples = efficientnet
    result = evaluate(deploy, targets, activations, params, observed, iter(samples), isolated_samples=2)
    comparisons, figures = reference_figures(deploy, targets, activations, params, observed, samples, 2)
    assert result.samples == len(samples) and result.isolated_samples == 2
    for got, want in zip(result.outputs, comparisons, strict=True):
        assert got.to_dict() == want.to_dict()  # the outputs are still compared in numpy, in sample order
    assert [f.name for f in result.tensors] == list(figures)
    clipping = 0
    for fig in result.tensors:
        want = figures[fig.name]
        np.testing.assert_array_equal(fig.histogram, want["histogram"])
        assert (fig.clipped, fig.count) == (want["clipped"], want["count"])
        clipping += fig.clipped > 0
        got_c, want_c = fig.cumulative, want["cumulative"]
        assert got_c.count == want_c.count and got_c.max_abs_error == want_c.max_abs_error
        for attribute in ("signal", "noise", "dot", "simulated_power", "abs_error_sum"):
            # float64 sums of up to 1.2 M values a sample in another order (whole vectorized tensors
            # against numpy's pairwise sums): a few units in 1e-12 apart
            assert getattr(got_c, attribute) == pytest.approx(getattr(want_c, attribute), rel=1e-11, abs=1e-300)
        assert fig.isolated_signal == want["signal"] and fig.isolated_noise == want["noise"]
    assert clipping > 10  # the figures that count clipping are exercised


def test_fold_matches_numpy_on_awkward_values():
    """NaN, infinities (in the reference, and in the simulation only), values beyond both ends, a
    narrow range far from zero, a tensor of 7 values, every bin edge and its float32 neighbours."""
    rng = np.random.default_rng(0)
    refs = [rng.normal(size=100_003).astype(np.float32) * 3, rng.normal(1000, 0.01, 50_000).astype(np.float32),
            rng.normal(size=7).astype(np.float32)]
    refs[0][:5] = [-np.inf, np.nan, 0.0, 1e30, -1e30]
    for ref, (lo, hi) in zip(refs[:2], [(-2.3, 4.1), (999.98123, 1000.0214)], strict=True):
        edges = np.histogram_bin_edges(np.zeros(1, np.float32), HISTOGRAM_BINS, (lo, hi)).astype(np.float32)
        ref[5:5 + 3 * edges.size] = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)),
                                                    np.nextafter(edges, np.float32(np.inf))])
    sims = [r + rng.normal(size=r.size).astype(np.float32) * 0.01 for r in refs]
    sims[1][9] = np.inf  # a simulated value overflows where the reference is finite
    ranges = [(-2.3, 4.1), (999.98123, 1000.0214), (-0.7, 0.7)]
    thresholds = [(-2.0000001, 3.9), (999.99, 1000.01), (-0.5, 0.5)]
    accumulator = Accumulator(3, HISTOGRAM_BINS)
    fold(TensorBins(ranges, thresholds, HISTOGRAM_BINS), typed_arrays(refs), typed_arrays(sims), accumulator)
    for k, (ref, sim) in enumerate(zip(refs, sims, strict=True)):
        lo, hi = ranges[k]
        want = np.histogram(np.clip(ref, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi))[0]
        np.testing.assert_array_equal(accumulator.histograms[k], want)
        assert accumulator.counts[k, 0] == np.count_nonzero((ref < thresholds[k][0]) | (ref > thresholds[k][1]))
        comparison = TensorComparison("t")
        comparison.update(ref, sim)
        np.testing.assert_allclose(accumulator.sums[k], [comparison.signal, comparison.noise, comparison.dot,
                                                          comparison.simulated_power, comparison.abs_error_sum],
                                   rtol=1e-12)
        assert accumulator.max_errors[k] == comparison.max_abs_error and accumulator.counts[k, 2] == comparison.count


def test_figures_do_not_depend_on_how_samples_are_shared_out(tiny_model):
    from onnxsnpe.report.evaluation import Evaluator

    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(3)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(9)]
    targets, observed, activations, params = minmax_encodings(deploy, samples[:4])
    results = [Evaluator(deploy, targets, workers).evaluate(deploy, activations, params, observed, iter(samples), 3)
               for workers in (1, 2, 3)]
    figures = [([o.to_dict() for o in r.outputs], [f.to_dict() for f in r.tensors],
                [(f.cumulative.abs_error_sum, f.isolated_noise) for f in r.tensors]) for r in results]
    assert figures[0] == figures[1] == figures[2]
    assert results[0].samples == 9 and results[0].isolated_samples == 3
