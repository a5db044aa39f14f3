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
