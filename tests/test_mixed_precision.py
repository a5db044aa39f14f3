"""Mixed 8/16-bit graphs: an 8-bit input converted to the same grid at 16 bits where the HTP needs it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import asymmetric_encoding, dequantize, quantize, same_grid_wider, symmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate import qdq as qdq_module
from onnxsnpe.simulate.emulator import HtpSession, cpu_runner, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.mixed_precision import widened_inputs
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()


@given(st.floats(-50, 0), st.floats(0.01, 50))
def test_the_wider_grid_holds_every_value_of_the_narrower(low: float, high: float) -> None:
    narrow = asymmetric_encoding(low, high, 8)
    wide = same_grid_wider(narrow, 16)
    values = dequantize(np.arange(256, dtype=np.uint8), narrow)
    codes = quantize(values, wide)
    assert np.array_equal(codes.astype(np.int64), 257 * np.arange(256))  # exact in real arithmetic
    np.testing.assert_allclose(dequantize(codes, wide), values, rtol=1e-6, atol=narrow.scale * 1e-6)


def test_a_symmetric_encoding_has_no_wider_grid() -> None:
    with pytest.raises(ValueError, match="no 16-bit grid"):
        same_grid_wider(symmetric_encoding(1.0, 8), 16)


def _div_conv(per_channel: bool):
    """x -> Mul(x, x) -> Div(6) -> depthwise 5x5 Conv: the Div reads an 8-bit tensor and writes a 16-bit one
    (PP-OCR cls under automatic mixed precision has this hard-swish tail), the Conv is 16-bit."""
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(8, 1, 5, 5)).astype(np.float32) * 0.2
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["m"]), helper.make_node("Div", ["m", "six"], ["d"]),
         helper.make_node("Conv", ["d", "w", "b"], ["y"], group=8, pads=[2, 2, 2, 2])],
        "div_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(6.0, np.float32), "six"), numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-3.0, 3.0, 8), "m": asymmetric_encoding(0.0, 9.0, 8),
            "d": asymmetric_encoding(0.0, 1.5, 16), "y": asymmetric_encoding(-4.0, 4.0, 16)}
    weights = weight_encodings(model, targets, 8, per_channel=per_channel)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    params.update(constant_encodings(model, targets, params, 8, acts))
    return model, targets, acts, params


def _sample(enc, seed: int = 1) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).uniform(enc.min, enc.max, (1, 8, 12, 12)).astype(np.float32)
    return {"x": dequantize(quantize(x, enc), enc)}


def _unconverted(monkeypatch, model, targets, acts, params) -> onnx.ModelProto:
    """The QDQ model as written before the conversions: every op reads its input's own grid."""
    monkeypatch.setattr(qdq_module, "widened_inputs", lambda *args: {})
    try:
        return build_qdq_model(model, targets, acts, params)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("div_bitwidth", [16, 8])
def test_a_div_writing_16_bits_reads_its_8_bit_input_converted_losslessly(monkeypatch, per_channel,
                                                                          div_bitwidth) -> None:
    model, targets, acts, params = _div_conv(per_channel)
    acts["d"] = asymmetric_encoding(0.0, 1.5, div_bitwidth)
    widened = widened_inputs(model.graph, targets, acts)
    expected = {"d": {0: same_grid_wider(acts["m"], 16)}} if div_bitwidth == 16 else {}
    assert widened == expected
    qdq = build_qdq_model(model, targets, acts, params)
    assert sum(node.input[0].endswith("/wide") for node in qdq.graph.node) == len(expected)
    sample = _sample(acts["x"])
    got = cpu_runner(qdq, {"x": acts["x"]}, ["y"])(sample)[0]
    before = cpu_runner(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]}, ["y"])(sample)[0]
    assert np.array_equal(got, before)  # the conversion loses nothing


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_the_htp_finalizes_the_mixed_div_only_with_its_input_converted(monkeypatch) -> None:
    """Without the conversion the emulator refuses the graph (QNN_COMMON_ERROR_MEM_ALLOC); with it the
    graph runs, and the HTP simulation follows it."""
    model, targets, acts, params = _div_conv(per_channel=False)
    with pytest.raises(OnnxSnpeError, match="rejected"):
        HtpSession(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]})
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(3):
        sample = _sample(acts["x"], seed)
        steps = np.abs(simulate(sample)[0] - htp.run(sample)[0]) / np.float32(acts["y"].scale)
        assert steps.max() <= 2
