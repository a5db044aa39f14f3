"""Evaluation of the simulated quantized model against FP32: per output, and per tensor in graph order.

One pass over the evaluation samples gives, per model output, SQNR, cosine, absolute errors and
class agreement, and for each activation with its own encoding, measured on evaluation samples:
- the share of FP32 values the encoding clips (beyond half a step outside [min, max]);
- cumulative error: the fully quantized model's value of this tensor against FP32's;
- isolated error: the model outputs' error when only this tensor is quantized (everything else,
  weights included, FP32). It ranks the tensors whose quantization costs the most;
- a histogram of the FP32 values over the calibration-observed range, to draw the chosen range on.

The simulated model computes with the chosen arithmetic (``ARITHMETICS``): ``htp``, the integer
arithmetic measured on Qualcomm's HTP (simulate/htp/), or ``exact``, float ops with exactly rounded
fake quantization (simulate/fake_quant.py). The isolated errors always use the exact arithmetic: they rank
tensors by the cost of their encoding, which does not depend on how the ops round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..encode.encoding import Encoding, ParamEncoding
from ..graph.runtime import make_session
from ..graph.targets import QuantTargets
from ..simulate.arithmetic import simulation_model
from ..simulate.fake_quant import SWITCH_INPUT, build_simulation_model
from .metrics import OutputComparison, TensorComparison, inner, json_db, sqnr_db

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
    reference = reference or deploy
    names = list(targets.activations)
    outputs = [o.name for o in deploy.graph.output]
    figures = [TensorFigures(n, activations[n], observed[n], TensorComparison(n)) for n in names]
    comparisons = [OutputComparison(o) for o in outputs]
    isolated_used = 0

    fp32 = make_session(reference, names)
    ref_names = [o.name for o in fp32.get_outputs()]
    simulated, sim_map = simulation_model(deploy, targets, activations, params, arithmetic)
    simulated_session = make_session(simulated, [sim_map[n] for n in names])
    isolated, iso_map = build_simulation_model(reference, targets, activations, {}, switchable=True)
    isolated_session = make_session(isolated)
    iso_outputs = [iso_map[o] for o in outputs]

    for index, sample in enumerate(samples):
        ref_values = dict(zip(ref_names, fp32.run(None, sample), strict=True))
        sim_values = simulated_session.run([sim_map[n] for n in [*outputs, *names]], sample)
        for comparison, sim in zip(comparisons, sim_values, strict=False):
            comparison.update(ref_values[comparison.name], sim)
        for fig, sim in zip(figures, sim_values[len(outputs):], strict=True):
            ref = ref_values[fig.name]
            fig.cumulative.update(ref, sim)
            enc = fig.encoding
            half = 0.5 * enc.scale
            fig.clipped += int(np.count_nonzero((ref < enc.min - half) | (ref > enc.max + half)))
            fig.count += int(ref.size)
            lo, hi = fig.histogram_range
            fig.histogram += np.histogram(np.clip(ref, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi))[0]
        if index >= isolated_samples:
            continue
        isolated_used += 1
        ref_outputs = [ref_values[o].astype(np.float64) for o in outputs]
        switch = np.zeros(len(names), dtype=bool)
        for position, fig in enumerate(figures):
            switch[:] = False
            switch[position] = True
            got = isolated_session.run(iso_outputs, {**sample, SWITCH_INPUT: switch})
            for ref, value in zip(ref_outputs, got, strict=True):
                err = value.astype(np.float64) - ref
                fig.isolated_signal += inner(ref, ref)
                fig.isolated_noise += inner(err, err)
    return Evaluation(comparisons, figures, isolated_used)


def worst_isolated(figures: list[TensorFigures], count: int = 10) -> list[TensorFigures]:
    """The tensors whose quantization alone costs the most output SQNR, worst first."""
    ranked = sorted(figures, key=lambda f: (f.isolated_sqnr_db, f.name))
    return [f for f in ranked if f.isolated_noise > 0][:count]
