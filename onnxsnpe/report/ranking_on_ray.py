"""Isolated errors on a Ray cluster: the tensors in groups, one task each. They serve automatic mixed
precision's ranking (``isolated_ranking_on_ray``) and the report's isolated analysis
(``isolated_sums_on_ray``, from evaluation.Evaluator).

The driver builds the switchable simulation once (sensitivity.IsolatedModel); each task makes its
sessions (one thread, the task's one CPU), reads the samples by path and returns the errors of its
group of tensors. A tensor's error comes from the same runs, accumulated in the same order and with
the same arithmetic as in-process, so the ranking and the figures are the same (tested); a task
whose worker dies is run again by Ray. Connection and failures as for calibration (stats/distributed.py).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx

from ..data.datasets import Dataset
from ..encode.encoding import Encoding, ParamEncoding
from ..graph.targets import QuantTargets
from ..stats.distributed import RETRIES, check_code, cluster_cpus, code_fingerprint, connect, gather
from .metrics import TensorComparison
from .sensitivity import IsolatedModel, ranked


def isolated_ranking_on_ray(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    samples: Dataset,
    weights: dict[str, ParamEncoding] | None = None,
    *,
    address: str | None = None,
    groups: int | None = None,
) -> list[tuple[str, float]]:
    """sensitivity.isolated_ranking over every sample of ``samples``, in ``groups`` Ray tasks of
    tensors (default: one per CPU of the cluster)."""
    ray = connect(address)
    switchable = IsolatedModel.build(deploy, targets, activations, weights or {})
    parts = _over_tensor_groups(ray, _ranking_task, switchable, groups, ray.put(deploy), samples)
    return ranked(comparison for part in parts for comparison in part)


def isolated_sums_on_ray(
    switchable: IsolatedModel,
    samples: Dataset,
    references: list[list[np.ndarray]],
    *,
    address: str | None = None,
    groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """IsolatedModel.output_sums of every tensor over the samples of ``samples`` (read by path in the
    tasks) with their FP32 outputs ``references`` (float64, from the driver's evaluation), in ``groups``
    Ray tasks of tensors (default: one per CPU of the cluster): [samples, tensors, outputs] each."""
    ray = connect(address)
    parts = _over_tensor_groups(ray, _sums_task, switchable, groups, samples, ray.put(references))
    return (np.concatenate([signal for signal, _ in parts], axis=1),
            np.concatenate([noise for _, noise in parts], axis=1))


def _over_tensor_groups(ray, function, switchable: IsolatedModel, groups: int | None, *shared) -> list:
    """``function(switchable, *shared, positions, code)`` as one Ray task per group of tensors
    (tensor_groups), the switchable model put in the object store once; the results in group order."""
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(function)
    model = ray.put(switchable)
    refs = [task.remote(model, *shared, positions, code_fingerprint())
            for positions in tensor_groups(ray, len(switchable.names), groups)]
    return gather(ray, refs)


def tensor_groups(ray, count: int, groups: int | None = None) -> list[list[int]]:
    """Positions 0 to ``count - 1`` in ``groups`` contiguous groups of near-equal size (default: one per
    CPU of the cluster), none empty."""
    groups = min(max(1, groups or cluster_cpus(ray)), count)
    bounds = np.linspace(0, count, groups + 1).round().astype(int)
    return [list(range(low, high)) for low, high in pairwise(bounds)]


def _ranking_task(switchable: IsolatedModel, deploy: onnx.ModelProto, samples: Dataset,
                  positions: list[int], code: str) -> list[TensorComparison]:
    """In a worker: the isolated errors of the tensors at ``positions``."""
    check_code(code)
    return switchable.errors(deploy, (samples.load(i) for i in range(len(samples))), positions, threads=1)


def _sums_task(switchable: IsolatedModel, samples: Dataset, references: list[list[np.ndarray]],
               positions: list[int], code: str) -> tuple[np.ndarray, np.ndarray]:
    """In a worker: the output sums of the tensors at ``positions`` over the samples and their FP32 outputs."""
    check_code(code)
    kept = [(samples.load(i), outputs) for i, outputs in enumerate(references)]
    return switchable.output_sums(kept, positions, threads=1)
