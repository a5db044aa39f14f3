"""An Add or Sub of a constant that quantizes to zero keeps its input's encoding (encode/zero_constants.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.encode.zero_constants import with_zero_sums_sharing_encodings
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
needs_qnn = pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")

X = asymmetric_encoding(-1.0, 2.0, 8)
A = asymmetric_encoding(-1.5, 3.2, 8)  # what min-max gives the Add's output: another grid
Y = asymmetric_encoding(-2.0, 2.5, 8)


def _add_then_conv(op: str, constant: float, consumer: str = "Conv") -> onnx.ModelProto:
    """x -> op(x, constant) -> a -> Reshape (an alias of a) -> consumer -> y, 8 channels of 16 x 16."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.array([constant], dtype=np.float32), "c"),
             numpy_helper.from_array(np.array([1, 8, 16, 16], dtype=np.int64), "shape"),
             numpy_helper.from_array((rng.normal(size=(8, 8, 1, 1)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.normal(size=8) * 0.1).astype(np.float32), "b")]
    last = (helper.make_node("Conv", ["r", "w", "b"], ["y"]) if consumer == "Conv"
            else helper.make_node("Relu", ["r"], ["y"]))
    nodes = [helper.make_node(op, ["x", "c"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["r"]), last]
    graph = helper.make_graph(nodes, "zero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _encodings(model: onnx.ModelProto) -> tuple[dict[str, Encoding], dict]:
    targets = find_targets(model)
    acts = {"x": X, "a": A, "r": A, "y": Y}
    weights = weight_encodings(model, targets, 8)
    return acts, {**weights, **constant_encodings(model, targets, weights, 8, acts)}


@pytest.mark.parametrize("op", ["Add", "Sub"])
@pytest.mark.parametrize("constant", [0.0, 1e-7, -1e-7])
def test_a_constant_that_quantizes_to_zero_shares_the_input_encoding(op, constant):
    """1e-7 rounds to code 0 on its own grid (at least 0.01 / 255 wide): x + 0 stays on x's grid,
    and so does the Reshape that aliases it."""
    model = _add_then_conv(op, constant)
    acts, params = _encodings(model)
    shared = with_zero_sums_sharing_encodings(model, find_targets(model), acts, params)
    assert shared["a"] == X and shared["r"] == X
    assert shared["x"] == X and shared["y"] == Y


@pytest.mark.parametrize("constant", [2e-3, -0.3])
def test_a_constant_off_zero_keeps_the_output_encoding(constant):
    model = _add_then_conv("Add", constant)
    acts, params = _encodings(model)
    assert with_zero_sums_sharing_encodings(model, find_targets(model), acts, params) == acts


def test_an_output_of_another_bitwidth_or_a_squashed_one_keeps_its_encoding():
    model = _add_then_conv("Add", 0.0)
    acts, params = _encodings(model)
    wide = {**acts, "a": asymmetric_encoding(-1.5, 3.2, 16), "r": asymmetric_encoding(-1.5, 3.2, 16)}
    assert with_zero_sums_sharing_encodings(model, find_targets(model), wide, params) == wide
    squashed = _add_then_conv("Add", 0.0, consumer="Relu")
    targets = find_targets(squashed)
    targets.squashed["a"] = "y"  # as if a Relu were squashed into the Add
    acts = {"x": X, "a": A, "r": A, "y": Y}
    assert with_zero_sums_sharing_encodings(squashed, targets, acts, _encodings(squashed)[1]) == acts


@needs_qnn
@pytest.mark.parametrize("arch", [None, "73"])
def test_the_htp_reads_the_input_under_a_dropped_add_encoding_and_sharing_makes_it_exact(arch):
    """The HTP drops ``x + 0`` and its Conv reads x's codes as if they had the Add's encoding
    (tools/HTP.md finding 23): with the Add's own min-max encoding nearly every output differs
    from the simulation; with the shared one every output is bit for bit."""
    model = _add_then_conv("Add", 1e-7)
    targets = find_targets(model)
    acts, params = _encodings(model)
    rng = np.random.default_rng(0)
    sample = {"x": ((rng.integers(0, 256, size=(1, 8, 16, 16)) + X.offset) * np.float32(X.scale)).astype(np.float32)}
    differing = []
    for encodings in (acts, with_zero_sums_sharing_encodings(model, targets, acts, params)):
        full = {**params, **bias_encodings(model, targets, encodings, params, 32)}
        htp = HtpSession(build_qdq_model(model, targets, encodings, full), {}, arch).run(sample)[0]
        simulated = simulation_runner(*htp_simulation_model(model, targets, encodings, full, arch), ["y"])(sample)[0]
        differing.append(int((np.abs(simulated - htp) > Y.scale / 2).sum()))
    assert differing[0] > 1000 and differing[1] == 0
