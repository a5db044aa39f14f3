"""Quantize a generated model just over protobuf's 2 GB limit and report time and peak memory.

    python tools/bench_large_model.py [--size 13568] [--samples 4] [--analysis-samples 0] [--keep DIR]
                                      [--external]

The model: x [1, N] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> y, three N x N float32
weights (N = 13568: 3 x 736 MB = 2.21 GB), saved as model.onnx + model.onnx.data. ``quantize``
runs in a child process on ``--samples`` random inputs (isolated analysis off unless
``--analysis-samples``); the child's peak resident memory (its own VmHWM, file-mapped weights
included) is printed next to the model's size. ``--external`` lowers the 2 GB limit
(graph/large.EXTERNAL_DATA_BYTES) to 0 in the child, so a smaller ``--size`` takes the large-model
path and its memory can be measured in less time. Needs about 4x the model size in free memory
(this process generates the weights) and 4x in disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_model(folder: Path, size: int) -> Path:
    """The three-MatMul model with external data in ``folder``."""
    rng = np.random.default_rng(0)
    scale = np.float32(1.0 / np.sqrt(size))
    inits = [numpy_helper.from_array((rng.standard_normal((size, size), dtype=np.float32) * scale), f"w{k}")
             for k in range(3)]
    make = helper.make_node
    nodes = [make("MatMul", ["x", "w0"], ["a0"]), make("Relu", ["a0"], ["r0"]),
             make("MatMul", ["r0", "w1"], ["a1"]), make("Relu", ["a1"], ["r1"]),
             make("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    (folder / "model.onnx.data").unlink(missing_ok=True)  # onnx.save appends to a data file there
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=13568)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--analysis-samples", type=int, default=0, help="quantize's isolated analysis (default off)")
    parser.add_argument("--keep", type=Path, help="write into this folder and keep it")
    parser.add_argument("--external", action="store_true", help="treat the model as over 2 GB whatever its size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = write_model(root, args.size)
        calib = root / "calib"
        calib.mkdir(exist_ok=True)
        rng = np.random.default_rng(1)
        for index in range(args.samples):
            np.save(calib / f"{index}.npy", rng.standard_normal((1, args.size), dtype=np.float32))
        model_bytes = (root / "model.onnx.data").stat().st_size + model.stat().st_size
        start = time.perf_counter()
        forced = "from onnxsnpe.graph import large; large.EXTERNAL_DATA_BYTES = 0; " if args.external else ""
        peak_file = root / "peak_rss"
        # the child reports its own high-water mark: getrusage's RUSAGE_CHILDREN would count this
        # process's memory (the generated weights), which a forked child holds until it execs
        report = (f"import atexit; atexit.register(lambda: open({str(peak_file)!r}, 'w').write("
                  "next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))); ")
        run = f"import sys; {report}{forced}from onnxsnpe.cli import main; sys.exit(main())"
        child = subprocess.run([sys.executable, "-c", run, "quantize", str(model), "--calib", str(calib),
                                "--out", str(root / "out"), "--analysis-samples", str(args.analysis_samples),
                                "--quiet"])
        seconds = time.perf_counter() - start
        peak = int(peak_file.read_text()) * 1024
        out = root / "out"
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()} if out.exists() else {}
        print(json.dumps({"exit_code": child.returncode, "model_gb": round(model_bytes / 1e9, 3),
                          "peak_rss_gb": round(peak / 1e9, 3), "peak_over_model": round(peak / model_bytes, 2),
                          "seconds": round(seconds, 1), "external": args.external,
                          "analysis_samples": args.analysis_samples, "files": files}, indent=1))


if __name__ == "__main__":
    main()
