"""If nodes folded once the inputs they depend on are fixed; control flow SNPE cannot run refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize
from onnxsnpe.cli import main
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.fixed_inputs import parse_fixed_input
from onnxsnpe.graph.runtime import make_session


def _branch(name: str, factor: float) -> onnx.GraphProto:
    const = numpy_helper.from_array(np.array(factor, np.float32), f"{name}_factor")
    return helper.make_graph([helper.make_node("Mul", ["x", f"{name}_factor"], [f"{name}_out"])], name, [],
                             [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 4])], [const])


def _if_model(path: Path) -> Path:
    """x [1,4] float, sr int64 scalar: y = Relu(x * 2 if sr == 16000 else x * 3), state_out = x + 1."""
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "rate")]
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
        helper.make_node("If", ["is_16k"], ["scaled"], then_branch=_branch("then", 2.0),
                         else_branch=_branch("else", 3.0), name="rate_switch"),
        helper.make_node("Relu", ["scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                       helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _samples(folder: Path, with_rate: bool) -> Path:
    folder.mkdir()
    for index in range(4):
        sample = {"x": np.random.default_rng(index).normal(size=(1, 4)).astype(np.float32)}
        if with_rate:
            sample["sr"] = np.array(16000, np.int64)
        np.savez(folder / f"{index}.npz", **sample)
    return folder


@pytest.mark.parametrize(("rate", "factor"), [(16000, 2.0), (8000, 3.0)])
def test_a_fixed_input_folds_the_if_into_its_branch(tmp_path, rate, factor):
    model = _if_model(tmp_path / "vad.onnx")
    result = quantize(model, _samples(tmp_path / "calib", False), tmp_path / "out", fixed_inputs={"sr": [rate]},
                      analysis_samples=0, progress=False)
    deploy = onnx.load(tmp_path / "out" / "snpe_deploy.onnx")
    assert [n.op_type for n in deploy.graph.node] == ["Mul", "Relu"]
    assert [i.name for i in deploy.graph.input] == ["x"]
    (factor_init,) = [numpy_helper.to_array(i) for i in deploy.graph.initializer if i.dims == [] or i.dims == [1]]
    assert float(factor_init) == factor
    assert result.report["model"]["fixed_inputs"] == {"sr": [float(rate)]}
    assert result.outputs[0].sqnr_db > 30


def test_an_if_on_a_run_time_value_is_refused_naming_the_input(tmp_path):
    model = _if_model(tmp_path / "vad.onnx")
    with pytest.raises(OnnxSnpeError) as info:
        quantize(model, _samples(tmp_path / "calib", True), tmp_path / "out", analysis_samples=0, progress=False)
    message = str(info.value)
    assert "If node 'rate_switch'" in message and "--fix-input sr=VALUE" in message and "vad.onnx" in message
    assert not (tmp_path / "out").exists()


def test_a_loop_is_refused_in_one_line(tmp_path, capsys):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="doubling")], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "0.npz", x=np.ones((1, 4), np.float32), trips=np.array(3, np.int64))
    code = main(["quantize", str(path), "--calib", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Loop node 'doubling'" in err[0] and "unroll" in err[0]
    assert "Traceback" not in "\n".join(err)


def test_fix_input_option(tmp_path, capsys):
    model = _if_model(tmp_path / "vad.onnx")
    code = main(["quantize", str(model), "--calib", str(_samples(tmp_path / "calib", False)), "--out",
                 str(tmp_path / "out"), "--fix-input", "sr=8000", "--quiet", "--analysis-samples", "0"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["fixed_inputs"] == {"sr": [8000.0]}
    assert parse_fixed_input("mask=1,0,1") == ("mask", [1.0, 0.0, 1.0])
    for bad in ("sr", "=3", "sr=fast"):
        with pytest.raises(OnnxSnpeError):
            parse_fixed_input(bad)
    with pytest.raises(OnnxSnpeError, match="inputs are"):
        quantize(model, tmp_path / "calib", tmp_path / "o2", fixed_inputs={"rate": [1]}, progress=False)
    with pytest.raises(OnnxSnpeError, match="whole numbers"):
        quantize(model, tmp_path / "calib", tmp_path / "o3", fixed_inputs={"sr": [1.5]}, progress=False)


def _counting_loop(path: Path, trips_as_input: bool) -> Path:
    """v <- v * 0.5 + i (i the iteration), scan output v + 1 per iteration; 3 iterations."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["i"], ["i_float"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["v_in", "half"], ["v_half"]),
         helper.make_node("Add", ["v_half", "i_float"], ["v_out"]),
         helper.make_node("Add", ["v_out", "one"], ["scan_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    if trips_as_input:
        inputs.append(helper.make_tensor_value_info("trips", TensorProto.INT64, []))
    else:
        inits.append(numpy_helper.from_array(np.array(3, np.int64), "trips"))
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["v_final", "scanned"], body=body, name="counter")],
        "loop", inputs, [helper.make_tensor_value_info("v_final", TensorProto.FLOAT, [1, 4]),
                         helper.make_tensor_value_info("scanned", TensorProto.FLOAT, [3, 1, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("trips_as_input", [False, True])
def test_a_loop_of_constant_trip_count_is_unrolled(tmp_path, trips_as_input):
    model = _counting_loop(tmp_path / "loop.onnx", trips_as_input)
    fixed = {"trips": [3]} if trips_as_input else None
    result = quantize(model, _samples(tmp_path / "calib", False), tmp_path / "out", fixed_inputs=fixed,
                      act_bitwidth=16, analysis_samples=0, progress=False)
    deploy = onnx.load(tmp_path / "out" / "snpe_deploy.onnx")
    assert "Loop" not in {n.op_type for n in deploy.graph.node}
    x = np.random.default_rng(5).normal(size=(1, 4)).astype(np.float32)
    original = make_session(onnx.load(model)).run(None, {"x": x, **({"trips": np.array(3)} if trips_as_input else {})})
    unrolled = make_session(deploy).run(None, {"x": x})
    for want, got in zip(original, unrolled, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert unrolled[1].shape == (3, 1, 4)
    assert all(o.sqnr_db > 40 for o in result.outputs)


def test_fixed_input_values_may_be_scalars_or_arrays(tmp_path):
    model = _if_model(tmp_path / "vad.onnx")
    calib = _samples(tmp_path / "calib", False)
    for index, value in enumerate((16000, np.array([16000]))):
        result = quantize(model, calib, tmp_path / f"out{index}", fixed_inputs={"sr": value},
                          analysis_samples=0, progress=False)
        assert result.report["model"]["fixed_inputs"] == {"sr": [16000.0]}
    with pytest.raises(OnnxSnpeError, match="outside int64"):
        quantize(model, calib, tmp_path / "o", fixed_inputs={"sr": [1e30]}, progress=False)
