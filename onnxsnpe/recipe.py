"""``--optimize``: apply what helps for the chosen scheme, and show what each step bought.

For the weight scheme the user chose (per tensor or per channel, and its bitwidth), each step in
turn, cross-layer equalization, AdaRound, bias correction, is applied on top of the steps kept so far and kept only when
the simulated quantized model does better on the held-back calibration samples (the lowest output
SQNR; never the ``--eval`` data the report measures with). Each trial calibrates again on the
calibration samples, since a step changes the activations. The ablation rows give every trial's
held-back SQNR and top-1 agreement, cumulative, and whether it was kept.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

from .encode.quantized_weights import quantized_weights
from .report.metrics import json_db
from .report.sensitivity import OutputScorer
from .stages import (
    Prepared,
    Settings,
    apply_adaround,
    apply_bias_correction,
    apply_cle,
    encode,
    hold_back,
    optimize_model,
    weight_set,
)
from .stats.collect import collect_statistics
from .stats.distributed import collect_on_ray

LABELS = {"cle": "CLE", "adaround": "AdaRound", "bias_correction": "bias correction"}
STEPS = (("cle", apply_cle), ("adaround", apply_adaround), ("bias_correction", apply_bias_correction))
ON_RAY = {"adaround"}
"""The steps that take ``ray`` (AdaRound's independent layers as Ray tasks)."""


def run_recipe(
    prepared: Prepared, settings: Settings, progress: bool, ray: str | bool | None = None
) -> tuple[Prepared, Settings, dict]:
    """The prepared model with the steps that helped applied, the settings that say which, and the record.
    With ``ray`` each trial's calibration runs on Ray (stats/distributed.py), and AdaRound's rounding
    where its order allows (optimize/adaround_on_ray.py), with the same result."""
    prepared = prepared if prepared.judging_set is not None else hold_back(prepared)
    samples = [prepared.judging_set.load(i) for i in range(len(prepared.judging_set))]
    scorer = OutputScorer(prepared.reference, prepared.targets, samples, settings.arithmetic)
    chosen = replace(settings, cle=False, adaround=False, bias_correction=False)

    def judge(candidate: Prepared, candidate_settings: Settings) -> tuple[float, float | None]:
        model = candidate.deploy  # tf_enhanced observes it with quantized weights, as calibrate does
        if candidate_settings.method == "tf_enhanced":
            model = quantized_weights(model, weight_set(candidate, candidate_settings))
        if ray not in (None, False):
            stats = collect_on_ray(model, candidate.targets.activations, candidate.calib_set,
                                   [candidate_settings.method], candidate.targets.floors(),
                                   address=None if ray is True else ray)
        else:
            stats = collect_statistics(model, candidate.targets.activations, iter(candidate.calib_set),
                                       methods=[candidate_settings.method], floors=candidate.targets.floors())
        encodings = encode(candidate, stats, candidate_settings)
        comparisons = scorer.compare(encodings.activations, encodings.params, candidate.deploy, candidate.targets)
        top1 = [c.top1 / c.rows for c in comparisons if c.rows]
        return min(c.sqnr_db for c in comparisons), (top1[0] if top1 else None)

    best, top1 = judge(prepared, chosen)
    rows = [{"step": "nearest rounding", "sqnr_db": json_db(best), "top1_agreement": top1, "kept": True,
             "seconds": 0.0}]
    steps = {}
    for name, step in STEPS:
        apply = partial(step, ray=ray) if name in ON_RAY else step
        start = time.perf_counter()
        trial_settings = replace(chosen, **{name: True})
        trial, steps[name] = apply(prepared, trial_settings, progress)
        score, top1 = judge(trial, trial_settings)
        kept = score > best
        rows.append({"step": f"+ {LABELS[name]}", "sqnr_db": json_db(score), "top1_agreement": top1,
                     "kept": kept, "seconds": round(time.perf_counter() - start, 3)})
        if kept:
            prepared, chosen, best = trial, trial_settings, score
    kept = [name for name, _ in STEPS if getattr(chosen, name)]
    record = {"recipe": {"held_back_samples": len(samples), "ablation": rows, "kept": kept},
              **{name: steps[name] for name in kept}}
    return prepared, replace(settings, cle=chosen.cle, adaround=chosen.adaround,
                             bias_correction=chosen.bias_correction), record


def optimize_weights(prepared: Prepared, settings: Settings, progress: bool,
             ray: str | bool | None = None) -> tuple[Prepared, Settings, dict]:
    """The weight-changing steps as ``settings`` ask: the recipe with ``--optimize`` (its settings say
    which steps it kept), else each step asked for (stages.optimize_model); ``ray`` as for run_recipe."""
    if settings.optimize:
        return run_recipe(prepared, settings, progress, ray)
    prepared, done = optimize_model(prepared, settings, progress, ray)
    return prepared, settings, done
