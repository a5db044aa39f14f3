"""The HTP runner and the simulator's model of the HTP's arithmetic.

Tests that run the HTP emulator are skipped, with the reason, when onnxruntime-qnn is not installed
(it is the optional extra ``onnxsnpe[qnn]``); the others run everywhere.
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding, fake_quantize, per_channel_symmetric
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import QuantTargets, find_targets
from onnxsnpe.report.agreement import measure_agreement
from onnxsnpe.simulate.emulator import (
    A16W16_ARCH,
    HtpSession,
    has_16_bit_weights,
    qnn_unavailable_reason,
    simulation_runner,
)
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.channelwise import batch_norm_constants
from onnxsnpe.simulate.htp.codes import centered_codes, exact_in_float32, gridded_bias, requant_constants
from onnxsnpe.simulate.htp.elementwise import add_constants, mul_constants, scalar_mul_constants
from onnxsnpe.simulate.htp.linear import int8_weights, stored_codes, weight_codes
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

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


def _one_op(node: onnx.NodeProto, shape: list[int]) -> tuple[onnx.ModelProto, QuantTargets]:
    """A model of one op from ``x`` (of ``shape``) to ``y``, with its targets."""
    graph = helper.make_graph([node], node.op_type, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    return model, find_targets(model)


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


def test_int8_weights_give_the_same_values_from_int16_codes():
    codes = np.array([[-20, 0, 127], [-141, 3, 100], [0, 64, 139]], dtype=np.float64)
    from_float, steps = int8_weights(codes, axis=1)
    from_int16, same_steps = int8_weights(codes.astype(np.int16), axis=1)
    assert from_int16.dtype == np.int16
    np.testing.assert_array_equal(from_int16, from_float)
    np.testing.assert_array_equal(same_steps, steps)


def test_weight_codes_slab_by_slab_are_the_whole_tensor_codes(monkeypatch):
    from onnxsnpe.graph import large
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((40, 6)).astype(np.float32)
    for enc, along in [(asymmetric_encoding(float(weight.min()), float(weight.max()), 8), None),
                       (per_channel_symmetric(np.abs(weight).max(axis=0), 1, 8), 1)]:
        scale_along = enc.along(np.float64(np.float32(enc.scales())), 2) if along is not None else enc.scale
        whole = np.round(fake_quantize(weight, enc).astype(np.float64) / scale_along)
        monkeypatch.setattr(large, "SLAB_VALUES", 12)  # two rows a slab
        np.testing.assert_array_equal(weight_codes(weight, enc, scale_along, 1), whole)
        monkeypatch.undo()


def test_stored_codes_take_the_smallest_integer_type_and_cast_back_exactly():
    for values, dtype in [(np.array([[-128, 0, 127]]), np.int8), (np.array([[-129, 0, 127]]), np.int16),
                          (np.array([[0, 255]]), np.int16)]:
        stored, cast = stored_codes(values.astype(np.int16), "w")
        assert onnx.numpy_helper.to_array(stored).dtype == dtype
        assert (cast.op_type, list(cast.input), list(cast.output)) == ("Cast", [stored.name], ["w"])
        graph = onnx.helper.make_graph([cast], "g", [], [onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT,
                                                                                              None)], [stored])
        session = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, {})[0], values.astype(np.float32))


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
    from onnxsnpe.graph.deploy import prepare_deploy_model
    from onnxsnpe.graph.load import load_model

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


@needs_qnn
@pytest.mark.parametrize("seed", [223, 233])
def test_htp_model_reproduces_the_htp_conv_with_per_channel_weights(seed):
    """A 1x1 Conv with symmetric int8 weights per output channel, scales spread over 55x, large biases.

    The per-channel offsets are computed relative to the largest weight scale (codes.requant_offset);
    with each channel's own scale, one or more outputs of these probes differ by one step.
    """
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=(64, 16, 1, 1)) * np.exp(rng.uniform(-3, 1, size=(64, 1, 1, 1)))).astype(np.float32)
    bias = (rng.normal(size=64) * rng.uniform(0.1, 5) * 20).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 0, 0, 0])
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 48, 48])
    graph = helper.make_graph([node], "conv", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    targets = find_targets(model)
    x_enc = Encoding(8, float(rng.uniform(0.005, 0.05)), -int(rng.integers(0, 256)))
    codes = rng.integers(0, 256, size=(1, 16, 48, 48)).astype(np.float64)
    x = ((codes + x_enc.offset) * np.float32(x_enc.scale)).astype(np.float32)
    y = np.einsum("nchw,oc->nohw", x.astype(np.float64), weight[:, :, 0, 0]) + bias[None, :, None, None]
    low, high = np.percentile(y, [2, 98])  # clamp a few outputs at both ends
    acts = {"x": x_enc, "y": asymmetric_encoding(min(low, 0.0), max(high, 0.0), 8)}
    weights = weight_encodings(model, targets, 8, per_channel=True)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": x_enc})
    assert htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    np.testing.assert_array_equal(modeled({"x": x})[0], htp.run({"x": x})[0])


@needs_qnn
@pytest.mark.parametrize("arch", [None, "73"])
def test_a_per_channel_conv_takes_its_bias_on_one_grid_set_by_the_largest(arch):
    """One channel's bias code near 2^30 puts every channel's bias on a grid of about 4 codes (tools/HTP.md
    finding 25: ``S = max |a| 2^-28``); the other biases, small and not multiples of 4, move by up to
    2 codes. The simulation reproduces every output on v68 and v73."""
    rng = np.random.default_rng(29)
    weight = (rng.normal(size=(16, 8, 1, 1)) * np.exp(rng.uniform(-2, 0, size=(16, 1, 1, 1)))).astype(np.float32)
    x_enc = Encoding(8, 0.02, -100)
    w_scales = np.abs(weight).reshape(16, -1).max(axis=1) / 127
    codes = rng.integers(100, 5000, size=16).astype(np.float64) * rng.choice([-1, 1], size=16)
    codes[3] = 0.99 * 2**30
    bias = (codes * x_enc.scale * w_scales).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 24, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    targets = find_targets(model)
    acts = {"x": x_enc, "y": asymmetric_encoding(-40.0, 40.0, 8)}
    weights = weight_encodings(model, targets, 8, per_channel=True)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    x = ((rng.integers(0, 256, size=(1, 8, 24, 24)) + x_enc.offset) * np.float32(x_enc.scale)).astype(np.float32)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {}, arch).run({"x": x})[0]
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params, arch), ["y"])({"x": x})[0]
    np.testing.assert_array_equal(modeled, htp)


def test_gridded_bias_rounds_every_channel_to_a_grid_set_by_the_largest():
    """Hand-worked: equal scales, the largest code 2^30, so the grid is 4 codes: 5 -> 4, 6 -> 8 (ties to
    even: 1.5 -> 2), 7 -> 8, -6 -> -8; the largest stays."""
    got = gridded_bias(np.array([2**30, 5, 6, 7, -6]), 0.01, np.full(5, 0.003, dtype=np.float32))
    np.testing.assert_array_equal(got, [2**30, 4, 8, 8, -8])


@needs_qnn
@pytest.mark.parametrize("arch", [None, "73"])
@pytest.mark.parametrize("scale, offset", [(0.05, -128), (0.011, -200)])
def test_htp_model_reproduces_the_htp_two_value_softmax_on_every_pair_of_codes(arch, scale, offset):
    """A Softmax over two values is a sigmoid of the code difference and its complement to 255 (tools/HTP.md
    finding 26); float softmax then rounding differs where the two codes are equal (127, 128, not 128, 128)."""
    model, targets = _one_op(helper.make_node("Softmax", ["x"], ["y"], axis=-1), [1, 256, 256, 2])
    acts = {"x": Encoding(8, scale, offset), "y": Encoding(8, 1 / 255, 0)}
    first, second = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    x = ((np.stack([first, second], -1)[None] + offset) * np.float32(scale)).astype(np.float32)
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {}, arch).run({"x": x})[0]
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}, arch), ["y"])({"x": x})[0]
    np.testing.assert_array_equal(modeled, htp)
    assert htp[0, 7, 7, 0] * 255 == pytest.approx(127) and htp[0, 7, 7, 1] * 255 == pytest.approx(128)


@needs_qnn
@pytest.mark.parametrize("length, scale, offset", [(64, 0.4376, -151), (40, 0.11, -128)])
def test_htp_model_follows_the_htp_table_softmax_far_closer_than_float(length, scale, offset):
    """Rows of 17 values or more: the HTP's exponential table, fitted not decoded (tools/HTP.md finding 26),
    leaves at most 0.05% of outputs one step off where float softmax then rounding misses ten times
    as many (MiniLM-L6's first attention Softmax encoding, and one of the recogniser's row length)."""
    rows = 256
    model, targets = _one_op(helper.make_node("Softmax", ["x"], ["y"], axis=-1), [1, rows, length])
    acts = {"x": Encoding(8, scale, offset), "y": Encoding(8, 1 / 255, 0)}
    rng = np.random.default_rng(5)
    codes = np.clip(rng.integers(200, 256, size=(1, rows, 1)) - rng.integers(0, 60, size=(1, rows, length)), 0, 255)
    x = ((codes + offset) * np.float32(scale)).astype(np.float32)
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {}).run({"x": x})[0]
    steps = {name: np.abs(simulation_runner(*build(model, targets, acts, {}), ["y"])({"x": x})[0] - htp) * 255
             for name, build in (("htp", htp_simulation_model), ("float", build_simulation_model))}
    assert steps["htp"].max() < 1.01 and (steps["htp"] > 0.5).sum() <= htp.size // 2000
    assert (steps["float"] > 0.5).sum() >= 10 * max(1, (steps["htp"] > 0.5).sum())


@needs_qnn
@pytest.mark.parametrize("length, scale, offset",
                         [(40, 0.001709918447587495, -27376), (512, 0.0008792410073659054, -46111)])
def test_htp_model_follows_the_htp_16_bit_table_softmax_far_closer_than_float(length, scale, offset):
    """A 16-bit Softmax over 17 values or more runs the 8-bit kernel's exponential table with a finer
    multiplier and a floored output (tools/HTP.md finding 47): within two steps and at most 4% of outputs
    off, where float softmax then rounding misses ten times as many (the recogniser's attention Softmax
    encoding, and its final Softmax's)."""
    rows = 128
    model, targets = _one_op(helper.make_node("Softmax", ["x"], ["y"], axis=-1), [1, rows, length])
    acts = {"x": Encoding(16, scale, offset), "y": Encoding(16, 1 / 65535, 0)}
    rng = np.random.default_rng(5)
    spread = rng.uniform(0.5, 8, size=(1, rows, 1)) / scale
    codes = np.clip(65535 - np.abs(rng.normal(0, 1, (1, rows, length))) * spread, 0, 65535).round()
    x = ((codes + offset) * np.float32(scale)).astype(np.float32)
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {}).run({"x": x})[0]
    steps = {name: np.abs(simulation_runner(*build(model, targets, acts, {}), ["y"])({"x": x})[0] - htp) * 65535
             for name, build in (("htp", htp_simulation_model), ("float", build_simulation_model))}
    assert steps["htp"].max() < 2.01 and (steps["htp"] > 0.5).sum() <= htp.size // 25
    assert (steps["float"] > 0.5).sum() >= 10 * max(1, (steps["htp"] > 0.5).sum())


@needs_qnn
@pytest.mark.parametrize("arch", [None, "73"])
@pytest.mark.parametrize("kernel", [(3, 2), (3, 3)])
def test_htp_model_reproduces_the_htp_average_pool_with_kernel_equal_to_stride(kernel, arch):
    """An 8-bit AveragePool tiling its input (the recogniser's is 3 x 2) computes as GlobalAveragePool:
    the window's sum of centered codes times a 15-significant-bit multiplier (tools/HTP.md finding 28)."""
    (kh, kw), channels = kernel, 64
    pool = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[kh, kw], strides=[kh, kw])
    model, targets = _one_op(pool, [1, channels, 4 * kh, 16 * kw])
    rng = np.random.default_rng(3)
    for _ in range(3):
        acts = {"x": asymmetric_encoding(-rng.uniform(0.1, 5), rng.uniform(1, 80), 8),
                "y": asymmetric_encoding(-rng.uniform(0.1, 3), rng.uniform(1, 50) * rng.uniform(0.3, 1.2), 8)}
        codes = rng.integers(0, 256, size=(1, channels, 4 * kh, 16 * kw))
        x = ((codes + acts["x"].offset) * np.float32(acts["x"].scale)).astype(np.float32)
        htp = HtpSession(build_qdq_model(model, targets, acts, {}), {}, arch).run({"x": x})[0]
        modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}, arch), ["y"])({"x": x})[0]
        np.testing.assert_array_equal(modeled, htp)


def test_add_constants_pick_fraction_bits_from_the_scale_ratios():
    bits, multipliers, constant = add_constants((0.05, 0.03), (100, 30), 0.07, 90)
    ratios = (np.float32(0.05) / np.float32(0.07), np.float32(0.03) / np.float32(0.07))
    assert bits == 13  # 14 - ceil(log2(0.714 + 0.429))
    assert multipliers == tuple(np.round(np.array(ratios, dtype=np.float64) * 2**13) / 2**13)
    assert constant * 2**5 == np.round(constant * 2**5)  # on the 2^-(n - 8) grid
    assert abs(constant - (90 - 100 * multipliers[0] - 30 * multipliers[1])) <= 2**-6
    bits, multipliers, _ = add_constants((0.05, 0.03), (100, 30), 0.07, 90, sign=-1.0)
    assert bits == 14 and multipliers[1] < 0  # Sub: 14 - ceil(log2(max(0.714, 0.429)))
    bits, multipliers, _ = add_constants((0.05, 0.03), (100, 30), 0.05, 90, sign=-1.0)
    assert bits == 13 and multipliers[0] == 1.0  # a larger ratio of 1: 2^14 would not fit, one bit less


def _add_model(op: str = "Add"):
    """y = a + b (or a - b) on [1, 1, 256, 256] inputs."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, 256, 256]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "add", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


ADD_CASES = {  # scale a, zero point a, scale b, zero point b, scale out, zero point out
    "generic": (0.0566, 100, 0.0366, 140, 0.0767, 90),
    "input scale equal to the output scale": (0.0767, 128, 0.0566, 128, 0.0767, 128),
    "one input at half the output scale": (0.2518, 135, 0.25126, 135, 0.50252, 135),
}


SUB_CASES = {  # as ADD_CASES; the fraction bits follow the larger scale ratio
    "generic": (0.0178, 242, 0.0597, 65, 0.0650, 104),
    "ratios 1.19 and 0.84": (0.0944, 71, 0.0891, 23, 0.0793, 185),
    "equal scales": (0.0230, 251, 0.0230, 192, 0.0487, 13),
    # the output's scale equal to a's: a ratio of 1, whose multiplier 2^14 takes one fraction bit less
    "input scale equal to the output scale": (0.0517, 117, 0.0211, 64, 0.0517, 140),
    "a ratio of exactly 2": (0.0618, 30, 0.0147, 201, 0.0309, 99),
}


@needs_qnn
@pytest.mark.parametrize("op, case", [("Add", case) for case in ADD_CASES] + [("Sub", case) for case in SUB_CASES])
def test_htp_model_reproduces_the_htp_add_on_every_pair_of_codes(op, case):
    sa, za, sb, zb, sy, zy = (ADD_CASES if op == "Add" else SUB_CASES)[case]
    model = _add_model(op)
    targets = find_targets(model)
    grids = (("a", sa, za), ("b", sb, zb), ("y", sy, zy))
    acts = {name: Encoding(8, scale, -zero_point) for name, scale, zero_point in grids}
    codes_a, codes_b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    sample = {"a": ((codes_a + acts["a"].offset) * np.float32(acts["a"].scale)).astype(np.float32)[None, None],
              "b": ((codes_b + acts["b"].offset) * np.float32(acts["b"].scale)).astype(np.float32)[None, None]}
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {"a": acts["a"], "b": acts["b"]})
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}), ["y"])
    np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])


def test_mul_constants_round_the_zero_point_term_to_the_constant_grid():
    multiplier, offset = mul_constants((0.02, 0.03), (128, 77), 0.014, 140)
    assert offset == 0.0  # a zero point of 128 leaves nothing to round
    assert multiplier * 2**19 == np.round(multiplier * 2**19)  # 15 significant bits: 2^-5 <= m < 2^-4
    assert abs(multiplier / (np.float32(0.02) * np.float32(0.03) / np.float32(0.014)) - 1) < 2.0**-15
    multiplier, offset = mul_constants((0.02, 0.03), (136, 136), 0.014, 140)  # j = round((128 + 16) / 256) = 1
    assert offset == np.round(256 * multiplier * 16) / 16 - 256 * multiplier  # grid 2^(15 - 19)
    small, _ = mul_constants((0.01, 0.01), (128, 128), 0.1, 0)  # M = 2^-9.97: fraction bits capped at 22
    assert small * 2**22 == np.round(small * 2**22) and small * 2**22 < 2**13
    multiplier, offset = mul_constants((0.01, 0.01), (250, 250), 0.0135, 200)  # j = 117, M = 2^-7.08
    rounded = offset + 256 * 117 * multiplier  # z_out + 256 j m >= 256 does not fit 16 bits at s = 22
    assert rounded * 2**6 == np.round(rounded * 2**6)  # so s = 21: the constant grid is 2^-6
    assert mul_constants((0.5, 0.5), (0, 0), 0.2, 0) is None  # M >= 1: not modelled
    multiplier, offset = scalar_mul_constants(0.02, 0.004, 255, 5.0)
    assert offset == 2.0**-7 and abs(multiplier / (0.02 * 0.004 / 5.0 * 255) - 1) < 2.0**-15
    assert scalar_mul_constants(0.02, 0.004, -255, 5.0)[1] == 0.0


def _code_grid(enc: Encoding, shape: tuple[int, ...]) -> np.ndarray:
    """The 256 codes of ``enc`` as float values, laid out along the axis of ``shape`` that has 256 entries."""
    return ((np.arange(256.0) + enc.offset) * np.float32(enc.scale)).astype(np.float32).reshape(shape)


MUL_CASES = {  # scale a, zero point a, scale b, zero point b, scale out, zero point out, b constant
    "two activations": (0.02, 108, 0.03, 164, 0.014, 140, False),
    "zero point 128, M = 2^-4.5": (0.0566, 128, 0.0366, 90, 0.0467, 20, False),
    "M below 2^-8: fewer fraction bits": (0.0152, 21, 0.0283, 126, 0.1191, 111, False),
    "M = 2^-7.4, z_out near the 16-bit limit": (0.0312, 9, 0.0119, 68, 0.0609, 229, False),
    "constant per channel": (0.00886, 204, 0.0326, 28, 0.1035, 156, True),
    "constant per channel, M = 2^-5": (0.0339, 28, 0.0473, 39, 0.0512, 241, True),
}


@needs_qnn
@pytest.mark.parametrize("case", list(MUL_CASES))
def test_htp_model_reproduces_the_htp_mul_on_every_pair_of_codes(case):
    sa, za, sb, zb, sy, zy, constant = MUL_CASES[case]
    a_enc, b_enc, y_enc = Encoding(8, sa, -za), Encoding(8, sb, -zb), Encoding(8, sy, -zy)
    a_shape = (1, 1, 256, 1) if constant else (1, 1, 256, 256)
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))]
    inits, params = [], {}
    if constant:
        b = _code_grid(b_enc, (1, 1, 1, 256))
        inits.append(numpy_helper.from_array(b, "b"))
        params["b"] = asymmetric_encoding(float(b.min()), float(b.max()), 8)
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1, 256, 256]))
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "mul", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    acts = {"a": a_enc, "y": y_enc} if constant else {"a": a_enc, "b": b_enc, "y": y_enc}
    if constant:
        sample = {"a": _code_grid(a_enc, a_shape)}
    else:
        codes_a, codes_b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
        sample = {"a": ((codes_a - za) * np.float32(sa)).astype(np.float32)[None, None],
                  "b": ((codes_b - zb) * np.float32(sb)).astype(np.float32)[None, None]}
    targets = find_targets(model)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {name: acts[name] for name in sample})
    assert htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])


@needs_qnn
@pytest.mark.parametrize("value", [0.94316906, -0.2581989, 2.7281597])
def test_htp_model_reproduces_the_htp_mul_by_a_scalar_on_every_code(value):
    """A one-element constant, as PP-OCR's layer scales (``M`` near 2^-8)."""
    x_enc = Encoding(8, 0.0437, -117)
    b = np.array([value], dtype=np.float32)
    params = {"b": asymmetric_encoding(min(value, 0.0), max(value, 0.0), 8)}
    y_enc = Encoding(8, 0.0437 * abs(value) * 1.3, -128)
    _assert_scalar_op_reproduced("Mul", ["x", "b"], b, x_enc, y_enc, params)


def _assert_scalar_op_reproduced(op: str, inputs: list[str], constant: np.ndarray, x_enc: Encoding,
                                 y_enc: Encoding, params: dict) -> None:
    """``op`` of the input x and a one-element constant (named as in ``inputs``) on the emulator and
    in the simulation, over all 256 codes of x: equal."""
    name = next(n for n in inputs if n != "x")
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], op.lower(),
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(constant, name)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    acts = {"x": x_enc, "y": y_enc}
    targets = find_targets(model)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": x_enc})
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    sample = {"x": _code_grid(x_enc, (1, 1, 1, 256))}
    np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])


def test_batch_norm_constants_requantize_the_folded_scale_and_bias():
    values = [np.array([1.0, -2.0, 0.5], np.float32), np.array([0.3, 0.0, -0.2], np.float32),
              np.array([0.1, 0.2, 0.0], np.float32), np.array([1.0, 4.0, 0.25], np.float32)]
    encodings = [asymmetric_encoding(min(float(v.min()), 0.0), max(float(v.max()), 0.0), 8) for v in values]
    weights, offsets, multiplier, constant = batch_norm_constants(values, encodings, 1e-5, 0.02, 0.05, 100)
    assert weights.min() >= -255 and weights.max() <= 255 and np.all(weights == np.round(weights))
    assert weights[1] < 0 < weights[0] and abs(weights[0] - weights[2]) <= 2  # a = 1, -1, 1 before rounding
    bits = 14 - int(np.floor(np.log2(multiplier)))
    assert multiplier * 2**bits == np.round(multiplier * 2**bits) and constant == 0.5 + 2.0 ** (9 - bits)
    assert np.all(offsets == np.round(offsets))
    assert batch_norm_constants(values, encodings, 1e-5, 0.02, 500.0, 100) is None  # M < 2^-11


BATCH_NORM_CASES = {  # input scale, input zero point, output range factor, gamma factor, Relu after it
    "M = 2^-8.1": (0.0183, 121, 0.8, 1.0, False),
    "Relu squashed": (0.0183, 121, 0.8, 1.0, True),
    "negative gammas, M = 2^-7.3": (0.09, 30, 0.6, -3.0, False),
    "M = 2^-3.7, outputs clamped": (0.09, 30, 0.05, -3.0, False),
    "M = 2^-10.2": (0.02, 200, 1.2, 0.1, False),
}


@needs_qnn
@pytest.mark.parametrize("case", list(BATCH_NORM_CASES))
def test_htp_model_reproduces_the_htp_batch_norm_on_every_code(case):
    """A standalone BatchNormalization: 16 channels, every input code in each."""
    x_scale, x_zero, out_factor, gamma_factor, relu = BATCH_NORM_CASES[case]
    rng = np.random.default_rng(7)
    channels = 16
    values = {"g": rng.normal(1.0, 0.5, channels) * gamma_factor, "b": rng.normal(0.0, 1.0, channels),
              "m": rng.normal(0.0, 1.0, channels), "v": rng.uniform(0.1, 2.0, channels)}
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["c" if relu else "y"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 1, 256])
    graph = helper.make_graph(nodes, "bn", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    targets = find_targets(model)
    params = constant_encodings(model, targets, {}, 8)
    x_enc = Encoding(8, x_scale, -x_zero)
    x = _code_grid(x_enc, (1, 1, 1, 256))
    scale = values["g"] / np.sqrt(values["v"] + 1e-5)
    y = x * scale[None, :, None, None] + (values["b"] - values["m"] * scale)[None, :, None, None]
    y_enc = asymmetric_encoding(0.0 if relu else float(y.min()) * out_factor, float(y.max()) * out_factor, 8)
    acts = {"x": x_enc, "y": y_enc, **({"c": y_enc} if relu else {})}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": x_enc})
    assert htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    sample = {"x": np.repeat(x, channels, axis=1)}
    np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])


@needs_qnn
@pytest.mark.parametrize("arch", [None, "73"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_htp_model_reproduces_the_htp_conv_transpose_with_kernel_equal_to_stride(seed, arch):
    """PP-OCR's upsampling ConvTranspose (kernel 2, stride 2), weights overflowing int8 in some blocks; on
    v73 requantized with v73's Conv rule (tools/HTP.md finding 27)."""
    rng = np.random.default_rng(seed)
    weight = (rng.normal(0.0, 0.3, (16, 8, 2, 2)) + rng.normal(0.0, 0.1)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])
    graph = helper.make_graph([node], "deconv", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    samples = _samples(16, count=2, seed=seed)
    targets, acts, params = _quantized(model, samples)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch)
    assert htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params, arch), ["y"])
    for sample in samples:
        np.testing.assert_array_equal(modeled(sample)[0], htp.run(sample)[0])


@needs_qnn
def test_htp_model_computes_an_add_read_only_by_a_concat_in_the_concat_encoding():
    """The HTP requantizes the Add once, to the Concat's encoding, not its own codes (PP-OCR det's Concat)."""
    shape = [1, 1, 256, 256]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("a", "b", "c")]
    nodes = [helper.make_node("Add", ["a", "b"], ["t"]), helper.make_node("Concat", ["t", "c"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "cat", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    targets = find_targets(model)
    acts = {"a": Encoding(8, 0.0566, -100), "b": Encoding(8, 0.0366, -140), "c": Encoding(8, 0.1, -128),
            "t": Encoding(8, 0.0537, -139), "y": Encoding(8, 0.1107, -128)}
    codes_a, codes_b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    sample = {"a": ((codes_a - 100) * np.float32(0.0566)).astype(np.float32)[None, None],
              "b": ((codes_b - 140) * np.float32(0.0366)).astype(np.float32)[None, None],
              "c": np.zeros(shape, np.float32)}
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {name: acts[name] for name in sample})
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}), ["y"])
    reference = htp.run(sample)[0]
    np.testing.assert_array_equal(modeled(sample)[0], reference)
    alone = _add_model()  # the same Add with its own encoding, then requantized to the Concat's
    add_acts = {"a": acts["a"], "b": acts["b"], "y": acts["t"]}
    own = simulation_runner(*htp_simulation_model(alone, find_targets(alone), add_acts, {}), ["y"])(
        {"a": sample["a"], "b": sample["b"]})[0]
    twice = (np.floor(own / np.float32(0.1107) + 0.5) * np.float32(0.1107)).astype(np.float32)
    assert (twice != reference[:, :1]).mean() > 0.01


def test_a_16_bit_weight_is_recognised_in_the_qdq_model():
    weight = np.random.default_rng(8).normal(size=(8, 4, 3, 3))
    model = _conv_model(weight, activation="Relu")
    targets, acts, params = _quantized(model, _samples(4))
    assert not has_16_bit_weights(build_qdq_model(model, targets, acts, params))
    wide_acts, wide_params = _a16w16(model, targets, acts, _samples(4))
    assert has_16_bit_weights(build_qdq_model(model, targets, wide_acts, wide_params))


@needs_qnn
def test_a16w16_conv_runs_on_the_htp_and_the_simulation_stays_within_two_steps():
    """A Conv raised to 16 bits (activations and a symmetric weight, as auto precision raises it) needs
    HTP v73 or later; the session asks for it and runs it whole. The simulation computes 16-bit ops in
    float with exact rounding (the HTP's A16W16 arithmetic is not decoded yet): measured up to 2.0
    steps of 16 bits off, a third of the outputs one step off."""
    weight = np.random.default_rng(9).normal(0.1, 1.0, size=(8, 4, 3, 3))
    model = _conv_model(weight, activation="Relu")
    samples = _samples(4, count=2, seed=5)
    targets, acts, params = _quantized(model, samples)
    acts, params = _a16w16(model, targets, acts, samples)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.arch == A16W16_ARCH and htp.cpu_nodes == []
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for sample in samples:
        error = np.abs(modeled(sample)[0] - htp.run(sample)[0]) / acts["y"].scale
        assert error.max() <= 2.01 and (error > 1.5).mean() <= 0.02


def _a16w16(model, targets, acts, samples):
    """The pipeline's encodings with every activation and the weight at 16 bits (weight symmetric)."""
    from onnxsnpe.encode.ranges import activation_encodings
    from onnxsnpe.stats.collect import collect_statistics

    stats = collect_statistics(model, targets.activations, samples)
    wide = activation_encodings(stats, targets, "minmax", 8, raised=set(targets.activations))
    weights = weight_encodings(model, targets, 8, raised=targets.weights)
    return wide, {**weights, **bias_encodings(model, targets, wide, weights, 32)}


@needs_qnn
def test_an_htp_too_old_for_a_16_bit_weight_is_a_one_line_error_with_the_fix():
    weight = np.random.default_rng(10).normal(size=(8, 4, 3, 3))
    model = _conv_model(weight, activation="Relu")
    samples = _samples(4)
    targets, acts, params = _quantized(model, samples)
    acts, params = _a16w16(model, targets, acts, samples)
    with pytest.raises(OnnxSnpeError, match=f"needs HTP v{A16W16_ARCH} or later: --htp-arch {A16W16_ARCH}"):
        HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch="68")


def test_unknown_htp_arch_is_refused(tmp_path, tiny_model, npy_folder):
    from onnxsnpe import quantize

    with pytest.raises(OnnxSnpeError, match="--htp-arch must be one of 68, 69, 73, 75, 79, got 71"):
        quantize(tiny_model, npy_folder, tmp_path / "out", htp_arch="71", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", range(4))
def test_requantization_in_float32_gives_the_float64_codes_where_it_is_used(seed: int) -> None:
    """The float32 requantization (integer_op, for 11-bit multipliers) against float64 on every
    accumulator around the clamp and far beyond it, for multipliers requant_constants makes."""
    rng = np.random.default_rng(seed)
    multipliers = np.exp(rng.uniform(np.log(1e-5), np.log(8.0), 64))
    for multiplier in multipliers:
        zero_point = int(rng.integers(0, 256))
        _, mantissa, _ = requant_constants(np.array([multiplier]), zero_point)
        assert exact_in_float32(mantissa)
        span = 300 / mantissa[0]
        t = np.unique(np.concatenate([np.arange(-span, span), rng.uniform(-2**23, 2**23, 4096)]).round())
        want = np.clip(np.floor(t * mantissa[0] + 0.5), 0, 255) - zero_point
        m32, t32 = np.float32(mantissa[0]), t.astype(np.float32)
        got = np.clip(np.floor(t32 * m32 + np.float32(0.5 - zero_point)), -zero_point, 255 - zero_point)
        np.testing.assert_array_equal(got, want)
    _, precise, _ = requant_constants(np.array([0.0123456]), 0, precise=True)
    assert not exact_in_float32(precise)  # 15 significant bits: float64


def test_codes_come_back_exactly_from_on_grid_values_times_the_inverse_scale() -> None:
    """centered_codes multiplies by float32 1/scale instead of dividing: run in onnxruntime, its nodes
    give back the codes of every on-grid value of 8- and 16-bit ranges, whatever the scale."""
    rng = np.random.default_rng(5)
    codes = np.arange(-65535, 65536, dtype=np.float32)
    for scale in np.float32(np.exp(rng.uniform(np.log(1e-8), np.log(1e4), 20))):
        nodes, inits = centered_codes("x", Encoding(16, float(scale), 0), "c")
        graph = helper.make_graph(nodes, "codes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        (got,) = make_session(model).run(None, {"x": codes * scale})
        np.testing.assert_array_equal(got, codes)


SCALAR_ADD_CASES = {  # op, constant first, x's encoding, the constant, y's encoding
    # where the fixed-point fold this replaced (n from x alone, the constant at 2^-n) missed 1 and 2 codes
    "x + c": ("Add", False, (0.02518448419868946, -43), -2.996725082397461, (0.02145121432840824, -204)),
    "x - c": ("Sub", False, (0.04099457710981369, -133), 0.06544798612594604, (0.031148234382271767, -129)),
    "c + x": ("Add", True, (0.02518448419868946, -43), -2.996725082397461, (0.02145121432840824, -204)),
    "c - x": ("Sub", True, (0.0291, -93), 1.3517, (0.0287, -180)),
    # every output an exact tie, which the HTP rounds to even (finding 22): MiniLM-L6's GELU erf + 1,
    # and power-of-two steps with a constant of k + 1/2 of them
    "erf + 1": ("Add", False, (2 / 255, -128), 1.0, (2 / 255, 0)),
    "x + c on ties": ("Add", False, (2**-6, -128), 3.5 * 2**-6, (2**-6, -128)),
    "c - x on ties": ("Sub", True, (2**-7, -128), 11.5 * 2**-7, (2**-7, -128)),
}


@needs_qnn
@pytest.mark.parametrize("case", SCALAR_ADD_CASES.values(), ids=SCALAR_ADD_CASES.keys())
def test_htp_model_reproduces_the_htp_add_and_sub_of_a_scalar_on_every_code(case):
    """At 8 bits the HTP adds or subtracts a one-element constant as exactly as float rounding does
    (tools/HTP.md finding 13), ties to even (finding 22)."""
    op, first, (x_scale, x_offset), value, (y_scale, y_offset) = case
    x_enc, y_enc = Encoding(8, x_scale, x_offset), Encoding(8, y_scale, y_offset)
    params = {"c": asymmetric_encoding(min(value, 0.0), max(value, 0.0), 8)}
    _assert_scalar_op_reproduced(op, ["c", "x"] if first else ["x", "c"], np.array([value], dtype=np.float32), x_enc,
                                 y_enc, params)


def _reduce_mean_sweep(shape_of: str, count: int, x_range: tuple[float, float], y_range: tuple[float, float]):
    """A ReduceMean over ``count`` values whose rows sweep every sum of centered codes (row r: base code
    r // count, the first r % count values one higher), as a rank-3 tensor reduced over its last axis
    ("last") or over axis 1 ("axis1"); returns the model, encodings and sample."""
    base = np.repeat(np.arange(255), count)
    codes = base[:, None] + (np.arange(count)[None, :] < np.tile(np.arange(count), 255)[:, None])
    codes, shape, axis = ((codes[None], [1, codes.shape[0], count], -1) if shape_of == "last"
                          else (codes.T[None], [1, count, codes.shape[0]], 1))
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[axis], keepdims=1)
    graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    acts = {"x": asymmetric_encoding(*x_range, 8), "y": asymmetric_encoding(*y_range, 8)}
    sample = {"x": ((codes + acts["x"].offset) * np.float32(acts["x"].scale)).astype(np.float32)}
    return model, acts, sample


def test_reduce_mean_multiplier_of_the_int16_kernel_sits_below_the_rounded_one():
    """Hand-worked: ratio 0.0190 has e = -6 and mantissa x = 0.0190 * 2^20 = 19922.94; the rounded
    kernel keeps 19923, the int16 one round(x * 32767 / 32768) = round(19922.33) = 19922."""
    from onnxsnpe.simulate.htp.channelwise import reduce_mean_multiplier

    assert reduce_mean_multiplier(0.0190, "rounded") == 19923 / 2**20
    assert reduce_mean_multiplier(0.0190, "int16") == 19922 / 2**20
    for ratio in np.random.default_rng(0).uniform(1e-4, 0.5, 200):  # 15 bits; half a step off, or 1.5 below
        step = 2.0 ** (np.floor(np.log2(ratio)) - 14)
        rounded, int16 = (reduce_mean_multiplier(float(ratio), kernel) / step for kernel in ("rounded", "int16"))
        assert rounded == np.floor(rounded) and int16 == np.floor(int16)
        assert abs(rounded - ratio / step) <= 0.5 and -1.5 <= int16 - ratio / step <= 0.5 and int16 <= rounded


@needs_qnn
@pytest.mark.parametrize(("shape_of", "count", "x_range", "y_range"), [
    ("last", 120, (-3.82, 2.78), (-2.15, 2.97)),  # the int16 kernel's multiplier differs from the rounded one
    ("last", 64, (-4.91, 4.82), (-4.89, 3.83)),
    ("axis1", 48, (-2.5, 3.1), (-1.2, 2.4)),  # the rounded kernel
])
def test_htp_model_reproduces_the_htp_reduce_mean_on_every_sum(shape_of, count, x_range, y_range):
    """An 8-bit ReduceMean (the recogniser's layer norms reduce a rank-3 tensor's last axis)."""
    model, acts, sample = _reduce_mean_sweep(shape_of, count, x_range, y_range)
    targets = find_targets(model)
    htp = HtpSession(build_qdq_model(model, targets, acts, {}), {"x": acts["x"]})
    assert htp.cpu_nodes == []
    want = htp.run(sample)[0]
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, {}), ["y"])(sample)[0]
    exact = simulation_runner(*build_simulation_model(model, targets, acts, {}), ["y"])(sample)[0]
    assert np.count_nonzero(exact != want) > 0  # the probe tells the kernels from exact rounding
    np.testing.assert_array_equal(modeled, want)


def test_v73_conv_constants_hand_worked():
    """M = 0.0123: k = floor(6.35) - 3 = 3, m = round(0.0123 * 2^18) / 2^15 = 3224 / 2^15, rounding
    constant m / 2 + 1/2; the bias 1000 codes of step 0.001 over s_in s_w = 0.0003 is 3333.33
    accumulator steps, truncated to 3333, and -3333 for a negative bias. M = 0.3 shifts left:
    k = floor(1.74) - 3 = -2, factor 4, m = round(0.3 * 2^13) / 2^15 = 2458 / 2^15."""
    from onnxsnpe.simulate.htp.linear import v73_conv_constants

    factor, mantissa, offset, rounding = v73_conv_constants(
        np.array([0.0123, 0.0123, 0.3]), 0.01, 0.03, np.ones(3), np.array([1000, -1000, 0]), 0.001)
    np.testing.assert_array_equal(factor, [1 / 8, 1 / 8, 4])
    np.testing.assert_array_equal(mantissa, [3224 / 2**15, 3224 / 2**15, 2458 / 2**15])
    np.testing.assert_array_equal(offset, [3333, -3333, 0])
    np.testing.assert_array_equal(rounding, mantissa / 2 + 0.5)


@needs_qnn
@pytest.mark.parametrize(("kernel", "group", "stride"), [(1, 1, 1), (3, 1, 1), (3, 1, 2), (3, 8, 1), (3, 8, 2)])
def test_htp_model_reproduces_the_v73_conv_at_8_bits(kernel, group, stride):
    """HTP v73 requantizes an 8-bit Conv unlike v68 (finding 19): with symmetric per-tensor weights
    (int8 codes as they are) every output equals the emulator's at v73, where the v68 rule does not."""
    rng = np.random.default_rng(kernel * 10 + group + stride)
    weight = rng.normal(0.0, 1.0, (8, 8 // group, kernel, kernel)).astype(np.float32)
    weight.flat[0], weight.flat[1] = np.abs(weight).max(), -np.abs(weight).max()  # codes fit int8 as they are
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[kernel // 2] * 4, group=group, strides=[stride] * 2)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(rng.normal(0.0, 3.0, 8).astype(np.float32), "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), "y": asymmetric_encoding(-6.0 * kernel, 8.0 * kernel, 8)}
    weights = weight_encodings(model, targets, 8)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    codes = rng.integers(0, 256, size=(1, 8, 12, 12))
    sample = {"x": ((codes + acts["x"].offset) * np.float32(acts["x"].scale)).astype(np.float32)}
    want = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, "73").run(sample)[0]
    got = {arch: simulation_runner(*htp_simulation_model(model, targets, acts, params, arch), ["y"])(sample)[0]
           for arch in ("68", "73")}
    np.testing.assert_array_equal(got["73"], want)
    if (group, stride) != (8, 2):  # the doubly strided depthwise kernel is v68's on v73 too
        assert np.count_nonzero(got["68"] != want) > 0


def test_the_simulation_computes_as_the_architecture_the_emulator_picks():
    """v73 when a Conv weight is 16-bit (the emulator then runs v73), else v68; an explicit
    architecture or --arithmetic htp-v73 overrides it, and --htp-arch 73 or later implies htp-v73."""
    from onnxsnpe.simulate.arithmetic import htp_arithmetic
    from onnxsnpe.simulate.htp.model import default_arch

    model = _conv_model(np.random.default_rng(0).normal(size=(4, 8, 3, 3)))
    targets = find_targets(model)
    assert default_arch(model, weight_encodings(model, targets, 8)) == 68
    assert default_arch(model, weight_encodings(model, targets, 16)) == 73
    assert [htp_arithmetic(arch) for arch in (None, "68", "69", "73", "75", "79")] == [
        "htp", "htp", "htp", "htp-v73", "htp-v73", "htp-v73"]
