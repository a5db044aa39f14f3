"""LayerNormalization on the HTP: how it is quantized to run there, and its arithmetic (tools/HTP.md finding 36)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import A16W16_ARCH, HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
FEATURES = 48


def _layer_norm(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.uniform(0.3, 1.7, FEATURES).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, FEATURES).astype(np.float32), "beta")]
    node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)
    graph = helper.make_graph([node], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, FEATURES])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, FEATURES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _encoded(bitwidth: int):
    model = _layer_norm()
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-3.0, 5.0, bitwidth), "y": asymmetric_encoding(-4.0, 4.0, bitwidth)}
    return model, targets, completed_encodings(model, targets, acts, {})


@pytest.mark.parametrize("bitwidth", [8, 16])
def test_a_layer_norm_bias_is_a_32_bit_bias_at_its_input_step_times_its_gammas(bitwidth: int) -> None:
    """onnxruntime-qnn groups DQ(x), DQ(gamma), DQ(beta) -> LayerNorm -> Q only with an int32 beta and a gamma
    of x's type (8 bits) or signed symmetric (16 bits), as ExecuTorch's Qualcomm quantizer annotates it."""
    _, targets, done = _encoded(bitwidth)
    assert [(b.bias, b.weight, b.input) for b in targets.biases] == [("beta", "gamma", "x")]
    gamma, beta = done.constants["gamma"], done.biases["beta"]
    assert gamma.bitwidth == bitwidth and gamma.is_symmetric == (bitwidth == 16)
    assert beta.bitwidth == 32 and beta.is_symmetric
    assert beta.scale == pytest.approx(done.activations["x"].scale * gamma.scale, rel=1e-12)


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize("bitwidth", [8, 16])
def test_the_htp_computes_the_layer_norm_quantized(bitwidth: int) -> None:
    """Not in float (8 bits: it was, with an 8-bit beta) and not on the CPU (16 bits: it was, with an
    asymmetric gamma); a 16-bit gamma asks for v73, as a 16-bit weight does (v68 refuses it)."""
    model, targets, done = _encoded(bitwidth)
    params = {**done.constants, **done.biases}
    htp = HtpSession(build_qdq_model(model, targets, done.activations, params), {"x": done.activations["x"]})
    assert htp.float_nodes == []
    assert not [op for op, _ in htp.cpu_nodes or [] if op == "LayerNormalization"]
    assert htp.arch == (A16W16_ARCH if bitwidth == 16 else None)
