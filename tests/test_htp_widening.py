"""A Conv from an 8-bit activation to a 16-bit one in the HTP simulation (simulate/htp/widening.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.encoding import ChannelEncodings, asymmetric_encoding, fake_quantize, quantize
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.htp import model as htp_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
SIZE = 16


def _boundary(seed: int, producer: str, per_channel: bool):
    """x -> ``producer`` (a 3x3 Conv, or a Relu that no Conv follows) -> t (8-bit) -> 3x3 Conv -> y (16-bit),
    encoded on the float run's ranges; the model, targets, encodings and the input."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(size=(8, 8, 3, 3)) * 0.2).astype(np.float32), "wp"),
             numpy_helper.from_array((rng.normal(size=8) * 0.1).astype(np.float32), "bp"),
             numpy_helper.from_array((rng.normal(size=(8, 8, 3, 3)) * 0.1).astype(np.float32), "w"),
             numpy_helper.from_array((rng.normal(size=8) * 0.1).astype(np.float32), "b")]
    first = (helper.make_node("Conv", ["x", "wp", "bp"], ["t"], pads=[1, 1, 1, 1]) if producer == "Conv"
             else helper.make_node("Relu", ["x"], ["t"]))
    graph = helper.make_graph([first, helper.make_node("Conv", ["t", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "widen",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = rng.uniform(-1, 2, size=(1, 8, SIZE, SIZE)).astype(np.float32)
    t, y = make_session(model, ["t", "y"]).run(None, {"x": x})
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), "t": asymmetric_encoding(float(t.min()), float(t.max()), 8),
            "y": asymmetric_encoding(float(y.min()), float(y.max()), 16)}
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8, per_channel=per_channel))
    return model, targets, done.activations, {**done.weights, **done.biases, **done.constants}, x


def _simulated(model, targets, acts, params, x, names, arch="73"):
    simulation, outputs = htp_model.htp_simulation_model(model, targets, acts, params, arch)
    wanted = [outputs[n] for n in names]
    return make_session(simulation, wanted).run(wanted, {"x": x})


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_widening_conv_computes_the_documented_formula(per_channel: bool) -> None:
    """float64 numpy from the codes: f(c) read for c, float16(s_x) for s_x, the bias at s_x s_w."""
    model, targets, acts, params, x = _boundary(0, "Conv", per_channel)
    t, y = _simulated(model, targets, acts, params, x, ["t", "y"])
    t_enc, y_enc, w_enc, b_enc = acts["t"], acts["y"], params["w"], params["b"]
    c = np.round(t.astype(np.float64) / np.float32(t_enc.scale))  # centered codes
    read = c + ((c % 4 == 0) & (c != 0))
    w_scale = (w_enc.scales().reshape(-1, 1, 1, 1) if isinstance(w_enc, ChannelEncodings)
               else np.float64(w_enc.scale))
    w = np.round(fake_quantize(initializer(model, "w"), w_enc) / w_scale) * w_scale  # s_w times the centered codes
    acc = np.stack([sum(np.sum(np.pad(read[0, :], ((0, 0), (1, 1), (1, 1)))[:, i:i + SIZE, j:j + SIZE]
                               * w[o, :, i, j, None, None], axis=0) for i in range(3) for j in range(3))
                    for o in range(8)])
    per_channel_bias = isinstance(b_enc, ChannelEncodings)
    offset, scale = (b_enc.offsets(), b_enc.scales()) if per_channel_bias else (b_enc.offset, b_enc.scale)
    bias = (quantize(initializer(model, "b"), b_enc) + offset) * np.asarray(scale, np.float64)
    real = (acc * float(np.float16(t_enc.scale)) + bias[:, None, None]) / float(np.float32(y_enc.scale))
    shifted = real - y_enc.offset + 0.5
    codes = np.clip(np.floor(shifted), 0, 65535)
    simulated = np.round(y[0].astype(np.float64) / np.float32(y_enc.scale)) - y_enc.offset
    differ = simulated != codes
    assert differ.mean() < 0.01
    tie = np.abs(shifted - np.round(shifted)) < 1e-6  # where the product order may decide
    assert np.all(tie[differ]) and np.abs(simulated - codes).max() <= 1


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("arch", ["73", None])
def test_the_htp_widening_conv_after_a_conv_is_within_one_step(per_channel: bool, arch: str | None) -> None:
    """After a Conv the HTP reads the input as f(c) at float16(s_x): exact rounding was up to 618
    steps off and off in 99.7% of values, the rule within one step (3-4% of values: the HTP's
    own rounding near boundaries, not decoded)."""
    model, targets, acts, params, x = _boundary(1, "Conv", per_channel)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch)
    on_htp = dict(zip(htp.output_names, htp.run({"x": x}), strict=True))["y"]
    steps = np.abs(_simulated(model, targets, acts, params, x, ["y"], arch)[0] - on_htp) / acts["y"].scale
    assert steps.max() <= 1.0 + 1e-3
    assert (steps > 0.5).mean() < 0.05


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_the_htp_widening_gemm_after_a_gemm_is_within_one_step() -> None:
    """x -> Gemm (8-bit out) -> Gemm (16-bit out): the same rule as the Conv's."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.normal(size=(64, 32)) * 0.2).astype(np.float32), "wp"),
             numpy_helper.from_array((rng.normal(size=(16, 64)) * 0.1).astype(np.float32), "w"),
             numpy_helper.from_array((rng.normal(size=16) * 0.1).astype(np.float32), "b")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "wp"], ["t"], transB=1),
                               helper.make_node("Gemm", ["t", "w", "b"], ["y"], transB=1)], "widen",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = rng.uniform(-1, 2, size=(64, 32)).astype(np.float32)
    t, y = make_session(model, ["t", "y"]).run(None, {"x": x})
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), "t": asymmetric_encoding(float(t.min()), float(t.max()), 8),
            "y": asymmetric_encoding(float(y.min()), float(y.max()), 16)}
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8))
    acts, params = done.activations, {**done.weights, **done.biases}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, "73")
    on_htp = dict(zip(htp.output_names, htp.run({"x": x}), strict=True))["y"]
    steps = np.abs(_simulated(model, targets, acts, params, x, ["y"])[0] - on_htp) / acts["y"].scale
    assert steps.max() <= 1.0 + 1e-3
    assert (steps > 0.5).mean() < 0.05


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_a_widening_conv_after_a_relu_stays_exact_rounding() -> None:
    """A graph input through a Relu, read by the 16-bit Conv alone: the HTP rounds about exactly."""
    model, targets, acts, params, x = _boundary(0, "Relu", False)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, "73")
    on_htp = dict(zip(htp.output_names, htp.run({"x": x}), strict=True))["y"]
    steps = np.abs(_simulated(model, targets, acts, params, x, ["y"])[0] - on_htp) / acts["y"].scale
    assert (steps > 0.5).mean() < 0.01


def _narrowed_sum(second_reader: bool):
    """Relu(x) + Sigmoid(x) at 16 bits, narrowed to 8 (t), then a 1x1 Conv to 16 bits; with
    ``second_reader`` an Add reads t too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=(8, 8, 1, 1)) * 0.1).astype(np.float32), "w"),
             numpy_helper.from_array((rng.normal(size=(8, 8, 1, 1)) * 0.3).astype(np.float32), "wr")]
    nodes = [helper.make_node("Relu", ["x"], ["p"]), helper.make_node("Sigmoid", ["x"], ["q"]),
             helper.make_node("Add", ["p", "q"], ["t"]), helper.make_node("Conv", ["t", "w"], ["y"])]
    outputs = ["y"]
    if second_reader:
        nodes += [helper.make_node("Conv", ["x", "wr"], ["r"]), helper.make_node("Add", ["t", "r"], ["z"])]
        outputs.append("z")
    graph = helper.make_graph(nodes, "narrowed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = rng.uniform(-1, 2, size=(1, 8, 16, 16)).astype(np.float32)
    names = [node.output[0] for node in nodes]
    values = dict(zip(names, make_session(model, names).run(names, {"x": x}), strict=True))
    bits = {"p": 16, "q": 16, "t": 8, "y": 16, "r": 8, "z": 8}
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), **{n: asymmetric_encoding(float(values[n].min()),
                                                                               float(values[n].max()), bits[n])
                                                        for n in names}}
    targets = find_targets(model)
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8))
    return model, targets, done.activations, {**done.weights, **done.biases}, x


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("second_reader", [False, True])
def test_a_second_reader_of_the_input_makes_the_htp_read_it_as_f_of_c(second_reader: bool) -> None:
    """Read by the 16-bit Conv alone the narrowed sum is rounded exactly; read by an Add too, the
    HTP reads it as f(c) (exact rounding 90% off there, up to 154 steps)."""
    model, targets, acts, params, x = _narrowed_sum(second_reader)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, "73")
    on_htp = dict(zip(htp.output_names, htp.run({"x": x}), strict=True))["y"]
    steps = np.abs(_simulated(model, targets, acts, params, x, ["y"])[0] - on_htp) / acts["y"].scale
    assert steps.max() <= 1.0 + 1e-3
    assert (steps > 0.5).mean() < 0.01
