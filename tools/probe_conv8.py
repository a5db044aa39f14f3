"""Single-Conv probes of the HTP emulator's 8-bit arithmetic, on one HTP architecture.

    python tools/probe_conv8.py [--htp-arch 73] [--seeds 6]

Needs onnxruntime-qnn. Each probe is a QDQ model of one Conv (8 input channels, 12x12 inputs of
uniformly random 8-bit codes, a random bias, 2 samples) in one of six shapes: 1x1, 3x3, 3x3 with
strides 2, depthwise 3x3, depthwise 3x3 with strides 2 and 1x1 followed by a Relu; with per-tensor
asymmetric weights (re-expressed as int8 where their codes overflow), symmetric ones (int8 as they
are) or symmetric per channel. Output ranges differ by seed, so the multiplier M spans about
2^-12 to 2^-3. Per shape and weights it prints, over the in-range output codes of every seed, how
many differ from the emulator's in the simulation's HTP arithmetic computing as the architecture
asked for and as the other one (v68 against v73 and later): tools/HTP.md, finding 19.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HTP_ARCHS, HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

SHAPES = {  # kernel, depthwise, stride, activation
    "1x1": (1, False, 1, None), "3x3": (3, False, 1, None), "3x3 stride 2": (3, False, 2, None),
    "depthwise 3x3": (3, True, 1, None), "depthwise 3x3 stride 2": (3, True, 2, None),
    "1x1 + Relu": (1, False, 1, "Relu"),
}
WEIGHTS = ("asymmetric", "symmetric", "per-channel")


def probe(seed: int, shape: str, weights_kind: str, arch: str, other: str) -> tuple[int, int, int]:
    """In-range outputs, and how many differ from the emulator's as ``arch`` and as ``other``."""
    kernel, depthwise, stride, activation = SHAPES[shape]
    rng = np.random.default_rng(seed)
    outputs = 8 if depthwise else 6
    weight = rng.normal(0.0, 1.0, size=(outputs, 1 if depthwise else 8, kernel, kernel)).astype(np.float32)
    if weights_kind == "symmetric":  # a range symmetric about zero: codes fit int8 as they are
        weight.flat[0], weight.flat[1] = np.abs(weight).max(), -np.abs(weight).max()
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if activation else "y"], pads=[kernel // 2] * 4,
                              group=8 if depthwise else 1, strides=[stride, stride])]
    if activation:
        nodes.append(helper.make_node(activation, ["c"], ["y"]))
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(rng.normal(size=outputs).astype(np.float32) * 3, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    targets = find_targets(model)
    out_range = float(rng.choice([2.0, 6.0, 20.0, 60.0, 200.0])) * (kernel if kernel > 1 else 0.5)
    y_enc = asymmetric_encoding(0.0 if activation else -out_range, 1.3 * out_range, 8)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 8), "y": y_enc, **({"c": y_enc} if activation else {})}
    weights = weight_encodings(model, targets, 8, per_channel=weights_kind == "per-channel")
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    htp = HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch)
    simulations = [simulation_runner(*htp_simulation_model(model, targets, acts, params, computed_as), ["y"])
                   for computed_as in (arch, other)]
    inside = differ = differ_other = 0
    for codes in rng.integers(0, 256, size=(2, 1, 8, 12, 12)):
        sample = {"x": ((codes + acts["x"].offset) * np.float32(acts["x"].scale)).astype(np.float32)}
        want = np.round(htp.run(sample)[0] / np.float32(y_enc.scale)) - y_enc.offset
        kept = (want > 0) & (want < 255)
        got, got_other = (np.round(run(sample)[0] / np.float32(y_enc.scale)) - y_enc.offset for run in simulations)
        inside += int(kept.sum())
        differ += int(((got != want) & kept).sum())
        differ_other += int(((got_other != want) & kept).sum())
    return inside, differ, differ_other


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--htp-arch", choices=HTP_ARCHS, default="73")
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    other = "68" if int(args.htp_arch) >= 73 else "73"
    print(f"| shape | weights | in range | differ, simulated as v{args.htp_arch} | differ, simulated as v{other} |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for weights_kind in WEIGHTS:
            totals = np.sum([probe(seed, shape, weights_kind, args.htp_arch, other) for seed in range(args.seeds)],
                            axis=0)
            print(f"| {shape} | {weights_kind} | {totals[0]} | {totals[1]} | {totals[2]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
