"""``onnxsnpe compare``: calibrate once, then encode, simulate and report several configurations.

Writes the deploy model and input list once, one overrides file per configuration
(``<method>_a<bits>/snpe_clip_ranges.json``), and compare.json / compare.html side by side.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__, export
from .data.datasets import ImageOptions
from .errors import OnnxSnpeError
from .recipe import run_recipe
from .report.evaluation import worst_isolated
from .report.html import write_comparison_html
from .stages import (
    Settings,
    calibrate,
    check_analysis_samples,
    encode_with_precision,
    evaluate_encodings,
    optimize_model,
    prepare,
)

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"


@dataclass
class CompareResult:
    """What :func:`compare` wrote and measured."""

    out_dir: Path
    report: dict
    seconds: float


def compare(
    model: str | os.PathLike,
    calib: str | os.PathLike,
    out: str | os.PathLike,
    *,
    methods: list[str],
    act_bitwidths: list[int],
    base: Settings | None = None,
    eval_data: str | os.PathLike | None = None,
    num_samples: int | None = None,
    input_shapes: dict[str | None, tuple[int, ...]] | None = None,
    fixed_inputs: dict[str, list[float]] | None = None,
    image_options: ImageOptions | None = None,
    analysis_samples: int = 1,
    progress: bool = True,
    ray: str | bool | None = None,
) -> CompareResult:
    """Every combination of ``methods`` and ``act_bitwidths`` from one calibration pass.

    ``base`` holds the other settings (weight method and bits, bias bits, percentile, fixed ranges).
    ``ray`` (True for a local cluster, or a cluster's address) calibrates on Ray, with the same result.
    """
    start = time.perf_counter()
    if not methods or not act_bitwidths:
        raise OnnxSnpeError("compare needs at least one method and one activation bitwidth")
    base = base or Settings()
    configs = [
        replace(base, method=m, act_bitwidth=b, auto_precision=base.auto_precision and b == 8)
        for m in dict.fromkeys(methods) for b in dict.fromkeys(act_bitwidths)
    ]
    for settings in configs:
        settings.check()
    check_analysis_samples(analysis_samples)
    prepared = prepare(model, calib, eval_data, num_samples, input_shapes, image_options, fixed_inputs)
    if base.optimize:
        prepared, base, optimizations = run_recipe(prepared, base, progress, ray)
        configs = [replace(base, method=s.method, act_bitwidth=s.act_bitwidth, auto_precision=s.auto_precision)
                   for s in configs]
    else:
        prepared, optimizations = optimize_model(prepared, base, progress)

    with export.StagedOutput(out) as staged:
        stats = calibrate(prepared, staged, {s.method for s in configs} | {base.weight_method}, progress, ray)
        deploy_files = export.write_model(staged.stage(export.DEPLOY_FILE), prepared.deploy)
        rows = []
        for settings in configs:
            name = f"{settings.method}_a{settings.act_bitwidth}"
            encodings, precision = encode_with_precision(prepared, stats, settings, ray)
            evaluation = evaluate_encodings(prepared, stats, encodings, settings.arithmetic, analysis_samples,
                                            progress)
            overrides = f"{name}/{export.OVERRIDES_FILE}"
            staged.stage(name).mkdir()
            export.write_json(
                staged.stage(overrides),
                export.overrides_json(prepared.deploy, encodings.activations, encodings.written_params,
                                      settings.encoding_format),
            )
            rows.append({
                "name": f"{settings.method} A{settings.act_bitwidth}W{settings.weight_bitwidth}",
                "settings": settings.to_dict(),
                "auto_precision": precision,
                "outputs": [c.to_dict() for c in evaluation.outputs],
                "worst_isolated": [f.name for f in worst_isolated(evaluation.tensors, 5)],
                "overrides": overrides,
            })
        calibration, evaluation_section = prepared.describe_data()
        report = {
            "tool": {"name": "onnxsnpe", "version": __version__},
            "model": {"path": str(prepared.model_path),
                      "inputs": [{"name": n, "shape": list(s)} for n, s in prepared.shapes.items()]},
            "calibration": calibration,
            "evaluation": {**evaluation_section, "isolated_samples": min(analysis_samples, len(prepared.eval_set))},
            "configurations": rows,
            "optimizations": optimizations,
            "files": [*deploy_files, export.INPUT_LIST_FILE, export.RAW_DIR + "/", COMPARE_JSON, COMPARE_HTML,
                      *(row["overrides"] for row in rows)],
        }
        export.write_json(staged.stage(COMPARE_JSON), report)
        write_comparison_html(report, staged.stage(COMPARE_HTML))
    return CompareResult(staged.destination, report, time.perf_counter() - start)


def comparison_summary(report: dict, out_dir: Path, seconds: float) -> str:
    """A one-screen table of the configurations for the terminal."""
    lines = [f"onnxsnpe: compared {len(report['configurations'])} configurations of {report['model']['path']}"
             f" in {seconds:.1f} s (evaluated on {report['evaluation']['num_samples']}"
             f" {'held-out' if report['evaluation']['held_out'] else 'calibration'} samples)"]
    width = max(len(row["name"]) for row in report["configurations"])
    for row in report["configurations"]:
        figures = []
        for output in row["outputs"]:
            sqnr = "exact" if output["sqnr_db"] is None else f"{output['sqnr_db']:.2f} dB"
            top1 = f", top-1 {100 * output['top1_agreement']:.1f}%" if "top1_agreement" in output else ""
            figures.append(f"{output['name']}: {sqnr}{top1}")
        lines.append(f"  {row['name']:<{width}}  " + "; ".join(figures))
    lines.append(f"  wrote {out_dir}/  (compare.html, compare.json, one overrides file per configuration)")
    return "\n".join(lines)
