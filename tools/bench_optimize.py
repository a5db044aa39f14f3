"""Time of each accuracy step against calibration itself, in one run (EfficientNet-Lite0 by default).

    python tools/bench_optimize.py [--model efficientnet_lite0.onnx] [--samples 128] [--iters 1000]

Calibration crops as tools/accuracy_table.py makes them. Prints seconds and the ratio to one
calibration pass (min-max statistics over the same samples read from disk, as ``quantize`` reads
them; best of two) for CLE, bias correction (its default samples) and AdaRound (``--iters``
iterations on ``--samples`` samples), each as the pipeline runs it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from accuracy_table import SHARED, crop_sets

from onnxsnpe.stages import Settings, apply_adaround, apply_bias_correction, apply_cle, prepare
from onnxsnpe.stats.collect import collect_statistics


def _timed(step, *args):
    start = time.perf_counter()
    result = step(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0.onnx")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--iters", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calib, _, options = crop_sets(Path(tmp), args.model, args.samples, 1)
        prepared = prepare(SHARED / "models" / args.model, calib, None, None, None, options)
        calibration = min(
            _timed(collect_statistics, prepared.deploy, prepared.targets.activations, iter(prepared.calib_set))[1]
            for _ in range(2))
        settings = Settings(adaround_iters=args.iters, adaround_samples=args.samples)
        rows = [("calibration (minmax statistics)", calibration)]
        _, seconds = _timed(apply_cle, prepared, settings, False)
        rows.append(("CLE", seconds))
        (_, record), seconds = _timed(apply_bias_correction, prepared, settings, False)
        rows.append((f"bias correction ({record['samples']} samples)", seconds))
        (_, record), seconds = _timed(apply_adaround, prepared, settings, False)
        rows.append((f"AdaRound ({record['samples']} samples, {args.iters} iterations)", seconds))
    print(f"model: {args.model}, {args.samples} calibration samples")
    print(f"{'step':<48}{'seconds':>10}{'ratio':>9}")
    for label, seconds in rows:
        print(f"{label:<48}{seconds:>10.2f}{seconds / calibration:>9.2f}")


if __name__ == "__main__":
    main()
