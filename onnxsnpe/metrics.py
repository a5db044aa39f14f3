"""Streaming error figures between FP32 and simulated quantized outputs."""

from __future__ import annotations

import math

import numpy as np


class OutputComparison:
    """SQNR and absolute errors of one output, accumulated sample by sample in float64."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signal = 0.0
        self.noise = 0.0
        self.abs_error_sum = 0.0
        self.max_abs_error = 0.0
        self.count = 0

    def update(self, reference: np.ndarray, simulated: np.ndarray) -> None:
        """Add one sample's outputs."""
        ref = np.asarray(reference, dtype=np.float64)
        err = np.asarray(simulated, dtype=np.float64) - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(err * err))
        abs_err = np.abs(err)
        self.abs_error_sum += float(abs_err.sum())
        self.max_abs_error = max(self.max_abs_error, float(abs_err.max(initial=0.0)))
        self.count += int(ref.size)

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal power / noise power) over all samples; inf when identical."""
        return sqnr_db(self.signal, self.noise)

    @property
    def mean_abs_error(self) -> float:
        return self.abs_error_sum / self.count if self.count else 0.0

    def to_dict(self) -> dict:
        """Figures for report.json; an infinite SQNR (no error at all) is written as null."""
        sqnr = self.sqnr_db
        return {
            "name": self.name,
            "sqnr_db": round(sqnr, 4) if math.isfinite(sqnr) else None,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "values_compared": self.count,
        }


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from summed squares."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
