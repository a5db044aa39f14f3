"""Range methods against brute-force float64 references on synthetic distributions, and their wiring."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsnpe import quantize
from onnxsnpe.cli import build_parser
from onnxsnpe.encode.encoding import asymmetric_encoding, fake_quantize
from onnxsnpe.encode.range_search import mse_range, percentile_range
from onnxsnpe.encode.ranges import activation_encodings, chosen_range, fixed_range_tensors, weight_encodings
from onnxsnpe.encode.tf_enhanced import tf_enhanced_range
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.stats.histogram import Histogram
from onnxsnpe.stats.tensor_stats import TensorStats


def distribution(kind: str, size: int = 60_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        values = rng.uniform(-1.0, 3.0, size)
    elif kind == "gaussian":
        values = rng.normal(0.3, 1.0, size)
    elif kind == "relu":
        values = np.maximum(rng.normal(0.0, 1.0, size), 0.0)
    elif kind == "relu6":
        values = np.clip(rng.normal(2.0, 3.0, size), 0.0, 6.0)
    else:  # heavy-tailed: Student-t with a few large outliers
        values = rng.standard_t(3, size)
        values[:6] = [25.0, -30.0, 40.0, 22.0, -18.0, 35.0]
    return values.astype(np.float32)


KINDS = ["uniform", "gaussian", "relu", "relu6", "heavy"]


def histogram_of(values: np.ndarray) -> Histogram:
    hist = Histogram()
    hist.update(values)
    return hist


def brute_force_mse(values: np.ndarray, bitwidth: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean squared error of SNPE fake quantization of the raw values for every grid candidate."""
    exact = values.astype(np.float64)
    fractions = np.arange(1, grid + 1) / grid
    lows = float(values.min()) * fractions if values.min() < 0 else np.zeros(1)
    highs = float(values.max()) * fractions if values.max() > 0 else np.zeros(1)
    errors = np.empty((len(lows), len(highs)))
    for i, low in enumerate(lows):
        for j, high in enumerate(highs):
            quantized = fake_quantize(values, asymmetric_encoding(low, high, bitwidth)).astype(np.float64)
            errors[i, j] = np.mean((exact - quantized) ** 2)
    return lows, highs, errors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bitwidth", [4, 8])
def test_mse_choice_is_within_a_grid_step_of_the_brute_force_optimum(kind: str, bitwidth: int) -> None:
    values = distribution(kind)
    grid = 32
    lows, highs, errors = brute_force_mse(values, bitwidth, grid)
    best_i, best_j = np.unravel_index(np.argmin(errors), errors.shape)
    low, high = mse_range(histogram_of(values), bitwidth, grid=grid)
    i, j = int(np.argmin(np.abs(lows - low))), int(np.argmin(np.abs(highs - high)))
    assert lows[i] == pytest.approx(low) and highs[j] == pytest.approx(high)
    assert abs(i - best_i) <= 1 and abs(j - best_j) <= 1, (kind, (i, j), (best_i, best_j))
    assert errors[i, j] <= errors[best_i, best_j] * 1.05


def true_error(values: np.ndarray, low: float, high: float, bitwidth: int) -> float:
    quantized = fake_quantize(values, asymmetric_encoding(low, high, bitwidth)).astype(np.float64)
    return float(np.mean((quantized - values) ** 2))


@pytest.mark.parametrize("bitwidth", [4, 8])
def test_mse_beats_minmax_on_outliers_and_keeps_dense_ranges(bitwidth: int) -> None:
    heavy = distribution("heavy")
    low, high = mse_range(histogram_of(heavy), bitwidth)
    assert heavy.min() < low and high < heavy.max()
    gain = {4: 0.5, 8: 0.95}[bitwidth]  # few bits: clipping outliers pays off more
    assert true_error(heavy, low, high, bitwidth) < gain * true_error(heavy, heavy.min(), heavy.max(), bitwidth)
    uniform = distribution("uniform")
    low, high = mse_range(histogram_of(uniform), bitwidth)
    assert low == pytest.approx(uniform.min(), rel=0.1) and high == pytest.approx(uniform.max(), rel=0.1)


def test_mse_leaves_a_one_sided_end_at_zero() -> None:
    low, high = mse_range(histogram_of(distribution("relu")), 8)
    assert low == 0.0 and high > 0
    low, high = mse_range(histogram_of(-distribution("relu")), 8)
    assert high == 0.0 and low < 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0, 90.0])
def test_percentile_is_within_one_bin_of_numpys_exact_percentile(kind: str, percentile: float) -> None:
    values = distribution(kind)
    hist = histogram_of(values)
    low, high = percentile_range(hist, percentile)
    exact = values.astype(np.float64)
    assert abs(high - np.percentile(exact, percentile)) <= hist.width
    assert abs(low - np.percentile(exact, 100 - percentile)) <= hist.width


def test_percentile_100_is_the_exact_range() -> None:
    values = distribution("gaussian")
    assert percentile_range(histogram_of(values), 100.0) == (float(values.min()), float(values.max()))
    with pytest.raises(ValueError):
        percentile_range(histogram_of(values), 30.0)


def test_methods_from_tensor_stats() -> None:
    values = distribution("heavy")
    stats = TensorStats(["minmax", "percentile", "mse", "tf_enhanced"])
    stats.update(values.reshape(6, -1))
    assert chosen_range(stats, "minmax", 8) == (float(values.min()), float(values.max()))
    assert chosen_range(stats, "percentile", 8, 99.0) == percentile_range(stats.histogram, 99.0)
    assert chosen_range(stats, "mse", 8) == mse_range(stats.histogram, 8)
    assert chosen_range(stats, "tf_enhanced", 8) == tf_enhanced_range(stats.tf_enhanced, 8)
    with pytest.raises(OnnxSnpeError, match="histogram"):
        chosen_range(TensorStats(["minmax"]), "mse", 8)
    with pytest.raises(OnnxSnpeError, match="unknown"):
        chosen_range(stats, "entropy", 8)


def _activation_model() -> onnx.ModelProto:
    """x -> Sigmoid, Softmax, Tanh (each a graph output) and Add."""
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["sig"]),
        helper.make_node("Softmax", ["x"], ["soft"]),
        helper.make_node("Tanh", ["x"], ["tanh"]),
        helper.make_node("Add", ["x", "x"], ["twice"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in ("sig", "soft", "tanh", "twice")]
    graph = helper.make_graph(nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_fixed_ranges_for_sigmoid_softmax_tanh() -> None:
    model = _activation_model()
    targets = find_targets(model)
    fixed = fixed_range_tensors(model)
    assert fixed == {"sig": (0.0, 1.0), "soft": (0.0, 1.0), "tanh": (-1.0, 1.0)}
    stats = {}
    for name in targets.activations:
        stats[name] = TensorStats()
        stats[name].update(np.array([[0.125, 0.375]], dtype=np.float32))
    with_fixed = activation_encodings(stats, targets, "minmax", 8, fixed=fixed)
    observed = activation_encodings(stats, targets, "minmax", 8)
    assert with_fixed["sig"] == asymmetric_encoding(0.0, 1.0, 8)
    assert with_fixed["tanh"] == asymmetric_encoding(-1.0, 1.0, 8)
    assert observed["sig"] == asymmetric_encoding(0.125, 0.375, 8)
    assert with_fixed["twice"] == observed["twice"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "tf_enhanced"])
def test_weight_methods(tiny_model, method: str) -> None:
    from onnxsnpe.graph.deploy import prepare_deploy_model
    from onnxsnpe.graph.load import load_model

    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    encodings = weight_encodings(deploy, targets, 8, method, percentile=99.0)
    assert set(encodings) == set(targets.weights)
    for name, enc in encodings.items():
        weights = next(onnx.numpy_helper.to_array(i) for i in deploy.graph.initializer if i.name == name)
        assert enc.min >= weights.min() - enc.scale and enc.max <= weights.max() + enc.scale
    if method == "minmax":
        assert all(enc.min <= -0.0 for enc in encodings.values())


def test_mse_weights_reduce_the_weight_error(tmp_path) -> None:
    from onnxsnpe.graph.deploy import prepare_deploy_model
    from onnxsnpe.graph.load import load_model

    weights = np.random.default_rng(5).laplace(0.0, 0.05, (32, 16, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 4, 4])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "conv.onnx"))
    deploy, _ = prepare_deploy_model(load_model(tmp_path / "conv.onnx"), {"x": (1, 16, 4, 4)})
    targets = find_targets(deploy)
    for bitwidth, gain in ((4, 0.7), (8, 1.0)):
        mse = weight_encodings(deploy, targets, bitwidth, "mse")["w"]
        assert mse == asymmetric_encoding(*mse_range(histogram_of(weights), bitwidth), bitwidth)
        assert true_error(weights, mse.min, mse.max, bitwidth) < gain * true_error(
            weights, weights.min(), weights.max(), bitwidth
        )


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["quantize", "m.onnx", "--calib", "c", "--out", "o", "--method", "percentile", "--percentile", "99.9",
         "--weight-method", "mse", "--no-fixed-ranges"]
    )
    assert (args.method, args.percentile, args.weight_method, args.fixed_ranges) == ("percentile", 99.9, "mse", False)
    defaults = build_parser().parse_args(["quantize", "m.onnx", "--calib", "c", "--out", "o"])
    assert (defaults.method, defaults.percentile, defaults.weight_method, defaults.fixed_ranges) == (
        "minmax", 99.99, "minmax", True
    )


@pytest.mark.parametrize("method", ["percentile", "mse", "tf_enhanced"])
def test_quantize_with_each_method(tiny_model, npy_folder, tmp_path, method: str) -> None:
    result = quantize(
        tiny_model, npy_folder, tmp_path / method, method=method, weight_method="mse", analysis_samples=0,
        progress=False,
    )
    overrides = json.loads(result.files["snpe_clip_ranges.json"].read_text())
    assert overrides["activation_encodings"] and overrides["param_encodings"]
    assert result.report["settings"]["method"] == method
    assert result.report["settings"]["weight_method"] == "mse"


def test_quantize_rejects_bad_method_and_percentile(tiny_model, npy_folder, tmp_path) -> None:
    with pytest.raises(OnnxSnpeError, match="unknown --method"):
        quantize(tiny_model, npy_folder, tmp_path / "a", method="kl", progress=False)
    with pytest.raises(OnnxSnpeError, match="--percentile"):
        quantize(tiny_model, npy_folder, tmp_path / "b", method="percentile", percentile=120, progress=False)
    with pytest.raises(OnnxSnpeError, match="unknown --weight-method"):
        quantize(tiny_model, npy_folder, tmp_path / "c", weight_method="kl", progress=False)


@pytest.mark.parametrize(("strides", "group", "cap"), [([1, 1], 1, 32639), ([2, 2], 1, 32511), ([2, 2], 4, 32511)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_raised_weight_keeps_its_codes_below_the_htps_int16_cap(strides, group, cap, per_channel):
    """HTP v73 computes positive int16 weight codes above 32639 (32511 in a strided 3x3 Conv, tools/HTP.md
    finding 20) as that cap: a raised weight's range is widened so that its largest code is the cap."""
    from onnx import numpy_helper

    rng = np.random.default_rng(group)
    weight = rng.normal(size=(4, 4 // group, 3, 3)).astype(np.float32)
    weight.flat[0] = np.abs(weight).max() + 1.0  # the largest magnitude positive
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, group=group, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    encoding = weight_encodings(model, find_targets(model), 8, per_channel=per_channel, raised=["w"])["w"]
    scales = encoding.scales() if per_channel else np.array([encoding.scale])
    codes = np.round(fake_quantize(weight, encoding) / scales.reshape(-1, 1, 1, 1))
    assert codes.max() == cap and encoding.bitwidth == 16
