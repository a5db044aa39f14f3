"""AdaRound: its patches reproduce the convolution, it is never worse than nearest rounding on the
layer's output error (measured independently with onnxruntime), and its weights lie on the grid of
the exported encodings."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize
from onnxsnpe.encode.encoding import Encoding, fake_quantize
from onnxsnpe.encode.encoding import quantize as quantize_codes
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.optimize import adaround as adaround_module
from onnxsnpe.optimize.adaround import (
    _as_matrix,
    _patches,
    _rounded_inputs_target,
    adaround,
    adaround_layers,
    layer_waves,
)


def _conv(weight: np.ndarray, **attrs) -> onnx.ModelProto:
    """A one-Conv model y = Conv(x, w) with x [1, 4, 9, 9]."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(weight.shape[2:]), **attrs)
    graph = helper.make_graph([conv], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Smooth, correlated inputs (neighbouring pixels alike), where the rounding choice matters."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(count, 1, 4, 1, 1)) + 0.3 * rng.normal(size=(count, 1, 4, 9, 9))
    return [{"x": x.astype(np.float32)} for x in base]


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 0, 2, 1]}, {"dilations": [2, 2]},
                                   {"group": 2, "pads": [1, 1, 1, 1]}, {"group": 4, "strides": [2, 1]}])
def test_patches_times_the_weight_matrix_is_the_convolution(attrs):
    rng = np.random.default_rng(1)
    groups = attrs.get("group", 1)
    weight = rng.normal(size=(6 if groups != 4 else 4, 4 // groups, 3, 3)).astype(np.float32)
    model = _conv(weight, **attrs)
    (layer,) = adaround_layers(model, {"w": Encoding(8, 0.1, -128)})
    x = _samples(1)[0]["x"]
    want = make_session(model).run(None, {"x": x})[0]
    patches = _patches(layer, x).astype(np.float64)  # [groups, inputs, positions]
    got = np.matmul(_as_matrix(layer, weight).astype(np.float64), patches)  # [groups, outputs, positions]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4)


def _output_error(model: onnx.ModelProto, weight: np.ndarray, samples) -> float:
    reference = make_session(model)
    rounded = onnx.ModelProto.FromString(model.SerializeToString())
    rounded.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
    candidate = make_session(rounded)
    return sum(float(np.sum((candidate.run(None, s)[0].astype(np.float64) - reference.run(None, s)[0]) ** 2))
               for s in samples)


@pytest.mark.parametrize("per_channel", [False, True])
def test_adaround_beats_nearest_rounding_on_the_layer_output_and_stays_on_the_grid(per_channel):
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    model = _conv(weight, pads=[1, 1, 1, 1])
    weights = weight_encodings(model, find_targets(model), 4 if not per_channel else 8, per_channel=per_channel)
    enc = weights["w"]
    samples = _samples(16)
    rounded_model, (result,) = adaround(model, weights, samples, iterations=300)
    rounded = numpy_helper.to_array(rounded_model.graph.initializer[0])
    np.testing.assert_array_equal(fake_quantize(rounded, enc), rounded)  # on the grid, bit for bit
    codes = quantize_codes(rounded, enc)
    assert codes.min() >= 0 and codes.max() <= enc.levels
    nearest = _output_error(model, fake_quantize(weight, enc), samples)
    learned = _output_error(model, rounded, samples)
    assert learned < nearest  # measured with onnxruntime, not with AdaRound's own Gram matrices
    assert result.adaround_error <= result.nearest_error and result.flipped > 0
    assert result.nearest_error == pytest.approx(nearest / (16 * 81), rel=1e-3)  # per output position


def test_adaround_keeps_nearest_rounding_when_it_cannot_help():
    weight = np.array([[[[0.5]]], [[[-0.25]]]], np.float32).repeat(4, axis=1)  # exactly on a grid
    model = _conv(weight)
    weights = {"w": Encoding(8, 0.5 / 64, -128, is_symmetric=True)}
    rounded_model, (result,) = adaround(model, weights, _samples(4), iterations=50)
    np.testing.assert_array_equal(numpy_helper.to_array(rounded_model.graph.initializer[0]), weight)
    assert result.kept_nearest or result.flipped == 0


def test_adaround_flag_writes_weights_the_exported_encodings_reproduce(tmp_path, tiny_model, npy_folder):
    plain = quantize(tiny_model, npy_folder, tmp_path / "plain", progress=False)
    rounded = quantize(tiny_model, npy_folder, tmp_path / "ada", adaround=True, adaround_iters=100, progress=False)
    record = rounded.report["optimizations"]["adaround"]
    assert record["layers"] == 2 and record["iterations"] == 100
    overrides = [json.loads((r.out_dir / "snpe_clip_ranges.json").read_text())["param_encodings"]
                 for r in (plain, rounded)]
    assert overrides[0] == overrides[1]  # AdaRound changes the rounding, not the grids
    written = onnx.load(str(rounded.out_dir / "snpe_deploy.onnx"))
    deploy = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    for name, (entry,) in overrides[1].items():
        enc = Encoding(entry["bitwidth"], entry["scale"], entry["offset"], entry["is_symmetric"] == "True")
        np.testing.assert_array_equal(fake_quantize(deploy[name], enc), deploy[name])


def test_rounded_models_are_measured_against_the_original_weights(tmp_path, tiny_model, npy_folder):
    """After AdaRound the deploy weights are on the grid: measured against themselves they would look exact."""
    result = quantize(tiny_model, npy_folder, tmp_path / "ada", adaround=True, adaround_iters=50, progress=False)
    figures = result.report["weights"]["figures"]
    assert figures and all(f["sqnr_db"] is not None and f["sqnr_db"] < 60 for f in figures)


def _two_convs() -> onnx.ModelProto:
    """x [1,4,9,9] -> Conv(4->6) -> Relu -> Conv(6->3) = y; the first weight has a per-tensor outlier."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    w1[0] *= 12  # coarse steps for the other channels: the second layer's inputs carry real error
    w2 = rng.normal(size=(3, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _network_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, samples) -> float:
    want, got = make_session(reference), make_session(candidate)
    return sum(float(np.sum((got.run(None, s)[0].astype(np.float64) - want.run(None, s)[0]) ** 2)) for s in samples)


def test_rounded_inputs_make_up_for_the_error_earlier_layers_leave():
    """With inputs="rounded", the second layer fits the FP32 output from the first layer's rounded
    output: the network's output error (onnxruntime, held-out samples) is lower than with FP32 inputs."""
    model = _two_convs()
    weights = weight_encodings(model, find_targets(model), 4)
    fitted, held_out = _samples(32), _samples(16, seed=9)
    plain, _ = adaround(model, weights, fitted, iterations=300, inputs="fp32")
    chained, results = adaround(model, weights, fitted, iterations=300, inputs="rounded")
    assert _network_error(model, chained, held_out) < _network_error(model, plain, held_out)
    for init in chained.graph.initializer:  # still on the exported grids
        values = numpy_helper.to_array(init)
        np.testing.assert_array_equal(fake_quantize(values, weights[init.name]), values)
    # the first layer's inputs carry no error: both modes round it alike
    np.testing.assert_array_equal(numpy_helper.to_array(chained.graph.initializer[0]),
                                  numpy_helper.to_array(plain.graph.initializer[0]))
    assert all(r.adaround_error <= r.nearest_error for r in results)
    with pytest.raises(ValueError):
        adaround(model, weights, fitted, iterations=1, inputs="quantized")


def test_the_rounded_inputs_target_is_the_weight_when_inputs_carry_no_error():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 200))
    gram = np.einsum("gkp,glp->gkl", x, x)
    gram[1] = 0.0  # a dead group: all its inputs zero
    matrix = rng.normal(size=(2, 3, 5))
    np.testing.assert_allclose(_rounded_inputs_target(matrix, gram, gram.copy()), matrix, atol=1e-12)
    noisy = x + 0.1 * rng.normal(size=x.shape)  # x~: x with error; T solves min ||W x - T x~||^2 (ridge aside)
    gram_q, cross = np.einsum("gkp,glp->gkl", noisy, noisy), np.einsum("gkp,glp->gkl", noisy, x)
    target = _rounded_inputs_target(matrix, gram_q, cross)
    best = np.linalg.lstsq(noisy[0].T, (matrix[0] @ x[0]).T, rcond=None)[0].T
    np.testing.assert_allclose(target[0], best, rtol=1e-2, atol=1e-2)


def branches() -> onnx.ModelProto:
    """x [1,4,9,9] -> Conv a -> Relu -> (Conv b 3x3, Conv c 1x1) -> Add -> Conv d = y: b and c are
    parallel branches."""
    rng = np.random.default_rng(5)
    shapes = {"wa": (6, 4, 3, 3), "wb": (5, 6, 3, 3), "wc": (5, 6, 1, 1), "wd": (3, 5, 3, 3)}
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name) for name, shape in shapes.items()]
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=pads), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["b"], pads=pads), helper.make_node("Conv", ["r", "wc"], ["c"]),
             helper.make_node("Add", ["b", "c"], ["s"]), helper.make_node("Conv", ["s", "wd"], ["y"], pads=pads)]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 9, 9])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _weights_of(model: onnx.ModelProto) -> dict[str, bytes]:
    return {init.name: init.SerializeToString() for init in model.graph.initializer}


def test_layers_go_in_waves_after_the_layers_upstream_of_them():
    model = branches()
    layers = adaround_layers(model, weight_encodings(model, find_targets(model), 8))
    assert [[layer.weight for layer in wave] for wave in layer_waves(model, layers)] == [["wa"], ["wb", "wc"], ["wd"]]
    chain = _two_convs()
    layers = adaround_layers(chain, weight_encodings(chain, find_targets(chain), 8))
    assert [[layer.weight for layer in wave] for wave in layer_waves(chain, layers)] == [["w1"], ["w2"]]
    shared = branches()
    shared.graph.node[3].input[1] = "wb"  # one weight read by two Convs of the same shape: one layer per wave
    shared.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((5, 6, 1, 1), np.float32), "wb"))
    shared.graph.node[2].attribute.pop()  # 1x1 without pads
    layers = adaround_layers(shared, weight_encodings(shared, find_targets(shared), 8))
    assert [[layer.weight for layer in wave] for wave in layer_waves(shared, layers)] == [["wa"], ["wb"], ["wd"]]


def test_rounding_in_waves_gives_the_weights_of_rounding_in_graph_order(monkeypatch):
    """A wave's statistics are all gathered before any of its layers is rounded: the same inputs as
    one layer at a time, so the same weights, byte for byte."""
    model = branches()
    weights = weight_encodings(model, find_targets(model), 4)
    samples = _samples(8)
    waved, waved_results = adaround(model, weights, samples, iterations=60, inputs="rounded")
    monkeypatch.setattr(adaround_module, "layer_waves", lambda model, layers: [[layer] for layer in layers])
    ordered, ordered_results = adaround(model, weights, samples, iterations=60, inputs="rounded")
    assert _weights_of(waved) == _weights_of(ordered) and _weights_of(waved) != _weights_of(model)
    assert [r.to_dict() for r in waved_results] == [r.to_dict() for r in ordered_results]
    assert [r.weight for r in waved_results] == ["wa", "wb", "wc", "wd"] and any(r.flipped for r in waved_results)
