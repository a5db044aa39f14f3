"""``--auto-precision`` wired to the stages: rank the tensors, score candidate sets on the held-back
samples, and give back the model and encodings of the chosen set (the choice itself is
optimize/mixed_precision.py, what a raise implies encode/precision.py).

A raised weight takes its FP32 value back, with its layer's bias, when an earlier step had changed
them for 8 bits (AdaRound rounded it onto its 8-bit grid, bias correction made up for that
rounding): at 16 bits the rounding they stand for is gone, so keeping them would keep an 8-bit
error. The activation statistics are not collected again for such a weight (its layer's output
moves by less than one 8-bit step on average, which is what AdaRound chose it for).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import onnx

from .graph.large import initializer_array
from .optimize.mixed_precision import choose_16bit
from .report.metrics import json_db
from .report.ranking_on_ray import isolated_ranking_on_ray
from .report.sensitivity import OutputScorer, isolated_ranking
from .stages import Encodings, Prepared, Settings, encode
from .stats.distributed import dataset_part
from .stats.tensor_stats import TensorStats

RANKING_SAMPLES = 4
"""Held-back samples the isolated ranking of automatic mixed precision runs on (one run per tensor each)."""


def raisable_weights(prepared: Prepared, settings: Settings) -> list[str]:
    """The weights mixed precision may raise to 16 bits: all of them when weights are 8-bit."""
    return list(prepared.targets.weights) if settings.weight_bitwidth == 8 else []


def with_fp32_weights(prepared: Prepared, weights: Iterable[str]) -> Prepared:
    """``prepared`` with ``weights`` no longer fixed on an 8-bit grid, and they and their layers' biases
    at the values of the FP32 model the rounding steps stand for (Prepared.reference) where a step
    changed them. ``prepared`` itself when there is nothing to release."""
    weights = set(weights)
    fixed = prepared.weight_encodings
    released = None if fixed is None else {name: enc for name, enc in fixed.items() if name not in weights}
    biases = {ref.bias for ref in prepared.targets.biases if ref.weight in weights}
    restored = _changed_values(prepared, weights | biases)
    if not restored and released == fixed:
        return prepared
    deploy = prepared.deploy
    if restored:
        deploy = onnx.ModelProto()
        deploy.CopyFrom(prepared.deploy)
        for init in deploy.graph.initializer:
            if init.name in restored:
                init.CopyFrom(restored[init.name])
    result = replace(prepared, deploy=deploy, weight_encodings=released)
    if "table_ranges" in vars(prepared):  # weights and biases are never gathered tables: the cache holds
        vars(result)["table_ranges"] = prepared.table_ranges
    return result


def _changed_values(prepared: Prepared, names: set[str]) -> dict[str, onnx.TensorProto]:
    """The FP32 initializers among ``names`` whose values an optimization step changed in the deploy model."""
    if prepared.fp32_deploy is None or not names:
        return {}
    current = {init.name: init for init in prepared.deploy.graph.initializer if init.name in names}
    return {init.name: init for init in prepared.fp32_deploy.graph.initializer
            if init.name in current and not np.array_equal(initializer_array(init),
                                                           initializer_array(current[init.name]))}


def encode_with_precision(
    prepared: Prepared, stats: dict[str, TensorStats], settings: Settings, ray: str | bool | None = None
) -> tuple[Prepared, Encodings, dict | None]:
    """The prepared model and its encodings, with the activations and weights raised to 16 bits that
    automatic mixed precision picks when asked, and the record of the choice (None when not asked).

    The ranking uses the first RANKING_SAMPLES held-back calibration samples, the scores all of them.
    A weight an earlier step fixed is ranked by the cost of its nearest rounding on its fixed grid.
    With ``ray`` (True, or a cluster's address) the ranking runs on Ray (report/ranking_on_ray.py),
    with the same result.
    """
    if not settings.auto_precision:
        return prepared, encode(prepared, stats, settings), None
    samples = [prepared.judging_set.load(i) for i in range(len(prepared.judging_set))]
    start = time.perf_counter()
    plain = encode(prepared, stats, settings)
    candidates = {name: plain.weights[name] for name in raisable_weights(prepared, settings)}
    if ray not in (None, False):
        ranking = isolated_ranking_on_ray(prepared.reference, prepared.targets, plain.activations,
                                          dataset_part(prepared.judging_set, 0, RANKING_SAMPLES), candidates,
                                          address=None if ray is True else ray)
    else:
        ranking = isolated_ranking(prepared.reference, prepared.targets, plain.activations,
                                   samples[:RANKING_SAMPLES], candidates)
    ranked = time.perf_counter() - start
    scorer = OutputScorer(prepared.reference, prepared.targets, samples, settings.arithmetic)

    def raised_model(raised: list[str]) -> Prepared:
        return with_fp32_weights(prepared, [name for name in raised if name in candidates])

    def score(raised: list[str]) -> float:
        candidate = raised_model(raised)
        encodings = encode(candidate, stats, settings, raised)
        comparisons = scorer.compare(encodings.activations, encodings.params, candidate.deploy, candidate.targets)
        return min(c.sqnr_db for c in comparisons)

    choice = choose_16bit([name for name, _ in ranking], score, settings.target_sqnr, settings.max_16bit)
    chosen = raised_model(choice.raised)
    encodings = encode(chosen, stats, settings, choice.raised)
    record = {
        **choice.to_dict(),
        "raised_weights": [name for name in choice.raised if name in candidates],
        "activations_at_16_bits": sum(enc.bitwidth == 16 for name, enc in encodings.activations.items()
                                      if name in prepared.targets.activations),
        "weights_at_16_bits": sum(enc.bitwidth == 16 for enc in encodings.weights.values()),
        "fp32_weights_restored": chosen.deploy is not prepared.deploy,
        "held_back_samples": len(samples),
        "ranking_samples": min(RANKING_SAMPLES, len(samples)),
        "ranking_seconds": round(ranked, 3),
        "ranking": [{"tensor": name, "isolated_sqnr_db": json_db(db)} for name, db in ranking[:20]],
    }
    return chosen, encodings, record
