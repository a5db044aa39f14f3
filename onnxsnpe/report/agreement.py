"""How closely one execution of a quantized model follows another (the simulation against the HTP emulator)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..encode.encoding import Encoding
from ..simulate.emulator import Runner, Sample
from .metrics import OutputComparison, json_db


@dataclass
class Agreement:
    """How closely one execution of a quantized model follows another on one output."""

    name: str
    comparison: OutputComparison
    scale: float

    @property
    def sqnr_db(self) -> float:
        return self.comparison.sqnr_db

    @property
    def max_error_lsb(self) -> float:
        """The largest difference in steps of the output's encoding."""
        return self.comparison.max_abs_error / self.scale

    @property
    def top1(self) -> float | None:
        """Share of rows (samples or time steps) whose best class agrees; None if not class scores."""
        rows = self.comparison.rows
        return self.comparison.top1 / rows if rows else None

    def to_dict(self) -> dict:
        """Figures for report.json."""
        return {
            "name": self.name,
            "sqnr_db": json_db(self.sqnr_db),
            "max_error_lsb": round(self.max_error_lsb, 3),
            "top1_agreement": self.top1,
            "values_compared": self.comparison.count,
        }


def measure_agreement(
    reference: Runner,
    candidate: Runner,
    names: list[str],
    output_encodings: dict[str, Encoding],
    samples: Iterable[Sample],
) -> list[Agreement]:
    """Per output, the error of ``candidate`` against ``reference`` over ``samples``, streaming.

    Both runners return the outputs ``names`` in that order. Typically the reference is an
    HtpSession's ``run`` and the candidate the simulation or onnxruntime's CPU execution.
    """
    results = [Agreement(name, OutputComparison(name), output_encodings[name].scale) for name in names]
    for sample in samples:
        for result, ref, got in zip(results, reference(sample), candidate(sample), strict=True):
            result.comparison.update(ref, got)
    return results
