"""Refuse, with a one-line error naming the node, the ops SNPE cannot take that preparation left.

Preparation flattens an ``If`` whose condition is constant and unrolls a ``Loop`` of constant trip
count (graph/deploy.py, unroll.py); an ``If`` that remains has a condition computed from the
inputs at run time, which SNPE cannot do: fixing the inputs it depends on (``--fix-input``) folds
it. ``Loop`` and ``Scan`` have no SNPE op either (*ours*: no Qualcomm op list names them; the
QAIRT converter documentation lists no control flow), nor do sequence and string ops.
"""

from __future__ import annotations

import onnx

from ..errors import OnnxSnpeError
from .unroll import MAX_ITERATIONS

UNSUPPORTED = frozenset({
    "Loop", "Scan", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "StringNormalizer", "RegexFullMatch",
    "StringConcat", "StringSplit",
})
"""Ops with no SNPE counterpart, refused wherever they remain after preparation."""


def check_supported(model: onnx.ModelProto, path: str) -> None:
    """Raise OnnxSnpeError for the first If, Loop, Scan, sequence or string op left in ``model``."""
    inputs = {value.name for value in model.graph.input}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        label = f"{node.op_type} node '{node.name or node.output[0]}'"
        if node.op_type == "If":
            sources = sorted(_input_sources(node.input[0], producers, inputs))
            hint = (f"fix the input{'s' if len(sources) > 1 else ''} it depends on with "
                    + " ".join(f"--fix-input {name}=VALUE" for name in sources)) if sources else \
                "make its condition constant before export"
            raise OnnxSnpeError(f"{path}: {label} branches on a value computed at run time, which SNPE cannot "
                                f"run; {hint}")
        if node.op_type in UNSUPPORTED:
            what = {"Loop": f"it was not unrolled (its trip count is not a constant from 1 to {MAX_ITERATIONS}, "
                            "it may stop early, or its body holds a subgraph); export it unrolled",
                    "Scan": "export it unrolled (e.g. with a fixed sequence length)"}.get(
                        node.op_type, "remove it from the model before export")
            raise OnnxSnpeError(f"{path}: {label}: SNPE has no {node.op_type} op; {what}")


def _input_sources(tensor: str, producers: dict[str, onnx.NodeProto], inputs: set[str]) -> set[str]:
    """The graph inputs ``tensor`` is computed from."""
    found: set[str] = set()
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            found.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(node.input)
    return found
