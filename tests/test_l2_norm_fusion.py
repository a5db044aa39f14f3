"""A written-out L2 normalization is one LpNormalization, as QAIRT's converter fuses it into L2Norm
(graph/fusions.py, tools/HTP.md finding 41)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.encoding import asymmetric_encoding, fake_quantize
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.fusions import find_fusions
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, cpu_runner, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.l2_norm import float16_rows
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
ROWS, FEATURES = 8, 384
"""MiniLM-L6's sentence embedding is [1, 384]; rows make more samples per run."""


def _l2_model(floor: str = "clip", expand: bool = True, opset: int = 17, divide_first: bool = True,
              clip_max: bool = False, keepdims: int = 1, axes: tuple[int, ...] = (-1,),
              rows: int = ROWS) -> onnx.ModelProto:
    """x [ROWS, FEATURES] -> ReduceL2 -> Clip(min 1e-12) | Add(1e-12) | nothing -> [Expand(Shape)]
    -> Div(x, .), as torch's F.normalize exports it with the defaults."""
    inits = [numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
             numpy_helper.from_array(np.array(1e6, np.float32), "big")]
    reduce_axes = {"axes": list(axes)} if opset < 18 else {}
    reduce_inputs = ["x"] if opset < 18 else ["x", "axes"]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
    nodes = [helper.make_node("ReduceL2", reduce_inputs, ["norm"], keepdims=keepdims, **reduce_axes)]
    last = "norm"
    if floor == "clip":
        nodes.append(helper.make_node("Clip", ["norm", "eps", "big" if clip_max else ""], ["floored"]))
        last = "floored"
    elif floor == "add":
        nodes.append(helper.make_node("Add", ["norm", "eps"], ["floored"]))
        last = "floored"
    if expand:
        nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Expand", [last, "shape"], ["expanded"])]
        last = "expanded"
    nodes.append(helper.make_node("Div", ["x", last] if divide_first else [last, "x"], ["y"]))
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "l2", [value("x", TensorProto.FLOAT, [rows, FEATURES])],
                              [value("y", TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _encoded(model: onnx.ModelProto, bitwidth: int = 8):
    targets = find_targets(model)
    ranges = {"x": (-4.0, 4.0), "y": (-0.25, 0.25)}
    acts = {name: asymmetric_encoding(*ranges.get(name, (0.0, 60.0)), bitwidth) for name in targets.activations}
    done = completed_encodings(model, targets, acts, weight_encodings(model, targets, 8))
    return targets, done.activations, {**done.weights, **done.constants, **done.biases}


def _sample(seed: int, rows: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.normal(0, 1, (rows, FEATURES)) * rng.uniform(0.3, 1.5, (rows, 1))).astype(np.float32)}


@pytest.mark.parametrize("variant", [{}, {"floor": "add"}, {"floor": "add", "expand": False},
                                     {"floor": "none", "expand": False}, {"opset": 18}])
def test_a_written_out_l2_normalization_is_found_and_its_inner_tensors_get_no_encoding(variant) -> None:
    model = _l2_model(**variant)
    fusion = find_fusions(model)["y"]
    assert (fusion.op_type, fusion.input, dict(fusion.attributes)) == ("LpNormalization", "x", {"axis": -1, "p": 2})
    targets, _, params = _encoded(model)
    assert targets.activations == ["x", "y"]
    assert params == {}  # epsilon is the fused op's, not the device's


@pytest.mark.parametrize("variant", [{"clip_max": True}, {"keepdims": 0, "expand": False, "floor": "none"},
                                     {"axes": (0, 1)}, {"divide_first": False}, {"floor": "none"}])
def test_what_the_converter_does_not_fuse_keeps_every_op(variant) -> None:
    """A Clip with a max, no keepdims, two axes, the norm divided by x, and an Expand straight after
    the ReduceL2 (none of QAIRT's four sequences)."""
    model = _l2_model(**variant)
    assert find_fusions(model) == {}
    assert "norm" in find_targets(model).activations


def test_the_qdq_export_writes_one_lp_normalization_that_computes_what_the_simulation_does() -> None:
    model = _l2_model()
    targets, acts, params = _encoded(model)
    qdq = build_qdq_model(model, targets, acts, params)
    ops = [node.op_type for node in qdq.graph.node]
    assert ops.count("LpNormalization") == 1
    assert not {"ReduceL2", "Clip", "Expand", "Shape", "Div"} & set(ops)
    exact = simulation_runner(*build_simulation_model(model, targets, acts, params), ["y"])
    cpu = cpu_runner(qdq, {"x": acts["x"]}, ["y"])
    for seed in range(2):
        np.testing.assert_allclose(cpu(_sample(seed))[0], exact(_sample(seed))[0], atol=acts["y"].scale * 1.01)


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
@pytest.mark.parametrize(("bitwidth", "rows"), [(8, 1), (8, ROWS), (8, 64), (16, ROWS)])
def test_the_htp_runs_the_fused_l2_normalization_quantized_as_simulated(bitwidth: int, rows: int) -> None:
    """Written out with its inner tensors quantized, the emulator refuses this graph at 8 and 16 bits
    (QNN_COMMON_ERROR_MEM_ALLOC; MiniLM-L6's at 16); fused it runs at both, nothing in float or on
    the CPU. At 8 bits bit for bit, in rows that round through float16 (1 and 8 rows: MiniLM-L6's
    [1, 384]) and rows that do not (64); at 16 bits within a step (the HTP's float32 reciprocal
    square root is a few units off the model's in some rows), and exact rounding misses 20-50%
    of the codes."""
    model = _l2_model(rows=rows)
    targets, acts, params = _encoded(model, bitwidth)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    assert htp.float_nodes == [] and not htp.cpu_nodes
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    exact = simulation_runner(*build_simulation_model(model, targets, acts, params), ["y"])
    for seed in range(2):
        sample = _sample(seed, rows)
        on_htp, simulated = htp.run(sample)[0], simulate(sample)[0]
        steps = np.abs(simulated - on_htp) / acts["y"].scale
        if bitwidth == 8:
            np.testing.assert_array_equal(simulated, on_htp)
        else:
            assert steps.max() <= 1.01 and (steps > 0.5).mean() < 0.002
        assert (np.abs(exact(sample)[0] - on_htp) / acts["y"].scale > 0.5).mean() > 0.15


@pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")
def test_a_16_bit_l2_normalization_below_its_range_comes_out_at_the_top_as_simulated() -> None:
    """The HTP's 16-bit L2Norm writes a value below its output range as the largest code (as MiniLM-L6
    meets on a held-out sentence); the simulation does too, and agrees within a step elsewhere."""
    model = _l2_model()
    targets, acts, params = _encoded(model, 16)
    acts["y"] = asymmetric_encoding(-0.02, 0.25, 16)
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
    simulate = simulation_runner(*htp_simulation_model(model, targets, acts, params), ["y"])
    x = fake_quantize(_sample(0)["x"], acts["x"]).astype(np.float64)
    below = np.floor(x / np.linalg.norm(x, axis=-1, keepdims=True) / acts["y"].scale - acts["y"].offset + 0.5) < 0
    on_htp, simulated = htp.run(_sample(0))[0], simulate(_sample(0))[0]
    assert 100 < below.sum() < below.size / 2
    top = np.float32((acts["y"].levels + acts["y"].offset) * np.float32(acts["y"].scale))
    assert np.all(on_htp[below] == top)
    np.testing.assert_array_equal(simulated[below], on_htp[below])
    assert (np.abs(simulated - on_htp) / acts["y"].scale).max() <= 1.01


def test_a_16_bit_l2_normalization_output_gets_the_range_minus_one_to_one() -> None:
    """So that no value falls below it on the device (the top-code wrap above); 8 bits saturate
    properly and keep the calibrated range, whose steps are finer."""
    model = _l2_model()
    _, eight, _ = _encoded(model, 8)
    _, sixteen, _ = _encoded(model, 16)
    assert (eight["y"].min, eight["y"].max) == pytest.approx((-0.25, 0.25), abs=0.002)
    assert sixteen["y"].min <= -1.0 and sixteen["y"].max == pytest.approx(1.0, abs=1e-4)
    assert sixteen["x"] == asymmetric_encoding(-4.0, 4.0, 16)


@pytest.mark.parametrize(("shape", "rounded"), [([1, 384], True), ([8, 384], True), ([64, 384], False),
                                                ([1, 128, 384], False), ([1, 100, 384], True),
                                                ([1, 12, 8, 384], [False] * 8 + [True] * 4)])
def test_which_rows_of_an_8_bit_l2_norm_round_through_float16(shape, rounded) -> None:
    """QNN's [B, H, W, N] view: whole blocks of 8 rows along H with W >= 8 keep float32, leftover rows
    only with W a multiple of 8 and at least 64 (the helper's ~90 probed shapes)."""
    rows = float16_rows(shape)
    assert rows.shape == (*shape[:-1], 1)
    if isinstance(rounded, bool):
        assert np.all(rows == rounded)
    else:  # per H row: H = 12 is one block of 8 and 4 left over, with W = 8 < 64
        assert np.all(rows == np.array(rounded)[None, :, None, None])
