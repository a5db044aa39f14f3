"""Streaming statistics of every tensor SNPE quantizes, from one onnxruntime pass over the samples.

onnxruntime runs the model with the observed tensors exposed as outputs (read in its blocked
layout where that saves a conversion: exposure.py), on batches of samples where the model allows
it. Each core gets a worker that takes the next batch, runs it with a one-thread session into a
reused set of output arrays and folds its tensors into statistics of its own, one sample in one
compiled call per kind of statistic (folding.py; numpy, onnxruntime and the compiled kernels
release the GIL); the workers' statistics merge exactly at the end. Running whole samples side by
side uses the cores better than splitting each run across them, and the activations are dropped
right after folding: memory does not grow with the number of samples.

What is kept per tensor depends on the range methods asked for: min and max always, an
order-independent histogram for ``percentile`` and ``mse``, AIMET's first-sample PDF for
``tf_enhanced``. The first batch runs alone (it fixes the PDFs' grids and checks the sessions), so
the result does not depend on how the rest is shared out; a PDF still without its grid after it
(a tensor all zeros so far, or a mask whose kept values are always zeros) takes its values batch by
batch in dataset order from whichever worker ran them, so it holds no other tensor back.
Statistics merge, so runs over parts of the data combine into one.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxSnpeError, bad_values
from ..graph.large import initializer_array
from .exposure import ExposedSession
from .folding import OutputFold
from .parallel import ordered_map
from .tensor_stats import TensorStats

log = logging.getLogger(__name__)


DEFAULT_BATCH_SIZE = 1
"""Samples per onnxruntime run. Batching works for any model that allows it (batch_size > 1), but on
the 2-core benchmark machine our pass over EfficientNet-Lite0 was faster at batch 1 (2.4x plain
inference at batch 4, 1.5x at batch 1, though plain inference itself gains a little from batching:
tools/bench_calibration.py prints both)."""


def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    samples: Iterable[dict[str, np.ndarray]],
    methods: Iterable[str] = ("minmax",),
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    floors: dict[str, float] | None = None,
    threads: int | None = None,
    continuing: dict[str, TensorStats] | None = None,
) -> dict[str, TensorStats]:
    """Run ``model`` once over ``samples`` (each with batch dimension 1) and observe ``tensors``.

    ``workers`` batches run side by side (default: one per core, at most MAX_WORKERS), each in
    a session with ``threads`` threads (default: an equal share of the cores). Every sample is
    consumed, even when there is nothing to observe. ``floors`` maps tensors carrying an attention
    mask to the value at or below which their values are masked positions, left out
    (graph/masks.py). ``continuing`` holds the statistics of the samples before these (from
    :func:`collect_first`): the result starts on their PDF grids and is returned apart, for the
    caller to merge into them. Raises OnnxSnpeError if a tensor takes NaN, or Inf other than at a
    masked position.
    """
    methods = tuple(methods)
    cores = available_cores()
    workers = max(1, workers or min(cores, MAX_WORKERS))
    floors = floors or {}
    if continuing is not None:
        stats = {name: continuing[name].spawn() for name in tensors}
    else:
        stats = {name: TensorStats(methods, floors.get(name)) for name in tensors}
    runner = _Runner(model, tensors, batch_size, threads or max(1, cores // workers), workers)
    batches = _batches(samples, runner.batch_size)
    _observe(runner, next(batches, []), stats)  # alone: it checks the sessions and fixes most PDF grids
    in_order = frozenset(name for name, observed in stats.items() if observed.order_matters)
    shares = [stats] + [{name: observed.spawn() for name, observed in stats.items()} for _ in range(workers - 1)]
    _share_out(runner, batches, shares, in_order)
    for share in shares[1:]:
        for name, observed in share.items():
            stats[name].merge(observed)
    return stats


def collect_first(
    model: onnx.ModelProto,
    tensors: list[str],
    samples: Iterable[dict[str, np.ndarray]],
    methods: Iterable[str] = ("minmax",),
    floors: dict[str, float] | None = None,
    threads: int = 1,
) -> tuple[dict[str, TensorStats], int]:
    """The statistics of the first ``samples``, run one at a time in order until the order of the
    rest no longer matters (every PDF has its grid: at once without ``tf_enhanced``), and how many
    samples that took. :func:`collect_statistics` with ``continuing`` takes the rest, in any split.
    """
    floors = floors or {}
    stats = {name: TensorStats(methods, floors.get(name)) for name in tensors}
    runner = _Runner(model, tensors, 1, threads)
    return stats, _observe_alone(runner, _batches(samples, 1), stats)


MAX_WORKERS = 4
"""Batches in flight at most: each holds its own set of output arrays."""


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _observe_alone(runner: _Runner, batches: Iterator[list], stats: dict[str, TensorStats]) -> int:
    """Observe batches one at a time: the first run checks the sessions, and early samples fix the PDF
    grids, up to the batch after which none lacks its grid. Returns the number of samples observed."""
    observed = 0
    for batch in batches:
        _observe(runner, batch, stats)
        observed += len(batch)
        if not any(tensor.order_matters for tensor in stats.values()):
            break
    return observed


def _observe(
    runner: _Runner, batch: list[dict[str, np.ndarray]], stats: dict[str, TensorStats],
    folds: dict[int, OutputFold | None] | None = None, in_order: frozenset[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """Run one batch and fold its tensors into ``stats``: with the worker's ``folds`` where they
    apply (see _Reused.fold), else tensor by tensor. The tensors ``in_order`` are not folded but
    returned (copied), for the caller to fold in sample order."""
    held: dict[str, np.ndarray] = {}
    for outputs, release in runner.run(batch):
        try:
            if isinstance(outputs, _Reused):
                if folds is not None and outputs.fold(stats, folds, in_order):
                    outputs = {**{name: outputs.feed[name] for name in runner.fed},
                               **outputs.unfolded(stats, in_order)}
                else:
                    outputs = outputs.named()
            for name, values in outputs.items():
                if len(batch) == 1 and values.shape[:1] != (1,):
                    values = values[np.newaxis]  # a first axis that is no batch (a recurrent state): one sample
                if name in in_order:
                    held[name] = np.array(values)
                else:
                    _update(stats, name, values)
        finally:
            release()
    return held


def _update(stats: dict[str, TensorStats], name: str, values: np.ndarray) -> None:
    try:
        stats[name].update(values)
    except ValueError as exc:
        raise bad_values(name, exc) from exc


def _share_out(runner: _Runner, batches: Iterator[list], shares: list[dict[str, TensorStats]],
               in_order: frozenset[str]) -> None:
    """Observe the remaining batches with one worker per share of statistics, this thread included
    (parallel.ordered_map: the first error stops every worker after its current batch and is raised
    here). The tensors ``in_order`` (PDFs still without their grid: the sample that fixes it must
    come first) go into the first share batch by batch in dataset order, whichever worker ran them."""
    folds: dict[int, dict[int, OutputFold | None]] = {id(share): {} for share in shares}

    def work(stats: dict[str, TensorStats], index: int, batch: list[dict[str, np.ndarray]]) -> dict:
        return _observe(runner, batch, stats, folds[id(stats)], in_order)

    def consume(index: int, held: dict[str, np.ndarray]) -> None:
        for name, values in held.items():
            _update(shares[0], name, values)

    ordered_map(batches, shares, work, consume, "onnxsnpe-calibration")


def _batches(samples: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[list[dict[str, np.ndarray]]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _nothing() -> None:
    pass


class _Runner:
    """Sessions returning the observed tensors, batched where the model allows.

    After the first batch, full batches are written into reused sets of output arrays, one per
    worker (onnxruntime's IO binding), so that no batch allocates and frees tens of megabytes: each
    result comes with a ``release`` to call once its arrays are no longer read. Only the first
    batch changes the runner's state; later ones may run from several threads at once.
    """

    def __init__(
        self, model: onnx.ModelProto, tensors: list[str], batch_size: int, threads: int = 0, workers: int = 1
    ) -> None:
        inputs = {value.name for value in model.graph.input}
        self.fed = [name for name in tensors if name in inputs]  # observed straight from the feed
        self.computed = [name for name in tensors if name not in inputs]
        self.session = ExposedSession(model, self.computed, threads) if self.computed else None
        self.batched: ExposedSession | None = None
        self.batch_size = 1
        if batch_size > 1 and self.computed:
            dynamic = batch_dynamic_copy(model)
            if dynamic is not None:
                try:
                    self.batched = ExposedSession(dynamic, self.computed, threads)
                    self.batch_size = batch_size
                except OnnxSnpeError as exc:
                    log.debug("no batching: %s", exc)
        self.workers = workers
        self.buffers: _Buffers | None = None  # set up from the first results' shapes
        self.bindable = True  # until a run into reused arrays fails
        self.batch_checked = False  # whether batched runs were found to match single ones

    def run(self, batch: list[dict[str, np.ndarray]]) -> Iterator[tuple[dict | _Reused, Callable[[], None]]]:
        """The observed tensors of a batch (one batched result or one per sample), each with its
        release: by name, or as the reused arrays a session wrote them into."""
        if self.batched is not None and len(batch) > 1:
            feed = {name: np.concatenate([s[name] for s in batch]) for name in batch[0]}
            if len(batch) == self.batch_size:
                bound = self._bound(self.batched, feed)
                if bound is not None:
                    yield bound
                    return
            try:
                raws = self.batched.run(feed)
            except OnnxSnpeError as exc:  # a graph whose folded shapes pin the batch of 1
                if self.batch_checked:
                    raise
                log.info("the model does not run batched (%s); calibrating one sample at a time", exc)
                raws = None
            outputs = self._named(self.batched, raws, feed) if raws is not None else None
            if raws is not None and (self.batch_checked or self._agrees(outputs, batch)):
                self.batch_checked = True
                self._remember_shapes(raws)
                yield outputs, _nothing
                return
            log.info("the model does not batch consistently; calibrating one sample at a time")
            self.batched, self.batch_size, self.buffers = None, 1, None
        for sample in batch:
            bound = self._bound(self.session, sample) if self.batched is None else None
            if bound is not None:
                yield bound
                continue
            raws = self.session.run(sample) if self.session is not None else []
            if self.batched is None:
                self._remember_shapes(raws)
            yield self._named(self.session, raws, sample), _nothing

    def _remember_shapes(self, raws: list[np.ndarray]) -> None:
        if self.buffers is None and self.computed and self.bindable:
            self.buffers = _Buffers([(self.batch_size, *raw.shape[1:]) for raw in raws], self.workers)

    def _bound(self, session: ExposedSession, feed: dict[str, np.ndarray]) -> tuple[_Reused, Callable[[], None]] | None:
        """A run into a reused set of arrays, or None (from then on, for every run) if the session
        will not write into arrays shaped like the first run's outputs: a tensor whose shape
        changes from sample to sample, or a model whose declared shapes disagree with its run."""
        buffers = self.buffers  # read once: another worker may give up on reused arrays meanwhile
        if buffers is None:
            return None
        arrays = buffers.take()
        try:
            session.run_into(feed, arrays)
        except Exception as exc:  # onnxruntime raises its own types; the run is retried unbound
            buffers.give(arrays)
            log.info("calibrating without reused output arrays: %s", str(exc).splitlines()[0] if str(exc) else exc)
            self.bindable, self.buffers = False, None
            return None
        return _Reused(self, session, arrays, feed), lambda: buffers.give(arrays)

    def _named(
        self, session: ExposedSession | None, raws: list[np.ndarray], feed: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        computed = session.values(raws) if session is not None else {}
        return {**{name: feed[name] for name in self.fed}, **computed}

    def _agrees(self, outputs: dict[str, np.ndarray], batch: list[dict[str, np.ndarray]]) -> bool:
        """Whether the batched run matches sample-by-sample runs of the static model (checked once)."""
        singles = [self._named(self.session, self.session.run(sample), sample) for sample in batch]
        for name in self.computed:
            batched = outputs[name]
            if batched.shape != (len(batch), *singles[0][name].shape[1:]):
                return False
            for index, single in enumerate(singles):
                tolerance = 1e-5 * float(np.abs(single[name]).max())
                if not np.allclose(batched[index], single[name][0], rtol=1e-4, atol=tolerance):
                    return False
        return True


@dataclass
class _Reused:
    """A run's observed tensors: the feed's, and the session's outputs in a reused set of arrays."""

    runner: _Runner
    session: ExposedSession
    arrays: list[np.ndarray]
    feed: dict[str, np.ndarray]

    def named(self) -> dict[str, np.ndarray]:
        """Every observed tensor by name."""
        return self.runner._named(self.session, self.arrays, self.feed)

    def fold(self, stats: dict[str, TensorStats], folds: dict[int, OutputFold | None],
             in_order: frozenset[str]) -> bool:
        """Fold the session's tensors into ``stats`` in one call per kind of statistic, with this
        worker's ``folds`` (made at the first use of a set of arrays, which are kept); False where
        that does not apply (a batch of several samples, a PDF without its grid, a huge tensor).
        Tensors with a mask floor, and those ``in_order``, are left to :meth:`unfolded`."""
        key = id(self.arrays)
        if key not in folds:
            pieces = self.session.pieces(self.arrays) if self.arrays[0].shape[0] == 1 else None
            pieces = [piece for piece in pieces or [] if stats[piece[0]].floor is None and piece[0] not in in_order]
            folds[key] = OutputFold(pieces, stats) if pieces and OutputFold.applies(stats, pieces) else None
        fold = folds[key]
        if fold is not None:
            fold.fold()
        return fold is not None

    def unfolded(self, stats: dict[str, TensorStats], in_order: frozenset[str]) -> dict[str, np.ndarray]:
        """The session's tensors a fold leaves out (those with a mask floor or ``in_order``), by name."""
        return {tensor: self.session.real_values(tensor, raw)
                for tensor, raw in zip(self.session.tensors, self.arrays, strict=True)
                if stats[tensor].floor is not None or tensor in in_order}


class _Buffers:
    """Sets of float32 output arrays of fixed shapes, handed out and given back."""

    def __init__(self, shapes: list[tuple[int, ...]], sets: int) -> None:
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(sets):
            self.free.put([np.empty(shape, dtype=np.float32) for shape in shapes])

    def take(self) -> list[np.ndarray]:
        """A free set, waiting until a worker gives one back."""
        return self.free.get()

    def give(self, arrays: list[np.ndarray]) -> None:
        self.free.put(arrays)


def batch_dynamic_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of a batch-1 static model that accepts any batch size, or None if inputs are not batch-1.

    The inputs' first dimension becomes symbolic, stale shapes are dropped, and Reshape targets
    whose first entry is the batch of 1 (folded from shape arithmetic) copy the input's first
    dimension instead (0). Whether the copy computes the same thing is checked on the first batch.
    """
    constants = {init.name: init for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value != 1:
            return None
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    graph = dynamic.graph
    for value in graph.input:
        if value.name not in constants:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers:
            continue
        shape = initializer_array(initializers[node.input[1]]).copy()
        if shape.ndim == 1 and shape.size > 1 and shape[0] == 1:
            shape[0] = 0
            name = f"{node.input[1]}__batch_{node.name or node.output[0]}"
            graph.initializer.append(numpy_helper.from_array(shape, name))
            node.input[1] = name
    return dynamic
