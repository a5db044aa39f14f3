"""Per-channel symmetric weights: the encoding math against a float64 reference, the output-channel
axis of every weighted op, 32-bit biases per channel, the overrides file, the QDQ model and the
simulation."""

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize
from onnxsnpe.encode.encoding import (
    ChannelEncodings,
    asymmetric_encoding,
    fake_quantize,
    per_channel_symmetric,
)
from onnxsnpe.encode.encoding import (
    quantize as quantize_codes,
)
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.export import overrides_json
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

from .conftest import minmax_encodings

weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3)),
                 elements=st.floats(-100, 100, width=32))


def _reference(array: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel symmetric 8-bit fake quantization in float64, rounding half away from zero."""
    moved = np.moveaxis(array.astype(np.float64), axis, 0)
    out = np.empty_like(moved)
    for c, row in enumerate(moved):
        scale = np.float32(max(np.abs(row).max(), 0.005) / 127)  # the simulation's float32 scale
        v = row / scale
        out[c] = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127) * scale
    return np.moveaxis(out, 0, axis)


@settings(max_examples=60, deadline=None)
@given(weights, st.integers(0, 2))
def test_per_channel_fake_quantization_matches_a_float64_reference(array, axis):
    absmax = np.abs(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)).max(axis=1)
    enc = per_channel_symmetric(absmax, axis, 8)
    got = fake_quantize(array, enc)
    np.testing.assert_allclose(got, _reference(array, axis), rtol=0, atol=1e-6 * max(1.0, float(absmax.max())))
    codes = quantize_codes(array, enc)
    assert codes.min() >= 1 and codes.max() <= 255  # symmetric: -127..127 around the zero point 128
    assert np.array_equal(fake_quantize(got, enc), got)  # idempotent
    assert np.all(fake_quantize(np.zeros_like(array), enc) == 0)  # zero exactly representable
    for c, channel in enumerate(np.moveaxis(array, axis, 0)):  # each slice is its own per-tensor encoding
        np.testing.assert_array_equal(np.moveaxis(got, axis, 0)[c], fake_quantize(channel, enc.channels[c]))


def _weighted_model(path):
    """x [1,4,6,6] -> Conv(4->3) -> depthwise Conv(3) -> ConvTranspose(3->2, k=stride=2) -> Flatten
    -> Gemm(transB, 288->5) -> MatMul(5x7) = y."""
    rng = np.random.default_rng(3)

    def const(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 10), name)

    inits = [const("conv.w", 3, 4, 3, 3), const("conv.b", 3), const("dw.w", 3, 1, 3, 3), const("dw.b", 3),
             const("up.w", 3, 2, 2, 2), const("up.b", 2), const("fc.w", 5, 288), const("fc.b", 5),
             const("mm.w", 5, 7)]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw.w", "dw.b"], ["c2"], pads=[1, 1, 1, 1], group=3),
        helper.make_node("ConvTranspose", ["c2", "up.w", "up.b"], ["c3"], strides=[2, 2]),
        helper.make_node("Flatten", ["c3"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "mm.w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "weighted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def weighted(tmp_path):
    deploy, _ = prepare_deploy_model(load_model(_weighted_model(tmp_path / "w.onnx")), {"x": (1, 4, 6, 6)})
    return deploy, find_targets(deploy)


def test_every_weighted_op_gets_its_output_channel_axis(weighted):
    deploy, targets = weighted
    assert targets.weight_axes == {"conv.w": 0, "dw.w": 0, "up.w": 1, "fc.w": 0, "mm.w": 1}
    encodings = weight_encodings(deploy, targets, 8, per_channel=True)
    channels = {name: len(enc.channels) for name, enc in encodings.items()}
    assert channels == {"conv.w": 3, "dw.w": 3, "up.w": 2, "fc.w": 5, "mm.w": 7}
    values = {i.name: numpy_helper.to_array(i) for i in deploy.graph.initializer}
    for name, enc in encodings.items():
        absmax = np.abs(np.moveaxis(values[name], enc.axis, 0).reshape(len(enc.channels), -1)).max(axis=1)
        np.testing.assert_allclose(enc.scales(), absmax.astype(np.float64) / 127, rtol=1e-12)
        assert enc.is_symmetric and set(enc.offsets()) == {-128}


def test_per_channel_biases_take_input_scale_times_each_channel_scale(weighted):
    deploy, targets = weighted
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)} for _ in range(3)]
    _, _, acts, _ = minmax_encodings(deploy, samples)
    weights = weight_encodings(deploy, targets, 8, per_channel=True)
    biases = bias_encodings(deploy, targets, acts, weights, 32)
    conv = biases["conv.b"]
    assert isinstance(conv, ChannelEncodings) and conv.axis == 0
    np.testing.assert_allclose(conv.scales(), acts["x"].scale * weights["conv.w"].scales(), rtol=1e-12)
    assert set(conv.offsets()) == {-(2**31)}


def test_overrides_list_one_entry_per_channel_in_channel_order(weighted):
    deploy, targets = weighted
    weights = weight_encodings(deploy, targets, 8, per_channel=True)
    act = {"x": asymmetric_encoding(-1, 1, 8)}
    entries = overrides_json(deploy, act, weights)["param_encodings"]["up.w"]
    assert len(entries) == 2
    assert [e["scale"] for e in entries] == list(weights["up.w"].scales())
    assert {(e["is_symmetric"], e["offset"], e["bitwidth"]) for e in entries} == {("True", -128, 8)}
    json.dumps(entries)


def test_qdq_model_with_per_channel_weights_follows_the_simulation(weighted):
    deploy, targets = weighted
    rng = np.random.default_rng(4)
    samples = [{"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    _, _, acts, _ = minmax_encodings(deploy, samples)
    weights = weight_encodings(deploy, targets, 8, per_channel=True)
    params = {**weights, **bias_encodings(deploy, targets, acts, weights, 32)}
    qdq = build_qdq_model(deploy, targets, acts, params)
    axes = {n.input[0].split("__")[0]: next((a.i for a in n.attribute if a.name == "axis"), None)
            for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    assert axes["conv.w"] == 0 and axes["up.w"] == 1 and axes["mm.w"] == 1 and axes["conv.b"] == 0
    sim, output_map = build_simulation_model(deploy, targets, acts, params)
    qdq_session, sim_session = make_session(qdq), make_session(sim)
    for sample in samples:
        x = fake_quantize(sample["x"], acts["x"])
        got = qdq_session.run(["y"], {"x": x})[0]
        want = sim_session.run([output_map["y"]], {"x": x})[0]
        assert np.abs(got - want).max() <= acts["y"].scale * 1.001


def test_per_channel_flag_end_to_end(tmp_path, tiny_model, npy_folder):
    per_tensor = quantize(tiny_model, npy_folder, tmp_path / "pt", progress=False)
    per_channel = quantize(tiny_model, npy_folder, tmp_path / "pc", per_channel=True, progress=False)
    params = json.loads((per_channel.out_dir / "snpe_clip_ranges.json").read_text())["param_encodings"]
    conv = next(name for name in params if name.startswith("conv"))
    assert len(params[conv]) == 4 and all(e["is_symmetric"] == "True" for e in params[conv])
    assert per_channel.report["settings"]["per_channel"] is True
    assert per_tensor.report["settings"]["per_channel"] is False
    figures = {w["name"]: w for w in per_channel.report["weights"]["figures"]}
    assert figures[conv]["per_channel"] and figures[conv]["per_channel_gain_db"] == pytest.approx(0, abs=1e-9)


def test_a_channel_of_zeros_takes_the_largest_channels_scale():
    """Not the floor scale, which would set the HTP's register reference for its group of channels
    (tools/HTP.md finding 33); a tensor of zeros keeps the floor."""
    enc = per_channel_symmetric(np.array([0.0, 0.5, 2.0]), 0, 8)
    assert enc.scales()[0] == enc.scales()[2] == 2.0 / 127
    assert fake_quantize(np.zeros((3, 4)), enc).tolist() == np.zeros((3, 4)).tolist()
    assert per_channel_symmetric(np.zeros(2), 0, 8).scales().tolist() == [0.005 / 127] * 2
