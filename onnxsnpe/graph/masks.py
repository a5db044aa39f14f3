"""Additive attention masks: the float tensors that carry a huge "minus infinity" at masked positions.

Transformer exports add a mask to the attention scores before Softmax: ``Where(mask, 0, -inf)``,
``(1 - mask) * -10000`` or ``mask * -3.4e38``. Taken at face value, those values would stretch the
range of every tensor they pass through (an 8-bit step of 39 for -1e4, of 1e36 for -3.4e38,
and no range at all for -inf) and wreck the attention scores. Here a mask *source* is the output
of a node with a constant operand of magnitude at least MASK_MAGNITUDE, and a mask *chain* is every
float tensor the source reaches through the ops that carry a mask unchanged (additions, Where
branches, Max/Min clamps, data movement) until the Softmax it feeds. Only chains that reach a
Softmax are masks: a huge constant elsewhere (audio scaled by 32768) is an ordinary operand.
Calibration leaves out the masked values of those tensors (at or below the chain's ``floor``) and
the encoding stage gives the chain a range that puts masked positions far enough below the real
scores (encode/masks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .large import initializer_array
from .load import FLOAT_TYPES
from .ops import DATA_MOVEMENT, standard_opset

MASK_MAGNITUDE = 1e4
"""A constant with a value at least this large in magnitude (or infinite) makes its node a mask source."""

MASK_SOURCES = frozenset({"Where", "Mul", "Add", "Sub"})
"""Ops whose huge constant operand makes their output a mask."""

MASK_CARRIERS = frozenset({"Add", "Sub", "Where", "Cast", "Concat", "Min", "Max"}) | DATA_MOVEMENT
"""Ops that pass a mask on to their output unchanged (for Where: as one of its branches)."""


@dataclass(frozen=True)
class MaskedTensor:
    """A float tensor on a mask chain: values at or below ``floor`` are masked positions."""

    floor: float
    sinks: tuple[MaskSink, ...]
    """The tensors of its chain that feed a Softmax."""


@dataclass(frozen=True, order=True)
class MaskSink:
    """A masked tensor fed to a Softmax: its name, the Softmax's axis length and output."""

    tensor: str
    length: int
    softmax_output: str


def find_masks(model: onnx.ModelProto) -> dict[str, MaskedTensor]:
    """Every float tensor on a mask chain in a prepared (static, folded) model, with its floor."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer if init.data_type in FLOAT_TYPES}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    floors: dict[str, float] = {}
    for node in graph.node:
        if node.op_type not in MASK_SOURCES:
            continue
        operands = node.input[1:] if node.op_type == "Where" else node.input
        magnitudes = [_huge(constants[name]) for name in operands if name in constants]
        magnitudes = [m for m in magnitudes if m is not None]
        if magnitudes:
            floor = -min(magnitudes) / 2
            for tensor in _chain(node.output[0], consumers, constants):
                floors[tensor] = max(floors.get(tensor, -np.inf), floor)
    shapes = _shapes(model)
    opset = standard_opset(model)
    sinks: dict[str, list[MaskSink]] = {}
    for tensor in floors:
        for node in consumers.get(tensor, []):
            if node.op_type == "Softmax" and node.input[0] == tensor:
                sink = MaskSink(tensor, _axis_length(node, shapes.get(tensor), opset), node.output[0])
                sinks.setdefault(tensor, []).append(sink)
    masked = {}
    for tensor, floor in floors.items():
        reached = _chain(tensor, consumers, constants)
        found = tuple(sorted({sink for name in reached for sink in sinks.get(name, [])}))
        if found:
            masked[tensor] = MaskedTensor(floor, found)
    return masked


def _huge(init: onnx.TensorProto) -> float | None:
    """The smallest magnitude among a constant's huge values (inf included), or None if it has none."""
    values = np.abs(initializer_array(init).astype(np.float64).reshape(-1))
    huge = values[values >= MASK_MAGNITUDE]
    if not huge.size:
        return None
    finite = huge[np.isfinite(huge)]
    return float(finite.min()) if finite.size else 2 * MASK_MAGNITUDE


def _chain(start: str, consumers: dict[str, list[onnx.NodeProto]], constants: dict) -> list[str]:
    """``start`` and the float tensors a mask in it reaches through carrying ops, in visiting order."""
    seen = [start]
    index = 0
    while index < len(seen):
        tensor = seen[index]
        index += 1
        for node in consumers.get(tensor, []):
            if node.op_type not in MASK_CARRIERS:
                continue
            if node.op_type == "Where" and node.input[0] == tensor:
                continue  # a condition, not a branch
            if node.op_type in DATA_MOVEMENT and node.input[0] != tensor:
                continue  # a shape or index operand
            outputs = node.output if node.op_type == "Split" else node.output[:1]  # Dropout: no mask output
            seen.extend(out for out in outputs if out and out not in seen)
    return seen


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def _axis_length(node: onnx.NodeProto, shape: tuple[int, ...] | None, opset: int) -> int:
    """How many values one Softmax normalizes together: its axis's length (opset 13 on, default the
    last axis), or before opset 13 the product of the dims from ``axis`` (default 1) on; 1 where the
    shape is unknown."""
    if not shape:
        return 1
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    return int(shape[axis]) if opset >= 13 else int(np.prod(shape[axis:]))
