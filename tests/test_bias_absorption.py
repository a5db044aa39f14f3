"""High-bias absorption keeps the function (checked against a float64 numpy reference) and narrows ranges."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.graph.runtime import make_session
from onnxsnpe.optimize.bias_absorption import absorb_high_biases

RNG = np.random.default_rng(11)
W1 = RNG.normal(size=(8, 3)) * 0.2
B1 = np.linspace(3.0, 20.0, 8)  # high biases: the channels sit far above zero, each at its own offset
W2 = RNG.normal(size=(4, 8))
B2 = RNG.normal(size=4)


def _pair(relu: bool, pads: int = 0) -> onnx.ModelProto:
    """x -> 1x1 Conv(3->8) -> [Relu] -> Conv(8->4, 1x1, ``pads``) -> y."""
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
             {"w1": W1.reshape(8, 3, 1, 1), "b1": B1, "w2": W2.reshape(4, 8, 1, 1), "b2": B2}.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["a"]))
    nodes.append(helper.make_node("Conv", ["a" if relu else "h", "w2", "b2"], ["y"], pads=[pads] * 4))
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _reference(x: np.ndarray, relu: bool) -> np.ndarray:
    """The pair in float64 numpy (1x1 convolutions are channel matrix products)."""
    h = np.einsum("oc,nchw->nohw", W1, x.astype(np.float64)) + B1[None, :, None, None]
    a = np.maximum(h, 0) if relu else h
    return np.einsum("oc,nchw->nohw", W2, a) + B2[None, :, None, None]


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def _between(model: onnx.ModelProto, sample: dict, name: str) -> np.ndarray:
    return make_session(model, [name]).run([name], sample)[0]


def test_relu_pair_keeps_the_function_on_the_calibration_samples_and_narrows_its_tensor():
    model = _pair(relu=True)
    calibration = _samples(8, 0)
    absorbed, done = absorb_high_biases(model, {"w2": False}, calibration)
    assert [(a.tensor, a.through_relu) for a in done] == [("h", True)]
    session = make_session(absorbed)
    for sample in calibration:
        np.testing.assert_allclose(session.run(None, sample)[0], _reference(sample["x"], True), rtol=1e-5, atol=1e-4)
    before = np.concatenate([_between(model, s, "a") for s in calibration])
    after = np.concatenate([_between(absorbed, s, "a") for s in calibration])
    assert after.min() == 0.0 and after.max() < 0.5 * before.max()  # each channel's floor taken out
    assert np.isclose(done[0].range_after[1], after.max(), rtol=1e-5)


def test_pair_joined_by_nothing_is_centred_and_exact_for_any_input():
    model = _pair(relu=False)
    absorbed, done = absorb_high_biases(model, {"w2": False}, _samples(8, 0))
    assert [(a.tensor, a.through_relu) for a in done] == [("h", False)]
    session = make_session(absorbed)
    for sample in _samples(4, 1):  # not the samples the offsets came from: exact anyway
        scaled = {"x": sample["x"] * 5}
        np.testing.assert_allclose(session.run(None, scaled)[0], _reference(scaled["x"], False), rtol=1e-5, atol=1e-3)
    low, high = done[0].range_after
    assert low == -high and high < 0.5 * done[0].range_before[1]


def test_padded_second_conv_and_narrow_gains_are_left_alone():
    for model in (_pair(relu=True, pads=1), _pair(relu=False, pads=1)):
        absorbed, done = absorb_high_biases(model, {"w2": False}, _samples(4, 0))
        assert done == []
        assert absorbed.graph.initializer == model.graph.initializer
    centred = _pair(relu=False)
    for init in centred.graph.initializer:
        if init.name == "b1":
            init.CopyFrom(numpy_helper.from_array(np.zeros(8, np.float32), "b1"))
    assert absorb_high_biases(centred, {"w2": False}, _samples(4, 0))[1] == []  # nothing to gain
