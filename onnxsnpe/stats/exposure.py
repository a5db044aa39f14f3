"""An onnxruntime session that hands calibration the tensors it observes at close to the cost of inference.

Exposing an intermediate tensor as a graph output normally costs a layout conversion. On x86,
onnxruntime runs convolutions in a blocked channel layout (NCHWc: channels in blocks of 8 or 16
as the innermost axis) and converts every exposed tensor back to NCHW (``ReorderOutput``); for
EfficientNet-Lite0 these conversions cost about half as much as the inference itself. The
statistics calibration keeps (min, max, histograms, AIMET's PDF) do not depend on the order of a
sample's values, so this session returns the blocked tensors as they are: onnxruntime optimizes
the model once, the conversions that only fed exposed outputs are removed, and the channels that
pad the last block are dropped when reading.

The rewritten model relies on onnxruntime's internal layout, so its first run is checked value for
value against an ordinary session, in the first, middle and last channel block of every tensor (a
misread layout, block size or padding shows in any of them; converting every block took 28 ms of
transposes for EfficientNet-Lite0). On any difference, or any failure to build it, the ordinary
session is used instead.

The optimized model is saved with its weights in a separate file, so the rewritten graph is read,
edited and handed back to onnxruntime without copying the weights through protobuf (for
EfficientNet-Lite0 that saved about 20 ms of the setup).
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import OnnxSnpeError
from ..graph.large import needs_file, session_file, session_options
from ..graph.ops import node_attributes

log = logging.getLogger(__name__)

NCHWC_DOMAIN = "com.microsoft.nchwc"
BLOCK_SIZES = (16, 8, 4)
"""Channel block sizes of onnxruntime's NCHWc kernels (AVX-512, AVX2, narrower), tried in turn."""
OPTIMIZED = "optimized.onnx"
WEIGHTS = "optimized.weights"


@dataclass
class _Blocked:
    """An observed tensor read in NCHWc layout: ``channels`` real ones, padded to blocks of ``block``."""

    channels: int
    block: int = 0  # found by the check of the first run


class ExposedSession:
    """A CPU session whose outputs are the observed ``tensors``, in blocked layout where that is cheaper.

    ``names`` are the session's output names, one per tensor; :meth:`values` turns the arrays they
    produce into each tensor's values (first axis: samples; order within a sample unspecified).
    ``blocked=False`` keeps the ordinary NCHW outputs (for comparison).
    """

    def __init__(self, model: onnx.ModelProto, tensors: list[str], threads: int = 0, blocked: bool = True) -> None:
        self.tensors = list(tensors)
        self.names = list(self.tensors)
        self.blocked: dict[str, _Blocked] = {}
        self.reference: ort.InferenceSession | None = None
        self._bindings: dict[int, tuple[list[np.ndarray], ort.IOBinding]] = {}
        # ignore_cleanup_errors: a session may still map the weights file (Windows cannot delete it)
        with tempfile.TemporaryDirectory(prefix="onnxsnpe-", ignore_cleanup_errors=True) as tmp:
            if needs_file(model):  # the weights mapped from files, no second session
                with session_file(model, lambda light: _exposing(light, self.tensors, copy=False)) as path:
                    self.session = _session(str(path), threads, None, large=model)
                return
            optimized_path = Path(tmp) / OPTIMIZED if blocked else None
            serialized = _exposing(model, self.tensors).SerializeToString()
            try:
                self.session = _session(serialized, threads, optimized_path)
            except OnnxSnpeError:  # perhaps only the optimized model could not be saved
                self.session = _session(serialized, threads, None)
                return
            if optimized_path is None:
                return
            try:
                optimized = onnx.load(str(optimized_path), load_external_data=False)
                rewritten, outputs, self.blocked = _without_reorders(optimized, self.tensors)
                if self.blocked:
                    rewritten_path = Path(tmp) / "observed.onnx"  # beside the weights it refers to
                    onnx.save(rewritten, str(rewritten_path))
                    blocked_session = _session(str(rewritten_path), threads, None, optimize=False)
                    self.reference, self.session, self.names = self.session, blocked_session, outputs
            except Exception as exc:  # onnxruntime and onnx raise many kinds; the ordinary session stays
                log.debug("observing tensors in NCHW layout: %s", exc)
                self.blocked = {}

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The session's output arrays for one feed (see :meth:`values`).

        The first run is checked: the ordinary session runs the same feed on another thread meanwhile.
        An onnxruntime failure (e.g. a token id outside its table) becomes a one-line OnnxSnpeError.
        """
        try:
            if self.reference is None:
                return self.session.run(self.names, feed)
            with ThreadPoolExecutor(1, thread_name_prefix="onnxsnpe-reference") as pool:
                wanted = pool.submit(self.reference.run, self.tensors, feed)
                raws = self.session.run(self.names, feed)
                self._check(raws, wanted.result())
            return raws
        except Exception as exc:  # onnxruntime raises its own types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxSnpeError(f"onnxruntime failed on a calibration sample: {text}") from exc

    def run_into(self, feed: dict[str, np.ndarray], arrays: list[np.ndarray]) -> None:
        """Run with the outputs written into ``arrays`` (shaped like an earlier :meth:`run`'s results).

        The outputs stay bound to a given list of arrays from one call to the next (binding
        EfficientNet-Lite0's 61 outputs took about 0.3 ms a run): the list must keep holding the
        same arrays. Calls with different lists may run at the same time.
        """
        if self.reference is not None:  # the first run is the checked one
            for array, raw in zip(arrays, self.run(feed), strict=True):
                array[...] = raw
            return
        bound = self._bindings.get(id(arrays))
        if bound is None or bound[0] is not arrays:
            binding = self.session.io_binding()
            for name, array in zip(self.names, arrays, strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
            bound = self._bindings[id(arrays)] = (arrays, binding)  # the list is kept: its id stays unique
        binding = bound[1]
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(binding)

    def values(self, raws: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor's values from the session's outputs: padding channels dropped, samples first."""
        return {tensor: self.real_values(tensor, raw) for tensor, raw in zip(self.tensors, raws, strict=True)}

    def pieces(self, arrays: list[np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """Each tensor's values in ``arrays`` (one sample's outputs, written again by every
        :meth:`run_into` with them) as flat contiguous pieces: (tensor, piece, source).

        A piece with a source is a buffer to fill from it after each run (the real channels of a
        padded last block, strided); the others are views that follow the arrays.
        """
        pieces = []
        for tensor, raw in zip(self.tensors, arrays, strict=True):
            if raw.shape[0] != 1 or not raw.flags.c_contiguous:
                raise ValueError("pieces are made for one sample's contiguous outputs")
            layout = self.blocked.get(tensor)
            if layout is None or raw.shape[1] == layout.channels:
                pieces.append((tensor, raw.reshape(-1), None))
                continue
            full, partial = _split(raw, layout)
            if full.size:
                pieces.append((tensor, full.reshape(-1), None))
            pieces.append((tensor, np.empty(partial.size, dtype=np.float32), partial[0]))
        return pieces

    def real_values(self, tensor: str, raw: np.ndarray) -> np.ndarray:
        """One tensor's values from its output array (padding channels dropped)."""
        layout = self.blocked.get(tensor)
        if layout is None or raw.shape[1] == layout.channels:
            return raw
        full, partial = _split(raw, layout)
        return np.concatenate([full.reshape(raw.shape[0], -1), partial.reshape(raw.shape[0], -1)], 1)

    def _check(self, raws: list[np.ndarray], wanted: list[np.ndarray]) -> None:
        """Compare the first run with the ordinary session's (``wanted``); on any difference, switch to
        that session."""
        reference, self.reference = self.reference, None
        for tensor, raw, want in zip(self.tensors, raws, wanted, strict=True):
            layout = self.blocked.get(tensor)
            if layout is None:
                same = np.array_equal(raw, want, equal_nan=True)
            else:
                layout.block = next((b for b in BLOCK_SIZES if _unblocked_equal(raw, want, b)), 0)
                same = layout.block > 0
            if not same:
                log.debug("blocked layout of %s not understood; observing tensors in NCHW layout", tensor)
                self.session, self.names, self.blocked = reference, list(self.tensors), {}
                raws[:] = wanted
                return


def _split(raw: np.ndarray, layout: _Blocked) -> tuple[np.ndarray, np.ndarray]:
    """A padded blocked tensor's real values: its full channel blocks (a view, contiguous per
    sample) and the real channels of its last block (strided): shapes (batch, blocks, pixels,
    block) and (batch, pixels, channels)."""
    blocks = raw.reshape(raw.shape[0], raw.shape[1] // layout.block, -1, layout.block)
    full, rest = divmod(layout.channels, layout.block)
    return blocks[:, :full], blocks[:, full, :, :rest]


def _unblocked_equal(raw: np.ndarray, want: np.ndarray, block: int) -> bool:
    """Whether ``raw``, read as NCHWc with blocks of ``block`` channels, holds ``want`` (NCHW): the
    channels of the blocks :func:`probe_blocks` picks, compared value for value."""
    if raw.ndim != 4 or want.ndim != 4 or raw.shape[1] % block or raw.shape[0] != want.shape[0]:
        return False
    if raw.shape[1] != -(-want.shape[1] // block) * block or raw.shape[2:] != want.shape[2:]:
        return False
    batch, padded, height, width = raw.shape
    blocks = raw.reshape(batch, padded // block, height * width, block)
    nchw = want.reshape(batch, want.shape[1], height * width)
    for index in probe_blocks(padded // block):
        channels = nchw[:, index * block : (index + 1) * block]  # fewer in a padded last block
        got = np.ascontiguousarray(blocks[:, index, :, : channels.shape[1]].transpose(0, 2, 1))
        if not np.array_equal(got, channels):  # a NaN differs: the NCHW session stays, the statistics report it
            return False
    return True


def probe_blocks(count: int) -> list[int]:
    """The channel blocks the check compares: the first, the middle and the last one (which holds
    the padding, if any)."""
    return sorted({0, count // 2, count - 1})


def _exposing(model: onnx.ModelProto, tensors: list[str], copy: bool = True) -> onnx.ModelProto:
    """``model`` with ``tensors`` among its outputs: a copy, or with ``copy`` False ``model`` itself."""
    exposed = model
    if copy:
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


def _without_reorders(optimized: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str], dict]:
    """Expose the blocked tensor behind every observed tensor that onnxruntime converts back to NCHW.

    Returns the rewritten model, the output name for each tensor, and the blocked tensors' layouts.
    A conversion that also feeds other nodes stays; one that only fed the output is removed.
    """
    graph = optimized.graph
    consumed = {name for node in graph.node for name in node.input}
    observed = set(tensors)
    source: dict[str, str] = {}
    blocked: dict[str, _Blocked] = {}
    kept = []
    for node in graph.node:
        if node.domain == NCHWC_DOMAIN and node.op_type == "ReorderOutput" and node.output[0] in observed:
            attributes = node_attributes(node)
            if attributes.get("channels_last", 0) == 0 and "channels" in attributes:
                source[node.output[0]] = node.input[0]
                blocked[node.output[0]] = _Blocked(int(attributes["channels"]))
                if node.output[0] not in consumed:
                    continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    outputs = [source.get(name, name) for name in tensors]
    present = {node_output for node in kept for node_output in node.output} | {i.name for i in graph.input}
    present |= {init.name for init in graph.initializer}
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs)
    missing = [name for name in outputs if name not in present]
    if missing:
        raise ValueError(f"rewritten model lacks {missing[0]}")
    return optimized, outputs, blocked


def _session(
    model: bytes | str, threads: int, optimized_path: Path | None, optimize: bool = True,
    large: onnx.ModelProto | None = None,
) -> ort.InferenceSession:
    """A CPU session over a serialized model or a model file; ``threads`` 0: all cores; ``large``:
    the large model the file stands for, whose weights the session maps (graph/large.session_options).

    If ``optimized_path`` is given, the optimized model is saved there, its weights in WEIGHTS
    beside it. Full optimization (layout transforms, fusions) keeps inference at plain-inference
    speed; it may change observed values in the last bits, which does not matter for ranges. Its
    threads spin only while a run lasts, leaving the cores to the statistics between runs.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
    disabled = session_options(options, large) if large is not None else []
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxSnpeError(f"onnxruntime cannot run the model: {str(exc).strip().splitlines()[0]}") from exc
