"""The HTP rounds a float16 multiplier that lies exactly halfway upwards (tools/HTP.md finding 39)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import ChannelEncodings, Encoding, asymmetric_encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.codes import float16_ties_up
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()


@given(st.floats(min_value=2.0**-20, max_value=60000.0))
def test_float16_ties_up_is_numpys_float16_except_at_exact_ties(value: float) -> None:
    rounded = float(float16_ties_up(np.array(value)))
    numpy = float(np.float16(value))
    if rounded != numpy:  # only a value exactly halfway between two float16 neighbours
        low, high = sorted([rounded, numpy])
        assert value == (low + high) / 2 and rounded == high


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize(("bitwidth", "tied"), [(8, (1 + 2.0**-11) * 2.0**-7), (16, (1 + 2.0**-11) * 2.0**-10)])
def test_the_htp_rounds_a_tied_per_channel_multiplier_upwards(bitwidth: int, tied: float) -> None:
    """A depthwise Conv whose channel 1 has its float16 multiplier exactly halfway (input and output
    share their step, so ``M`` is the weight scale; ``M 2^k`` at 8 bits as EfficientNet-Lite0's block 12
    channel 148, ``M 2^8`` at 16 bits): with ties to even the simulation missed it (3 of 1,024 values
    at 8 bits, 768 of 3,072 at 16)."""
    channels = 4
    scales = np.array([0.004, tied, 0.0061, 0.0052]) if bitwidth == 8 else np.array([0.0009, tied, 0.0011, 0.0013])
    rng = np.random.default_rng(5)
    codes = rng.integers(-127, 128, size=(channels, 1, 3, 3))
    codes[:, 0, 0, 0] = 127
    weight = (codes * scales[:, None, None, None]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "tie", [value("x", TensorProto.FLOAT, [1, channels, 16, 16])],
                              [value("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    levels = 2**bitwidth
    step = 16 / levels
    acts = {"x": asymmetric_encoding(0.0, (levels - 1) * step, bitwidth),
            "y": asymmetric_encoding(-levels / 2 * step, (levels / 2 - 1) * step, bitwidth)}
    params = {"w": ChannelEncodings(0, tuple(Encoding(8, float(np.float32(s)), -128, True) for s in scales))}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(3):
        x = (np.random.default_rng(seed).integers(0, levels, (1, channels, 16, 16)) * step).astype(np.float32)
        np.testing.assert_array_equal(simulate({"x": x})[0], htp.run({"x": x})[0])


def _units(multiplier: float, arch: str | None) -> float:
    """``M`` in units of its last kept bit: float16 after the ``2^k`` shift on v68, 15 fraction bits on v73."""
    k = np.floor(-np.log2(multiplier)) - 3
    if arch is None:
        shifted = multiplier * 2.0**k
        return shifted / 2.0 ** (np.floor(np.log2(shifted)) - 10)
    return multiplier * 2.0 ** (k + 15)


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize(("arch", "in_scale", "w_scale"), [(None, 0.017109634, 0.00332177),
                                                          ("73", 0.017109634, 0.0033211699)])
def test_the_htp_computes_the_multiplier_in_float32(arch: str | None, in_scale: float, w_scale: float) -> None:
    """A 1x1 Conv (per-tensor symmetric weights) whose ``M = s_in s_w / s_out`` lies just below a tie
    of its rounding in float64 (a few 1e-5 of a unit) and exactly on it as ``f32(f32(s_in s_w) /
    s_out)``: the HTP rounds it up, as from the tie (PP-OCRv4 det's `p2o.Conv.23` channel 185 met it;
    tools/HTP.md finding 46). On scratch probes with these scales (other random codes) computing ``M``
    in float64 missed 217 and 150 values of two samples on v68, 21 and 31 on v73; on v73 ``f32(s_in
    f32(s_w / s_out))`` lies below the tie and is not what the HTP computes."""
    in_scale, w_scale, out_scale = np.float32(in_scale), np.float32(w_scale), np.float32(0.0430755708731857)
    exact = float(in_scale) * float(w_scale) / float(out_scale)
    single = float(np.float32(np.float32(in_scale * w_scale) / out_scale))
    assert _units(exact, arch) % 1 < 0.5 and _units(single, arch) % 1 == 0.5  # the probe is what it claims
    inputs, outputs, size = 32, 8, 16
    rng = np.random.default_rng(0)
    weight = (rng.integers(-127, 128, (outputs, inputs, 1, 1)) * w_scale).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "float32_multiplier", [value("x", TensorProto.FLOAT, [1, inputs, size, size])],
                              [value("y", TensorProto.FLOAT, [1, outputs, size, size])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    targets = find_targets(model)
    acts = {"x": Encoding(8, float(in_scale), -10), "y": Encoding(8, float(out_scale), -128)}
    params = {"w": Encoding(8, float(w_scale), -128, True)}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch)
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params, arch), ["y"])
    for seed in range(2):
        codes = np.random.default_rng(seed).integers(0, 256, (1, inputs, size, size))
        x = ((codes - 10) * in_scale).astype(np.float32)
        np.testing.assert_array_equal(simulate({"x": x})[0], htp.run({"x": x})[0])
