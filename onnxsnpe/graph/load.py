"""Read an FP32 ONNX model and describe its run-time inputs (names, dimensions, dtypes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import OnnxSnpeError
from .large import adopt_external_data, initializer_array, is_large, spill, workspace

FLOAT_TYPES = {onnx.TensorProto.FLOAT}


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, declared dimensions (int, or None where dynamic) and numpy dtype.

    ``index_limit``: for an integer input that indexes a constant table (token ids into an
    embedding), the table's number of rows.
    """

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype
    index_limit: int | None = None

    @property
    def is_static(self) -> bool:
        return all(d is not None for d in self.dims)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model, turning every failure into a one-line OnnxSnpeError."""
    path = Path(path)
    if not path.exists():
        raise OnnxSnpeError(f"model not found: {path}")
    if not path.is_file():
        raise OnnxSnpeError(f"model is not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise OnnxSnpeError(f"cannot read ONNX model {path}: {_first_line(exc)}") from exc
    if not model.graph.node:
        raise OnnxSnpeError(f"not an ONNX model, or a model with no nodes: {path}")
    large = is_large(model)
    try:
        if large:
            onnx.checker.check_model(str(path))
        else:
            onnx.load_external_data_for_model(model, str(path.parent))
            onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxSnpeError(f"invalid ONNX model {path}: {_first_line(exc)}") from exc
    if large:  # its weights stay in files (graph/large.py)
        try:
            adopt_external_data(model, path.parent)
            spill(model)
        except OSError as exc:
            raise OnnxSnpeError(f"cannot copy the weights of {path} to the temporary folder {workspace()} "
                                f"(set TMPDIR to a folder with room for them): {_first_line(exc)}") from exc
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are fed at run time (initializers excluded)."""
    constants = {init.name for init in model.graph.initializer}
    limits = _index_limits(model)
    specs = []
    for value in model.graph.input:
        if value.name in constants:
            continue
        if not value.type.HasField("tensor_type"):
            raise OnnxSnpeError(f"input '{value.name}' is not a tensor (a sequence or map): SNPE takes tensors only")
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.STRING:
            raise OnnxSnpeError(f"input '{value.name}' is a string tensor: SNPE takes numeric inputs only")
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dims, dtype, limits.get(value.name)))
    return specs


INDEX_CARRIERS = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
"""Ops that pass token ids on unchanged (so ids that reach a Gather through them are still indices)."""


def _index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Inputs used as Gather indices into a constant table (directly or through INDEX_CARRIERS), with
    the rows of that axis."""
    tables = {init.name: tuple(init.dims) for init in model.graph.initializer}
    sources = {value.name: value.name for value in model.graph.input}  # tensor -> the input it carries
    limits: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in INDEX_CARRIERS and node.input and node.input[0] in sources:
            sources[node.output[0]] = sources[node.input[0]]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            source = sources.get(node.input[1])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if source is not None and dims:
                rows = int(dims[axis])
                limits[source] = min(rows, limits.get(source, rows))
    return limits


def initializer_values(model: onnx.ModelProto, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """The named initializers' float arrays, in initializer order, one at a time (a large model's
    are memory maps: each is resident only while its reader holds it)."""
    wanted = set(names)
    for init in model.graph.initializer:
        if init.name in wanted:
            yield init.name, initializer_array(init).astype(np.float32, copy=False)
