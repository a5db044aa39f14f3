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
from .graph.large import with_scoped_workspace
from .precision import encode_with_precision
from .recipe import optimize_weights
from .report.evaluation import Evaluation, Evaluator, worst_isolated
from .report.html import write_comparison_html
from .stages import (
    Encodings,
    Prepared,
    Settings,
    StageTimer,
    calibrate,
    check_analysis_samples,
    check_eval_samples,
    evaluate_encodings,
    limit_evaluation,
    make_evaluator,
    prepare,
    weight_set,
)
from .stats.distributed import RETRIES, check_code, code_fingerprint, connect, gather
from .stats.tensor_stats import TensorStats

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"


@dataclass
class CompareResult:
    """What :func:`compare` wrote and measured."""

    out_dir: Path
    report: dict
    seconds: float


@with_scoped_workspace
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
    eval_samples: int | str | None = None,
    progress: bool = True,
    ray: str | bool | None = None,
) -> CompareResult:
    """Every combination of ``methods`` and ``act_bitwidths`` from one calibration pass.

    ``base`` holds the other settings (weight method and bits, bias bits, percentile, fixed ranges);
    ``eval_samples`` as for quantize. One FP32 reference session serves every configuration.
    ``ray`` (True for a local cluster, or a cluster's address) runs the calibration, AdaRound's
    independent layers and the configurations (each with its isolated analysis) on Ray, with the
    same results.
    """
    timer = StageTimer()
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
    check_eval_samples(eval_samples)
    with timer.stage("prepare"):
        prepared = prepare(model, calib, eval_data, num_samples, input_shapes, image_options, fixed_inputs)
        prepared = limit_evaluation(prepared, eval_samples)
    with timer.stage("optimize"):
        prepared, base, optimizations = optimize_weights(prepared, base, progress, ray)
    configs = [replace(base, method=s.method, act_bitwidth=s.act_bitwidth, auto_precision=s.auto_precision)
               for s in configs]

    with export.StagedOutput(out) as staged:
        with timer.stage("calibration"):
            stats = calibrate(prepared, staged, {s.method for s in configs} | {base.weight_method}, progress,
                              weights=weight_set(prepared, base), ray=ray)
        with timer.stage("writing"):
            deploy_files = export.write_model(staged.stage(export.DEPLOY_FILE), prepared.deploy)
        with timer.stage("reference_setup"):
            evaluator = make_evaluator(prepared, tensors=False)  # compare reports outputs and isolated ranks
        rows = []
        if ray not in (None, False):
            results = _configurations_on_ray(prepared, stats, configs, analysis_samples, ray)
        else:
            results = (_configuration(prepared, stats, settings, analysis_samples, progress, evaluator, timer)
                       for settings in configs)
        for settings, (configured, encodings, precision, evaluation) in zip(configs, results, strict=True):
            name = f"{settings.method}_a{settings.act_bitwidth}"
            overrides = f"{name}/{export.OVERRIDES_FILE}"
            staged.stage(name).mkdir()
            export.write_json(
                staged.stage(overrides),
                export.overrides_json(configured.deploy, encodings.activations, encodings.written_params,
                                      settings.encoding_format),
            )
            deploy = export.DEPLOY_FILE
            if precision and precision["fp32_weights_restored"]:  # raised weights took back their FP32 values
                deploy = f"{name}/{export.DEPLOY_FILE}"
                export.write_model(staged.stage(deploy), configured.deploy)
            rows.append({
                "name": f"{settings.method} A{settings.act_bitwidth}W{settings.weight_bitwidth}",
                "settings": settings.to_dict(),
                "auto_precision": precision,
                "outputs": [c.to_dict() for c in evaluation.outputs],
                "worst_isolated": [f.name for f in worst_isolated(evaluation.tensors, 5)],
                "overrides": overrides,
                "deploy": deploy,
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
                      *(row["overrides"] for row in rows),
                      *(row["deploy"] for row in rows if row["deploy"] != export.DEPLOY_FILE)],
        }
        with timer.stage("report_html"):
            write_comparison_html(report, staged.stage(COMPARE_HTML))
        report["timings"] = timer.to_dict()  # the one part that differs between identical runs
        export.write_json(staged.stage(COMPARE_JSON), report)
    return CompareResult(staged.destination, report, time.perf_counter() - timer.start)


def _configuration(
    prepared: Prepared, stats: dict[str, TensorStats], settings: Settings, analysis_samples: int, progress: bool,
    evaluator: Evaluator | None = None, timer: StageTimer | None = None,
) -> tuple[Prepared, Encodings, dict | None, Evaluation]:
    """One configuration's model (raised weights may take their FP32 values), encodings (with its
    automatic mixed precision, if asked) and evaluation."""
    configured, encodings, precision = encode_with_precision(prepared, stats, settings)
    evaluation = evaluate_encodings(configured, stats, encodings, settings.arithmetic, analysis_samples, progress,
                                    evaluator, timer)
    return configured, encodings, precision, evaluation


def _configurations_on_ray(
    prepared: Prepared, stats: dict[str, TensorStats], configs: list[Settings], analysis_samples: int,
    address: str | bool,
) -> list[tuple[Prepared, Encodings, dict | None, Evaluation]]:
    """_configuration of every configuration, one Ray task each (stats/distributed.py); the evaluation
    samples are read by path in the tasks. The results are those of the run without Ray."""
    ray = connect(None if address is True else address)
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_configuration_task)
    shared, stats_ref = ray.put(prepared), ray.put(stats)
    return gather(ray, [task.remote(shared, stats_ref, settings, analysis_samples, code_fingerprint())
                        for settings in configs])


def _configuration_task(prepared: Prepared, stats: dict[str, TensorStats], settings: Settings,
                        analysis_samples: int, code: str) -> tuple[Prepared, Encodings, dict | None, Evaluation]:
    """In a worker: one configuration, without progress bars (a ranking for automatic mixed precision
    runs in the task: tasks started from tasks could wait for CPUs their parents hold)."""
    check_code(code)
    return _configuration(prepared, stats, settings, analysis_samples, False, make_evaluator(prepared, tensors=False))


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
