"""Automatic mixed precision: which activations and weights to raise from 8 to 16 bits, and what
each buys.

The tensors are ranked once by how much their 8-bit quantization alone costs the model's outputs
(the isolated analysis, one run per tensor per sample on a few held-back samples); the whole
quantized model is then scored on the held-back calibration samples with candidate sets raised:

- with a target SQNR, by bisection on the ranking: the shortest prefix of it (within the budget)
  that meets the target, found in log2(n) scorings, then pruned: each raised tensor, least costly
  first, goes back to 8 bits when the target is still met without it (at most PRUNE_SCORINGS
  tries). Errors spread over many tensors (a transformer, the PP-OCR detector) need many raises
  that each lift the score too little to be told from noise alone; a prefix catches them together.
- with a budget only, or when even the whole budget's prefix misses the target: greedily, the next
  tensor in ranking order is raised and kept only when it lifts the score by MIN_GAIN_DB, until
  the target is met or the budget is spent.

This module holds the choice only: the caller supplies the ranking and the score (the simulation
is a later stage), so the rule is tested on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MIN_GAIN_DB = 0.1
"""A greedy raise is kept only when it lifts the held-back SQNR by this much (a noise floor for 16 samples).
It does not stop the PP-OCR classifier's raises from losing 2.5 dB on held-out crops: there the
held-back and held-out crops disagree by more than that (README, "What each accuracy step buys")."""
DEFAULT_HELD_BACK = 16
"""Calibration samples held back to judge the choice (fewer when the set is small: an eighth of it)."""
PRUNE_SCORINGS = 16
"""At most this many tries to lower a tensor of the bisected prefix back to 8 bits."""


@dataclass
class Trial:
    """One scoring of a candidate set: what changed from the current set, the score, whether kept."""

    step: str  # "prefix" (the first `count` ranked tensors), "drop" (prune one), "raise" (greedy)
    count: int  # tensors raised in the candidate
    sqnr_db: float
    kept: bool
    tensor: str | None = None  # the tensor dropped or raised

    def to_dict(self) -> dict:
        return {"step": self.step, "raised": self.count, "tensor": self.tensor, "sqnr_db": self.sqnr_db,
                "kept": self.kept}


@dataclass
class PrecisionChoice:
    """The tensors raised to 16 bits and how the choice went."""

    raised: list[str]
    baseline_db: float
    final_db: float
    target_db: float | None
    budget: int | None
    strategy: str
    tried: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def target_met(self) -> bool | None:
        return None if self.target_db is None else self.final_db >= self.target_db

    def to_dict(self) -> dict:
        return {"raised": self.raised, "count": len(self.raised), "baseline_sqnr_db": self.baseline_db,
                "final_sqnr_db": self.final_db, "target_sqnr_db": self.target_db, "target_met": self.target_met,
                "max_16bit": self.budget, "strategy": self.strategy, "evaluations": len(self.tried) + 1,
                "seconds": round(self.seconds, 3), "tried": [t.to_dict() for t in self.tried]}


def held_back_count(calibration_samples: int) -> int:
    """How many calibration samples to hold back for judging: up to DEFAULT_HELD_BACK, an eighth of the set."""
    return max(1, min(DEFAULT_HELD_BACK, calibration_samples // 8))


def choose_16bit(
    ranking: Sequence[str],
    score: Callable[[list[str]], float],
    target_db: float | None,
    budget: int | None,
) -> PrecisionChoice:
    """Tensors from ``ranking`` (costliest first) to raise so that ``score`` (output SQNR in dB with
    the given tensors at 16 bits) meets ``target_db`` with at most ``budget`` raised: bisection and
    pruning with a target, greedy otherwise (module docstring).

    At least one of ``target_db`` and ``budget`` must be given; with no target the whole budget is
    spent on the tensors that help.
    """
    if target_db is None and budget is None:
        raise ValueError("choose_16bit needs a target SQNR or a budget of 16-bit tensors")
    start = time.perf_counter()
    baseline = score([])
    limit = len(ranking) if budget is None else min(budget, len(ranking))
    tried: list[Trial] = []
    if target_db is not None and baseline >= target_db:
        raised, final, strategy = [], baseline, "none needed"
    elif target_db is not None and limit and _meets(ranking[:limit], score, target_db, tried):
        raised, final = _bisect(ranking, limit, score, target_db, baseline, tried)
        strategy = "bisection"
    else:
        raised, final = _greedy(ranking, score, target_db, budget, baseline, tried)
        strategy = "greedy"
    choice = PrecisionChoice(raised, baseline, final, target_db, budget, strategy, tried)
    choice.seconds = time.perf_counter() - start
    return choice


def _meets(candidate: Sequence[str], score: Callable[[list[str]], float], target_db: float,
           tried: list[Trial]) -> bool:
    db = score(list(candidate))
    tried.append(Trial("prefix", len(candidate), db, db >= target_db))
    return db >= target_db


def _bisect(ranking: Sequence[str], limit: int, score: Callable[[list[str]], float], target_db: float,
            baseline: float, tried: list[Trial]) -> tuple[list[str], float]:
    """The shortest prefix meeting the target (the first ``limit`` do), then pruned."""
    low, high = 0, limit  # the prefix of `low` misses the target (the baseline), that of `high` meets it
    scores = {0: baseline, limit: tried[-1].sqnr_db}
    while high - low > 1:
        middle = (low + high) // 2
        db = score(list(ranking[:middle]))
        scores[middle] = db
        tried.append(Trial("prefix", middle, db, db >= target_db))
        low, high = (low, middle) if db >= target_db else (middle, high)
    raised, final = list(ranking[:high]), scores[high]
    for tensor in list(reversed(raised))[:PRUNE_SCORINGS]:
        if len(raised) == 1:
            break
        candidate = [name for name in raised if name != tensor]
        db = score(candidate)
        dropped = db >= target_db
        tried.append(Trial("drop", len(candidate), db, dropped, tensor))
        if dropped:
            raised, final = candidate, db
    return raised, final


def _greedy(ranking: Sequence[str], score: Callable[[list[str]], float], target_db: float | None,
            budget: int | None, baseline: float, tried: list[Trial]) -> tuple[list[str], float]:
    """Raise in ranking order, keeping a raise that gains MIN_GAIN_DB, until the target or the budget."""
    raised: list[str] = []
    current = baseline
    for tensor in ranking:
        if (target_db is not None and current >= target_db) or (budget is not None and len(raised) >= budget):
            break
        candidate = score([*raised, tensor])
        kept = candidate >= current + MIN_GAIN_DB
        tried.append(Trial("raise", len(raised) + 1, candidate, kept, tensor))
        if kept:
            raised.append(tensor)
            current = candidate
    return raised, current
