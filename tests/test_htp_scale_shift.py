"""The Mul then Add of constant vectors the HTP fuses into a BatchNorm (simulate/htp/scale_shift.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.ranges import activation_encodings, weight_encodings
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model
from onnxsnpe.stats.collect import collect_statistics

QNN_REASON = qnn_unavailable_reason()
needs_qnn = pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")

CASES = {  # x shape, scale shape, shift shape, second op, constants first, the Mul's output also a graph output
    "fused: [C] and [C] over [1, T, C]": ([1, 256, 24], [24], [24], "Add", False, False),
    "fused: [1, 1, 1, C] over NCHW's last axis, the Mul exposed": ([1, 4, 64, 12], [1, 1, 1, 12], [12], "Add", False,
                                                                   True),
    "apart: a Sub": ([1, 256, 24], [24], [24], "Sub", False, False),
    "apart: constants first": ([1, 256, 24], [24], [24], "Add", True, False),
    "apart: [C, 1, 1] over NCHW channels": ([1, 12, 16, 16], [12, 1, 1], [12, 1, 1], "Add", False, False),
}


def _scale_shift_model(x_shape, scale_shape, shift_shape, op, constants_first, exposed):
    rng = np.random.default_rng(5)
    scale = (rng.uniform(0.3, 1.6, scale_shape) * rng.choice([-1.0, 1.0], scale_shape)).astype(np.float32)
    shift = rng.uniform(-0.6, 0.6, shift_shape).astype(np.float32)
    mul_inputs, add_inputs = (["a", "x"], ["b", "m"]) if constants_first else (["x", "a"], ["m", "b"])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["y", "m"][:1 + exposed]]
    graph = helper.make_graph(
        [helper.make_node("Mul", mul_inputs, ["m"]), helper.make_node(op, add_inputs, ["y"])], "scale_shift",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
        [numpy_helper.from_array(scale, "a"), numpy_helper.from_array(shift, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@needs_qnn
@pytest.mark.parametrize("case", list(CASES))
def test_htp_model_follows_the_htp_where_it_fuses_a_mul_and_add_and_where_it_does_not(case):
    """Every input code in each channel (the first 256 values along an axis before the last)."""
    model = _scale_shift_model(*CASES[case])
    shape = CASES[case][0]
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(0.0, 1.5, shape).astype(np.float32)} for _ in range(2)]
    targets = find_targets(model)
    stats = collect_statistics(model, targets.activations, samples)
    done = completed_encodings(model, targets, activation_encodings(stats, targets, "minmax", 8),
                               weight_encodings(model, targets, 8))
    acts, params = done.activations, {**done.weights, **done.biases, **done.constants}
    x_enc = acts["x"]
    codes = np.arange(int(np.prod(shape))).reshape(shape) % 256  # each code in every channel of the last axis
    x = ((codes + x_enc.offset) * np.float32(x_enc.scale)).astype(np.float32)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": x_enc}).run({"x": x})[0]
    modeled = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])({"x": x})[0]
    np.testing.assert_array_equal(modeled, htp)
