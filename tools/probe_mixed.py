"""Which mixed 8/16-bit ops the HTP emulator finalizes (tools/HTP.md finding 16).

    python tools/probe_mixed.py [--no-conversions]

Needs onnxruntime-qnn. Each probe is a QDQ model ``x -> op -> d -> Conv 5x5 -> y`` (8 channels,
12 x 12) for every mix of 8 and 16 bits on x, d and y, where ``op`` is a Div, Mul or Add by the
constant 6, a Sigmoid, or a depthwise 5x5 Conv with strides [1, 1], [2, 2], [2, 1] or [1, 2]; the
following Conv's weights per tensor or per channel. Prints a table of what the emulator refused.
With ``--no-conversions`` the QDQ export writes no conversions (encode/conversions.py): that shows
what the emulator refuses; without it, what the pipeline's QDQ models still meet.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.errors import HtpRefused
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate import qdq as qdq_module
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason

OPS = ("Div", "Mul", "Add", "Sigmoid", "HardSigmoid", "Tanh", "Relu", "Erf", "Sqrt", "Softmax", "ReduceMean",
       "GlobalAveragePool", "MatMul", "MatMul weight", "depthwise 1,1", "depthwise 2,2", "depthwise 2,1",
       "depthwise 1,2")
UNARY = ("Sigmoid", "HardSigmoid", "Tanh", "Relu", "Erf", "Sqrt", "GlobalAveragePool")
MIXES = list(itertools.product((8, 16), repeat=3))


def probe_model(op: str, x_bits: int, d_bits: int, y_bits: int, per_channel: bool):
    """The float model, targets, activation encodings and params of one probe."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 5, 5)).astype(np.float32) * 0.1, "w"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "b")]
    if op.startswith("depthwise"):
        strides = [int(s) for s in op.split()[1].split(",")]
        first = helper.make_node("Conv", ["x", "dw", "db"], ["d"], group=8, pads=[2, 2, 2, 2], strides=strides)
        inits += [numpy_helper.from_array(rng.normal(size=(8, 1, 5, 5)).astype(np.float32) * 0.1, "dw"),
                  numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "db")]
    elif op in UNARY:
        first = helper.make_node(op, ["x"], ["d"])
    elif op == "Softmax":
        first = helper.make_node("Softmax", ["x"], ["d"], axis=-1)
    elif op == "ReduceMean":
        first = helper.make_node("ReduceMean", ["x"], ["d"], axes=[3], keepdims=1)
    elif op == "MatMul":  # two activations: x times itself
        first = helper.make_node("MatMul", ["x", "x"], ["d"])
    elif op == "MatMul weight":  # a constant weight (a FullyConnected on the HTP)
        first = helper.make_node("MatMul", ["x", "mw"], ["d"])
        inits.append(numpy_helper.from_array(rng.normal(size=(12, 12)).astype(np.float32) * 0.3, "mw"))
    else:
        first = helper.make_node(op, ["x", "six"], ["d"])
        inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "six"))
    graph = helper.make_graph([first, helper.make_node("Conv", ["d", "w", "b"], ["y"], pads=[2, 2, 2, 2])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-3.0, 9.0, x_bits), "d": asymmetric_encoding(-1.5, 1.5, d_bits),
            "y": asymmetric_encoding(-4.0, 4.0, y_bits)}
    weights = weight_encodings(model, targets, 8, per_channel=per_channel)
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    params.update(constant_encodings(model, targets, params, 8, acts))
    return model, targets, acts, params


def finalizes(op: str, mix: tuple[int, int, int], per_channel: bool, conversions: bool) -> bool:
    """Whether the emulator finalizes the probe's QDQ model."""
    model, targets, acts, params = probe_model(op, *mix, per_channel)
    if not conversions:
        qdq_module.widened_inputs = qdq_module.widened_outputs = lambda *args: {}
    try:
        HtpSession(qdq_module.build_qdq_model(model, targets, acts, params), {"x": acts["x"]})
        return True
    except HtpRefused:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-conversions", action="store_true", help="QDQ models without the conversions")
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    print("| op | next Conv's weights | " + " | ".join(f"x{x} d{d} y{y}" for x, d, y in MIXES) + " |")
    print("|---|---|" + "---|" * len(MIXES))
    for op, per_channel in itertools.product(OPS, (False, True)):
        cells = ["runs" if finalizes(op, mix, per_channel, not args.no_conversions) else "**refused**"
                 for mix in MIXES]
        print(f"| {op} | {'per channel' if per_channel else 'per tensor'} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
