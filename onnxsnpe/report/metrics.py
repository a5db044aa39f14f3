"""Streaming error figures between FP32 and simulated quantized tensors."""

from __future__ import annotations

import math

import numpy as np


class TensorComparison:
    """SQNR, cosine similarity and absolute errors of one tensor, accumulated sample by sample in float64."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.simulated_power = 0.0
        self.abs_error_sum = 0.0
        self.max_abs_error = 0.0
        self.count = 0

    def update(self, reference: np.ndarray, simulated: np.ndarray) -> None:
        """Add one sample's values (positions where the reference is infinite are left out)."""
        ref = np.asarray(reference, dtype=np.float64).ravel()
        sim = np.asarray(simulated, dtype=np.float64).ravel()
        finite = np.isfinite(ref)
        if not finite.all():  # masked positions (-inf) of an output that carries an attention mask
            ref, sim = ref[finite], sim[finite]
        err = sim - ref
        self.signal += inner(ref, ref)
        self.noise += inner(err, err)
        self.dot += inner(ref, sim)
        self.simulated_power += inner(sim, sim)
        abs_err = np.abs(err)
        self.abs_error_sum += float(abs_err.sum())
        self.max_abs_error = max(self.max_abs_error, float(abs_err.max(initial=0.0)))
        self.count += int(ref.size)

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal power / noise power) over all samples; inf when identical."""
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        """Cosine similarity of all reference values with all simulated values: 1 when both are all
        zero, 0 when only one is (a quantized output stuck at zero is not similar to anything)."""
        norm = math.sqrt(self.signal * self.simulated_power)
        if norm:
            return self.dot / norm
        return 1.0 if self.signal == self.simulated_power == 0 else 0.0

    @property
    def mean_abs_error(self) -> float:
        return self.abs_error_sum / self.count if self.count else 0.0

    def to_dict(self) -> dict:
        """Figures for report.json; an infinite SQNR (no error at all) is written as null."""
        return {
            "name": self.name,
            "sqnr_db": json_db(self.sqnr_db),
            "cosine": round(self.cosine, 8),
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "values_compared": self.count,
        }


class OutputComparison(TensorComparison):
    """A model output's figures, plus top-1/top-5 agreement where the output looks like class scores.

    An output of rank 2 or 3 whose last axis has at least two entries is read as one score vector
    per row; top-1 agreement is the share of rows whose best class is the same, top-5 the share
    whose FP32 best class is among the simulated model's five best.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.rows = 0
        self.top1 = 0
        self.top5 = 0
        self.classes = 0

    def update(self, reference: np.ndarray, simulated: np.ndarray) -> None:
        super().update(reference, simulated)
        if reference.ndim not in (2, 3) or reference.shape[-1] < 2:
            return
        ref = reference.reshape(-1, reference.shape[-1])
        sim = simulated.reshape(-1, simulated.shape[-1])
        self.classes = ref.shape[1]
        best = ref.argmax(axis=1)
        self.top1 += int(np.sum(sim.argmax(axis=1) == best))
        if self.classes >= 5:
            top5 = np.argpartition(-sim, 4, axis=1)[:, :5]
            self.top5 += int(np.sum(np.any(top5 == best[:, None], axis=1)))
        self.rows += ref.shape[0]

    def to_dict(self) -> dict:
        figures = super().to_dict()
        if self.rows:
            figures["top1_agreement"] = self.top1 / self.rows
            figures["top5_agreement"] = self.top5 / self.rows if self.classes >= 5 else None
            figures["rows_compared"] = self.rows
        return figures


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from summed squares."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def json_db(value: float) -> float | None:
    """A dB figure rounded for the report; JSON has no infinity, so an exact match is null."""
    return round(value, 4) if math.isfinite(value) else None


def inner(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of a * b in float64; einsum avoids BLAS, whose threads only add overhead at these sizes."""
    flat_a = np.ravel(a).astype(np.float64, copy=False)
    flat_b = np.ravel(b).astype(np.float64, copy=False)
    return float(np.einsum("i,i->", flat_a, flat_b))
