"""How many samples the isolated analysis needs: its ranking from few samples against one from many.

    python tools/isolated_ranking.py [--sets 3] [--counts 1 2 4] [--reference 16] [--samples 64]

On EfficientNet-Lite0 (../shared/models), for each of ``--sets`` sets of ``--samples`` real image
crops (bench_calibration's crops, seeds 0, 1, ...), runs ``quantize --method mse`` with the isolated
analysis on each of ``--counts`` samples and on ``--reference`` samples, and prints for each count the
rank correlation of the tensors' isolated output SQNR with the reference ranking, how many of the
reference's 5 and 10 worst tensors it also puts there, and the largest difference in dB. What
quantize's default (report/evaluation.py's DEFAULT_ANALYSIS_SAMPLES) rests on.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from bench_calibration import MODEL, samples, write_samples

from onnxsnpe import quantize


def isolated_sqnr(folder: Path, out: Path, count: int) -> dict[str, float]:
    """Each tensor's isolated output SQNR (dB) from ``count`` samples."""
    report = quantize(MODEL, folder, out, method="mse", analysis_samples=count, progress=False).report
    return {t["name"]: t["isolated_output_sqnr_db"] for t in report["tensors"]["figures"]}


def ranks(sqnr: dict[str, float]) -> dict[str, int]:
    """Costliest first; a tensor without a figure (no error) last."""
    order = sorted(sqnr, key=lambda name: (np.inf if sqnr[name] is None else sqnr[name], name))
    return {name: position for position, name in enumerate(order)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reference", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    print(f"{MODEL.name}: isolated ranking from N samples against {args.reference} samples "
          f"({args.samples} calibration crops a set, --method mse)")
    print(f"{'set':>4}{'N':>4}{'rank corr.':>12}{'worst 5':>9}{'worst 10':>10}{'max |dB diff|':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.sets):
            folder = write_samples(Path(tmp) / f"set{seed}", list(samples(args.samples, seed=seed)))
            reference = isolated_sqnr(folder, Path(tmp) / f"ref{seed}", args.reference)
            names = sorted(reference)
            want = ranks(reference)
            for count in args.counts:
                got_sqnr = isolated_sqnr(folder, Path(tmp) / f"q{seed}_{count}", count)
                got = ranks(got_sqnr)
                correlation = np.corrcoef([want[n] for n in names], [got[n] for n in names])[0, 1]
                common = [len({n for n in names if want[n] < k} & {n for n in names if got[n] < k}) for k in (5, 10)]
                diffs = [abs(got_sqnr[n] - reference[n]) for n in names
                         if got_sqnr[n] is not None and reference[n] is not None]
                print(f"{seed:>4}{count:>4}{correlation:>12.3f}{common[0]:>9}{common[1]:>10}{max(diffs):>15.2f}")


if __name__ == "__main__":
    main()
