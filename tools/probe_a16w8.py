"""Single-Conv probes of the HTP emulator's arithmetic with 16-bit activations and 8-bit weights.

    python tools/probe_a16w8.py [--probes 12] [--depthwise] [--stride 1] [--htp-arch 73]

Needs onnxruntime-qnn. Each probe is a QDQ model of one Conv (8 input channels, 4 outputs, 3x3, pads
1, a 12x12 input of uniformly random 16-bit codes) with its own seed, output range (so the
requantization multiplier M spans 2^-13 to 2^-6) and weight encoding (per-tensor asymmetric
min-max, symmetric about zero, or symmetric per channel). For each it prints M and the share of
in-range output codes where the simulation in HTP arithmetic (simulate/htp/wide.py) and in exact
float rounding equal the emulator's, and their largest difference in 16-bit steps (tools/HTP.md,
"16-bit activations"; with ``--htp-arch 73`` or later, the emulator and the simulation compute as
that architecture: finding 20).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HTP_ARCHS, HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

WEIGHTS = ("asymmetric", "symmetric", "per-channel")
OUTPUT_RANGES = (2.0, 6.0, 20.0, 60.0, 200.0)


def probe(seed: int, output_range: float, weights_kind: str, depthwise: bool = False, stride: int = 1,
          arch: str | None = None) -> dict:
    """One probe: M, and per simulation the share of exact in-range codes and the largest difference."""
    rng = np.random.default_rng(seed)
    outputs = 8 if depthwise else 4
    weight = rng.normal(0.0, 1.0, size=(outputs, 1 if depthwise else 8, 3, 3)).astype(np.float32)
    if weights_kind == "symmetric":  # a range symmetric about zero: codes fit int8 as they are
        weight.flat[0], weight.flat[1] = np.abs(weight).max(), -np.abs(weight).max()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], group=8 if depthwise else 1,
                          strides=[stride, stride])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(rng.normal(size=outputs).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    targets = find_targets(model)
    acts = {"x": asymmetric_encoding(-1.0, 2.0, 16), "y": asymmetric_encoding(-output_range, 1.3 * output_range, 16)}
    weights = weight_encodings(model, targets, 8, per_channel=weights_kind == "per-channel")
    params = {**weights, **bias_encodings(model, targets, acts, weights, 32)}
    codes = rng.integers(0, 65536, size=(1, 8, 12, 12))
    x = ((codes + acts["x"].offset) * np.float32(acts["x"].scale)).astype(np.float32)
    scale = np.float32(acts["y"].scale)
    reference = np.round(HtpSession(build_qdq_model(model, targets, acts, params), {"x": acts["x"]}, arch).run(
        {"x": x})[0] / scale) - acts["y"].offset
    inside = (reference > 0) & (reference < 65535)
    w_scale = weights["w"].scales().max() if weights_kind == "per-channel" else weights["w"].scale
    row = {"M": float(np.float32(acts["x"].scale)) * float(np.float32(w_scale)) / float(scale)}
    for label, build in (("htp", partial(htp_simulation_model, arch=arch)), ("exact", build_simulation_model)):
        got = np.round(simulation_runner(*build(model, targets, acts, params), ["y"])({"x": x})[0] / scale) \
            - acts["y"].offset
        row[label] = (float(np.mean((got == reference)[inside])), float(np.abs(got - reference)[inside].max()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=12)
    parser.add_argument("--depthwise", action="store_true", help="a depthwise Conv (8 channels) instead")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--htp-arch", choices=HTP_ARCHS, default=None)
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    print("| seed | weights | M | htp arithmetic: exact, max steps | exact rounding: exact, max steps |")
    print("|---|---|---|---|---|")
    for seed in range(args.probes):
        kind, output_range = WEIGHTS[seed % len(WEIGHTS)], OUTPUT_RANGES[seed % len(OUTPUT_RANGES)]
        row = probe(seed, output_range, kind, args.depthwise, args.stride, args.htp_arch)
        print(f"| {seed} | {kind} | 2^{np.log2(row['M']):.1f} | {100 * row['htp'][0]:.1f}%, {row['htp'][1]:.0f} "
              f"| {100 * row['exact'][0]:.1f}%, {row['exact'][1]:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
