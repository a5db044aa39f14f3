"""The HTP simulation's shortcuts between lowered ops give the numbers of the long way round.

A Relu/Clip squashed into a lowered op becomes a narrower clamp of its codes (simulate/htp/squash.py)
and a lowered op reads its producer's codes, through a Pad, instead of deriving them again
(simulate/htp/code_passing.py). The reference is the same function built so that neither shortcut
applies: an Identity between the activation and the Pad hides the codes, and the squashed
activations become graph outputs, so they are fake-quantized on their own.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.fake_quant import fake_quant_nodes
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.htp.squash import code_bounds

from .conftest import minmax_encodings


def _chain_model(activation: str, shortcuts: bool) -> onnx.ModelProto:
    """x -> Conv -> activation -> Pad -> depthwise Conv -> Relu -> Conv -> y. Without ``shortcuts``
    an Identity sits before the Pad and the two squashed tensors are graph outputs too."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "low"),
        numpy_helper.from_array(np.array(2.5, dtype=np.float32), "high"),
        numpy_helper.from_array(np.array(0.3, dtype=np.float32), "pad_value"),  # off the grid
    ]
    bounds = ["low", "high"] if activation == "Clip" else []
    padded = "a" if shortcuts else "a_copy"
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c1", *bounds], ["a"]),
        *([] if shortcuts else [helper.make_node("Identity", ["a"], ["a_copy"])]),
        helper.make_node("Pad", [padded, "pads", "pad_value"], ["p"]),
        helper.make_node("Conv", ["p", "w2"], ["c2"], group=8),
        helper.make_node("Relu", ["c2"], ["r"]),
        helper.make_node("Conv", ["r", "w3"], ["y"]),
    ]
    outputs = ["y"] if shortcuts else ["y", "c1", "c2"]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("activation", ["Clip", "Relu"])
def test_shortcuts_between_lowered_ops_give_the_same_numbers(activation: str) -> None:
    """The activations' encodings reach beyond their bounds (as a user's or another method's may), so
    the narrowed clamp does the Relu/Clip's work."""
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(1, 3, 10, 10)).astype(np.float32)} for _ in range(3)]
    fast, slow = _chain_model(activation, True), _chain_model(activation, False)
    targets, _, acts, params = minmax_encodings(fast, samples)
    wider = {"a": asymmetric_encoding(-1.0, 4.0, 8), "r": asymmetric_encoding(-0.7, acts["r"].max + 1.0, 8)}
    acts = {name: wider.get(targets.root(name), enc) for name, enc in acts.items()}
    slow_targets = find_targets(slow)
    assert "c1" in targets.squashed and "c1" not in slow_targets.squashed
    slow_acts = {**acts, "a_copy": acts["a"], "c1": acts["a"], "c2": acts["r"]}  # the encodings SNPE would use
    sim, output_map = htp_simulation_model(fast, targets, acts, params)
    kinds = [node.op_type for node in sim.graph.node]
    names = {name for node in sim.graph.node for name in [*node.input, *node.output]}
    assert not names & {"c1", "c2", "p"}  # both activations absorbed, the float Pad gone
    assert kinds.count("Round") == 1 and kinds.count("Pad") == 1  # the input's codes only; the Pad pads codes
    fast_run = _runner(sim, output_map, ["y", "a", "r"])
    slow_run = _runner(*htp_simulation_model(slow, slow_targets, slow_acts, params), ["y", "a", "r"])
    for sample in samples:
        for got, expected in zip(fast_run(sample), slow_run(sample), strict=True):
            np.testing.assert_array_equal(got, expected)


def _runner(model: onnx.ModelProto, output_map: dict[str, str], names: list[str]):
    """Run ``model`` for the simulated values of ``names`` (intermediate tensors exposed)."""
    mapped = [output_map[name] for name in names]
    session = make_session(model, mapped)
    return lambda sample: session.run(mapped, sample)


def _fake_quantized_ties_up(values: np.ndarray, enc: Encoding) -> np.ndarray:
    """fake_quant_nodes(rounding="half_up") run by onnxruntime: what the squashed activation's output got."""
    nodes, inits = fake_quant_nodes("v", enc, "q", rounding="half_up")
    graph = helper.make_graph(nodes, "fq", [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"v": values})[0]


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1.0), offset=st.integers(-255, 0),
       lo=st.one_of(st.just(-np.inf), st.floats(-300.0, 300.0)), width=st.floats(0.0, 600.0))
def test_clamping_codes_equals_fake_quantizing_the_clipped_grid(scale, offset, lo, width) -> None:
    """g(clamp(x, lo, hi)) = clamp(x, g(lo), g(hi)) for every on-grid x, g the fake quantization."""
    enc = Encoding(8, scale, offset)
    hi = np.inf if np.isinf(lo) else lo + width
    codes = np.arange(offset, offset + 256, dtype=np.float32)
    grid = (codes * np.float32(enc.scale)).astype(np.float32)
    expected = _fake_quantized_ties_up(np.clip(grid, np.float32(lo), np.float32(hi)), enc)
    low, high = code_bounds(enc, lo, hi)
    got = (np.clip(codes, low, high) * np.float32(enc.scale)).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("activation", ["Clip", "Relu"])
def test_an_activation_squashed_into_an_add_is_its_uncentered_clamp(activation: str) -> None:
    """The fixed-point Add ends on uncentered codes (codes.with_output_codes): the narrowed clamp is
    shifted by the zero point. Against the same Add with its output a graph output (not squashed)."""
    shape = [1, 2, 16, 16]
    bounds = [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for v, n in ((-0.5, "low"), (1.5, "high"))]

    def model(squashed: bool) -> onnx.ModelProto:
        nodes = [helper.make_node("Add", ["u", "v"], ["s"]),
                 helper.make_node(activation, ["s", "low", "high"] if activation == "Clip" else ["s"], ["y"])]
        outputs = ["y"] if squashed else ["y", "s"]
        graph = helper.make_graph(nodes, "add", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                                 for n in ("u", "v")],
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                                  bounds if activation == "Clip" else [])
        built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        built.ir_version = 8
        return onnx.shape_inference.infer_shapes(built)

    wide = asymmetric_encoding(-2.0, 3.0, 8)  # beyond both bounds
    acts = {"u": asymmetric_encoding(-1.0, 2.0, 8), "v": asymmetric_encoding(-1.5, 1.0, 8), "y": wide}
    rng = np.random.default_rng(2)
    sample = {n: (rng.integers(0, 256, size=shape) + acts[n].offset).astype(np.float32) * np.float32(acts[n].scale)
              for n in ("u", "v")}
    fast, slow = model(True), model(False)
    assert "s" in find_targets(fast).squashed
    fast_sim, fast_map = htp_simulation_model(fast, find_targets(fast), acts, {})
    assert "s" not in {name for node in fast_sim.graph.node for name in [*node.input, *node.output]}  # absorbed
    got = _runner(fast_sim, fast_map, ["y"])(sample)[0]
    want = _runner(*htp_simulation_model(slow, find_targets(slow), {**acts, "s": wide}, {}), ["y"])(sample)[0]
    np.testing.assert_array_equal(got, want)
    low, high = (0.0, np.inf) if activation == "Relu" else (-0.5, 1.5)
    assert got.min() >= low - wide.scale and got.max() <= high + wide.scale  # the bounds did act
