"""Mixed 8/16-bit graphs on the HTP: where an op needs its activation input and output at one bitwidth,
the 8-bit side is converted to the same grid at 16 bits (encode/conversions.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.conversions import HTP_FIXED_16_BIT, widened_inputs, widened_outputs
from onnxsnpe.encode.encoding import asymmetric_encoding, dequantize, quantize, same_grid_wider, symmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings, with_htp_fixed_encodings
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate import qdq as qdq_module
from onnxsnpe.simulate.emulator import (
    HtpSession,
    cpu_runner,
    qnn_unavailable_reason,
    simulation_runner,
)
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
SHAPE = [1, 8, 12, 12]


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


def _mixed(op: str, x_bits: int, d_bits: int, per_channel: bool = False):
    """x -> op -> d -> 1x1 Conv -> y, ``op`` a Div by 6, a HardSigmoid or a depthwise 5x5 Conv with
    strides [2, 1] (the PP-OCR models have all three where automatic mixed precision raises one side
    to 16 bits); y is 16-bit. The activations' encodings are the pipeline's (a 16-bit HardSigmoid
    output takes the HTP's own)."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "b")]
    if op == "Div":
        first = helper.make_node("Div", ["x", "six"], ["d"])
        inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "six"))
    elif op in ("HardSigmoid", "Sqrt"):
        first = helper.make_node(op, ["x"], ["d"], **({"alpha": 0.2, "beta": 0.5} if op == "HardSigmoid" else {}))
    else:
        first = helper.make_node("Conv", ["x", "dw", "db"], ["d"], group=8, pads=[2, 2, 2, 2], strides=[2, 1])
        inits += [numpy_helper.from_array(rng.normal(size=(8, 1, 5, 5)).astype(np.float32) * 0.1, "dw"),
                  numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "db")]
    graph = helper.make_graph([first, helper.make_node("Conv", ["d", "w", "b"], ["y"])], "mixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("d", "y")],
                              inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-0.4, 9.0, x_bits), "d": asymmetric_encoding(-1.5, 1.5, d_bits),
            "y": asymmetric_encoding(-4.0, 4.0, 16)}
    acts = with_htp_fixed_encodings(model, targets, acts)
    weights = weight_encodings(model, targets, 8, per_channel=per_channel)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    params.update(constant_encodings(model, targets, params, 8, acts))
    return model, targets, acts, params


CASES = [("Div", 8, 16), ("Div", 16, 8), ("HardSigmoid", 8, 16), ("HardSigmoid", 16, 8), ("Conv", 8, 16),
         ("Conv", 16, 8)]


def _sample(enc, seed: int = 1) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).uniform(enc.min, enc.max, SHAPE).astype(np.float32)
    return {"x": dequantize(quantize(x, enc), enc)}


def _unconverted(monkeypatch, model, targets, acts, params) -> onnx.ModelProto:
    """The QDQ model as written before the conversions: every op reads and writes its tensors' own grids."""
    monkeypatch.setattr(qdq_module, "widened_inputs", lambda *args: {})
    monkeypatch.setattr(qdq_module, "widened_outputs", lambda *args: {})
    try:
        return build_qdq_model(model, targets, acts, params)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("op, x_bits, d_bits", CASES)
def test_the_8_bit_side_of_a_mixed_op_is_converted_on_the_16_bit_grid(monkeypatch, op, x_bits, d_bits) -> None:
    model, targets, acts, params = _mixed(op, x_bits, d_bits)
    inputs, outputs = widened_inputs(model.graph, targets, acts), widened_outputs(model.graph, targets, acts)
    computed = HTP_FIXED_16_BIT.get(op) or same_grid_wider(acts["d"], 16)
    expected = {"d": {0: same_grid_wider(acts["x"], 16)}} if x_bits == 8 else {}
    if d_bits == 8:  # the Conv after it writes 16 bits: it reads d converted too
        expected["y"] = {0: same_grid_wider(acts["d"], 16)}
    assert inputs == expected and outputs == ({} if x_bits == 8 else {"d": computed})
    if op == "Div":
        assert params["six"].bitwidth == 16  # the Div computes in 16 bits either way
    qdq = build_qdq_model(model, targets, acts, params)
    names = [name for node in qdq.graph.node for name in node.output]
    assert sum(name.endswith("/wide") for name in names) == (x_bits == 8) + (d_bits == 8)
    assert sum(name.endswith("/computed") for name in names) == (d_bits == 8)
    sample = _sample(acts["x"])
    got = cpu_runner(qdq, {"x": acts["x"]}, ["y"])(sample)[0]
    before = cpu_runner(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]}, ["y"])(sample)[0]
    if x_bits == 8:
        assert np.array_equal(got, before)  # the input's conversion loses nothing
    else:  # rounding twice differs from rounding once at ties only
        assert np.mean(got != before) < 0.01


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("op, x_bits, d_bits", CASES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_the_htp_runs_a_mixed_op_only_with_its_8_bit_side_converted(monkeypatch, op, x_bits, d_bits,
                                                                    per_channel) -> None:
    """Without the conversions the emulator refuses the graph (QNN_COMMON_ERROR_MEM_ALLOC); with them
    it runs, and the HTP simulation follows it: the mixed op's output within a step, the Conv after it
    within 2 steps of 16 bits where the mixed op's output is 16-bit."""
    model, targets, acts, params = _mixed(op, x_bits, d_bits, per_channel)
    with pytest.raises(OnnxSnpeError, match="rejected"):
        HtpSession(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]})
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.output_names == ["d", "y"]
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["d", "y"])
    for seed in range(3):
        sample = _sample(acts["x"], seed)
        (d, y), (htp_d, htp_y) = simulate(sample), htp.run(sample)
        steps = np.abs(d - htp_d) / np.float32(acts["d"].scale)
        assert steps.max() <= 1.01
        if not (op == "Div" and d_bits == 16):  # the 16-bit Div is float in the simulation: 15% one step off
            assert np.mean(steps > 0.5) < 0.02
        if d_bits == 16:
            assert (np.abs(y - htp_y) / np.float32(acts["y"].scale)).max() <= 2


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("x_bits, d_bits", [(8, 16), (16, 8)])
def test_the_htp_runs_a_mixed_sqrt_only_with_its_8_bit_side_converted(monkeypatch, x_bits, d_bits) -> None:
    """PP-OCRv4 rec's Sqrt under automatic mixed precision (tools/probe_mixed.py)."""
    model, targets, acts, params = _mixed("Sqrt", x_bits, d_bits)
    with pytest.raises(OnnxSnpeError, match="rejected"):
        HtpSession(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]})
    HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})


def _linear_chain():
    """x (8-bit) -> 1x1 Conv -> a (16-bit) -> 1x1 Conv -> y (8-bit): each Conv's input and output differ."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.3, name)
             for name in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), "a": asymmetric_encoding(-3.0, 4.0, 16),
            "y": asymmetric_encoding(-5.0, 5.0, 8)}
    return model, targets, acts, weight_encodings(model, targets, 8)


def test_a_conv_between_bitwidths_computes_at_16_bits() -> None:
    model, targets, acts, _ = _linear_chain()
    assert widened_inputs(model.graph, targets, acts) == {"a": {0: same_grid_wider(acts["x"], 16)}}
    assert widened_outputs(model.graph, targets, acts) == {"y": same_grid_wider(acts["y"], 16)}


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_the_htp_computes_no_conv_in_float_once_converted(monkeypatch) -> None:
    """Written as they are, both Convs are float islands on the HTP (tools/HTP.md finding 32); converted,
    none is, and the simulation follows the HTP (A16W8 kernels and the narrowing)."""
    model, targets, acts, params = _linear_chain()
    unconverted = HtpSession(_unconverted(monkeypatch, model, targets, acts, params), {"x": acts["x"]})
    assert [op for op, _ in unconverted.float_nodes] == ["Conv2d"] * 2
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.float_nodes == []
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(3):
        sample = _sample(acts["x"], seed)
        np.testing.assert_array_equal(simulate(sample)[0], htp.run(sample)[0])


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_a_conv_with_a_squashed_clip_into_8_bits_is_narrowed_after_its_clamp() -> None:
    """x (16-bit) -> Conv -> Clip(0, 6) -> y (8-bit), the Clip squashed into the Conv: the HTP runs the
    Conv and its clamp at 16 bits and converts after (EfficientNet-Lite0's conv_head under auto
    precision: 145 of 62,720 values a step off when simulated as one 16 -> 8-bit rounding)."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    graph = helper.make_graph(nodes, "clipped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    assert targets.squashed == {"c": "y"}
    acts = {"x": asymmetric_encoding(-2.0, 3.0, 16), "y": asymmetric_encoding(0.0, 6.0, 8)}
    params = weight_encodings(model, targets, 8)
    assert widened_outputs(model.graph, targets, acts) == {"y": same_grid_wider(acts["y"], 16)}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.float_nodes == []
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(3):
        sample = {"x": dequantize(quantize(np.random.default_rng(seed).uniform(-2, 3, SHAPE).astype(np.float32),
                                           acts["x"]), acts["x"])}
        np.testing.assert_array_equal(simulate(sample)[0], htp.run(sample)[0])
