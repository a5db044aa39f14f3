"""Cross-layer equalization keeps the function (generated graphs and every real model) and balances ranges."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.data.datasets import ImageOptions, open_dataset
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model, model_inputs
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.optimize.bias_absorption import absorb_high_biases
from onnxsnpe.optimize.cle import equalize

from .conftest import SHARED, shared_model


def _chain(activation: str) -> onnx.ModelProto:
    """x -> Conv(3->8) -> act -> Pad -> depthwise Conv(8) -> act -> Conv(8->4) -> y, channel ranges far apart."""
    rng = np.random.default_rng(5)
    spread = np.exp(rng.uniform(-3, 3, size=(8, 1, 1, 1)))
    inits = {
        "w1": rng.normal(size=(8, 3, 3, 3)) * spread, "b1": rng.normal(size=8),
        "w2": rng.normal(size=(8, 1, 3, 3)) / spread, "b2": rng.normal(size=8),
        "w3": rng.normal(size=(4, 8, 1, 1)), "b3": rng.normal(size=4),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "low": np.array(0.0), "high": np.array(6.0),
    }
    def act(x, y):
        return (helper.make_node("Relu", [x], [y]) if activation == "Relu"
                else helper.make_node("Clip", [x, "low", "high"], [y]))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), act("c1", "a1"),
        helper.make_node("Pad", ["a1", "pads"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], group=8), act("c2", "a2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["y"]),
    ]
    tensors = [numpy_helper.from_array(v.astype(np.int64 if k == "pads" else np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_relu_chain_is_equalized_without_changing_the_function():
    model = _chain("Relu")
    equalized, pairs = equalize(model)
    assert [(p.first_weight, p.second_weight) for p in pairs] == [("w1", "w2"), ("w2", "w3")]
    rng = np.random.default_rng(0)
    before, after = make_session(model), make_session(equalized)
    for _ in range(4):
        x = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
        want = before.run(None, x)[0]
        np.testing.assert_allclose(after.run(None, x)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    old, new = _weights(model), _weights(equalized)
    r1 = np.abs(new["w1"]).reshape(8, -1).max(axis=1)
    r2 = np.abs(new["w2"]).reshape(8, -1).max(axis=1)
    spread_before = np.abs(old["w1"]).reshape(8, -1).max(axis=1)
    assert r1.max() / r1.min() < spread_before.max() / spread_before.min() / 10  # far better balanced
    assert np.all(np.abs(np.log(r1 / r2)) < np.log(4))  # the two sides of each channel close


def test_clipped_activations_are_left_alone():
    model = _chain("Clip")
    equalized, pairs = equalize(model)
    assert pairs == []
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(equalized)[name], value)


MODELS = {
    "efficientnet_lite0.onnx": ((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "ch_PP-OCRv4_det_infer.onnx": ((320, 320), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "ch_PP-OCRv4_rec_infer.onnx": ((48, 320), (0.5,), (0.5,)),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ((48, 192), (0.5,), (0.5,)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_compute_the_same_function_after_equalization_and_absorption(name):
    """Absorption through a Relu is exact on the samples its offsets come from: those are checked."""
    path = shared_model(name)
    size, mean, std = MODELS[name]
    model = load_model(path)
    data = open_dataset(SHARED / "images", model_inputs(model), ImageOptions(resize=size, mean=mean, std=std), None, 3)
    data.load(0)
    deploy, _ = prepare_deploy_model(model, dict(data.shapes))
    equalized, pairs = equalize(deploy)
    assert pairs
    equalized, _ = absorb_high_biases(equalized, {p.second_weight: p.depthwise_second for p in pairs}, list(data))
    before, after = make_session(deploy), make_session(equalized)
    for sample in data:
        for want, got in zip(before.run(None, sample), after.run(None, sample), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_bias_correction_after_cle_aims_at_the_equalized_model(tmp_path, tiny_model, npy_folder):
    from onnxsnpe.stages import Settings, apply_bias_correction, apply_cle, prepare

    prepared = prepare(tiny_model, npy_folder, None, None, None, None)
    settings = Settings(cle=True, bias_correction=True)
    equalized, _ = apply_cle(prepared, settings, False)
    assert equalized.fp32_deploy is equalized.deploy
    corrected, record = apply_bias_correction(equalized, settings, False)
    assert corrected.fp32_deploy is equalized.deploy and record["layers"] == 2


def test_cle_flag_records_pairs_and_absorptions_in_the_report(tmp_path):
    """A Conv-Relu-Conv pair with high biases: --cle equalizes it and absorbs its offsets, and the
    report says so."""
    from onnxsnpe import quantize

    from .test_bias_absorption import _pair

    model = _pair(relu=True)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]))
    onnx.save(model, str(tmp_path / "pair.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(2)
    for index in range(8):
        np.save(calib / f"{index}.npy", rng.normal(size=(1, 3, 6, 6)).astype(np.float32))
    result = quantize(tmp_path / "pair.onnx", calib, tmp_path / "out", cle=True, progress=False)
    record = result.report["optimizations"]["cle"]
    assert record["pairs"] == len(record["equalized"]) == 1
    assert [a["tensor"] for a in record["absorbed"]] == ["h"]
    for absorbed in record["absorbed"]:
        low, high = absorbed["range_after"]
        assert high - low <= 0.95 * (absorbed["range_before"][1] - absorbed["range_before"][0])
    assert "1 offsets absorbed" in (result.out_dir / "report.html").read_text()
