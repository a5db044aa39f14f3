"""How much each activation's quantization costs, and how well a whole configuration does, on a few
samples: what automatic mixed precision (optimize/mixed_precision.py) ranks and scores with.

- ``isolated_ranking``: per activation (and per weight given), the output SQNR when only it is
  quantized (everything else FP32), worst first; one switchable simulation serves every tensor,
  so it costs one run per tensor per sample.
- ``OutputScorer``: the lowest output SQNR of the simulated quantized model (all activations and
  params quantized) against FP32 over the samples, with the FP32 outputs computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from ..encode.encoding import Encoding, ParamEncoding
from ..graph.ops import standard_opset
from ..graph.runtime import make_session
from ..graph.targets import QuantTargets
from ..simulate.arithmetic import simulation_model
from ..simulate.fake_quant import SWITCH_INPUT, build_simulation_model, encoding_feed
from ..stats.parallel import ordered_map
from .metrics import OutputComparison, TensorComparison, inner

Sample = dict[str, np.ndarray]
Kept = tuple[Sample, list[np.ndarray]]
"""A sample with its FP32 outputs (float64), as the evaluation keeps them for the isolated analysis."""
DEFAULT_ANALYSIS_SAMPLES = 2
"""Samples of quantize's isolated analysis (one run per tensor each). On EfficientNet-Lite0 (three
sets of 64 calibration crops, mse; tools' isolated-ranking check in the README) the rankings from 1,
2 and 4 samples agree equally with one from 16 (rank correlations 0.93-0.96, 7-10 of the 10 worst in
common, no sample count ahead): 4 samples cost twice the time of 2 for nothing measured."""


def isolated_ranking(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    samples: Sequence[Sample],
    weights: dict[str, ParamEncoding] | None = None,
) -> list[tuple[str, float]]:
    """Every activation with its own encoding, and every weight in ``weights``, with its isolated
    output SQNR (dB), costliest first."""
    switchable = IsolatedModel.build(deploy, targets, activations, weights or {})
    return ranked(switchable.errors(deploy, samples))


@dataclass
class IsolatedModel:
    """The switchable simulation the isolated errors run: ``names`` in switch order, ``outputs`` the
    deploy model's, ``mapped`` the simulation's outputs that stand for them, ``feed`` the activations'
    encodings when the model takes them as inputs (one model and one session then serve every set of
    encodings: with_encodings) and ``fed`` those activations in order."""

    model: onnx.ModelProto
    names: list[str]
    outputs: list[str]
    mapped: list[str]
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    fed: list[str] = field(default_factory=list)
    sessions: dict[int, ort.InferenceSession] = field(default_factory=dict, repr=False, compare=False)
    """Sessions by thread count, made when first needed and shared by with_encodings' copies."""

    @classmethod
    def build(cls, deploy: onnx.ModelProto, targets: QuantTargets, activations: dict[str, Encoding],
              weights: dict[str, ParamEncoding]) -> IsolatedModel:
        """One simulation in which each activation, and each weight in ``weights``, can be quantized
        alone; the activations' encodings are inputs where the opset allows (11 or later)."""
        outputs = [o.name for o in deploy.graph.output]
        opset = standard_opset(deploy)
        generic = opset >= 11
        model, output_map = build_simulation_model(deploy, targets, activations, weights, switchable=True,
                                                   switched_params=list(weights), encodings_as_inputs=generic)
        fed = list(targets.activations) if generic else []
        return cls(model, [*targets.activations, *weights], outputs, [output_map[o] for o in outputs],
                   encoding_feed(fed, activations) if fed else {}, fed)

    @property
    def takes_encodings(self) -> bool:
        """Whether with_encodings can serve another set of activation encodings."""
        return bool(self.feed)

    def with_encodings(self, activations: dict[str, Encoding]) -> IsolatedModel:
        """The same model (and sessions) with other encodings for its activations (takes_encodings)."""
        if not self.takes_encodings:
            raise ValueError("this switchable model holds its encodings")
        return replace(self, feed=encoding_feed(self.fed, activations))

    def session(self, threads: int = 0) -> ort.InferenceSession:
        """A session over the model on ``threads`` threads, made once."""
        if threads not in self.sessions:
            self.sessions[threads] = make_session(self.model, threads=threads)
        return self.sessions[threads]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "sessions": {}}  # sessions stay in their process (Ray pickles the model)

    def errors(self, deploy: onnx.ModelProto, samples: Iterable[Sample],
               positions: Sequence[int] | None = None, threads: int = 0) -> list[TensorComparison]:
        """The model outputs against ``deploy``'s FP32 ones with only one tensor quantized, for the
        tensors at ``positions`` (default: all), accumulated over the samples in order; sessions of
        ``threads`` threads (default: onnxruntime's)."""
        positions = range(len(self.names)) if positions is None else positions
        reference = make_session(deploy, threads=threads)
        session = self.session(threads)
        comparisons = [TensorComparison(self.names[position]) for position in positions]
        switch = np.zeros(len(self.names), dtype=bool)
        for sample in samples:
            ref = reference.run(self.outputs, sample)
            for position, comparison in zip(positions, comparisons, strict=True):
                switch[:] = False
                switch[position] = True
                for want, got in zip(ref, session.run(self.mapped, {**sample, **self.feed, SWITCH_INPUT: switch}),
                                     strict=True):
                    comparison.update(want, got)
        return comparisons

    def output_sums(self, kept: Sequence[Kept], positions: Sequence[int], threads: int = 0,
                    workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Signal and noise (sums of squares) of each model output with only the tensor at one of
        ``positions`` quantized, against the kept FP32 outputs: two arrays [samples, positions, outputs].
        One run per sample and position, ``workers`` side by side on one session of ``threads`` threads;
        each figure comes from its run alone, so they do not depend on how the runs were shared out."""
        session = self.session(threads)
        shape = (len(kept), len(positions), len(self.mapped))
        signal, noise = np.zeros(shape), np.zeros(shape)

        def work(_: None, index: int, job: tuple[int, int]) -> None:
            sample_index, column = job
            sample, ref_outputs = kept[sample_index]
            switch = np.zeros(len(self.names), dtype=bool)
            switch[positions[column]] = True
            got = session.run(self.mapped, {**sample, **self.feed, SWITCH_INPUT: switch})
            for k, (ref, value) in enumerate(zip(ref_outputs, got, strict=True)):
                err = value.astype(np.float64) - ref
                signal[sample_index, column, k] = inner(ref, ref)
                noise[sample_index, column, k] = inner(err, err)

        jobs = [(s, c) for s in range(len(kept)) for c in range(len(positions))]
        ordered_map(jobs, [None] * max(1, workers), work, lambda index, result: None)
        return signal, noise


def ranked(comparisons: Iterable[TensorComparison]) -> list[tuple[str, float]]:
    """(name, isolated output SQNR in dB), costliest first."""
    return sorted(((c.name, c.sqnr_db) for c in comparisons), key=lambda item: (item[1], item[0]))


class OutputScorer:
    """Scores configurations of one deploy model on fixed samples: the lowest output SQNR (dB)."""

    def __init__(self, deploy: onnx.ModelProto, targets: QuantTargets, samples: Sequence[Sample],
                 arithmetic: str) -> None:
        self.deploy, self.targets, self.samples, self.arithmetic = deploy, targets, list(samples), arithmetic
        self.outputs = [o.name for o in deploy.graph.output]
        reference = make_session(deploy)
        self.references = [reference.run(self.outputs, sample) for sample in self.samples]

    def __call__(self, activations: dict[str, Encoding], params: dict[str, ParamEncoding]) -> float:
        """The lowest output SQNR of the quantized deploy model."""
        return min(c.sqnr_db for c in self.compare(activations, params))

    def compare(
        self,
        activations: dict[str, Encoding],
        params: dict[str, ParamEncoding],
        deploy: onnx.ModelProto | None = None,
        targets: QuantTargets | None = None,
    ) -> list[OutputComparison]:
        """Each output of the quantized ``deploy`` (default: the scorer's own, e.g. with other weights)
        against the FP32 outputs of the scorer's deploy model."""
        deploy, targets = deploy or self.deploy, targets or self.targets
        model, output_map = simulation_model(deploy, targets, activations, params, self.arithmetic)
        session = make_session(model)
        mapped = [output_map[o] for o in self.outputs]
        comparisons = [OutputComparison(o) for o in self.outputs]
        for sample, ref in zip(self.samples, self.references, strict=True):
            for comparison, want, got in zip(comparisons, ref, session.run(mapped, sample), strict=True):
                comparison.update(want, got)
        return comparisons
