"""The 16-bit Mul of two activations, or of one and a constant, in the HTP simulation (simulate/htp/mul16.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.htp.mul16 import mul16_constants
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
SHAPE = [1, 4, 64, 64]


def _mul_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "mul16",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def _case(seed: int, out_span: float):
    """Random 16-bit codes of a and b, and an output range ``out_span`` times the products' (a small
    span makes the multiplier large)."""
    rng = np.random.default_rng(seed)
    ea = asymmetric_encoding(-rng.uniform(0, 5), rng.uniform(0.1, 5), 16)
    eb = asymmetric_encoding(-rng.uniform(0, 3), rng.uniform(0.1, 3), 16)
    qa, qb = rng.integers(0, 65536, size=SHAPE), rng.integers(0, 65536, size=SHAPE)
    a = ((qa + ea.offset) * np.float32(ea.scale)).astype(np.float32)
    b = ((qb + eb.offset) * np.float32(eb.scale)).astype(np.float32)
    y = a * b
    ey = asymmetric_encoding(float(y.min()) * out_span, float(y.max()) * out_span, 16)
    return {"a": ea, "b": eb, "y": ey}, {"a": a, "b": b}, (qa, qb)


def _reference_codes(acts, codes) -> np.ndarray:
    """The module docstring's recipe in Python integers, element by element."""
    f32 = np.float32
    ea, eb, ey = acts["a"], acts["b"], acts["y"]
    multiplier = float(f32(f32(f32(ea.scale) * f32(eb.scale)) / f32(ey.scale)))
    shift = max(0, math.floor(math.log2(multiplier)) + 4)
    m = int(np.rint(multiplier * 2.0 ** (34 - shift)))
    z_a, z_b, z_y = -ea.offset, -eb.offset, -ey.offset
    n = 2**16 + 65535 * (z_a + z_b) - 2 * z_a * z_b
    r = (n * m + 2**30) // 2**31
    out = [min(65535, max(0, z_y + (((int(qa) - z_a) * (int(qb) - z_b) + n) * m - r * 2**31 + 2**33) // 2**34
                                 * 2**shift)) for qa, qb in zip(codes[0].ravel()[:4096], codes[1].ravel()[:4096],
                                                                strict=True)]
    return np.array(out)


def _simulated(acts, feed, arch="73") -> np.ndarray:
    model = _mul_model()
    simulation, outputs = htp_simulation_model(model, find_targets(model), acts, {}, arch)
    return make_session(simulation, [outputs["y"]]).run([outputs["y"]], feed)[0]


@pytest.mark.parametrize("seed, out_span", [(0, 1.0), (1, 0.4), (2, 0.01)])
def test_the_16_bit_mul_computes_the_documented_recipe(seed: int, out_span: float) -> None:
    """Against Python integers."""
    acts, feed, codes = _case(seed, out_span)
    assert mul16_constants((acts["a"].scale, acts["b"].scale), (-acts["a"].offset, -acts["b"].offset),
                           acts["y"].scale) is not None  # lowered, not the float fallback
    y = _simulated(acts, feed)
    simulated = np.round(y.astype(np.float64).ravel()[:4096] / np.float32(acts["y"].scale)) - acts["y"].offset
    np.testing.assert_array_equal(simulated, _reference_codes(acts, codes))


def test_a_16_bit_mul_whose_products_would_leave_int64_keeps_the_float_computation() -> None:
    """A multiplier of 1/32 or more (an output range thousands of times narrower than the products'):
    (c_a c_b + N) m passes 2^62."""
    acts, _, _ = _case(5, 1e-4)
    assert mul16_constants((acts["a"].scale, acts["b"].scale), (-acts["a"].offset, -acts["b"].offset),
                           acts["y"].scale) is None


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("arch", ["73", None])
def test_the_htp_16_bit_mul_is_reproduced_bit_for_bit(arch: str | None) -> None:
    """Exact rounding was 0.6-8% of codes off on the helper's probes (tools/HTP.md finding 31)."""
    for seed, out_span in ((3, 1.0), (4, 0.5)):
        acts, feed, _ = _case(seed, out_span)
        model = _mul_model()
        htp = HtpSession(build_qdq_model(model, find_targets(model), acts, {}), {"a": acts["a"], "b": acts["b"]}, arch)
        np.testing.assert_array_equal(_simulated(acts, feed, arch), htp.run(feed)[0])


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("constant_shape, constant_first", [([64], False), ([1, 4, 1, 1], True), ([4, 64, 64], False)])
def test_the_htp_16_bit_mul_by_a_16_bit_constant_is_reproduced_bit_for_bit(constant_shape, constant_first) -> None:
    """The same recipe with the constant's codes (tools/HTP.md finding 60; the float computation was
    10-232 of 4,800 codes off on such probes)."""
    rng = np.random.default_rng(9)
    constant = (rng.uniform(0.3, 1.6, constant_shape) * rng.choice([-1.0, 1.0], constant_shape)).astype(np.float32)
    inputs = ["c", "a"] if constant_first else ["a", "c"]
    graph = helper.make_graph([helper.make_node("Mul", inputs, ["y"])], "mul16c",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
                              [onnx.numpy_helper.from_array(constant, "c")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    ea = asymmetric_encoding(-2.5, 3.0, 16)
    ec = asymmetric_encoding(min(float(constant.min()), 0.0), max(float(constant.max()), 0.0), 16)
    acts = {"a": ea, "y": asymmetric_encoding(-4.0, 4.5, 16)}
    a = ((rng.integers(0, 65536, size=SHAPE) + ea.offset) * np.float32(ea.scale)).astype(np.float32)
    targets = find_targets(model)
    simulation, outputs = htp_simulation_model(model, targets, acts, {"c": ec})
    htp = HtpSession(build_qdq_model(model, targets, acts, {"c": ec}), {"a": ea})
    np.testing.assert_array_equal(make_session(simulation, [outputs["y"]]).run([outputs["y"]], {"a": a})[0],
                                  htp.run({"a": a})[0])
