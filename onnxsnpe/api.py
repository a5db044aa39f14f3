"""The whole job in one call: FP32 ONNX + samples -> everything SNPE needs, plus a report.

``quantize`` runs the stages (stages.py) in order and writes their results; ``Settings`` is
re-exported from there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from . import export
from .data.datasets import ImageOptions
from .encode.methods import DEFAULT_PERCENTILE
from .errors import HtpRefused, OnnxSnpeError
from .graph.large import free_dropped_copies, tensor_bytes, with_scoped_workspace
from .optimize.adaround import DEFAULT_INPUTS as DEFAULT_ADAROUND_INPUTS
from .optimize.adaround import DEFAULT_ITERATIONS as DEFAULT_ADAROUND_ITERATIONS
from .optimize.adaround import DEFAULT_SAMPLES as DEFAULT_ADAROUND_SAMPLES
from .optimize.bias_correction import DEFAULT_SAMPLES as DEFAULT_CORRECTION_SAMPLES
from .precision import encode_with_precision
from .recipe import optimize_weights
from .report.agreement import measure_agreement
from .report.document import build_report
from .report.html import write_html_report
from .report.metrics import OutputComparison, json_db
from .report.sensitivity import DEFAULT_ANALYSIS_SAMPLES
from .report.weight_analysis import analyze_weights
from .simulate.arithmetic import htp_arithmetic, simulation_model
from .simulate.emulator import HTP_ARCHS, HtpSession, qnn_unavailable_reason, simulation_runner
from .simulate.qdq import build_qdq_model
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
    prepare,
    weight_set,
)


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote and measured."""

    out_dir: Path
    files: dict[str, Path]
    report: dict
    outputs: list[OutputComparison]
    seconds: float


@with_scoped_workspace
def quantize(
    model: str | os.PathLike,
    calib: str | os.PathLike,
    out: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    num_samples: int | None = None,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    weight_method: str = "minmax",
    fixed_ranges: bool = True,
    act_bitwidth: int = 8,
    weight_bitwidth: int = 8,
    per_channel: bool = False,
    optimize: bool = False,
    cle: bool = False,
    adaround: bool = False,
    adaround_iters: int = DEFAULT_ADAROUND_ITERATIONS,
    adaround_samples: int = DEFAULT_ADAROUND_SAMPLES,
    adaround_inputs: str = DEFAULT_ADAROUND_INPUTS,
    bias_correction: bool = False,
    correction_samples: int = DEFAULT_CORRECTION_SAMPLES,
    auto_precision: bool = False,
    target_sqnr: float | None = None,
    max_16bit: int | None = None,
    bias_bitwidth: int = 32,
    write_bias_encodings: bool = False,
    encoding_format: str = "legacy",
    arithmetic: str = "htp",
    input_shapes: dict[str | None, tuple[int, ...]] | None = None,
    fixed_inputs: dict[str, list[float]] | None = None,
    image_options: ImageOptions | None = None,
    analysis_samples: int = DEFAULT_ANALYSIS_SAMPLES,
    eval_samples: int | str | None = None,
    htp_samples: int = 0,
    htp_arch: str | None = None,
    progress: bool = True,
    ray: str | bool | None = None,
) -> QuantizeResult:
    """Calibrate ``model`` on the samples at ``calib`` and write SNPE's inputs into ``out``.

    Writes snpe_deploy.onnx, snpe_clip_ranges.json, data.txt with raw/, report.json and report.html.
    ``eval_data`` holds held-out samples for the report (default: the calibration samples);
    the isolated per-tensor errors use the first ``analysis_samples`` of them (0 skips them).
    ``eval_samples`` cuts the evaluation to the first N samples; by default every held-out sample,
    or without ``eval_data`` the first 64 calibration samples; "all" takes every one.
    ``fixed_inputs`` ({name: values}) become constants, so that If nodes depending on them fold.
    Also writes snpe_qdq.onnx; with ``htp_samples`` > 0 runs that many evaluation samples on
    Qualcomm's HTP backend (onnxruntime-qnn) and reports how closely the simulation follows it, the
    emulator computing as HTP ``htp_arch`` (emulator.HtpSession: None picks).
    ``ray`` (True for a local cluster, or a cluster's address) runs the calibration, ``optimize``'s trial
    calibrations, AdaRound's rounding where its order allows, automatic mixed precision's ranking and
    the report's isolated analysis on Ray, with the same results.
    Raises OnnxSnpeError, with a one-line message, on bad input.
    """
    timer = StageTimer()
    settings = Settings(method=method, percentile=percentile, weight_method=weight_method, fixed_ranges=fixed_ranges,
                        act_bitwidth=act_bitwidth, weight_bitwidth=weight_bitwidth, per_channel=per_channel,
                        optimize=optimize, cle=cle, adaround=adaround, adaround_iters=adaround_iters,
                        adaround_samples=adaround_samples, adaround_inputs=adaround_inputs,
                        bias_correction=bias_correction, correction_samples=correction_samples,
                        auto_precision=auto_precision, target_sqnr=target_sqnr, max_16bit=max_16bit,
                        bias_bitwidth=bias_bitwidth, write_bias_encodings=write_bias_encodings,
                        encoding_format=encoding_format, arithmetic=arithmetic)
    if arithmetic == "htp" and htp_arch is not None:  # simulate the architecture the emulator computes as
        settings = replace(settings, arithmetic=htp_arithmetic(htp_arch))
    settings.check()
    check_analysis_samples(analysis_samples)
    check_eval_samples(eval_samples)
    if htp_samples < 0:
        raise OnnxSnpeError(f"--htp must be 0 or more, got {htp_samples}")
    if htp_arch is not None and htp_arch not in HTP_ARCHS:
        raise OnnxSnpeError(f"--htp-arch must be one of {', '.join(HTP_ARCHS)}, got {htp_arch}")
    if htp_samples and (reason := qnn_unavailable_reason()):
        raise OnnxSnpeError(f"--htp: {reason}")
    with timer.stage("prepare"):
        prepared = prepare(model, calib, eval_data, num_samples, input_shapes, image_options, fixed_inputs)
        prepared = limit_evaluation(prepared, eval_samples)
    with timer.stage("optimize"):
        prepared, settings, optimizations = optimize_weights(prepared, settings, progress, ray)

    with export.StagedOutput(out) as staged:
        with timer.stage("calibration"):
            stats = calibrate(prepared, staged, [method], progress, weights=weight_set(prepared, settings),
                              ray=ray)
        with timer.stage("encoding"):
            prepared, encodings, precision = encode_with_precision(prepared, stats, settings, ray)
        if precision is not None:
            optimizations["auto_precision"] = precision
            if "recipe" in optimizations:
                optimizations["recipe"]["ablation"].append(
                    {"step": "+ auto precision", "sqnr_db": json_db(precision["final_sqnr_db"]),
                     "top1_agreement": None, "kept": bool(precision["raised"]), "seconds": precision["seconds"]})
        evaluation = evaluate_encodings(prepared, stats, encodings, settings.arithmetic, analysis_samples, progress,
                                        timer=timer, ray=ray)
        if not htp_samples:  # the simulated model is not run again: free its weights
            evaluation = replace(evaluation, simulation=None)
            free_dropped_copies(tensor_bytes(prepared.deploy))
        with timer.stage("weight_analysis"):
            weights = analyze_weights(prepared.reference, encodings.weights, prepared.targets.weight_axes,
                                      prepared.deploy)
        with timer.stage("qdq_model"):
            qdq = build_qdq_model(prepared.deploy, prepared.targets, encodings.activations, encodings.params)
        with timer.stage("htp_emulator"):
            htp = compare_with_htp(prepared, encodings, qdq, htp_samples, htp_arch,
                                   {settings.arithmetic: evaluation.simulation}) if htp_samples else None
        with timer.stage("writing"):
            deploy_files = export.write_model(staged.stage(export.DEPLOY_FILE), prepared.deploy)
            qdq_files = export.write_model(staged.stage(export.QDQ_FILE), qdq)
            export.write_json(
                staged.stage(export.OVERRIDES_FILE),
                export.overrides_json(prepared.deploy, encodings.activations, encodings.written_params,
                                      settings.encoding_format),
            )
        files = [*deploy_files, export.OVERRIDES_FILE, export.INPUT_LIST_FILE, export.RAW_DIR + "/",
                 *qdq_files, export.REPORT_FILE, export.HTML_REPORT_FILE]
        calibration, evaluation_section = prepared.describe_data()
        targets = prepared.targets
        report = build_report(
            model_path=prepared.model_path,
            input_shapes=prepared.shapes,
            input_dtypes=prepared.input_dtypes,
            fixed_inputs=fixed_inputs or {},
            output_names=[o.name for o in prepared.deploy.graph.output],
            calibration=calibration,
            evaluation=evaluation_section,
            settings=settings.to_dict(),
            graph={"nodes": len(prepared.deploy.graph.node), "batchnorms_folded": prepared.batchnorms_folded},
            encodings={
                "activation_count": len(encodings.activations),
                "alias_count": len(targets.aliases),
                "squashed_count": len(targets.squashed),
                "param_count": len(encodings.written_params),
                "activations": targets.activations,
                "aliases": targets.aliases,
                "squashed_into_activation": targets.squashed,
                "params": list(encodings.written_params),
            },
            evaluation_figures=evaluation,
            weights=weights,
            files=files,
        )
        if htp is not None:
            report["htp"] = htp
        report["optimizations"] = optimizations
        with timer.stage("report_html"):
            write_html_report(report, staged.stage(export.HTML_REPORT_FILE))
        if not htp_samples:
            timer.seconds.pop("htp_emulator")
        report["timings"] = timer.to_dict()  # the one part of report.json that differs between identical runs
        export.write_json(staged.stage(export.REPORT_FILE), report)
    out_dir = staged.destination
    return QuantizeResult(
        out_dir=out_dir,
        files={name.rstrip("/"): out_dir / name.rstrip("/") for name in files},
        report=report,
        outputs=evaluation.outputs,
        seconds=time.perf_counter() - timer.start,
    )


def compare_with_htp(prepared: Prepared, encodings: Encodings, qdq: onnx.ModelProto, count: int,
                     arch: str | None = None,
                     built: dict[str, tuple[onnx.ModelProto, dict[str, str]]] | None = None) -> dict:
    """Run ``count`` evaluation samples on the HTP backend and measure how closely our simulations follow it.

    Both arithmetics are compared (keys of ``agreement``): ``htp``, the HTP's measured integer
    arithmetic of the architecture the emulator computes as, and ``exact``, float ops with exact
    rounding; ``built`` holds simulation models already made for these encodings (the evaluation's),
    by arithmetic. A model the backend refuses is a finding, reported as ``refused`` (its message)
    with no samples run, so that the rest of the run's outputs are still written.
    """
    built = built or {}
    acts = encodings.activations
    try:
        session = HtpSession(qdq, {name: acts[name] for name in prepared.input_names if name in acts}, arch)
    except HtpRefused as exc:
        return {"samples": 0, "htp_arch": arch, "refused": str(exc), "cpu_fallback_ops": None, "float_ops": [],
                "agreement": {}}
    names = session.output_names
    samples = [prepared.eval_set.load(i) for i in range(min(count, len(prepared.eval_set)))]
    arithmetics = {"htp": htp_arithmetic(session.arch), "exact": "exact"}  # the emulator's own architecture
    simulations = {
        label: built.get(arithmetic)
        or simulation_model(prepared.deploy, prepared.targets, acts, encodings.params, arithmetic)
        for label, arithmetic in arithmetics.items()
    }
    output_encodings = {name: acts[name] for name in names}
    return {
        "samples": len(samples),
        "htp_arch": session.arch,
        "cpu_fallback_ops": None if session.cpu_nodes is None else [list(n) for n in session.cpu_nodes],
        "float_ops": [list(n) for n in session.float_nodes],
        "agreement": {
            label: [a.to_dict() for a in measure_agreement(session.run, simulation_runner(model, output_map, names),
                                                            names, output_encodings, samples)]
            for label, (model, output_map) in simulations.items()
        },
    }
