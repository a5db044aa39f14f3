"""The in-graph fake quantization equals the numpy reference bit for bit."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding, fake_quantize
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.report.metrics import OutputComparison
from onnxsnpe.simulate.fake_quant import build_simulation_model, fake_quant_nodes


def _fq_session(enc, rounding="half_away"):
    nodes, inits = fake_quant_nodes("x", enc, "y", rounding=rounding)
    graph = helper.make_graph(
        nodes, "fq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits,
    )
    return make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("bitwidth", [8, 16])
def test_graph_fake_quant_matches_numpy_on_ties_and_edges(bitwidth):
    enc = asymmetric_encoding(-1.8, 0.5, bitwidth)
    steps = np.arange(-(2**bitwidth) - 10, 10, dtype=np.float64)
    # exact ties k + 0.5 steps, values just either side, and far outside the range
    x = np.concatenate([(steps + 0.5) * enc.scale, (steps + 0.4999999) * enc.scale, steps * enc.scale,
                        [np.nextafter(np.float32(0.5), 0) * enc.scale, -100.0, 100.0, 0.0, -0.0]])
    x = x.astype(np.float32)
    got = _fq_session(enc).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, fake_quantize(x, enc))


def test_graph_fake_quant_rounds_ties_to_even_when_asked():
    """rounding="half_even" (the HTP's scalar Add and Sub): ties to the even code, within the clamp;
    elsewhere the same as rounding half away from zero."""
    enc = Encoding(8, 2**-6, -128)  # a power-of-two step: k + 1/2 steps are exact ties in float32
    steps = np.arange(-140, 140, dtype=np.float64)
    ties = ((steps + 0.5) * enc.scale).astype(np.float32)
    got = _fq_session(enc, "half_even").run(None, {"x": ties})[0] / np.float32(enc.scale)
    np.testing.assert_array_equal(got, np.clip(np.rint(steps + 0.5), -128, 127))
    assert (got % 2 == 0).sum() >= 250  # all even but the clamped ends
    off_tie = ((steps + 0.3) * enc.scale).astype(np.float32)
    np.testing.assert_array_equal(_fq_session(enc, "half_even").run(None, {"x": off_tie})[0],
                                  fake_quantize(off_tie, enc))


@settings(max_examples=30, deadline=None)
@given(st.floats(-50, 0), st.floats(0, 50), st.sampled_from([8, 16]), st.integers(0, 2**31))
def test_graph_fake_quant_matches_numpy_random(lo, hi, bitwidth, seed):
    enc = asymmetric_encoding(lo, hi, bitwidth)
    x = np.random.default_rng(seed).normal(scale=max(hi - lo, 0.01), size=2000).astype(np.float32)
    np.testing.assert_array_equal(_fq_session(enc).run(None, {"x": x})[0], fake_quantize(x, enc))


def test_simulation_with_only_input_quantized_equals_numpy(tiny_model):
    """Quantizing only the graph input must equal running FP32 on numpy fake-quantized input."""
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    enc = asymmetric_encoding(-1.0, 1.5, 8)
    sim, output_map = build_simulation_model(deploy, targets, {"x": enc}, {}, ["x"])
    x = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)
    got = make_session(sim).run([output_map["out"]], {"x": x})[0]
    expected = make_session(deploy).run(["out"], {"x": fake_quantize(x, enc)})[0]
    np.testing.assert_array_equal(got, expected)


def test_identical_outputs_report_null_sqnr():
    comparison = OutputComparison("y")
    comparison.update(np.ones(4), np.ones(4))
    assert comparison.to_dict()["sqnr_db"] is None and comparison.max_abs_error == 0.0


def test_simulated_model_is_valid_onnx(tiny_model):
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    encs = {name: asymmetric_encoding(-3, 3, 8) for name in targets.activations}
    sim, _ = build_simulation_model(deploy, targets, encs, {})
    onnx.checker.check_model(sim)
