"""Inputs fixed to a value (``--fix-input NAME=VALUE``), so that what depends on them folds away.

A voice-activity detector that takes its sample rate as an input, or a model that switches
between branches on a flag, holds ``If`` nodes SNPE cannot run; with the input fixed, the
condition becomes a constant and preparation flattens the chosen branch into the graph
(graph/deploy.py). A fixed input becomes an initializer of the same name: samples no longer
carry it, and the deploy model SNPE converts no longer has it as an input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxSnpeError
from .load import InputSpec, model_inputs


def parse_fixed_input(text: str) -> tuple[str, list[float]]:
    """``NAME=VALUE`` or ``NAME=V1,V2,...`` as (name, values)."""
    name, sep, values = text.rpartition("=")
    if not sep or not name or not values:
        raise OnnxSnpeError(f"--fix-input needs NAME=VALUE (e.g. sr=16000), got {text!r}")
    try:
        return name, [float(v) for v in values.split(",")]
    except ValueError as exc:
        raise OnnxSnpeError(f"--fix-input {text}: values must be numbers") from exc


def fix_inputs(model: onnx.ModelProto, values: dict[str, list[float] | float | np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` in which each named input is a constant with the given value(s).

    Values take the input's dtype and its declared shape (a single value fills a scalar or any
    one-element shape); an integer or boolean input must get whole numbers (0 or 1 for bool).
    """
    if not values:
        return model
    specs = {spec.name: spec for spec in model_inputs(model)}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for name, given in values.items():
        spec = specs.get(name)
        if spec is None:
            raise OnnxSnpeError(f"--fix-input names '{name}', the model's inputs are {sorted(specs)}")
        fixed.graph.initializer.append(numpy_helper.from_array(_value(spec, given), name))
    kept = [value for value in fixed.graph.input if value.name not in values]
    del fixed.graph.input[:]
    fixed.graph.input.extend(kept)
    return fixed


def _value(spec: InputSpec, given: list[float] | float | np.ndarray) -> np.ndarray:
    """``given`` as the input's constant: its dtype and shape, checked."""
    name = spec.name
    array = np.asarray(given, dtype=np.float64).reshape(-1)
    if any(d is None for d in spec.dims):
        raise OnnxSnpeError(f"--fix-input {name}: the input has dynamic dims; only static inputs can be fixed")
    shape = tuple(int(d) for d in spec.dims)
    if array.size != int(np.prod(shape)):
        raise OnnxSnpeError(f"--fix-input {name}: {array.size} values given, the input of shape "
                            f"{list(shape)} needs {int(np.prod(shape))}")
    if not np.all(np.isfinite(array)):
        raise OnnxSnpeError(f"--fix-input {name}: values must be finite")
    if spec.dtype.kind in "iub" and np.any(array != np.round(array)):
        raise OnnxSnpeError(f"--fix-input {name}: the input is {spec.dtype}, give whole numbers")
    if spec.dtype.kind == "b" and np.any((array != 0) & (array != 1)):
        raise OnnxSnpeError(f"--fix-input {name}: the input is bool, give 0 or 1")
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise OnnxSnpeError(f"--fix-input {name}: values outside {spec.dtype}")
    return array.astype(spec.dtype).reshape(shape)
