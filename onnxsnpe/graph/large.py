"""Models too large for one protobuf message (2 GB): their weights go to a file beside the model.

A ModelProto over 2 GB cannot be serialized, so onnxruntime cannot take it as bytes, the ONNX
checker and shape inference cannot take it in memory, and it cannot be saved in one file. Such a
model is written with its tensors in ``<file>.data`` beside it, and handed to onnxruntime and to
shape inference as a file. Below the limit nothing changes (outputs stay single files).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import onnx

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
              size_threshold=1024, convert_attribute=True)
    onnx.load_external_data_for_model(model, str(path.parent))  # saving moved the tensors out of memory
    return [path.name, data]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation); for a large model through files."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory(prefix="onnxsnpe-large-", ignore_cleanup_errors=True) as tmp:
        source, inferred = Path(tmp) / "model.onnx", Path(tmp) / "inferred.onnx"
        save_model(model, source)
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred), data_prop=True)
        return onnx.load(str(inferred))


def with_model_source(model: onnx.ModelProto, use: Callable[[bytes | str], T]) -> T:
    """Call ``use`` with what onnxruntime and the checker take: the serialized model, or for a large
    model the path of a temporary copy with external data (removed when ``use`` returns)."""
    if not is_large(model):
        return use(model.SerializeToString())
    with tempfile.TemporaryDirectory(prefix="onnxsnpe-large-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        return use(str(path))
