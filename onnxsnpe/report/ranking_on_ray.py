"""Automatic mixed precision's isolated ranking on a Ray cluster: the tensors in groups, one task each.

The driver builds the switchable simulation once (sensitivity.IsolatedModel); each task makes its
sessions (one thread, the task's one CPU), reads the ranking samples by path and returns the errors
of its group of tensors. A tensor's error is accumulated over the samples in the same order and with
the same arithmetic as in-process, so the ranking is the same (tested); a task whose worker dies is
run again by Ray. Connection and failures as for calibration (stats/distributed.py).
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
    count = len(switchable.names)
    groups = min(max(1, groups or cluster_cpus(ray)), count)
    bounds = np.linspace(0, count, groups + 1).round().astype(int)
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_group_task)
    model, reference = ray.put(switchable), ray.put(deploy)
    refs = [task.remote(model, reference, samples, list(range(low, high)), code_fingerprint())
            for low, high in pairwise(bounds)]
    return ranked(comparison for part in gather(ray, refs) for comparison in part)


def _group_task(switchable: IsolatedModel, deploy: onnx.ModelProto, samples: Dataset,
                positions: list[int], code: str) -> list[TensorComparison]:
    """In a worker: the isolated errors of the tensors at ``positions``."""
    check_code(code)
    return switchable.errors(deploy, (samples.load(i) for i in range(len(samples))), positions, threads=1)
