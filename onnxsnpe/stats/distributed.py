"""The calibration pass on a Ray cluster: the samples in shards, one task each, merged exactly.

Each task reads its shard's samples by path (the dataset travels with its file names only, never its
arrays), runs them through the exposed onnxruntime session (collect.py, one thread, the task's one
CPU) and returns the statistics (min/max, histograms, PDFs: a few megabytes whatever the number of
samples); the driver merges them in shard order. Statistics merge exactly (tensor_stats.py), so the
result is the in-process one for any number of shards. AIMET's PDFs are the exception that needs
care: their grids come from the first sample that is not all zeros, so with ``tf_enhanced`` a first
task runs the first samples alone until every PDF has its grid (collect.collect_first; one sample,
as a rule), and the shards of the rest start from those grids. (The in-process pass runs only the
first batch alone and folds a PDF still without its grid in dataset order as the workers go; here
such a PDF, e.g. a mask's whose kept values are all zeros, keeps the first task going to the end.) A
task whose worker dies is run again by Ray (``max_retries``): its statistics start from nothing
again, and the raw files it writes (``sink``) get the same bytes again.

Ray is optional (``pip install "onnxsnpe[ray]"``) and imported only here, on first use. With no
address a local cluster is started with the machine's cores; with one, the job joins a running
cluster (``ray start --head``), whose every node needs onnxsnpe installed and the samples (and the
output folder, for the raw files) at the same paths; each task checks that its worker runs the
driver's onnxsnpe code (check_code). The connection stays open for later calls in the process
(``ray.shutdown()`` ends it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..data.datasets import Dataset, Sample
from ..errors import OnnxSnpeError
from ..graph.large import is_large
from .collect import DEFAULT_BATCH_SIZE, available_cores, collect_first, collect_statistics
from .tensor_stats import TensorStats

RETRIES = 3
"""Times Ray runs a task again whose worker died (an error raised by the task is not retried)."""
REPORT_SECONDS = 0.25
"""How often a task reports its progress to the bar."""
POLL_SECONDS = 0.2
"""How often the driver looks at finished tasks and the progress."""

Sink = Callable[[int, Sample], None]
"""Called in the worker with each sample's index in the dataset and the sample (writes raw files)."""


def connect(address: str | None = None):
    """The ``ray`` module, connected: to the cluster at ``address``, or a local one started with this
    machine's cores when None; an existing connection is used as it is."""
    try:
        import ray
    except ImportError as exc:
        raise OnnxSnpeError('--ray needs Ray: pip install "onnxsnpe[ray]"') from exc
    if ray.is_initialized():
        return ray
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # its start-up notes (token authentication is on, ...) are not the user's concern
            ray.init(address="local", num_cpus=available_cores(), include_dashboard=False,
                     logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        hint = ""
        if address and address != "auto" and not os.environ.get("RAY_AUTH_MODE"):
            hint = ("; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its "
                    "token (~/.ray/auth_token or RAY_AUTH_TOKEN)")
        raise OnnxSnpeError(f"--ray: cannot connect to {where}: {_first_line(exc)}{hint}") from exc
    return ray


CONNECT_SECONDS = 10
"""How long the head node's port may take to answer (Ray itself keeps trying for minutes)."""


def check_reachable(address: str) -> None:
    """Refuse at once an address whose host and port nobody answers on (``host:port``, also after
    ``ray://``; other forms such as ``auto`` are left to Ray)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise OnnxSnpeError(f"--ray: nothing answers at {address} ({exc.strerror or exc}); "
                            "start the cluster's head there with 'ray start --head'") from exc


@functools.cache
def code_fingerprint() -> str:
    """A digest of this onnxsnpe's source files. Ray workers import onnxsnpe on their own (from their
    node's installation, or from a source checkout in the folder the command was started in, which
    Ray puts first on their path): each task checks that it runs the driver's code."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_code(expected: str) -> None:
    """In a worker: refuse to run other onnxsnpe code than the driver's (results could differ)."""
    if code_fingerprint() != expected:
        where = Path(__file__).resolve().parents[1]
        raise OnnxSnpeError(f"--ray: the Ray worker on {socket.gethostname()} runs the onnxsnpe in {where}, "
                            "whose code differs from this command's: install the same onnxsnpe on every node "
                            "(and start the command outside other copies of its source)")


def cluster_cpus(ray) -> int:
    """The CPUs of the connected cluster: the default number of shards."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def collect_on_ray(
    model: onnx.ModelProto,
    tensors: list[str],
    dataset: Dataset,
    methods: Iterable[str] = ("minmax",),
    floors: dict[str, float] | None = None,
    *,
    address: str | None = None,
    shards: int | None = None,
    sink: Sink | None = None,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """collect.collect_statistics over every sample of ``dataset``, in ``shards`` Ray tasks (default:
    one per CPU of the cluster), with ``sink`` called on each sample where it is read.

    Raises OnnxSnpeError for bad input found by a task (its one-line message, naming the file), and
    for a task that failed beyond Ray's retries.
    """
    ray = connect(address)
    methods = tuple(methods)
    floors = floors or {}
    if is_large(model):
        raise OnnxSnpeError("--ray: models with over 1.8 GB of weights are not sent to Ray workers yet; "
                            "calibrate without --ray")
    if not dataset.shapes:
        dataset.load(0)  # fixes the input shapes every shard checks its samples against
    count = len(dataset)
    shards = max(1, shards or cluster_cpus(ray))
    bar = tqdm(total=count, desc="calibration", unit="sample", disable=not progress or None, leave=False)
    reporter = None if bar.disable else ray.remote(num_cpus=0)(_Progress).remote()  # no bar, no counting
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)
    common = dict(model=ray.put(model.SerializeToString()), tensors=tensors, methods=methods, floors=floors,
                  sink=ray.put(sink), reporter=reporter, code=code_fingerprint())
    try:
        first, start = None, 0
        if "tf_enhanced" in methods:
            (first, start), = gather(ray, [task(_first_task).remote(dataset=dataset, **common)], bar, reporter)
        bounds = np.linspace(start, count, min(shards, count - start) + 1).round().astype(int)
        continuing = ray.put(first)
        refs = [task(_shard_task).remote(shard=shard, dataset=dataset_part(dataset, low, high), first_index=int(low),
                                         continuing=continuing, **common)
                for shard, (low, high) in enumerate(pairwise(bounds), 1)]
        parts = gather(ray, refs, bar, reporter)
        bar.update(count - bar.n)  # every task is done; their last counts may still be on their way
    finally:
        bar.close()
        if reporter is not None:
            ray.kill(reporter)
    return merge_in_order([first, *parts] if first is not None else parts)


def merge_in_order(parts: list[dict[str, TensorStats]]) -> dict[str, TensorStats]:
    """The statistics of every part (in sample order), merged into new ones: the arrays of results
    Ray hands back are read-only."""
    stats = {name: observed.spawn() for name, observed in parts[0].items()}
    for part in parts:
        for name, observed in part.items():
            stats[name].merge(observed)
    return stats


def dataset_part(dataset: Dataset, low: int, high: int) -> Dataset:
    """The dataset's samples ``low`` to ``high - 1``: their file names, no arrays."""
    return replace(dataset, entries=dataset.entries[low:high], shapes=dict(dataset.shapes))


def gather(ray, refs: list, bar: tqdm | None = None, reporter=None) -> list:
    """The tasks' results in the order of ``refs``, updating the bar meanwhile. The first failure is
    raised: a task's OnnxSnpeError as itself, an error of Ray's (a task that died beyond its retries)
    as an OnnxSnpeError.

    The other tasks are not cancelled: they run out on the cluster (a local cluster ends with the
    command) and their results are dropped. Ray's cancellation races with a task's reply (ray 2.60:
    ``Check failed: it != submissible_tasks_.end() Tried to complete task that was not pending`` in
    the driver's task manager, which ends the whole process without a message; ray-project/ray
    #54527); it aborted two of four full test runs here (2026-12-08)."""
    import ray.exceptions

    results: dict[int, object] = {}
    pending = dict(enumerate(refs))
    asked = None
    try:
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=POLL_SECONDS)
            for index in [i for i, ref in pending.items() if ref in ready]:
                results[index] = ray.get(pending.pop(index))
            if reporter is not None and bar is not None:
                if asked is None:
                    asked = reporter.total.remote()
                elif ray.wait([asked], timeout=0)[0]:
                    bar.update(ray.get(asked) - bar.n)
                    asked = None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, OnnxSnpeError):
            raise OnnxSnpeError(str(cause)) from None
        if isinstance(cause, ray.exceptions.RayError):  # e.g. a worker that cannot unpickle the task
            raise OnnxSnpeError(f"--ray: a task failed on the cluster ({_first_line(cause)}); do all nodes "
                                "run this command's onnxsnpe?") from exc
        raise cause from None  # a bug shows as it would in-process
    except ray.exceptions.RayError as exc:
        raise OnnxSnpeError(f"--ray: a task failed on the cluster: {_first_line(exc)}") from exc
    return [results[index] for index in range(len(refs))]


def _first_task(model: bytes, tensors: list[str], methods: tuple[str, ...], floors: dict[str, float],
                dataset: Dataset, sink: Sink | None, reporter, code: str) -> tuple[dict[str, TensorStats], int]:
    """In a worker: the first samples alone, until every PDF has its grid (collect.collect_first)."""
    check_code(code)
    samples = _read(dataset, 0, sink, reporter, 0)
    stats, count = collect_first(onnx.ModelProto.FromString(model), tensors, samples, methods, floors, threads=1)
    if reporter is not None:
        reporter.report.remote(0, count)
    return stats, count


def _shard_task(model: bytes, tensors: list[str], methods: tuple[str, ...], floors: dict[str, float],
                dataset: Dataset, first_index: int, continuing: dict[str, TensorStats] | None, sink: Sink | None,
                reporter, shard: int, code: str) -> dict[str, TensorStats]:
    """In a worker: the statistics of one shard, on the first samples' PDF grids when there are any."""
    check_code(code)
    samples = _read(dataset, first_index, sink, reporter, shard)
    return collect_statistics(onnx.ModelProto.FromString(model), tensors, samples, methods, DEFAULT_BATCH_SIZE,
                              workers=1, floors=floors, threads=1, continuing=continuing)


def _read(dataset: Dataset, first_index: int, sink: Sink | None, reporter, shard: int) -> Iterator[Sample]:
    """The shard's samples read from their files, each handed to ``sink``; progress reported now and then
    (the samples read before the one being read)."""
    reported = time.monotonic()
    for index in range(len(dataset)):
        if reporter is not None and index and time.monotonic() - reported >= REPORT_SECONDS:
            reporter.report.remote(shard, index)
            reported = time.monotonic()
        sample = dataset.load(index)
        if sink is not None:
            sink(first_index + index, sample)
        yield sample
    if reporter is not None:
        reporter.report.remote(shard, len(dataset))


class _Progress:
    """A Ray actor counting the samples each task has read, for the driver's one bar. A task run
    again reports from its start again, so its count replaces the earlier one."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def report(self, shard: int, done: int) -> None:
        self.done[shard] = done

    def total(self) -> int:
        return sum(self.done.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
