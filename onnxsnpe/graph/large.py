"""Models too large for one protobuf message (2 GB): their weights live in files, not in memory.

A ModelProto over 2 GB cannot be serialized, so onnxruntime cannot take it as bytes, the ONNX
checker and shape inference cannot take it in memory, and it cannot be saved in one file. Such a
model is written with its tensors in ``<file>.data`` beside it, and handed to onnxruntime and to
shape inference as a file. Below the limit nothing changes (outputs stay single files).

A large model's weights are not held in memory: its big initializers are references into files of
the process's ``workspace`` (the input's data file copied there at load, or tensors moved there by
``spill``), read with ``initializer_array`` (a memory map: only the tensor in use is resident). onnxruntime
maps the same files (or pre-packs a weight in place of its mapping) and computes nothing from them
at load (``session_options``), so a session holds one copy at most; outputs stream the bytes into
their own data file.
"""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

EXTERNAL_TENSOR_BYTES = 1024
"""Tensors of more bytes than this go to the data file (as onnx.save's size_threshold)."""
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Tensor bytes above which a model is saved with external data (below protobuf's 2 GB, with room
for the graph itself)."""
COPY_CHUNK = 64 << 20
"""Bytes copied at a time when a tensor streams from one data file to another."""
SLAB_VALUES = 4 << 20
"""Values of a weight computed at a time where a whole-tensor temporary would cost a copy (slabs)."""
COLLECT_BYTES = 256 << 20
"""Weights above which a dropped copy of a model is freed at once by a full garbage collection."""

T = TypeVar("T")
_workspaces: list[Path] = []
_names = itertools.count()


def workspace() -> Path:
    """The folder of large models' weight files: the innermost ``scoped_workspace``'s, or else one
    for the process, made on first use and removed at exit."""
    if not _workspaces:
        path = Path(tempfile.mkdtemp(prefix="onnxsnpe-weights-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _workspaces.append(path)
    return _workspaces[-1]


@contextmanager
def scoped_workspace() -> Iterator[Path]:
    """A workspace for the block (one quantize or compare call), removed when it ends: no model that
    refers to it may outlive the block."""
    path = Path(tempfile.mkdtemp(prefix="onnxsnpe-weights-"))
    _workspaces.append(path)
    try:
        yield path
    finally:
        _workspaces.remove(path)
        shutil.rmtree(path, ignore_errors=True)


def with_scoped_workspace(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` run in a ``scoped_workspace`` of its own (a whole command: nothing it returns
    refers to the workspace)."""
    @functools.wraps(function)
    def scoped(*args, **kwargs) -> T:
        with scoped_workspace():
            return function(*args, **kwargs)
    return scoped


def _new_file(suffix: str) -> Path:
    return workspace() / f"{os.getpid()}-{next(_names)}{suffix}"


def _all_tensors(graph: onnx.GraphProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """The graph's initializers (unless ``initializers`` is False) and tensor attributes, those of its
    subgraphs (If, Loop) included."""
    if initializers:
        yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _all_tensors(subgraph)


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def _nbytes(tensor: onnx.TensorProto) -> int:
    info = _external(tensor)
    if info is None:
        return len(tensor.raw_data) or tensor.ByteSize()
    if "length" in info:
        return int(info["length"])
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize  # the length is optional
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the model's tensors (what makes a model large), in memory or in files, those of
    its subgraphs included."""
    return sum(_nbytes(tensor) for tensor in _all_tensors(model.graph))


def in_workspace(model: onnx.ModelProto) -> bool:
    """Whether some of ``model``'s tensors are in workspace files (a large model, or one made from it)."""
    return any(_external(tensor) is not None for tensor in _all_tensors(model.graph))


def needs_file(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime must take ``model`` as a file in the workspace (``session_file``): it is
    large, or some of its tensors are in workspace files."""
    return is_large(model) or in_workspace(model)


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must be saved with external data."""
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES


def free_dropped_copies(weight_bytes: int) -> None:
    """Free the model copies just dropped (graphs refer to themselves, so only a collection frees
    them) when their weights, ``weight_bytes`` each, are heavy enough to matter. A full collection
    costs about 60 ms in a process that imported onnxruntime and numba; a small model's copies are
    left to Python's own collections."""
    if weight_bytes > COLLECT_BYTES:
        gc.collect()


def initializer_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer: numpy_helper.to_array's, or for a tensor in a workspace file a
    read-only memory map of it (resident only while used)."""
    info = _external(tensor)
    if info is None:
        return numpy_helper.to_array(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(tensor.dims)
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype)
    return np.memmap(workspace() / info["location"], dtype=dtype.newbyteorder("<"), mode="r",
                     offset=int(info.get("offset", 0)), shape=shape)


def slabs(shape: tuple[int, ...], keep: int | None = None) -> Iterator[tuple[slice, ...]]:
    """Index tuples that cut an array of ``shape`` into slabs of about SLAB_VALUES values along its
    first axis other than ``keep`` (a channel axis that elementwise work needs whole)."""
    axes = [axis for axis in range(len(shape)) if keep is None or axis != keep % len(shape)]
    if not axes:
        yield tuple(slice(None) for _ in shape)
        return
    axis = axes[0]
    per_index = max(1, int(np.prod(shape)) // max(1, shape[axis]))
    step = max(1, SLAB_VALUES // per_index)
    for start in range(0, max(1, shape[axis]), step):
        yield tuple(slice(start, start + step) if a == axis else slice(None) for a in range(len(shape)))


def adopt_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Point ``model``'s external tensors (as loaded without their data, relative to ``folder``)
    at the workspace: each data file is copied there (by the kernel, not through memory; a hard link
    would do, but onnx refuses to read tensors from a file with several links). The input files are
    only read."""
    copied: dict[str, str] = {}
    for init in _all_tensors(model.graph):
        info = _external(init)
        if info is None:
            continue
        location = info["location"]
        if location not in copied:
            target = _new_file(".data")
            source = (Path(folder) / location).resolve()
            shutil.copyfile(source, target)
            copied[location] = target.name
        _set_location(init, copied[location], int(info.get("offset", 0)), _nbytes(init))


def spill(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move a large model's big in-memory initializers into a workspace file, leaving references
    (the same values, no longer in memory); a model under the limit stays as it is. Returns it."""
    if not is_large(model):
        return model
    for init in model.graph.initializer:
        if _external(init) is not None and init.HasField("raw_data"):  # read in by onnx (to_array): in the file
            init.ClearField("raw_data")
    moving = [init for init in model.graph.initializer
              if _external(init) is None and init.HasField("raw_data") and len(init.raw_data) > EXTERNAL_TENSOR_BYTES]
    if not moving:
        return model
    path = _new_file(".data")
    with open(path, "wb") as data:
        for init in moving:
            offset = data.tell()
            data.write(init.raw_data)
            length = data.tell() - offset
            init.ClearField("raw_data")
            _set_location(init, path.name, offset, length)
    return model


@contextmanager
def resolving_external_data(model: onnx.ModelProto) -> Iterator[None]:
    """Run the block in the workspace when ``model`` refers to workspace files: onnxruntime resolves
    the external data of a model given as bytes (onnx-graphsurgeon's constant folding) against the
    working directory, and onnx reads a tensor's data against it too."""
    if not in_workspace(model):
        yield
        return
    previous = os.getcwd()
    os.chdir(workspace())
    try:
        yield
    finally:
        os.chdir(previous)


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def session_options(options: ort.SessionOptions, model: onnx.ModelProto) -> list[str]:
    """Set ``options`` for a session over ``model`` and return the optimizers it must leave out.

    For a large model: no constant folding, which would hold a float copy of every weight a Cast
    reads (the simulation's integer weights, htp/linear.stored_codes), so that each Cast runs in the
    inference, just before its reader; no identity elimination, after which onnxruntime ran every
    such Cast first (measured on the simulated three-MatMul model: all float weights at once); and
    no memory arena, so what a Cast makes is freed after its reader instead of kept for reuse.
    Weights that are initializers themselves are mapped from their file, or pre-packed in place of
    it (one copy).
    """
    if not is_large(model):
        return []
    options.enable_cpu_mem_arena = False
    return ["ConstantFolding", "EliminateIdentity"]


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save ``model`` at ``path``, its tensors in ``<name>.data`` beside it when it is large (a model
    under the limit is written whole, its workspace tensors read in). Returns the names of the files
    written. The model in memory is not changed.
    """
    path = Path(path)
    if is_large(model):
        onnx.save(external_copy(model, path), str(path))
        return [path.name, f"{path.name}.data"]
    if in_workspace(model):
        whole = onnx.ModelProto()
        whole.CopyFrom(model)
        for tensor in _all_tensors(whole.graph):
            info = _external(tensor)
            if info is not None:
                tensor.raw_data = _read(info, tensor)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
        model = whole
    onnx.save(model, str(path))
    return [path.name]


def _read(info: dict[str, str], tensor: onnx.TensorProto) -> bytes:
    """The bytes of a workspace tensor."""
    with open(workspace() / info["location"], "rb") as data:
        data.seek(int(info.get("offset", 0)))
        return data.read(_nbytes(tensor))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation).

    A large model is inferred without its weights (``external_copy``, no file written) and gets the
    inferred graph around its own initializers: ``model`` itself is changed and returned.
    """
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    inferred = onnx.shape_inference.infer_shapes(external_copy(model, None), data_prop=True)
    for field in onnx.ModelProto.DESCRIPTOR.fields:
        if field.name != "graph":
            model.ClearField(field.name)
    for field, value in inferred.ListFields():
        if field.name != "graph":
            _copy_field(model, field.name, value)
    for field in onnx.GraphProto.DESCRIPTOR.fields:
        if field.name != "initializer":
            model.graph.ClearField(field.name)
    for field, value in inferred.graph.ListFields():
        if field.name != "initializer":
            _copy_field(model.graph, field.name, value)
    return model


def external_copy(model: onnx.ModelProto, path: Path | None) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over EXTERNAL_TENSOR_BYTES refer to files, to save at
    ``path`` with onnx.save (after any edit): in-memory tensors are written to ``<path>.data`` one at a
    time, and so are the workspace tensors when ``path`` is not in the workspace (streamed); a copy
    saved in the workspace refers to them where they are. With ``path`` None nothing is written (a
    copy for what reads no weights: shape inference).

    Neither ``model`` nor its weights are copied in memory: the copy holds the graph, the small
    tensors and the references.
    """
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field.name, value)
    beside = path is not None and Path(path).parent.resolve() == workspace().resolve()
    with _DataFile(None if path is None else Path(path)) as data:
        for init in model.graph.initializer:
            tensor = light.graph.initializer.add()
            source = _external(init)
            if source is not None and (path is None or beside):
                tensor.CopyFrom(init)
                continue
            if source is None and (init.ByteSize() <= EXTERNAL_TENSOR_BYTES or not init.HasField("raw_data")):
                tensor.CopyFrom(init)
                continue
            for field, value in init.ListFields():
                if field.name not in ("raw_data", "external_data", "data_location"):
                    _copy_field(tensor, field.name, value)
            offset, length = data.add(init, source)
            _set_location(tensor, data.location, offset, length)
        for tensor in _all_tensors(light.graph, initializers=False):  # those of attributes and subgraphs
            source = _external(tensor)
            if source is not None and path is not None and not beside:
                _set_location(tensor, data.location, *data.add(tensor, source))
    return light


class _DataFile:
    """The data file an external copy writes (opened at its first tensor); at ``None``, nothing is
    written and offsets are 0."""

    def __init__(self, model_path: Path | None) -> None:
        self.path = None if model_path is None else model_path.parent / f"{model_path.name}.data"
        self.location = "none" if model_path is None else f"{model_path.name}.data"
        self.file = None

    def __enter__(self) -> _DataFile:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()

    def add(self, tensor: onnx.TensorProto, source: dict[str, str] | None) -> tuple[int, int]:
        """Write ``tensor``'s bytes (in memory, or in the workspace file ``source`` names); (offset, length)."""
        if self.path is None:
            return 0, _nbytes(tensor)
        if self.file is None:
            self.file = open(self.path, "wb")
        offset = self.file.tell()
        if source is None:
            self.file.write(tensor.raw_data)
        else:
            with open(workspace() / source["location"], "rb") as origin:
                origin.seek(int(source.get("offset", 0)))
                left = _nbytes(tensor)
                while left:
                    chunk = origin.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{origin.name}: ends before tensor {tensor.name}")
                    self.file.write(chunk)
                    left -= len(chunk)
        return offset, self.file.tell() - offset


def _copy_field(message, name: str, value) -> None:
    """Set field ``name`` of ``message`` to ``value`` (a scalar, a message or a repeated field)."""
    target = getattr(message, name)
    if hasattr(target, "extend"):
        target.extend(value)
    elif hasattr(target, "CopyFrom"):
        target.CopyFrom(value)
    else:
        setattr(message, name, value)


def with_model_source(model: onnx.ModelProto, use: Callable[[bytes | str], T],
                      edit: Callable[[onnx.ModelProto], None] | None = None) -> T:
    """Call ``use`` with what onnxruntime and the checker take: the serialized model, or for a model
    with tensors in the workspace the path of a file there (``session_file``). ``edit``, if given,
    changes a copy of the model first (``model`` stays as it is)."""
    if not needs_file(model):
        if edit is None:
            return use(model.SerializeToString())
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        edit(copy)
        return use(copy.SerializeToString())
    with session_file(model, edit) as path:
        return use(str(path))


@contextmanager
def session_file(model: onnx.ModelProto, edit: Callable[[onnx.ModelProto], None] | None = None) -> Iterator[Path]:
    """``model`` saved in the workspace for onnxruntime as long as the block lasts: it refers to the
    workspace files where they are, and its in-memory weights go to a data file of its own, removed
    with it (a session maps or copies what it needs when it is made). ``model`` is not changed."""
    path = _new_file(".onnx")
    light = external_copy(model, path)
    if edit is not None:
        edit(light)
    onnx.save(light, str(path))
    try:
        yield path
    finally:
        for leftover in (path, path.parent / f"{path.name}.data"):
            leftover.unlink(missing_ok=True)
