"""The HTP runner and the simulator's model of the HTP's arithmetic.

Tests that run the HTP emulator are skipped, with the reason, when onnxruntime-qnn is not installed
(it is the optional extra ``onnxsnpe[qnn]``); the others run everywhere.
"""

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encoding import Encoding, fake_quantize
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.htp import HtpSession, measure_agreement, qnn_unavailable_reason, simulation_runner
from onnxsnpe.htp_model import add_constants, htp_simulation_model, int8_weights, requant_constants
from onnxsnpe.qdq import build_qdq_model
from onnxsnpe.simulate import build_simulation_model
from onnxsnpe.targets import find_targets

from .conftest import minmax_encodings

QNN_REASON = qnn_unavailable_reason()
needs_qnn = pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")


def _conv_model(weight, *, group=1, stride=1, bias=True, activation=None):
    """x [1, C, 12, 12] -> Conv(weight, pads 1) [-> activation] = y."""
    rng = np.random.default_rng(3)
    channels = weight.shape[1] * group
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=weight.shape[0]).astype(np.float32), "b"))
        inputs.append("b")
    conv_out = "c" if activation else "y"
    nodes = [helper.make_node("Conv", inputs, [conv_out], pads=[1, 1, 1, 1], group=group, strides=[stride, stride])]
    if activation:
        nodes.append(helper.make_node(activation, ["c"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 12, 12])
    graph = helper.make_graph(nodes, "conv", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _quantized(model, samples):
    """Min-max encodings over ``samples``, per-tensor asymmetric uint8 weights, int32 bias."""
    targets, _, acts, params = minmax_encodings(model, samples)
    return targets, acts, params


def _samples(channels, count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1.0, 2.0, size=(1, channels, 12, 12)).astype(np.float32)} for _ in range(count)]


def test_missing_onnxruntime_qnn_is_a_one_line_error(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # makes the import fail
    reason = qnn_unavailable_reason()
    assert reason.startswith("onnxruntime-qnn is not installed") and "onnxsnpe[qnn]" in reason
    with pytest.raises(OnnxSnpeError) as info:
        HtpSession(onnx.load(str(tiny_model)), {})
    assert "\n" not in str(info.value)


def test_int8_weights_keep_fitting_channels_and_rescale_the_others():
    codes = np.array([[-20, 0, 127], [-141, 3, 100], [0, 64, 139]], dtype=np.float64)
    values, steps = int8_weights(codes, axis=0)
    np.testing.assert_array_equal(values[0], codes[0])
    assert steps[0] == 1.0
    assert steps[1] == np.round(2048 * 141 / 128) / 2048 and values[1, 0] == -128  # negative end maps to -128
    assert steps[2] == np.round(2048 * 139 / 127) / 2048 and values[2, 2] == 127  # positive end maps to 127
    assert np.all(values >= -128) and np.all(values <= 127)


def test_requant_constants_truncate_and_use_a_float16_multiplier():
    factor, mantissa, offset = requant_constants(np.array([0.003, 0.2]), zero_point=128)
    np.testing.assert_array_equal(factor, [2.0**-5, 1.0])  # k = floor(-log2 M) - 3, at least 0
    np.testing.assert_array_equal(mantissa, [np.float16(0.096), np.float16(0.2)])
    np.testing.assert_array_equal(offset, np.round(128 / np.array([0.003, 0.2])))
    factor, mantissa, _ = requant_constants(np.array([0.0326]), zero_point=0, precise=True)
    assert factor[0] == 1.0 and abs(mantissa[0] / 0.0326 - 1) < 2.0**-15


def test_htp_simulation_stays_within_one_step_of_exact_rounding_on_one_conv():
    weight = np.random.default_rng(1).uniform(0.0, 1.0, size=(6, 4, 3, 3))  # all positive: codes overflow int8
    model = _conv_model(weight)
    samples = _samples(4)
    targets, acts, params = _quantized(model, samples)
    plain = simulation_runner(*build_simulation_model(model, targets, acts, params), ["y"])
    htp_like = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for sample in samples:
        exact, modeled = plain(sample)[0], htp_like(sample)[0]
        steps = (modeled - exact) / acts["y"].scale
        assert np.abs(steps).max() <= 2.0  # weights re-expressed per channel plus the rounding model
        np.testing.assert_allclose(modeled, fake_quantize(modeled, acts["y"]), atol=1e-6)  # on the grid


@needs_qnn
def test_small_model_runs_entirely_on_the_htp(tiny_model):
    from onnxsnpe.graph import load_model, prepare_deploy_model

    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    targets, acts, params = _quantized(deploy, samples)
    htp = HtpSession(build_qdq_model(deploy, targets, acts, params), {"x": acts["x"]})
    assert htp.cpu_nodes == []
    assert sorted(op for op, _ in htp.io_nodes) == ["DequantizeLinear", "QuantizeLinear"]
    modeled = simulation_runner(*htp_simulation_model(deploy, targets, acts, params), ["out"])
    agreement = measure_agreement(htp.run, modeled, ["out"], acts, samples)[0]
    assert agreement.max_error_lsb == 0.0


CONV_CASES = {  # weights, group, stride, share of outputs allowed to differ by one step
    "conv, weights overflowing int8 upwards": (np.random.default_rng(1).uniform(0.0, 1.0, (8, 4, 3, 3)), 1, 1, 0.01),
    "conv, weights overflowing int8 downwards": (-np.random.default_rng(2).uniform(0.0, 1.0, (8, 4, 3, 3)), 1, 1, 0),
    "depthwise conv": (np.random.default_rng(3).uniform(-0.3, 1.0, (8, 1, 3, 3)), 8, 1, 0),
    "strided depthwise conv": (np.random.default_rng(4).uniform(-0.3, 1.0, (8, 1, 3, 3)), 8, 2, 0),
    "strided conv": (np.random.default_rng(5).normal(0.2, 1.0, (8, 4, 3, 3)), 1, 2, 0),
}


@needs_qnn
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_htp_model_reproduces_the_htp_on_convolutions(case):
    """Bit for bit, except rare one-step differences where weight channels overflowing upwards are rescaled."""
    weight, group, stride, tolerance = CONV_CASES[case]
    model = _conv_model(weight, group=group, stride=stride, activation="Relu")
    samples = _samples(weight.shape[1] * group, count=2, seed=7)
    targets, acts, params = _quantized(model, samples)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for sample in samples:
        error = np.abs(modeled(sample)[0] - htp.run(sample)[0]) / acts["y"].scale
        assert error.max() <= 1.001
        assert (error > 0.5).mean() <= tolerance


def test_add_constants_pick_fraction_bits_from_the_scale_ratios():
    bits, multipliers, constant = add_constants((0.05, 0.03), (100, 30), 0.07, 90)
    ratios = (np.float32(0.05) / np.float32(0.07), np.float32(0.03) / np.float32(0.07))
    assert bits == 13  # 14 - ceil(log2(0.714 + 0.429))
    assert multipliers == tuple(np.round(np.array(ratios, dtype=np.float64) * 2**13) / 2**13)
    assert constant * 2**5 == np.round(constant * 2**5)  # on the 2^-(n - 8) grid
    assert abs(constant - (90 - 100 * multipliers[0] - 30 * multipliers[1])) <= 2**-6


def _add_model():
    """y = a + b on [1, 1, 256, 256] inputs."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, 256, 256]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


ADD_CASES = {  # scale a, zero point a, scale b, zero point b, scale out, zero point out
    "generic": (0.0566, 100, 0.0366, 140, 0.0767, 90),
    "input scale equal to the output scale": (0.0767, 128, 0.0566, 128, 0.0767, 128),
    "one input at half the output scale": (0.2518, 135, 0.25126, 135, 0.50252, 135),
}


@needs_qnn
@pytest.mark.parametrize("case", list(ADD_CASES))
def test_htp_model_reproduces_the_htp_add_on_every_pair_of_codes(case):
    sa, za, sb, zb, sy, zy = ADD_CASES[case]
    model = _add_model()
    targets = find_targets(model)
    grids = (("a", sa, za), ("b", sb, zb), ("y", sy, zy))
    acts = {name: Encoding(8, scale, -zero_point) for name, scale, zero_point in grids}
    codes_a, codes_b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    sample = {"a": ((codes_a + acts["a"].offset) * np.float32(acts["a"].scale)).astype(np.float32)[None, None],
              "b": ((codes_b + acts["b"].offset) * np.float32(acts["b"].scale)).astype(np.float32)[None, None]}
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {"a": acts["a"], "b": acts["b"]})
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}), ["y"])
    np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])
