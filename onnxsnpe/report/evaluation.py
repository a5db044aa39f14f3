"""Evaluation of the simulated quantized model against FP32: per output, and per tensor in graph order.

One pass over the evaluation samples gives, per model output, SQNR, cosine, absolute errors and
class agreement, and for each activation with its own encoding, measured on evaluation samples:
- the share of FP32 values the encoding clips (beyond half a step outside [min, max]);
- cumulative error: the fully quantized model's value of this tensor against FP32's;
- isolated error: the model outputs' error when only this tensor is quantized (everything else,
  weights included, FP32). It ranks the tensors whose quantization costs the most;
- a histogram of the FP32 values over the calibration-observed range, to draw the chosen range on.

The simulated model computes with the chosen arithmetic (``ARITHMETICS``): ``htp`` or ``htp-v73``, the
integer arithmetic measured on Qualcomm's HTP (simulate/htp/), or ``exact``, float ops with exactly
rounded fake quantization (simulate/fake_quant.py). The isolated errors always use the exact arithmetic: they rank
tensors by the cost of their encoding, which does not depend on how the ops round.

The pass costs two inferences a sample plus one compiled fold of every tensor (folding.py), samples
side by side on the cores (``Evaluator``); the isolated runs are shared out the same way, or run on a
Ray cluster in groups of tensors (ranking_on_ray.py) with the same figures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
import onnxruntime as ort

from ..data.datasets import Dataset
from ..encode.encoding import Encoding, ParamEncoding
from ..graph.large import is_large
from ..graph.runtime import make_session
from ..graph.targets import QuantTargets
from ..simulate.arithmetic import simulation_model
from ..stats.collect import available_cores
from ..stats.distributed import dataset_part
from ..stats.parallel import ordered_map
from .folding import SUMS, Accumulator, TensorBins, fold, typed_arrays
from .metrics import OutputComparison, TensorComparison, json_db, sqnr_db
from .ranking_on_ray import isolated_sums_on_ray
from .sensitivity import IsolatedModel, Kept

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 64


@dataclass
class TensorFigures:
    """What the report says about one quantized activation."""

    name: str
    encoding: Encoding
    observed: tuple[float, float]
    cumulative: TensorComparison
    clipped: int = 0
    count: int = 0
    isolated_signal: float = 0.0
    isolated_noise: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))

    @property
    def histogram_range(self) -> tuple[float, float]:
        lo = min(self.observed[0], self.encoding.min)
        hi = max(self.observed[1], self.encoding.max)
        return lo, hi if hi > lo else lo + 1.0

    @property
    def clipped_share(self) -> float:
        return self.clipped / self.count if self.count else 0.0

    @property
    def isolated_sqnr_db(self) -> float:
        return sqnr_db(self.isolated_signal, self.isolated_noise)

    def to_dict(self) -> dict:
        enc = self.encoding
        lo, hi = self.histogram_range
        return {
            "name": self.name,
            "encoding": {"bitwidth": enc.bitwidth, "min": enc.min, "max": enc.max, "scale": enc.scale,
                         "offset": enc.offset},
            "observed_min": self.observed[0],
            "observed_max": self.observed[1],
            "clipped_share": self.clipped_share,
            "cumulative_sqnr_db": json_db(self.cumulative.sqnr_db),
            "isolated_output_sqnr_db": json_db(self.isolated_sqnr_db),
            "histogram": {"min": lo, "max": hi, "counts": self.histogram.tolist()},
        }


@dataclass
class Evaluation:
    """Figures per model output and per quantized activation (graph order)."""

    outputs: list[OutputComparison]
    tensors: list[TensorFigures]
    isolated_samples: int
    samples: int = 0
    """Evaluation samples the figures were measured on."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent building the simulation, evaluating and in the isolated analysis."""
    simulation: tuple[onnx.ModelProto, dict[str, str]] | None = None
    """The simulated model evaluated and its map to tensor names, for whatever else runs it (--htp);
    None for a large model, whose simulation is not kept beside its session."""


def evaluate(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
    observed: dict[str, tuple[float, float]],
    samples: Iterable[dict[str, np.ndarray]],
    isolated_samples: int,
    arithmetic: str = "htp",
    reference: onnx.ModelProto | None = None,
) -> Evaluation:
    """Run FP32 and simulated models over ``samples``; isolated errors use the first ``isolated_samples``.

    ``reference`` is the FP32 model to measure against when ``deploy``'s weights were changed by a
    rounding step (AdaRound, bias correction): the same tensors, the original weights. The isolated
    errors quantize one tensor of the reference model.
    """
    evaluator = Evaluator(reference or deploy, targets)
    return evaluator.evaluate(deploy, activations, params, observed, samples, isolated_samples, arithmetic)


class Evaluator:
    """Evaluations against one FP32 reference model: its session is built once and serves every
    configuration evaluated (``compare``).

    Every core gets a worker that takes the next sample, runs the FP32 and the simulated model on
    it (one thread each, into reused arrays) and folds all tensors in one compiled call
    (report/folding.py); the per-sample sums are added in sample order, so the figures do not depend
    on how the samples were shared out.
    """

    def __init__(self, reference: onnx.ModelProto, targets: QuantTargets, workers: int | None = None,
                 tensors: bool = True, ray: str | bool | None = None, dataset: Dataset | None = None) -> None:
        """``tensors=False`` measures the outputs only (and the isolated errors): no tensor is exposed
        or folded, which is all ``compare`` reports. Its FP32 outputs are then kept, sample by sample,
        for the next configuration: every configuration is evaluated on the same samples in order.
        With ``ray`` (True, or a cluster's address) the isolated runs are Ray tasks
        (report/ranking_on_ray.py) reading their samples by path from ``dataset``, the one the
        evaluated samples come from; the figures are the same."""
        if ray not in (None, False) and dataset is None:
            raise ValueError("an evaluation on Ray needs the dataset its samples come from")
        self.reference = reference
        self.targets = targets
        self.ray, self.dataset = ray, dataset
        self.names = list(targets.activations)
        self.folded = self.names if tensors else []  # the tensors whose cumulative figures are measured
        self.outputs = [o.name for o in reference.graph.output]
        cores = available_cores()
        self.large = is_large(reference)
        # a large model's samples one at a time: each inference of its simulation computes float weights
        self.workers = 1 if self.large else max(1, workers or min(cores, MAX_WORKERS))
        self.threads = max(1, cores // self.workers)
        inputs = {value.name for value in reference.graph.input}
        self.fed = [name for name in self.folded if name in inputs]  # the sample's values, not a run's
        self.exposed = [n for n in self.folded if n not in inputs]
        self.kept_outputs: dict[int, list[np.ndarray]] | None = None if tensors else {}
        self.kept_bytes = 0
        self.keeping = threading.Lock()  # workers keep outputs side by side
        self.switchable_model: IsolatedModel | None = None  # the isolated runs' model, for every configuration

    @cached_property
    def fp32(self) -> ort.InferenceSession:
        """The FP32 session, made when first needed: after the first simulated model is built, so that
        a large model's simulation is built before the FP32 weights are resident."""
        return make_session(self.reference, self.exposed, self.threads)

    @cached_property
    def fp32_names(self) -> list[str]:
        return [o.name for o in self.fp32.get_outputs()]

    def keep(self, index: int, outputs: list[np.ndarray]) -> None:
        """Keep sample ``index``'s FP32 outputs for the next configuration, while they fit in
        KEPT_OUTPUT_BYTES (memory stays flat in the number of samples)."""
        if self.kept_outputs is None:
            return
        size = sum(a.nbytes for a in outputs)
        with self.keeping:
            if index not in self.kept_outputs and self.kept_bytes + size <= KEPT_OUTPUT_BYTES:
                self.kept_outputs[index] = outputs
                self.kept_bytes += size

    def reference_outputs(self, index: int, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The FP32 session's outputs on sample ``index``: kept from an earlier configuration, or run
        (and kept, when keeping, while they fit)."""
        kept = self.kept_outputs.get(index) if self.kept_outputs is not None else None
        if kept is None:
            kept = self.fp32.run(None, sample)
            self.keep(index, kept)
        return kept

    def evaluate(
        self,
        deploy: onnx.ModelProto,
        activations: dict[str, Encoding],
        params: dict[str, ParamEncoding],
        observed: dict[str, tuple[float, float]],
        samples: Iterable[dict[str, np.ndarray]],
        isolated_samples: int,
        arithmetic: str = "htp",
    ) -> Evaluation:
        """The figures of ``deploy`` quantized with these encodings (in ``arithmetic``) on ``samples``."""
        start = time.perf_counter()
        figures = [TensorFigures(n, activations[n], observed[n], TensorComparison(n)) for n in self.names]
        simulated, sim_map = simulation_model(deploy, self.targets, activations, params, arithmetic)
        sim_names = list(dict.fromkeys(sim_map[n] for n in [*self.outputs, *self.folded]))
        session = make_session(simulated, sim_names, self.threads)
        large = is_large(simulated)
        if large:  # the session has its weights: not a second copy in memory (nor kept for --htp)
            del simulated
        timings = {"simulation_setup": time.perf_counter() - start}
        if "fp32" not in self.__dict__:  # the FP32 session's first use (see fp32)
            start = time.perf_counter()
            _ = self.fp32_names
            timings["reference_setup"] = time.perf_counter() - start
        run = _Run(self, figures if self.folded else [], session, sim_names, sim_map)
        start = time.perf_counter()
        kept = run.evaluate(samples, isolated_samples)
        comparisons, count = run.comparisons, run.count
        del run, session  # sessions hold weights: a large model's are not kept beside the isolated analysis's
        if self.large:
            for name in ("fp32", "fp32_names"):  # made again if another configuration needs them
                self.__dict__.pop(name, None)
        timings["evaluation"] = time.perf_counter() - start
        start = time.perf_counter()
        if kept and figures:
            self._isolated(figures, activations, kept)
        timings["isolated_analysis"] = time.perf_counter() - start
        return Evaluation(comparisons, figures, len(kept), count, timings, None if large else (simulated, sim_map))

    def _isolated(self, figures: list[TensorFigures], activations: dict[str, Encoding], kept: list[Kept]) -> None:
        """The isolated errors: one run of the switchable model per tensor per kept sample (with its
        FP32 outputs), shared out over the cores, or on Ray in groups of tensors; added up in sample order."""
        switchable = self._switchable(activations)
        positions = list(range(len(figures)))
        if self.ray not in (None, False):
            signal, noise = isolated_sums_on_ray(switchable, dataset_part(self.dataset, 0, len(kept)),
                                                 [outputs for _, outputs in kept],
                                                 address=None if self.ray is True else self.ray)
        else:
            signal, noise = switchable.output_sums(kept, positions, self.threads, self.workers)
        for position, fig in enumerate(figures):  # in the order the figures were always summed
            for s in range(len(kept)):
                for k in range(len(self.outputs)):
                    fig.isolated_signal += float(signal[s, position, k])
                    fig.isolated_noise += float(noise[s, position, k])

    def _switchable(self, activations: dict[str, Encoding]) -> IsolatedModel:
        """The switchable model with these encodings: built once and reused by every configuration
        (compare) where it takes its encodings as inputs; built each time for a large model, whose
        sessions are not kept between configurations."""
        if self.switchable_model is not None:
            return self.switchable_model.with_encodings(activations)
        switchable = IsolatedModel.build(self.reference, self.targets, activations, {})
        if switchable.takes_encodings and not self.large:
            self.switchable_model = switchable
        return switchable


MAX_WORKERS = 4
"""Samples in flight at most: each worker holds its own FP32 and simulated tensors."""
KEPT_OUTPUT_BYTES = 256 << 20
"""FP32 outputs ``compare`` keeps for its next configurations at most; beyond, it runs FP32 again."""


class _Run:
    """One configuration's pass over the evaluation samples."""

    def __init__(self, evaluator: Evaluator, figures: list[TensorFigures], session: ort.InferenceSession,
                 sim_names: list[str], sim_map: dict[str, str]) -> None:
        self.evaluator, self.figures, self.session, self.sim_names = evaluator, figures, session, sim_names
        ref_index = {name: k for k, name in enumerate(evaluator.fp32_names)}
        sim_index = {name: k for k, name in enumerate(sim_names)}
        fed = {name: -1 - k for k, name in enumerate(evaluator.fed)}  # a negative index: the sample's input
        self.ref_tensors = [ref_index[n] if n in ref_index else fed[n] for n in evaluator.folded]
        self.sim_tensors = [sim_index[sim_map[n]] for n in evaluator.folded]
        self.ref_outputs = [ref_index[o] for o in evaluator.outputs]
        self.sim_outputs = [sim_index[sim_map[o]] for o in evaluator.outputs]
        ranges = [f.histogram_range for f in figures]
        thresholds = [(f.encoding.min - 0.5 * f.encoding.scale, f.encoding.max + 0.5 * f.encoding.scale)
                      for f in figures]
        self.bins = TensorBins(ranges, thresholds, HISTOGRAM_BINS)
        self.comparisons = [OutputComparison(o) for o in evaluator.outputs]
        self.sums = np.zeros((len(figures), SUMS))
        self.count = 0

    def evaluate(self, samples: Iterable[dict[str, np.ndarray]],
                 isolated_samples: int) -> list[Kept]:
        """Fold every sample; returns the first ``isolated_samples`` samples with their FP32 outputs."""
        kept: list[Kept] = []
        iterator = iter(samples)
        first = next(iterator, None)
        if first is None:
            return kept
        first = _contiguous(first)
        ref_arrays = self.evaluator.reference_outputs(0, first)  # alone: its shapes size every worker's arrays
        sim_arrays = self.session.run(self.sim_names, first)
        workers = [_Worker(self, ref_arrays, sim_arrays, first) for _ in range(self.evaluator.workers)]
        isolated = max(0, isolated_samples)

        def consume(index: int, result: tuple) -> None:
            sums, outputs, sample = result
            self.sums += sums
            for comparison, (ref, sim) in zip(self.comparisons, outputs, strict=True):
                comparison.update(ref, sim)
            if index < isolated:
                kept.append((sample, [ref.astype(np.float64) for ref, _ in outputs]))
            self.count += 1

        consume(0, workers[0].fold(ref_arrays, sim_arrays, first))

        def work(worker: _Worker, index: int, sample: dict[str, np.ndarray]) -> tuple:
            return worker.evaluate(_contiguous(sample), index + 1)

        ordered_map(iterator, workers, work, lambda index, result: consume(index + 1, result),  # after the first
                    "onnxsnpe-evaluation")
        for worker in workers[1:]:
            workers[0].accumulator.merge(worker.accumulator)
        self._settle(workers[0].accumulator)
        return kept

    def _settle(self, accumulator: Accumulator) -> None:
        """Write the folded figures into each tensor's figures."""
        for k, fig in enumerate(self.figures):
            comparison = fig.cumulative
            comparison.signal, comparison.noise, comparison.dot, comparison.simulated_power, \
                comparison.abs_error_sum = (float(v) for v in self.sums[k])
            comparison.max_abs_error = float(accumulator.max_errors[k])
            fig.clipped, fig.count, comparison.count = (int(v) for v in accumulator.counts[k])
            fig.histogram = accumulator.histograms[k].copy()


class _Worker:
    """One worker's arrays, sessions bound to them, and running figures."""

    def __init__(self, run: _Run, ref_like: list[np.ndarray], sim_like: list[np.ndarray],
                 first: dict[str, np.ndarray]) -> None:
        self.run = run
        self.ref_arrays = [np.empty_like(a) for a in ref_like]
        self.sim_arrays = [np.empty_like(a) for a in sim_like]
        self.bindings = [_bind(run.evaluator.fp32, run.evaluator.fp32_names, self.ref_arrays),
                         _bind(run.session, run.sim_names, self.sim_arrays)]
        self.sessions = [run.evaluator.fp32, run.session]
        self.fed = [np.array(first[name], dtype=np.float32) for name in run.evaluator.fed]  # copied into
        self.references = typed_arrays(_pick(run.ref_tensors, self.ref_arrays, self.fed))
        self.simulated = typed_arrays([self.sim_arrays[k] for k in run.sim_tensors])
        self.accumulator = Accumulator(len(run.figures), HISTOGRAM_BINS)
        self.bound = True  # until a run into these arrays fails (a tensor whose shape changes)

    def evaluate(self, sample: dict[str, np.ndarray], index: int) -> tuple:
        """Run both models on sample number ``index`` and fold it: (this sample's sums, output pairs,
        sample). FP32 outputs kept from an earlier configuration are taken instead of a run (only the
        outputs are kept, when no tensor is folded)."""
        evaluator = self.run.evaluator
        kept = evaluator.kept_outputs.get(index) if evaluator.kept_outputs is not None else None
        if self.bound:
            try:
                for name, array in zip(evaluator.fed, self.fed, strict=True):
                    np.copyto(array, sample[name])
                first = 0 if kept is None else 1  # with kept FP32 outputs only the simulation runs
                for session, binding in zip(self.sessions[first:], self.bindings[first:], strict=True):
                    for name, value in sample.items():
                        binding.bind_cpu_input(name, value)
                    session.run_with_iobinding(binding)
                result = self._folded(self.references, self.simulated, self.ref_arrays if kept is None else kept,
                                      self.sim_arrays, sample)
                if kept is None:
                    evaluator.keep(index, [ref for ref, _ in result[1]])  # when keeping, FP32 runs only the outputs
                return result
            except Exception as exc:  # onnxruntime raises its own types; runs continue unbound
                log.info("evaluating without reused output arrays: %s", str(exc).splitlines()[0] if str(exc) else exc)
                self.bound = False
        ref_arrays = evaluator.reference_outputs(index, sample)
        sim_arrays = self.sessions[1].run(self.run.sim_names, sample)
        return self.fold(ref_arrays, sim_arrays, sample)

    def fold(self, ref_arrays: list[np.ndarray], sim_arrays: list[np.ndarray], sample: dict[str, np.ndarray]) -> tuple:
        """Fold one sample's arrays as a run returned them (not the reused ones)."""
        fed = [_float32(sample[name]) for name in self.run.evaluator.fed]
        references = typed_arrays([_float32(a) for a in _pick(self.run.ref_tensors, ref_arrays, fed)])
        simulated = typed_arrays([_float32(sim_arrays[k]) for k in self.run.sim_tensors])
        return self._folded(references, simulated, ref_arrays, sim_arrays, sample, copy=False)

    def _folded(self, references, simulated, ref_arrays: list[np.ndarray], sim_arrays: list[np.ndarray],
                sample: dict[str, np.ndarray], copy: bool = True) -> tuple:
        if self.run.figures:
            fold(self.run.bins, references, simulated, self.accumulator)
        outputs = [(ref_arrays[r].copy() if copy else ref_arrays[r], sim_arrays[s].copy() if copy else sim_arrays[s])
                   for r, s in zip(self.run.ref_outputs, self.run.sim_outputs, strict=True)]
        return self.accumulator.sums.copy(), outputs, sample


def _bind(session: ort.InferenceSession, names: list[str], arrays: list[np.ndarray]) -> ort.IOBinding:
    """An IO binding writing ``session``'s outputs ``names`` into ``arrays``."""
    binding = session.io_binding()
    for name, array in zip(names, arrays, strict=True):
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    return binding


def _pick(indices: list[int], arrays: list[np.ndarray], fed: list[np.ndarray]) -> list[np.ndarray]:
    """The arrays at ``indices``: a run's outputs, or for a negative index -1 - i, fed input i."""
    return [arrays[k] if k >= 0 else fed[-1 - k] for k in indices]


def _contiguous(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value) for name, value in sample.items()}


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def worst_isolated(figures: list[TensorFigures], count: int = 10) -> list[TensorFigures]:
    """The tensors whose quantization alone costs the most output SQNR, worst first."""
    ranked = sorted(figures, key=lambda f: (f.isolated_sqnr_db, f.name))
    return [f for f in ranked if f.isolated_noise > 0][:count]
