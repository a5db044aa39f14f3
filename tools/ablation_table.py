"""What each accuracy step buys on the real models, on held-out crops, for the README's ablation table.

    python tools/ablation_table.py [--models a.onnx,b.onnx] [--schemes per_tensor,per_channel]
                                   [--steps cle,adaround,bias_correction,auto_precision]
                                   [--calib 128] [--eval 32] [--target-sqnr 25] [--max-16bit 20]

Per model and weight scheme (8-bit weights, 8-bit activations, min-max, 32-bit biases, HTP
arithmetic), the steps are applied cumulatively, as ``quantize`` applies them: nearest rounding,
+ CLE, + AdaRound, + bias correction, + automatic mixed precision (``--steps`` picks a subset, in
that order; ``--max-16bit 0`` sets no budget). Each row is measured on the held-out
evaluation crops (tools/accuracy_table.py's crops: calibration from the top three quarters of each
photograph, evaluation from the bottom quarter); the last calibration samples are held back for
automatic precision, as with ``--auto-precision``. Prints one JSON line per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from accuracy_table import MODELS, SHARED, crop_sets

from onnxsnpe.precision import encode_with_precision
from onnxsnpe.stages import (
    Settings,
    apply_adaround,
    apply_bias_correction,
    apply_cle,
    evaluate_encodings,
    hold_back,
    prepare,
)
from onnxsnpe.stats.collect import collect_statistics

STEPS = {"cle": "+ CLE", "adaround": "+ AdaRound", "bias_correction": "+ bias correction",
         "auto_precision": "+ auto precision"}
APPLY = {"cle": apply_cle, "adaround": apply_adaround, "bias_correction": apply_bias_correction}


def _measure(prepared, settings) -> dict:
    stats = collect_statistics(prepared.deploy, prepared.targets.activations, iter(prepared.calib_set),
                               methods=[settings.method], floors=prepared.targets.floors())
    prepared, encodings, precision = encode_with_precision(prepared, stats, settings)
    output = evaluate_encodings(prepared, stats, encodings, settings.arithmetic, 0, False).outputs[0].to_dict()
    return {"sqnr_db": output["sqnr_db"], "top1": output.get("top1_agreement"),
            "raised": None if precision is None else precision["count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--schemes", default="per_tensor,per_channel")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--target-sqnr", type=float, default=25.0)
    parser.add_argument("--max-16bit", type=int, default=20, help="0: no budget, the target alone")
    parser.add_argument("--steps", default=",".join(STEPS), help="the steps after nearest rounding, in order")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            calib, held_out, options = crop_sets(Path(tmp), name, args.calib, args.eval)
            for scheme in args.schemes.split(","):
                settings = Settings(per_channel=scheme == "per_channel")
                prepared = hold_back(prepare(SHARED / "models" / name, calib, held_out, None, None, options))
                cells = []
                steps = [("nearest", None), *((STEPS[step], APPLY.get(step)) for step in args.steps.split(","))]
                for label, apply in steps:
                    start = time.perf_counter()
                    if apply is not None:
                        settings = replace(settings, **{apply.__name__.removeprefix("apply_"): True})
                        prepared, _ = apply(prepared, settings, False)
                    if label == "+ auto precision":
                        settings = replace(settings, auto_precision=True, target_sqnr=args.target_sqnr,
                                           max_16bit=args.max_16bit or None)
                    row = {"model": name, "scheme": scheme, "step": label, **_measure(prepared, settings),
                           "seconds": round(time.perf_counter() - start, 1)}
                    print(json.dumps(row), flush=True)
                    top1 = f" ({100 * row['top1']:.0f}%)" if row["top1"] is not None else ""
                    raised = f", {row['raised']} raised" if row["raised"] is not None else ""
                    cells.append(f"{row['sqnr_db']:.2f}{top1}{raised}")
                rows.append(f"| {name} | {scheme.replace('_', ' ')} | " + " | ".join(cells) + " |")
    print()
    labels = ["nearest", *(STEPS[step] for step in args.steps.split(","))]
    print(f"| model | weights | {' | '.join(labels)} |")
    print("|---|---|" + "---|" * len(labels))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
