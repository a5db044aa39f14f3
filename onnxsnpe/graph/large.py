"""Models too large for one protobuf message (2 GB): their weights go to a file beside the model.

A ModelProto over 2 GB cannot be serialized, so onnxruntime cannot take it as bytes, the ONNX
checker and shape inference cannot take it in memory, and it cannot be saved in one file. Such a
model is written with its tensors in ``<file>.data`` beside it, and handed to onnxruntime and to
shape inference as a file. Below the limit nothing changes (outputs stay single files).

Handing a large model to onnxruntime costs no copy of its weights in memory: ``external_copy``
writes them to a file one tensor at a time (the model in memory is neither changed nor copied),
and the session reads them from there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

import onnx

EXTERNAL_TENSOR_BYTES = 1024
"""Tensors of more bytes than this go to the data file (as onnx.save's size_threshold)."""
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Tensor bytes above which a model is saved with external data (below protobuf's 2 GB, with room
for the graph itself)."""

T = TypeVar("T")


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the model's initializers (what makes a model large)."""
    return sum(len(init.raw_data) or init.ByteSize() for init in model.graph.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must be saved with external data."""
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save ``model`` at ``path``, its tensors in ``<name>.data`` beside it when it is large.

    Returns the names of the files written. The model in memory keeps its tensors.
    """
    path = Path(path)
    if not is_large(model):
        onnx.save(model, str(path))
        return [path.name]
    data = f"{path.name}.data"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=EXTERNAL_TENSOR_BYTES, convert_attribute=True)
    onnx.load_external_data_for_model(model, str(path.parent))  # saving moved the tensors out of memory
    return [path.name, data]


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
    """A copy of ``model`` whose initializers over EXTERNAL_TENSOR_BYTES refer to ``<path>.data``,
    written there one tensor at a time; save the copy at ``path`` (after any edit) with onnx.save.
    With ``path`` None nothing is written (a copy for what reads no weights: shape inference).

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
    location = f"{Path(path).name}.data" if path is not None else "none"
    with open(Path(path).parent / location, "wb") if path is not None else nullcontext() as data:
        for init in model.graph.initializer:
            tensor = light.graph.initializer.add()
            if init.data_location == onnx.TensorProto.EXTERNAL or init.ByteSize() <= EXTERNAL_TENSOR_BYTES \
                    or not init.HasField("raw_data"):
                tensor.CopyFrom(init)
                continue
            for field, value in init.ListFields():
                if field.name != "raw_data":
                    _copy_field(tensor, field.name, value)
            offset, length = 0, init.ByteSize()
            if data is not None:
                raw = init.raw_data
                offset, length = data.tell(), len(raw)
                data.write(raw)
                del raw
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return light


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
    """Call ``use`` with what onnxruntime and the checker take: the serialized model, or for a large
    model the path of a temporary copy with external data (``external_copy``, removed when ``use``
    returns). ``edit``, if given, changes a copy of the model first (``model`` stays as it is)."""
    if not is_large(model):
        if edit is None:
            return use(model.SerializeToString())
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        edit(copy)
        return use(copy.SerializeToString())
    with tempfile.TemporaryDirectory(prefix="onnxsnpe-large-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        light = external_copy(model, path)
        if edit is not None:
            edit(light)
        onnx.save(light, str(path))
        return use(str(path))
