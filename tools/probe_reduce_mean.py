"""Probes of the HTP emulator's 8-bit ReduceMean: which multiplier it applies to the sum of codes.

    python tools/probe_reduce_mean.py [--probes 30] [--layouts last,axis1,last4,axis1_4,hw] [--htp-arch 73]

Needs onnxruntime-qnn. Each probe averages ``n`` values (n drawn from 3 to 384) in rows that sweep
every sum S of centered input codes: row r holds base code r // n with its first r % n values one
higher, so S takes every value from -n z_in to n (255 - z_in). The layouts: a rank-3 tensor reduced
over its last axis (``last``, the recogniser's layer norms) or axis 1 (``axis1``), a rank-4 one over
its last axis (``last4``), axis 1 (``axis1_4``) or axes 2 and 3 (``hw``). Random min-max encodings.
For each probe it prints, over the in-range output codes, how many differ from
``floor(S m + z_out + 1/2)`` for three multipliers m: the ``int16`` kernel's (the 15-bit mantissa of
``s_in / (s_out n)`` scaled by 32767/32768 before rounding), the ``rounded`` one (GlobalAveragePool's
15-bit rounding) and exact; and which kernel the simulation (simulate/htp/channelwise.py) picks
(tools/HTP.md, finding 18).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxsnpe.encode.encoding import asymmetric_encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.htp.channelwise import REDUCE_MEAN_KERNELS, reduce_mean_multiplier
from onnxsnpe.simulate.qdq import build_qdq_model

LAYOUTS = {"last": (3, (2,)), "axis1": (3, (1,)), "last4": (4, (3,)), "axis1_4": (4, (1,)), "hw": (4, (2, 3))}
COUNTS = (3, 7, 10, 12, 40, 48, 49, 64, 96, 120, 200, 255, 384)


def swept_codes(n: int, layout: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Input codes whose rows sweep every sum of n codes, laid out for ``layout``; and the reduced axes."""
    rows = 255 * n
    codes = np.repeat(np.arange(255), n)[:, None] + (np.arange(n)[None, :] < np.tile(np.arange(n), 255)[:, None])
    if layout == "last":
        return codes[None], (2,)
    if layout == "axis1":
        return codes.T[None], (1,)
    if layout == "last4":
        return codes[None, None], (3,)
    if layout == "axis1_4":
        return codes.T[None, :, :, None], (1,)
    if n % 4:
        raise ValueError("the hw layout needs n divisible by 4")
    return codes.reshape(1, rows, n // 4, 4), (2, 3)


def probe(n: int, layout: str, x_range: tuple[float, float], y_range: tuple[float, float],
          arch: str | None) -> tuple[int, dict[str, int]]:
    """In-range outputs, and per multiplier how many of them differ from the emulator's."""
    codes, axes = swept_codes(n, layout)
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=list(axes), keepdims=1)
    graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, codes.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.ir_version = 8
    x_enc, y_enc = asymmetric_encoding(*x_range, 8), asymmetric_encoding(*y_range, 8)
    x = ((codes + x_enc.offset) * np.float32(x_enc.scale)).astype(np.float32)
    options = {} if arch is None else {"arch": arch}
    session = HtpSession(build_qdq_model(model, find_targets(model), {"x": x_enc, "y": y_enc}, {}), {"x": x_enc},
                         **options)
    got = np.round(session.run({"x": x})[0] / np.float32(y_enc.scale)).ravel() - y_enc.offset
    sums = (codes + x_enc.offset).sum(axis=axes).ravel().astype(np.float64)
    ratio = float(np.float32(x_enc.scale)) / float(np.float32(y_enc.scale)) / n
    inside = (got > 0) & (got < 255)
    counts = {}
    for label, m in (("int16", reduce_mean_multiplier(ratio, "int16")),
                     ("rounded", reduce_mean_multiplier(ratio, "rounded")), ("exact", ratio)):
        counts[label] = int(np.count_nonzero((np.floor(sums * m - y_enc.offset + 0.5) != got)[inside]))
    return int(inside.sum()), counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=6, help="probes per layout")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--htp-arch", default=None, choices=["68", "69", "73", "75", "79"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    print("| layout | n | in range | differ: int16 | rounded | exact | simulation's kernel |")
    print("|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        for _ in range(args.probes):
            n = int(rng.choice([c for c in COUNTS if layout != "hw" or c % 4 == 0]))
            x_range = (-float(rng.uniform(0.2, 5)), float(rng.uniform(0.2, 5)))
            y_range = (x_range[0] * float(rng.uniform(0.2, 1.3)), x_range[1] * float(rng.uniform(0.2, 1.3)))
            inside, counts = probe(n, layout, x_range, y_range, args.htp_arch)
            kernel = REDUCE_MEAN_KERNELS.get(LAYOUTS[layout], "float")
            print(f"| {layout} | {n} | {inside} | {counts['int16']} | {counts['rounded']} | {counts['exact']} "
                  f"| {kernel} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
