"""Graph shapes met on real models shipped in PyPI wheels (tools/wheel_models.py), on small generated graphs.

- khmersm's word segmenter: ``Shape`` with ``start``/``end`` (onnx-graphsurgeon folded it to the
  whole shape);
- Silero VAD: ``If`` nodes nested in the branches of an ``If`` on the sample rate (onnx-graphsurgeon's
  flattening lost a tensor), a state input whose first axis (2) is not a batch;
- ddddocr's common_old.onnx: a dynamically quantized model, and onnxruntime contrib ops.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize
from onnxsnpe.data.datasets import open_dataset
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.fixed_inputs import fix_inputs
from onnxsnpe.graph.load import model_inputs
from onnxsnpe.graph.runtime import make_session


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model).run(None, feed)


def _positions_model(start: int, end: int) -> onnx.ModelProto:
    """y = x + pe[:, :len] with len = Shape(x, start, end), as torch's dynamo exporter writes it."""
    pe = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(1, 10, 3), "pe")
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [
        helper.make_node("Shape", ["x"], ["length"], start=start, end=end),
        helper.make_node("Slice", ["pe", "zero", "length", "one"], ["positions"], name="node_slice_1"),
        helper.make_node("Add", ["x", "positions"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [pe, zero, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("start", "end"), [(1, 2), (-2, -1)])
def test_shape_with_start_and_end_folds_to_the_slice_it_means(start, end):
    model = _positions_model(start, end)
    deploy, _ = prepare_deploy_model(model, {"x": (1, 5, 3)})
    assert "Shape" not in {node.op_type for node in deploy.graph.node}
    x = np.random.default_rng(0).normal(size=(1, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(deploy, {"x": x})[0], _run(model, {"x": x})[0])


def _graph(name: str, nodes: list[onnx.NodeProto], outputs: list[str], inits=()) -> onnx.GraphProto:
    shapes = [[2, "b", 3] if o.endswith("state") else [1, "n"] for o in outputs]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape)
                                                for o, shape in zip(outputs, shapes, strict=True)], list(inits))


def _scaled(prefix: str, factor: float) -> onnx.GraphProto:
    const = numpy_helper.from_array(np.array(factor, np.float32), f"{prefix}_factor")
    return _graph(prefix, [helper.make_node("Mul", ["x", f"{prefix}_factor"], [f"{prefix}_out"])],
                  [f"{prefix}_out"], [const])


def _nested_if_model() -> onnx.ModelProto:
    """Silero's layout: If(sr == 16000) whose branches hold an If on a shape; two outputs (y, state)."""
    def rate_branch(prefix: str, width: int) -> onnx.GraphProto:
        inits = [numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis"),
                 numpy_helper.from_array(np.array([width], np.int64), f"{prefix}_width"),
                 numpy_helper.from_array(np.array(1.0, np.float32), f"{prefix}_one")]
        nodes = [
            helper.make_node("Shape", ["x"], [f"{prefix}_shape"]),
            helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_axis"], [f"{prefix}_len"]),
            helper.make_node("Equal", [f"{prefix}_len", f"{prefix}_width"], [f"{prefix}_eq"]),
            helper.make_node("Squeeze", [f"{prefix}_eq"], [f"{prefix}_cond"]),
            helper.make_node("If", [f"{prefix}_cond"], [f"{prefix}_inner"], name=f"{prefix}_if",
                             then_branch=_scaled(f"{prefix}_then", 2.0), else_branch=_scaled(f"{prefix}_else", 5.0)),
            helper.make_node("Relu", [f"{prefix}_inner"], [f"{prefix}_y"]),
            helper.make_node("Add", ["state", f"{prefix}_one"], [f"{prefix}_state"]),
        ]
        return _graph(prefix, nodes, [f"{prefix}_y", f"{prefix}_state"], inits)

    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
        helper.make_node("If", ["is_16k"], ["if_y", "if_state"], name="rate_switch",
                         then_branch=rate_branch("wide", 4), else_branch=rate_branch("narrow", 2)),
        helper.make_node("Identity", ["if_y"], ["y"]),
        helper.make_node("Identity", ["if_state"], ["state_out"]),
    ]
    graph = helper.make_graph(
        nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"]),
                       helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "b", 3]),
                       helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "b", 3])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("rate", "width", "factor"), [(16000, 4, 2.0), (16000, 3, 5.0), (8000, 2, 2.0)])
def test_nested_ifs_fold_level_by_level_into_their_branches(rate, width, factor):
    model = _nested_if_model()
    deploy, _ = prepare_deploy_model(fix_inputs(model, {"sr": [rate]}), {"x": (1, width), "state": (2, 1, 3)})
    assert "If" not in {node.op_type for node in deploy.graph.node}
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, width)).astype(np.float32)
    state = rng.normal(size=(2, 1, 3)).astype(np.float32)
    y, state_out = _run(deploy, {"x": x, "state": state})
    expected = _run(model, {"x": x, "state": state, "sr": np.array(rate, np.int64)})
    np.testing.assert_allclose(y, np.maximum(x * factor, 0), rtol=1e-6)
    np.testing.assert_array_equal(y, expected[0])
    np.testing.assert_array_equal(state_out, expected[1])


def _save_states(folder: Path, first_axis: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(2)
    for index in range(3):
        np.savez(folder / f"{index}.npz", x=rng.normal(size=(1, 4)).astype(np.float32),
                 state=rng.normal(size=(first_axis, 1, 3)).astype(np.float32))
    return folder


def test_a_static_first_axis_other_than_one_is_no_batch(tmp_path):
    model = fix_inputs(_nested_if_model(), {"sr": [16000]})
    dataset = open_dataset(_save_states(tmp_path / "calib", 2), model_inputs(model), None, None, None)
    assert dataset.load(0)["state"].shape == (2, 1, 3)
    wrong = open_dataset(_save_states(tmp_path / "wrong", 3), model_inputs(model), None, None, None)
    with pytest.raises(OnnxSnpeError, match=r"input 'state' has shape \[3, 1, 3\], the model expects \[2, \?, 3\]"):
        wrong.load(0)


def test_a_vad_with_nested_ifs_and_a_state_quantizes_end_to_end(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(_nested_if_model(), path)
    result = quantize(path, _save_states(tmp_path / "calib", 2), tmp_path / "out", fixed_inputs={"sr": [16000]},
                      analysis_samples=0, progress=False)
    assert {o.name for o in result.outputs} == {"y", "state_out"}
    assert "state" in result.report["encodings"]["activations"]


def _saved(tmp_path: Path, node: onnx.NodeProto, opsets: list, output_type: int = TensorProto.FLOAT) -> Path:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", output_type, [1, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    (tmp_path / "calib").mkdir(exist_ok=True)
    np.save(tmp_path / "calib" / "0.npy", np.ones((1, 4), np.float32))
    return path


def test_an_already_quantized_model_is_refused_naming_the_node(tmp_path):
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero"], name="input1_QuantizeLinear")
    path = _saved(tmp_path, node, [helper.make_opsetid("", 13)], TensorProto.UINT8)
    with pytest.raises(OnnxSnpeError, match="DynamicQuantizeLinear node 'input1_QuantizeLinear': the model is "
                                            "already quantized; give onnxsnpe the FP32 model"):
        quantize(path, tmp_path / "calib", tmp_path / "out", analysis_samples=0, progress=False)


def test_an_onnxruntime_contrib_op_is_refused_naming_the_node(tmp_path):
    node = helper.make_node("FastGelu", ["x"], ["y"], name="gelu_1", domain="com.microsoft")
    path = _saved(tmp_path, node, [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    message = "FastGelu node 'gelu_1' is a com.microsoft op, which SNPE's converter does not take"
    with pytest.raises(OnnxSnpeError, match=re.escape(message)):
        quantize(path, tmp_path / "calib", tmp_path / "out", analysis_samples=0, progress=False)


def test_a_branch_returning_an_outer_tensor_is_copied_by_an_identity():
    from onnxsnpe.graph.inline_if import inline_constant_ifs

    passthrough = helper.make_graph([], "then", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["chosen"], then_branch=passthrough, else_branch=_scaled("other", 3.0)),
         helper.make_node("Relu", ["chosen"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(True), "flag")])
    inlined, count = inline_constant_ifs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert count == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in inlined.graph.node] == [
        ("Identity", ["x"], ["chosen"]), ("Relu", ["chosen"], ["y"])]
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(_run(inlined, {"x": x})[0], np.maximum(x, 0))
