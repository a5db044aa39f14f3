"""Automatic mixed precision: which activations to raise from 8 to 16 bits, and what each buys.

The tensors are ranked once by how much their 8-bit quantization alone costs the model's outputs
(the isolated analysis, one run per tensor per sample on a few held-back samples); then, greedily
in that order, the next tensor is raised to 16 bits and the whole quantized model is scored on the
held-back calibration samples, until the target SQNR is met or the budget of 16-bit tensors is
spent. A raise that does not lift the score by MIN_GAIN_DB is undone and the next tensor tried. The cost is one
scoring of the model per tensor tried, each over the held-back samples; the report gives the
count and the time.

This module holds the choice only: the caller supplies the ranking and the score (the simulation
is a later stage), so the rule is tested on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MIN_GAIN_DB = 0.1
"""A raise is kept only when it lifts the held-back SQNR by this much (a noise floor for 16 samples).
It does not stop the PP-OCR classifier's raises from losing 2.5 dB on held-out crops: there the
held-back and held-out crops disagree by more than that (README, "What each accuracy step buys")."""
DEFAULT_HELD_BACK = 16
"""Calibration samples held back to judge the choice (fewer when the set is small: an eighth of it)."""


@dataclass
class Raise:
    """One tensor tried at 16 bits: the score before and after, and whether it was kept."""

    tensor: str
    before_db: float
    after_db: float
    kept: bool

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "sqnr_before_db": self.before_db, "sqnr_after_db": self.after_db,
                "kept": self.kept, "gain_db": self.after_db - self.before_db}


@dataclass
class PrecisionChoice:
    """The tensors raised to 16 bits and how the choice went."""

    raised: list[str]
    baseline_db: float
    final_db: float
    target_db: float | None
    budget: int | None
    tried: list[Raise] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def target_met(self) -> bool | None:
        return None if self.target_db is None else self.final_db >= self.target_db

    def to_dict(self) -> dict:
        return {"raised": self.raised, "count": len(self.raised), "baseline_sqnr_db": self.baseline_db,
                "final_sqnr_db": self.final_db, "target_sqnr_db": self.target_db, "target_met": self.target_met,
                "max_16bit": self.budget, "evaluations": len(self.tried) + 1, "seconds": round(self.seconds, 3),
                "tried": [r.to_dict() for r in self.tried]}


def held_back_count(calibration_samples: int) -> int:
    """How many calibration samples to hold back for judging: up to DEFAULT_HELD_BACK, an eighth of the set."""
    return max(1, min(DEFAULT_HELD_BACK, calibration_samples // 8))


def choose_16bit(
    ranking: Sequence[str],
    score: Callable[[list[str]], float],
    target_db: float | None,
    budget: int | None,
) -> PrecisionChoice:
    """Raise tensors from ``ranking`` (costliest first) one at a time while ``score`` (output SQNR in dB
    with the given tensors at 16 bits) is below ``target_db`` and fewer than ``budget`` are raised.

    At least one of ``target_db`` and ``budget`` must be given; with no target the whole budget is
    spent on the tensors that help.
    """
    if target_db is None and budget is None:
        raise ValueError("choose_16bit needs a target SQNR or a budget of 16-bit tensors")
    start = time.perf_counter()
    raised: list[str] = []
    current = baseline = score([])
    tried = []
    for tensor in ranking:
        if (target_db is not None and current >= target_db) or (budget is not None and len(raised) >= budget):
            break
        candidate = score([*raised, tensor])
        kept = candidate >= current + MIN_GAIN_DB
        tried.append(Raise(tensor, current, candidate, kept))
        if kept:
            raised.append(tensor)
            current = candidate
    return PrecisionChoice(raised, baseline, current, target_db, budget, tried, time.perf_counter() - start)
