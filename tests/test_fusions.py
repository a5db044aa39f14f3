"""A written-out GELU is one Gelu op, as SNPE's converter fuses it (graph/fusions.py, tools/HTP.md finding 37)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.fusions import find_fusions
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, cpu_runner, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
ROWS, FEATURES, OUT = 64, 1536, 16
"""MiniLM-L6's feed-forward shape: the HTP adds the written-out GELU's 1 to one channel in 192 here."""


def _gelu_model(one: float = 1.0, constant_first: bool = False, every_code: bool = False) -> onnx.ModelProto:
    """x -> written-out GELU (as BERT exports write it) -> MatMul; ``every_code``: a [1, 1, 65536] x and no MatMul."""
    rng = np.random.default_rng(0)
    scalars = {"sqrt2": math.sqrt(2), "one": one, "half": 0.5}
    inits = [numpy_helper.from_array(np.array(value, np.float32), name) for name, value in scalars.items()]
    inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (FEATURES, OUT)).astype(np.float32), "w"))
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["one", "erf"] if constant_first else ["erf", "one"], ["plus_one"]),
        helper.make_node("Mul", ["x", "plus_one"], ["times_x"]),
        helper.make_node("Mul", ["times_x", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w"], ["y"]),
    ]
    value = helper.make_tensor_value_info
    x, y = value("x", TensorProto.FLOAT, [1, ROWS, FEATURES]), value("y", TensorProto.FLOAT, [1, ROWS, OUT])
    if every_code:
        nodes, inits = nodes[:-1], inits[:-1]
        x, y = value("x", TensorProto.FLOAT, [1, 1, 65536]), value("gelu", TensorProto.FLOAT, [1, 1, 65536])
    graph = helper.make_graph(nodes, "gelu", [x], [y], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _encoded(model: onnx.ModelProto):
    targets = find_targets(model)
    ranges = {"x": (-4.0, 6.0), "gelu": (-0.2, 6.0), "y": (-3.0, 3.0), "scaled": (-3.0, 4.3), "erf": (-1.0, 1.0),
              "plus_one": (0.0, 2.0), "times_x": (-0.4, 12.0)}
    acts = {name: asymmetric_encoding(*ranges[name], 8) for name in targets.activations}
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8))
    return targets, done.activations, {**done.weights, **done.constants, **done.biases}


def _sample(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0.5, 1.5, (1, ROWS, FEATURES)).astype(np.float32)}


def test_a_written_out_gelu_is_found_and_its_inner_tensors_get_no_encoding() -> None:
    model = _gelu_model()
    fusion = find_fusions(model)["gelu"]
    assert (fusion.op_type, fusion.input, fusion.inner) == ("Gelu", "x", ("scaled", "erf", "plus_one", "times_x"))
    targets, _, params = _encoded(model)
    assert targets.activations == ["x", "gelu", "y"]
    assert set(params) == {"w"}  # sqrt 2, 1 and 1/2 are the fused op's, not the device's
    assert find_fusions(_gelu_model(constant_first=True))["gelu"].inner == fusion.inner
    assert find_fusions(_gelu_model(one=2.0)) == {}  # not a GELU: every op keeps its own encoding
    assert "erf" in find_targets(_gelu_model(one=2.0)).activations


def test_the_qdq_export_writes_one_gelu_that_computes_what_the_simulation_does() -> None:
    model = _gelu_model()
    targets, acts, params = _encoded(model)
    qdq = build_qdq_model(model, targets, acts, params)
    ops = [node.op_type for node in qdq.graph.node]
    assert ops.count("Gelu") == 1 and "Erf" not in ops and "Div" not in ops
    exact = simulation_runner(*build_simulation_model(model, targets, acts, params), ["y"])
    cpu = cpu_runner(qdq, {"x": acts["x"]}, ["y"])
    for seed in range(2):
        np.testing.assert_allclose(cpu(_sample(seed))[0], exact(_sample(seed))[0], atol=acts["y"].scale * 1.01)


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_the_htp_computes_the_fused_gelu_as_simulated() -> None:
    """Fused, bit for bit; written out with its inner tensors quantized, the HTP adds the 1 to one
    channel in 192 when a MatMul follows, so that most GELU outputs are wrong by many steps."""
    model = _gelu_model()
    targets, acts, params = _encoded(model)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.float_nodes == [] and not htp.cpu_nodes
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(2):
        np.testing.assert_array_equal(simulate(_sample(seed))[0], htp.run(_sample(seed))[0])
    steps = np.abs(_written_out(model).run(_sample(0))[0] - htp.run(_sample(0))[0]) / acts["y"].scale
    assert steps.max() > 5


def _written_out(model: onnx.ModelProto) -> HtpSession:
    """``model`` on the HTP with every op of its GELU quantized (as before the fusion)."""
    targets = find_targets(model)
    inner = targets.fusions.pop("gelu").inner
    targets.activations += list(inner)
    acts = _encoded(_gelu_model(one=2.0))[1]  # the same tensors, none fused
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8))
    params = {**done.weights, **done.constants, **done.biases}
    return HtpSession(build_qdq_model(model, targets, done.activations, params), {"x": acts["x"]})


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_a_fused_gelu_with_a_16_bit_output_reads_its_8_bit_input_converted() -> None:
    """As automatic mixed precision leaves it: the Gelu runs at 16 bits on its input converted to the
    same grid (encode/conversions.py), not as a float island. The 16-bit Gelu beyond |x| = 2 sqrt 2 is
    fitted, not decoded (finding 38: here 511 of 98,304 of its codes off), so the output is within 2 steps."""
    model = _gelu_model()
    targets, acts, params = _encoded(model)
    acts["gelu"] = asymmetric_encoding(-0.2, 6.0, 16)
    qdq = build_qdq_model(model, targets, acts, params)
    gelu = next(node for node in qdq.graph.node if node.op_type == "Gelu")
    assert gelu.input[0].endswith("/wide")
    htp = HtpSession(qdq, {"x": acts["x"]})
    assert htp.float_nodes == [] and not htp.cpu_nodes
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    steps = np.abs(simulate(_sample(0))[0] - htp.run(_sample(0))[0]) / acts["y"].scale
    assert steps.max() <= 2


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize(("x_step", "y_step", "y_zero", "most_off"), [(2e-5, 2e-5, 32768, 0), (1e-4, 6e-5, 3000, 0.03)])
def test_the_htp_16_bit_gelu_is_reproduced_in_its_decoded_segments(x_step, y_step, y_zero, most_off) -> None:
    """Every 16-bit input code: bit for bit while |x| < 2 sqrt 2 (the first probe stays there), within 3%
    of the codes beyond (segments 2 and 3 fitted, finding 38), where exact rounding misses most."""
    model = _gelu_model(every_code=True)
    targets = find_targets(model)
    acts = {"x": Encoding(bitwidth=16, scale=x_step, offset=-32768),
            "gelu": Encoding(bitwidth=16, scale=y_step, offset=-y_zero)}
    x = ((np.arange(65536) - 32768) * np.float32(x_step)).astype(np.float32).reshape(1, 1, -1)
    expected = HtpSession(build_qdq_model(model, targets, acts, {}), {}).run({"x": x})[0]
    got = simulation_runner(*htp_simulation_model(model, targets, acts, {}), ["gelu"])({"x": x})[0]
    exact = simulation_runner(*build_simulation_model(model, targets, acts, {}), ["gelu"])({"x": x})[0]
    assert (got != expected).mean() <= most_off
    assert (exact != expected).mean() > 0.5
