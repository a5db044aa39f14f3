"""The whole job in one call: FP32 ONNX + samples -> everything SNPE needs, plus a report."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import export
from .calibration import Dataset, ImageOptions, Sample, open_dataset
from .errors import OnnxSnpeError
from .evaluation import evaluate
from .graph import load_model, model_inputs, prepare_deploy_model
from .html_report import write_html_report
from .metrics import OutputComparison
from .ranges import ACTIVATION_METHODS, activation_encodings, bias_encodings, weight_encodings
from .report import build_report
from .statistics import collect_statistics
from .targets import find_targets
from .weight_analysis import analyze_weights


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote and measured."""

    out_dir: Path
    files: dict[str, Path]
    report: dict
    outputs: list[OutputComparison]
    seconds: float


def quantize(
    model: str | os.PathLike,
    calib: str | os.PathLike,
    out: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    num_samples: int | None = None,
    method: str = "minmax",
    act_bitwidth: int = 8,
    weight_bitwidth: int = 8,
    bias_bitwidth: int = 32,
    write_bias_encodings: bool = False,
    input_shapes: dict[str | None, tuple[int, ...]] | None = None,
    image_options: ImageOptions | None = None,
    analysis_samples: int = 4,
    progress: bool = True,
) -> QuantizeResult:
    """Calibrate ``model`` on the samples at ``calib`` and write SNPE's inputs into ``out``.

    Writes snpe_deploy.onnx, snpe_clip_ranges.json, data.txt with raw/, report.json and report.html.
    ``eval_data`` holds held-out samples for the report (default: the calibration samples);
    the isolated per-tensor errors use the first ``analysis_samples`` of them (0 skips them).
    Raises OnnxSnpeError, with a one-line message, on bad input.
    """
    start = time.perf_counter()
    if analysis_samples < 0:
        raise OnnxSnpeError(f"--analysis-samples must be 0 or more, got {analysis_samples}")
    if method not in ACTIVATION_METHODS:
        raise OnnxSnpeError(f"unknown method '{method}'; choose from {', '.join(ACTIVATION_METHODS)}")
    for flag, value, allowed in (
        ("--act-bitwidth", act_bitwidth, (8, 16)),
        ("--weight-bitwidth", weight_bitwidth, (8, 16)),
        ("--bias-bitwidth", bias_bitwidth, (8, 32)),
    ):
        if value not in allowed:
            raise OnnxSnpeError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value}")

    model_path = Path(model).absolute()
    onnx_model = load_model(model_path)
    inputs = model_inputs(onnx_model)
    calib_set = open_dataset(calib, inputs, image_options, input_shapes, num_samples)
    calib_set.load(0)  # fixes the input shapes from the data
    shapes = dict(calib_set.shapes)
    eval_set = calib_set
    if eval_data is not None:
        eval_set = open_dataset(eval_data, inputs, image_options, input_shapes)
        eval_set.shapes.update(shapes)  # the deploy model is static: eval samples must match

    deploy, batchnorms_folded = prepare_deploy_model(onnx_model, shapes)
    targets = find_targets(deploy)

    with export.StagedOutput(out) as staged:
        raw_writer = export.InputListWriter(staged, [spec.name for spec in inputs])
        samples = _progress(calib_set, "calibration", progress)
        stats = collect_statistics(deploy, targets.activations, _teed(samples, raw_writer.add))
        raw_writer.finish()

        act_encodings = activation_encodings(stats, targets, method, act_bitwidth)
        param_encodings = weight_encodings(deploy, targets, weight_bitwidth)
        biases = bias_encodings(deploy, targets, act_encodings, param_encodings, bias_bitwidth)
        evaluation = evaluate(
            deploy,
            targets,
            act_encodings,
            {**param_encodings, **biases},
            {name: (stats[name].min, stats[name].max) for name in targets.activations},
            _progress(eval_set, "evaluation", progress),
            isolated_samples=analysis_samples,
        )
        weights = analyze_weights(deploy, param_encodings)
        written_params = {**param_encodings, **(biases if write_bias_encodings else {})}

        export.write_model(staged.stage(export.DEPLOY_FILE), deploy)
        export.write_json(
            staged.stage(export.OVERRIDES_FILE),
            export.overrides_json(deploy, act_encodings, written_params),
        )
        files = [export.DEPLOY_FILE, export.OVERRIDES_FILE, export.INPUT_LIST_FILE, export.RAW_DIR + "/",
                 export.REPORT_FILE, export.HTML_REPORT_FILE]
        report = build_report(
            model_path=model_path,
            input_shapes=shapes,
            output_names=[o.name for o in deploy.graph.output],
            calibration=_describe(calib_set),
            evaluation={
                **_describe(eval_set),
                "held_out": eval_data is not None,
                "note": None if eval_data is not None else
                "no --eval data: figures are measured on the calibration samples and flatter the result",
            },
            settings={
                "method": method,
                "act_bitwidth": act_bitwidth,
                "weight_bitwidth": weight_bitwidth,
                "bias_bitwidth": bias_bitwidth,
                "bias_encodings_written": write_bias_encodings,
            },
            graph={"nodes": len(deploy.graph.node), "batchnorms_folded": batchnorms_folded},
            encodings={
                "activation_count": len(act_encodings),
                "alias_count": len(targets.aliases),
                "squashed_count": len(targets.squashed),
                "param_count": len(written_params),
                "activations": targets.activations,
                "aliases": targets.aliases,
                "squashed_into_activation": targets.squashed,
                "params": list(written_params),
            },
            evaluation_figures=evaluation,
            weights=weights,
            files=files,
        )
        export.write_json(staged.stage(export.REPORT_FILE), report)
        write_html_report(report, staged.stage(export.HTML_REPORT_FILE))
    out_dir = staged.destination
    return QuantizeResult(
        out_dir=out_dir,
        files={name.rstrip("/"): out_dir / name.rstrip("/") for name in files},
        report=report,
        outputs=evaluation.outputs,
        seconds=time.perf_counter() - start,
    )


def _describe(dataset: Dataset) -> dict:
    return {"path": str(Path(dataset.path).absolute()), "format": dataset.kind, "num_samples": len(dataset)}


def _progress(dataset: Dataset, label: str, enabled: bool) -> Iterator[Sample]:
    return iter(tqdm(dataset, desc=label, unit="sample", disable=not enabled or None, leave=False))


def _teed(samples: Iterator[Sample], sink) -> Iterator[Sample]:
    for sample in samples:
        sink(sample)
        yield sample
