"""A MatMul by a constant 8-bit weight with 16-bit activations runs on the HTP as the A16W8 Gemm does
(simulate/htp/wide.py; tools/HTP.md finding 42)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import asymmetric_encoding, fake_quantize
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
ROWS, FEATURES, OUTPUTS = 16, 64, 48
"""A transformer's projection: [1, rows, features] times a [features, outputs] weight."""


def _matmul_model(seed: int) -> onnx.ModelProto:
    weight = np.random.default_rng(seed).normal(0.0, 0.1, (FEATURES, OUTPUTS)).astype(np.float32)
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "projection",
                              [value("x", TensorProto.FLOAT, [1, ROWS, FEATURES])],
                              [value("y", TensorProto.FLOAT, [1, ROWS, OUTPUTS])],
                              [numpy_helper.from_array(weight, "w")])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize(("per_channel", "arch"), [(True, None), (True, "73"), (False, "73")])
def test_the_htp_a16w8_matmul_is_reproduced_bit_for_bit(per_channel: bool, arch: str | None) -> None:
    """Bit for bit on v68 and v73 (MiniLM-L6's 36 projections at A16 per channel: 0 of 1,306,368
    values off; exact float rounding, as simulated before, missed 424,489 of them)."""
    model = _matmul_model(3)
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-2.0, 3.0, 16), "y": asymmetric_encoding(-4.0, 5.0, 16)}
    params = weight_encodings(model, targets, 8, per_channel=per_channel)
    rng = np.random.default_rng(7)
    x = fake_quantize(rng.uniform(-2.0, 3.0, (1, ROWS, FEATURES)).astype(np.float32), acts["x"])
    on_htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch).run({"x": x})[0]
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params, arch), ["y"])({"x": x})[0]
    exact = simulation_runner(*build_simulation_model(model, targets, acts, params), ["y"])({"x": x})[0]
    np.testing.assert_array_equal(modeled, on_htp)
    assert np.mean(exact != on_htp) > 0.05
