"""The stages shared by ``quantize`` and ``compare``, wired in order: prepare (load, fix shapes,
fold, find targets, open the datasets), optimize (steps that change weights), calibrate (one pass:
statistics and the input list), encode (with automatic mixed precision when asked), evaluate.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import onnx
from tqdm import tqdm

from . import export
from .data.datasets import Dataset, ImageOptions, Sample, open_dataset
from .encode.completion import completed_encodings
from .encode.encoding import Encoding, ParamEncoding
from .encode.methods import DEFAULT_PERCENTILE, check_method
from .encode.precision import sixteen_bit_tensors
from .encode.quantized_weights import quantized_weights
from .encode.ranges import (
    activation_encodings,
    function_ranges,
    gathered_table_ranges,
    weight_encodings,
)
from .errors import OnnxSnpeError
from .graph.control_flow import check_supported
from .graph.deploy import prepare_deploy_model
from .graph.fixed_inputs import fix_inputs
from .graph.foreign_ops import check_float_model
from .graph.load import load_model, model_inputs
from .graph.targets import QuantTargets, find_targets
from .optimize.adaround import DEFAULT_INPUTS as DEFAULT_ADAROUND_INPUTS
from .optimize.adaround import DEFAULT_ITERATIONS as DEFAULT_ADAROUND_ITERATIONS
from .optimize.adaround import DEFAULT_SAMPLES as DEFAULT_ADAROUND_SAMPLES
from .optimize.adaround import INPUT_MODES as ADAROUND_INPUTS
from .optimize.adaround import adaround, run_here
from .optimize.adaround_on_ray import ray_runner
from .optimize.bias_absorption import absorb_high_biases
from .optimize.bias_correction import DEFAULT_SAMPLES as DEFAULT_CORRECTION_SAMPLES
from .optimize.bias_correction import correct_biases
from .optimize.cle import equalize
from .optimize.mixed_precision import held_back_count
from .report.evaluation import Evaluation, Evaluator
from .report.timings import StageTimer
from .simulate.arithmetic import ARITHMETICS
from .stats.collect import collect_statistics
from .stats.distributed import collect_on_ray
from .stats.tensor_stats import TensorStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """How ranges and encodings are chosen."""

    method: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE
    weight_method: str = "minmax"
    fixed_ranges: bool = True
    act_bitwidth: int = 8
    weight_bitwidth: int = 8
    per_channel: bool = False
    adaround: bool = False
    adaround_iters: int = DEFAULT_ADAROUND_ITERATIONS
    adaround_samples: int = DEFAULT_ADAROUND_SAMPLES
    adaround_inputs: str = DEFAULT_ADAROUND_INPUTS
    bias_correction: bool = False
    correction_samples: int = DEFAULT_CORRECTION_SAMPLES
    optimize: bool = False
    cle: bool = False
    auto_precision: bool = False
    target_sqnr: float | None = None
    max_16bit: int | None = None
    bias_bitwidth: int = 32
    write_bias_encodings: bool = False
    encoding_format: str = "legacy"
    arithmetic: str = "htp"

    def check(self) -> None:
        """Raise OnnxSnpeError for a setting SNPE or this tool does not support."""
        check_method(self.method, self.percentile)
        if self.arithmetic not in ARITHMETICS:
            raise OnnxSnpeError(f"--arithmetic must be one of {', '.join(ARITHMETICS)}, got {self.arithmetic}")
        check_method(self.weight_method, self.percentile, "--weight-method")
        if self.encoding_format not in export.ENCODING_FORMATS:
            raise OnnxSnpeError(f"--encoding-format must be one of {', '.join(export.ENCODING_FORMATS)}, "
                                f"got {self.encoding_format}")
        for flag, value, allowed in (
            ("--act-bitwidth", self.act_bitwidth, (8, 16)),
            ("--weight-bitwidth", self.weight_bitwidth, (8, 16)),
            ("--bias-bitwidth", self.bias_bitwidth, (8, 32)),
        ):
            if value not in allowed:
                raise OnnxSnpeError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value}")
        if self.adaround_inputs not in ADAROUND_INPUTS:
            raise OnnxSnpeError(f"--adaround-inputs must be one of {', '.join(ADAROUND_INPUTS)}, "
                                f"got {self.adaround_inputs}")
        for flag, count in (("--correction-samples", self.correction_samples),
                            ("--adaround-samples", self.adaround_samples), ("--adaround-iters", self.adaround_iters)):
            if count < 1:
                raise OnnxSnpeError(f"{flag} must be 1 or more, got {count}")
        if self.auto_precision:
            if self.target_sqnr is None and self.max_16bit is None:
                raise OnnxSnpeError("--auto-precision needs --target-sqnr DB, --max-16bit N or both")
            if self.act_bitwidth != 8:
                raise OnnxSnpeError("--auto-precision raises 8-bit activations to 16 bits: use --act-bitwidth 8")
            if self.max_16bit is not None and self.max_16bit < 1:
                raise OnnxSnpeError(f"--max-16bit must be 1 or more, got {self.max_16bit}")

    def to_dict(self) -> dict:
        settings = asdict(self)
        if not self.bias_correction:
            settings["correction_samples"] = None
        if not self.adaround:
            settings["adaround_iters"] = settings["adaround_samples"] = settings["adaround_inputs"] = None
        if not self.auto_precision:
            settings["target_sqnr"] = settings["max_16bit"] = None
        if "percentile" not in (self.method, self.weight_method):
            settings["percentile"] = None
        settings["bias_encodings_written"] = settings.pop("write_bias_encodings")
        return settings


@dataclass
class Prepared:
    """The deploy model, what gets encodings, and the datasets, ready to calibrate."""

    model_path: Path
    deploy: onnx.ModelProto
    batchnorms_folded: int
    targets: QuantTargets
    input_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    calib_set: Dataset
    eval_set: Dataset
    held_out: bool
    weight_encodings: dict[str, ParamEncoding] | None = None
    """Weight encodings fixed by an optimization (AdaRound's grids), else computed from the deploy weights."""
    fp32_deploy: onnx.ModelProto | None = None
    """The FP32 model the rounding steps stand for (after CLE, before AdaRound): bias correction aims at it."""
    judging_set: Dataset | None = None
    """Calibration samples held back from calibration and fitting, to judge automatic choices on."""
    eval_available: int | None = None
    """How many evaluation samples there were when eval_set was cut to the first few (limit_evaluation)."""

    @cached_property
    def table_ranges(self) -> dict[str, tuple[float, float]]:
        """The deploy model's gathered table ranges (encode.ranges.gathered_table_ranges), read once."""
        return gathered_table_ranges(self.deploy)

    @property
    def reference(self) -> onnx.ModelProto:
        """The FP32 model quantization is measured against: before any rounding step changed weights."""
        return self.fp32_deploy or self.deploy

    @property
    def input_dtypes(self) -> dict[str, str]:
        """Each input's dtype as the samples carry it (float inputs as float32)."""
        return {spec.name: "float32" if spec.dtype.kind == "f" else spec.dtype.name for spec in self.calib_set.inputs}

    def describe_data(self) -> tuple[dict, dict]:
        """The report's calibration and evaluation sections."""
        evaluation = {
            **_describe(self.eval_set),
            "held_out": self.held_out,
            "available_samples": self.eval_available or len(self.eval_set),
            "note": None if self.held_out else
            "no --eval data: figures are measured on the calibration samples and flatter the result",
        }
        if self.eval_available is not None:
            evaluation["subset"] = (f"the first {len(self.eval_set)} of {self.eval_available} "
                                    f"{'evaluation' if self.held_out else 'calibration'} samples "
                                    "(--eval-samples all for every one)")
        return _describe(self.calib_set), evaluation


@dataclass
class Encodings:
    """Every encoding of one configuration."""

    activations: dict[str, Encoding]
    weights: dict[str, Encoding]
    biases: dict[str, Encoding]
    constants: dict[str, Encoding]  # static operands of elementwise ops, 8-bit min-max as SNPE quantizes them
    written_params: dict[str, ParamEncoding]

    @property
    def params(self) -> dict[str, Encoding]:
        """Every constant the quantized model quantizes: weights, biases and static operands."""
        return {**self.weights, **self.constants, **self.biases}


DEFAULT_EVAL_SAMPLES = 64
"""Without --eval, the report measures on the first this many calibration samples: enough for stable
figures, at a fraction of a large calibration set's cost (--eval-samples all takes every one)."""


def check_eval_samples(count: int | str | None) -> None:
    """--eval-samples is a positive count, "all" or unset."""
    if count is not None and count != "all" and (not isinstance(count, int) or count < 1):
        raise OnnxSnpeError(f"--eval-samples must be a positive number or 'all', got {count}")


def limit_evaluation(prepared: Prepared, count: int | str | None) -> Prepared:
    """The evaluation set cut to its first ``count`` samples: by default (None) every held-out
    sample, or the first DEFAULT_EVAL_SAMPLES calibration samples without --eval; "all": every one."""
    check_eval_samples(count)
    if count is None:
        count = "all" if prepared.held_out else DEFAULT_EVAL_SAMPLES
    available = len(prepared.eval_set)
    if count == "all" or count >= available:
        return prepared
    return replace(prepared, eval_set=replace(prepared.eval_set, entries=prepared.eval_set.entries[:count]),
                   eval_available=available)


def check_analysis_samples(count: int) -> None:
    """--analysis-samples must not be negative."""
    if count < 0:
        raise OnnxSnpeError(f"--analysis-samples must be 0 or more, got {count}")


def prepare(
    model: str | os.PathLike,
    calib: str | os.PathLike,
    eval_data: str | os.PathLike | None,
    num_samples: int | None,
    input_shapes: dict[str | None, tuple[int, ...]] | None,
    image_options: ImageOptions | None,
    fixed_inputs: dict[str, list[float]] | None = None,
) -> Prepared:
    """Load the model, open the datasets, fix the shapes from the first sample, fold the graph.

    ``fixed_inputs`` become constants first (graph/fixed_inputs.py), so what depends on them folds.
    """
    model_path = Path(model).absolute()
    onnx_model = fix_inputs(load_model(model_path), fixed_inputs or {})
    check_float_model(onnx_model, str(model_path))
    inputs = model_inputs(onnx_model)
    calib_set = open_dataset(calib, inputs, image_options, input_shapes, num_samples)
    calib_set.load(0)  # fixes the input shapes from the data
    shapes = dict(calib_set.shapes)
    eval_set = calib_set
    if eval_data is not None:
        eval_set = open_dataset(eval_data, inputs, image_options, input_shapes)
        eval_set.shapes.update(shapes)  # the deploy model is static: eval samples must match
    deploy, batchnorms_folded = prepare_deploy_model(onnx_model, shapes)
    check_supported(deploy, str(model_path))
    return Prepared(model_path, deploy, batchnorms_folded, find_targets(deploy), [spec.name for spec in inputs],
                    shapes, calib_set, eval_set, eval_data is not None)


def optimize_model(prepared: Prepared, settings: Settings, progress: bool,
                   ray: str | bool | None = None) -> tuple[Prepared, dict]:
    """The steps that change the deploy model's weights before calibration, as ``settings`` ask, in
    order: CLE, AdaRound, bias correction (held-back samples set apart first when a choice is automatic).
    Returns the prepared model with the new deploy graph, and what each step did. ``ray``: AdaRound's
    rounding on Ray where its order allows (apply_adaround)."""
    done: dict = {}
    if settings.auto_precision or settings.optimize:
        prepared = hold_back(prepared)
    if settings.cle:
        prepared, done["cle"] = apply_cle(prepared, settings, progress)
    if settings.adaround:
        prepared, done["adaround"] = apply_adaround(prepared, settings, progress, ray)
    if settings.bias_correction:
        prepared, done["bias_correction"] = apply_bias_correction(prepared, settings, progress)
    return prepared, done


def weight_set(prepared: Prepared, settings: Settings, raised: Iterable[str] = ()) -> dict[str, ParamEncoding]:
    """The weight encodings: those an earlier step fixed (AdaRound's grids), the others from the deploy
    weights, the ``raised`` ones at 16 bits (a raised weight is never among the fixed ones:
    precision.with_fp32_weights releases it)."""
    fixed = prepared.weight_encodings or {}
    if fixed.keys() >= set(prepared.targets.weights):
        return fixed
    computed = weight_encodings(prepared.deploy, prepared.targets, settings.weight_bitwidth, settings.weight_method,
                                settings.percentile, per_channel=settings.per_channel, raised=raised)
    return {name: fixed.get(name, encoding) for name, encoding in computed.items()}


def apply_cle(prepared: Prepared, settings: Settings, progress: bool) -> tuple[Prepared, dict]:
    """Cross-layer equalization of the deploy weights (the same function, balanced channel ranges), then
    high-bias absorption where it narrows a pair's tensor on the calibration samples (one pass)."""
    start = time.perf_counter()
    deploy, pairs = equalize(prepared.deploy)
    deploy, absorbed = absorb_high_biases(deploy, {pair.second_weight: pair.depthwise_second for pair in pairs},
                                          _progress(prepared.calib_set, "bias absorption", progress))
    record = {"pairs": len(pairs), "seconds": round(time.perf_counter() - start, 3),
              "equalized": [pair.to_dict() for pair in pairs], "absorbed": [a.to_dict() for a in absorbed]}
    # the same function: bias correction aims at this model's channel means, not the unscaled ones
    return replace(_with_deploy(prepared, deploy, prepared.weight_encodings), fp32_deploy=deploy), record


def apply_adaround(prepared: Prepared, settings: Settings, progress: bool,
                   ray: str | bool | None = None) -> tuple[Prepared, dict]:
    """AdaRound the deploy weights; their encodings are fixed from then on (re-encoding the rounded
    weights could move a grid). With ``ray`` (True, or a cluster's address) the layers that can be
    rounded side by side are rounded in Ray tasks (optimize/adaround_on_ray.py), with the same weights."""
    start = time.perf_counter()
    weights = weight_set(prepared, settings)
    count = min(settings.adaround_samples, len(prepared.calib_set))
    deploy, layers = adaround(prepared.deploy, weights, (prepared.calib_set.load(i) for i in range(count)),
                              settings.adaround_iters, progress=_bar("adaround", "layer", progress),
                              inputs=settings.adaround_inputs,
                              runner=run_here if ray in (None, False) else ray_runner(None if ray is True else ray))
    record = {"samples": count, "iterations": settings.adaround_iters, "inputs": settings.adaround_inputs,
              "layers": len(layers),
              "seconds": round(time.perf_counter() - start, 3), "weights": [r.to_dict() for r in layers]}
    return _with_deploy(prepared, deploy, weights), record


def apply_bias_correction(prepared: Prepared, settings: Settings, progress: bool) -> tuple[Prepared, dict]:
    """Correct the deploy biases towards the FP32 model's channel means (the model before any step)."""
    start = time.perf_counter()
    count = min(settings.correction_samples, len(prepared.calib_set))
    samples = [prepared.calib_set.load(i) for i in range(count)]
    deploy, corrections = correct_biases(prepared.deploy, weight_set(prepared, settings), samples,
                                         reference=prepared.fp32_deploy or prepared.deploy,
                                         progress=_bar("bias correction", "layer", progress))
    record = {"samples": count, "layers": len(corrections), "seconds": round(time.perf_counter() - start, 3),
              "corrections": [c.to_dict() for c in corrections]}
    return _with_deploy(prepared, deploy, prepared.weight_encodings), record


def _with_deploy(prepared: Prepared, deploy: onnx.ModelProto, weights: dict | None) -> Prepared:
    return replace(prepared, deploy=deploy, targets=find_targets(deploy), weight_encodings=weights,
                   fp32_deploy=prepared.fp32_deploy or prepared.deploy)


def hold_back(prepared: Prepared) -> Prepared:
    """The last calibration samples (optimize.mixed_precision.held_back_count) set apart to judge on."""
    entries = prepared.calib_set.entries
    if len(entries) < 2:
        raise OnnxSnpeError(f"{prepared.calib_set.path}: automatic choices need at least 2 calibration samples "
                            "(some are held back to judge them)")
    count = held_back_count(len(entries))
    return replace(prepared, calib_set=replace(prepared.calib_set, entries=entries[:-count]),
                   judging_set=replace(prepared.calib_set, entries=entries[-count:]))


def _bar(label: str, unit: str, enabled: bool):
    """A wrapper that shows a progress bar over a list, when progress is on."""
    return lambda items: tqdm(items, desc=label, unit=unit, disable=not enabled or None, leave=False)


def calibrate(
    prepared: Prepared, staged: export.StagedOutput, methods: Iterable[str], progress: bool,
    weights: dict[str, ParamEncoding] | None = None, ray: str | bool | None = None,
) -> dict[str, TensorStats]:
    """One pass over the calibration samples: statistics for ``methods``, and data.txt with its raw files.

    ``tf_enhanced`` observes the deploy model with ``weights`` fake-quantized, as AIMET's calibration
    runs it (encode/quantized_weights.py); the other methods the FP32 deploy model. Asked for
    together, they take a pass each, the tf_enhanced PDFs joining the other statistics. With ``ray``
    (True, or a cluster's address) the passes run on Ray (stats/distributed.py), with the same result.
    """
    methods = set(methods)
    quantized = "tf_enhanced" in methods and weights is not None
    plain = methods - {"tf_enhanced"} if quantized else methods
    raw_writer = export.InputListWriter(staged, prepared.input_names)
    floors = prepared.targets.floors()
    model = quantized_weights(prepared.deploy, weights) if quantized else None
    first = prepared.deploy if plain else model
    on_ray = ray not in (None, False)
    address = None if ray is True else ray
    if on_ray:
        stats = collect_on_ray(first, prepared.targets.activations, prepared.calib_set, sorted(plain or methods),
                               floors, address=address, sink=raw_writer.write, progress=progress)
        raw_writer.list_written(len(prepared.calib_set))
    else:
        samples = _teed(_progress(prepared.calib_set, "calibration", progress), raw_writer.add)
        stats = collect_statistics(first, prepared.targets.activations, samples, methods=sorted(plain or methods),
                                   floors=floors)
    raw_writer.finish()
    if quantized and plain:
        if on_ray:
            pdfs = collect_on_ray(model, prepared.targets.activations, prepared.calib_set, ["tf_enhanced"], floors,
                                  address=address, progress=progress)
        else:
            pdfs = collect_statistics(model, prepared.targets.activations,
                                      _progress(prepared.calib_set, "calibration (tf_enhanced)", progress),
                                      methods=["tf_enhanced"], floors=floors)
        for name, observed in pdfs.items():
            stats[name].tf_enhanced = observed.tf_enhanced
    return stats


def encode(
    prepared: Prepared, stats: dict[str, TensorStats], settings: Settings, raised: Iterable[str] = ()
) -> Encodings:
    """Activation, weight and bias encodings for one configuration; ``raised`` activations and weights
    at 16 bits, with the activations a 16-bit weight needs (encode.precision)."""
    deploy, targets = prepared.deploy, prepared.targets
    sixteen_activations, sixteen_weights = sixteen_bit_tensors(targets, raised)
    fixed = {**(function_ranges(deploy) if settings.fixed_ranges else {}), **prepared.table_ranges}
    activations = activation_encodings(stats, targets, settings.method, settings.act_bitwidth,
                                       percentile=settings.percentile, fixed=fixed, raised=sixteen_activations)
    done = completed_encodings(deploy, targets, activations, weight_set(prepared, settings, sixteen_weights),
                               settings.bias_bitwidth)
    activations, weights, constants, biases = done.activations, done.weights, done.constants, done.biases
    written = {**weights, **constants, **(biases if settings.write_bias_encodings else {})}
    return Encodings(activations, weights, biases, constants, written)


def evaluate_encodings(
    prepared: Prepared,
    stats: dict[str, TensorStats],
    encodings: Encodings,
    arithmetic: str,
    analysis_samples: int,
    progress: bool,
    evaluator: Evaluator | None = None,
    timer: StageTimer | None = None,
    ray: str | bool | None = None,
) -> Evaluation:
    """The simulated model (in ``arithmetic``) against FP32 on the evaluation samples, per output and tensor.

    ``evaluator`` (made by :func:`make_evaluator`) serves several configurations with one FP32
    session; ``timer`` gets the evaluation's stages. Without one, ``ray`` (True, or a cluster's
    address) runs the isolated analysis on Ray, with the same figures."""
    if evaluator is None:
        start = time.perf_counter()
        evaluator = make_evaluator(prepared, ray=ray)
        if timer is not None:
            timer.add("reference_setup", time.perf_counter() - start)
    evaluation = evaluator.evaluate(
        prepared.deploy,
        encodings.activations,
        encodings.params,
        {name: (stats[name].min, stats[name].max) for name in prepared.targets.activations},
        _progress(prepared.eval_set, "evaluation", progress),
        isolated_samples=analysis_samples,
        arithmetic=arithmetic,
    )
    for name, seconds in evaluation.timings.items():
        if timer is not None:
            timer.add(name, seconds)
    return evaluation


def make_evaluator(prepared: Prepared, tensors: bool = True, ray: str | bool | None = None) -> Evaluator:
    """The FP32 side of evaluation (reference model, session), for every configuration of ``prepared``;
    ``tensors=False``: outputs and isolated errors only; ``ray``: the isolated errors on Ray (Evaluator)."""
    return Evaluator(prepared.reference, prepared.targets, tensors=tensors, ray=ray, dataset=prepared.eval_set)


def _describe(dataset: Dataset) -> dict:
    return {"path": str(Path(dataset.path).absolute()), "format": dataset.kind, "num_samples": len(dataset)}


def _progress(dataset: Dataset, label: str, enabled: bool) -> Iterator[Sample]:
    return iter(tqdm(dataset, desc=label, unit="sample", disable=not enabled or None, leave=False))


def _teed(samples: Iterator[Sample], sink) -> Iterator[Sample]:
    for sample in samples:
        sink(sample)
        yield sample
