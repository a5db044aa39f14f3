"""An unrolled LSTM (Gemm, Split, Sigmoid, Tanh, Mul per time step) with dynamic batch and state inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize

STEPS, FEATURES, HIDDEN = 5, 6, 4


def _lstm_model(path: Path) -> Path:
    """x [N,5,6], h0/c0 [N,4] -> per step: gates = x_t W^T + h R^T + b, i,f,g,o = Split(gates);
    c = f*c + i*g, h = o*tanh(c) -> y = Concat of the steps' h [N,5*4], h_n, c_n."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(scale=0.4, size=(4 * HIDDEN, FEATURES)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(scale=0.4, size=(4 * HIDDEN, HIDDEN)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(scale=0.1, size=4 * HIDDEN).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([HIDDEN] * 4, np.int64), "split"),
    ]
    make = helper.make_node
    nodes, h, c, steps = [], "h0", "c0", []
    for t in range(STEPS):
        p = f"t{t}/"
        inits.append(numpy_helper.from_array(np.array(t, np.int64), p + "index"))
        nodes += [
            make("Gather", ["x", p + "index"], [p + "x"], axis=1),
            make("Gemm", [p + "x", "W", "B"], [p + "xw"], transB=1),
            make("Gemm", [h, "R"], [p + "hr"], transB=1),
            make("Add", [p + "xw", p + "hr"], [p + "gates"]),
            make("Split", [p + "gates", "split"], [p + "i", p + "f", p + "g", p + "o"], axis=1),
            make("Sigmoid", [p + "i"], [p + "si"]), make("Sigmoid", [p + "f"], [p + "sf"]),
            make("Tanh", [p + "g"], [p + "tg"]), make("Sigmoid", [p + "o"], [p + "so"]),
            make("Mul", [p + "sf", c], [p + "fc"]), make("Mul", [p + "si", p + "tg"], [p + "ig"]),
            make("Add", [p + "fc", p + "ig"], [p + "c"]),
            make("Tanh", [p + "c"], [p + "tc"]), make("Mul", [p + "so", p + "tc"], [p + "h"]),
        ]
        h, c = p + "h", p + "c"
        steps.append(h)
    nodes += [make("Concat", steps, ["y"], axis=1), make("Identity", [h], ["h_n"]), make("Identity", [c], ["c_n"])]
    dims = {"x": ["N", STEPS, FEATURES], "h0": ["N", HIDDEN], "c0": ["N", HIDDEN]}
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in dims.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", STEPS * HIDDEN]),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, ["N", HIDDEN]),
         helper.make_tensor_value_info("c_n", TensorProto.FLOAT, ["N", HIDDEN])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _samples(folder: Path, seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(8):
        np.savez(folder / f"{index}.npz", x=rng.normal(size=(1, STEPS, FEATURES)).astype(np.float32),
                 h0=rng.normal(scale=0.3, size=(1, HIDDEN)).astype(np.float32),
                 c0=rng.normal(scale=0.3, size=(1, HIDDEN)).astype(np.float32))
    return folder


def test_unrolled_lstm_with_dynamic_batch_and_state_runs_end_to_end(tmp_path):
    model = _lstm_model(tmp_path / "lstm.onnx")
    # measured on the calibration samples: 8 samples of 4 state values are too few for ranges that cover
    # held-out ones (they clip, at any bitwidth)
    result = quantize(model, _samples(tmp_path / "calib", 0), tmp_path / "out", act_bitwidth=16,
                      weight_bitwidth=16, analysis_samples=2, progress=False)
    assert [o.name for o in result.outputs] == ["y", "h_n", "c_n"]
    assert all(o.sqnr_db > 60 for o in result.outputs), [o.to_dict() for o in result.outputs]
    overrides = json.loads((tmp_path / "out" / "snpe_clip_ranges.json").read_text())
    activations = overrides["activation_encodings"]
    assert {"x", "h0", "c0", "y", "t4/h", "t4/c"} <= set(activations)  # state inputs and outputs are encoded
    assert activations["t0/si"][0]["min"] == 0.0 and activations["t0/tg"][0]["min"] == pytest.approx(-1.0, abs=1e-4)
    assert {"W", "R"} <= set(overrides["param_encodings"])
    deploy = onnx.load(tmp_path / "out" / "snpe_deploy.onnx")
    assert [d.dim_value for d in deploy.graph.input[0].type.tensor_type.shape.dim] == [1, STEPS, FEATURES]
