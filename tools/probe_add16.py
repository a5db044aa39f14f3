"""Probe the HTP emulator's 16-bit Add and Sub against the simulation, on every input code.

    python tools/probe_add16.py [--probes 12] [--seed 0] [--cases x+c,c+x,x-c,c-x,a+b,a-b,clip(x+c)]

Each probe is a one-op QDQ model (16-bit activations, constants in their 16-bit encodings as the
pipeline gives them) with random encodings: x takes all 65,536 codes once (for two activations, a
takes them all and b random codes). For every case it prints how many probes the simulation
(simulate/htp, elementwise.add16_operands) reproduces bit for bit, the most values of one probe
that differ and the largest difference in steps, and the same for exact float rounding. The cases:
an activation plus or minus a one-element constant in both orders, two activations, and x + c
with a Clip squashed into it (a hard-swish's first half). Needs onnxruntime-qnn (tools/HTP.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

SHAPE = [1, 1, 256, 256]
CASES = ("x+c", "c+x", "x-c", "c-x", "a+b", "a-b", "clip(x+c)")


def model_of(case: str, constant: float, top: float) -> onnx.ModelProto:
    """The case's one-op model (two for the squashed Clip); its output is ``y``."""
    value = helper.make_tensor_value_info
    two = case in ("a+b", "a-b")
    op = "Sub" if "-" in case else "Add"
    inputs = {"x+c": ["x", "c"], "c+x": ["c", "x"], "x-c": ["x", "c"], "c-x": ["c", "x"], "a+b": ["a", "b"],
              "a-b": ["a", "b"], "clip(x+c)": ["x", "c"]}[case]
    nodes = [helper.make_node(op, inputs, ["s" if case.startswith("clip") else "y"])]
    inits = [] if two else [numpy_helper.from_array(np.array(constant, dtype=np.float32), "c")]
    if case.startswith("clip"):
        nodes.append(helper.make_node("Clip", ["s", "low", "high"], ["y"]))
        inits += [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in (("low", 0.0), ("high", top))]
    graph = helper.make_graph(nodes, case, [value(n, TensorProto.FLOAT, SHAPE) for n in (["a", "b"] if two else ["x"])],
                              [value("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def encodings_of(case: str, rng: np.random.Generator, constant: float, top: float) -> dict[str, Encoding]:
    """Random 16-bit input encodings and an output encoding covering the result (scaled by 0.3 to 1.5,
    so that the scale ratios reach both sides of 1), or for the Clip [0, 0.7 to 1 times its top]."""
    low, high = -rng.uniform(0.05, 5), rng.uniform(0.3, 8)
    if case in ("a+b", "a-b"):
        b_low, b_high = -rng.uniform(0.05, 5), rng.uniform(0.3, 6)
        acts = {"a": asymmetric_encoding(low, high, 16), "b": asymmetric_encoding(b_low, b_high, 16)}
        out = (low + b_low, high + b_high) if case == "a+b" else (low - b_high, high - b_low)
    else:
        acts = {"x": asymmetric_encoding(low, high, 16)}
        out = {"x+c": (low + constant, high + constant), "c+x": (low + constant, high + constant),
               "x-c": (low - constant, high - constant), "c-x": (constant - high, constant - low),
               "clip(x+c)": (0.0, top)}[case]
    if case.startswith("clip"):  # inside the Clip's range, as calibration gives it (min-max stays inside)
        acts["y"] = asymmetric_encoding(0.0, top * rng.uniform(0.7, 1.0), 16)
        return acts
    scale = rng.uniform(0.3, 1.5)
    acts["y"] = asymmetric_encoding(min(0.0, out[0]) * scale, max(1e-3, out[1] * scale), 16)
    return acts


def codes_of(values: np.ndarray, enc: Encoding) -> np.ndarray:
    return np.round(values.astype(np.float64) / np.float32(enc.scale)).ravel() - enc.offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    rng = np.random.default_rng(args.seed)
    print(f"{'case':<11}{'probes':>7}{'htp arithmetic: exact':>24}{'most differing':>16}{'steps':>7}"
          f"{'exact rounding: exact':>24}{'most differing':>16}{'steps':>7}")
    for case in args.cases.split(","):
        rows = {"htp": [0, 0, 0.0], "exact": [0, 0, 0.0]}
        for _ in range(args.probes):
            constant = float(rng.normal(0, 2) * 10 ** rng.uniform(-2, 0.5))
            top = float(rng.uniform(2, 8))
            if case.startswith("clip"):
                constant = abs(constant) + 0.5
            model = model_of(case, constant, top)
            targets = find_targets(model)
            acts = encodings_of(case, rng, constant, top)
            for name in targets.activations:  # a squashed Add's output takes the Clip's encoding
                acts.setdefault(name, acts["y"])
            params = constant_encodings(model, targets, {}, 8, acts)
            inputs = [value.name for value in model.graph.input]
            codes = {inputs[0]: rng.permutation(65536)} | ({"b": rng.integers(0, 65536, 65536)} if len(inputs) == 2
                                                              else {})
            sample = {name: ((q + acts[name].offset) * np.float32(acts[name].scale)).astype(np.float32).reshape(SHAPE)
                      for name, q in codes.items()}
            want = codes_of(HtpSession(build_qdq_model(model, targets, acts, params),
                                       {name: acts[name] for name in inputs}).run(sample)[0], acts["y"])
            for label, built in (("htp", htp_simulation_model(model, targets, acts, params)),
                                 ("exact", build_simulation_model(model, targets, acts, params))):
                got = codes_of(simulation_runner(*built, ["y"])(sample)[0], acts["y"])
                differing = int(np.count_nonzero(got != want))
                row = rows[label]
                row[0] += differing == 0
                row[1] = max(row[1], differing)
                row[2] = max(row[2], float(np.abs(got - want).max()))
        print(f"{case:<11}{args.probes:>7}" + "".join(f"{rows[k][0]:>24}{rows[k][1]:>16}{rows[k][2]:>7.0f}"
                                                      for k in ("htp", "exact")))


if __name__ == "__main__":
    main()
