"""Op patterns SNPE's converter fuses into one op: only the fused op's input and output exist on the device.

SNPE's converter matches a GELU written out as ``x * (erf(x / sqrt 2) + 1) * 1/2`` (``Div -> Erf ->
Add -> Mul -> Mul``, tools/HTP.md "Not done", the converter's pattern fusions; Qualcomm's list of the
ONNX ops snpe-onnx-to-dlc supports takes Erf only where it matches a GeLU) and builds one Gelu op, so
the tensors inside the pattern are never quantized there. The HTP computes a quantized Gelu as
exact GELU then rounding (tools/HTP.md finding 37), while the pattern written out, as a QDQ model
hands it over, is computed wrongly when a MatMul follows it. So the chain's inner tensors get no
encoding, the simulation computes it in float between its quantized input and output, and the QDQ
export writes a Gelu node (with_fused_ops).

The converter also matches an L2 normalization written out (``ReduceL2`` over one axis with
``keepdims``, then ``Add(eps)`` or ``Clip(min eps)``, then optionally ``Expand``, then ``Div(x, .)``:
its four sequences, QAIRT's ``OptimizeL2NormTranslation``; torch's ``F.normalize`` exports the Clip
and Expand one) and builds one L2Norm op. onnxruntime-qnn hands QNN's L2Norm an ONNX
``LpNormalization(p=2)`` (its own QNN preprocessing fuses the same pattern), and the pattern written
out it refuses at 16 bits (tools/HTP.md finding 41), so the export writes that op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .large import initializer_array
from .ops import node_attributes, standard_opset

GELU_OPSET = 20
"""The standard domain has Gelu from this opset; before it, onnxruntime's com.microsoft Gelu (same math)."""
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Fusion:
    """A fused op: its type, its input, the outputs of the nodes it replaces (the last is its output)
    and the fused node's attributes."""

    op_type: str
    input: str
    nodes: tuple[str, ...]
    attributes: tuple[tuple[str, int], ...] = ()

    @property
    def output(self) -> str:
        return self.nodes[-1]

    @property
    def inner(self) -> tuple[str, ...]:
        """The tensors inside the pattern, which do not exist after fusion."""
        return self.nodes[:-1]


class _Patterns:
    """A prepared graph's constants, producers and readers, for matching op patterns."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.constants = {init.name: init for init in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return initializer_array(self.constants[name]) if name in self.constants else None

    def scalar(self, name: str) -> float | None:
        values = self.constant(name)
        return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The one node that reads ``tensor``, which is not a graph output; None otherwise."""
        users = self.readers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def operand(self, node: onnx.NodeProto, value: float | None = None) -> str | None:
        """The other input of a binary node one of whose inputs is a scalar constant (``value``, if given)."""
        for index in (0, 1):
            constant = self.scalar(node.input[index])
            if constant is not None and (value is None or math.isclose(constant, value, rel_tol=1e-6)):
                return node.input[1 - index]
        return None


def find_fusions(model: onnx.ModelProto) -> dict[str, Fusion]:
    """Every written-out GELU and L2 normalization of a prepared model (module docstring), by its output."""
    patterns = _Patterns(model)
    return {**_gelus(patterns), **_l2_norms(patterns)}


def _gelus(patterns: _Patterns) -> dict[str, Fusion]:
    """The GELUs: the constants must be sqrt 2 (or its inverse, as a Mul), 1 and 1/2, and every inner
    tensor read once, inside."""
    found: dict[str, Fusion] = {}
    for erf in patterns.nodes:
        if erf.op_type != "Erf":
            continue
        scaling = patterns.producers.get(erf.input[0])
        x = None
        if scaling is not None and scaling.op_type == "Div" and _close(patterns.scalar(scaling.input[1]), math.sqrt(2)):
            x = scaling.input[0]
        elif scaling is not None and scaling.op_type == "Mul":
            x = patterns.operand(scaling, 1 / math.sqrt(2))
        if x is None or patterns.only_reader(scaling.output[0]) is not erf:
            continue
        plus_one = patterns.only_reader(erf.output[0])
        if plus_one is None or plus_one.op_type != "Add" or patterns.operand(plus_one, 1.0) != erf.output[0]:
            continue
        times_x = patterns.only_reader(plus_one.output[0])
        if times_x is None or times_x.op_type != "Mul" or sorted(times_x.input) != sorted([x, plus_one.output[0]]):
            continue
        half = patterns.only_reader(times_x.output[0])
        if half is None or half.op_type != "Mul" or patterns.operand(half, 0.5) != times_x.output[0]:
            continue
        chain = (scaling, erf, plus_one, times_x, half)
        found[half.output[0]] = Fusion("Gelu", x, tuple(node.output[0] for node in chain))
    return found


def _l2_norms(patterns: _Patterns) -> dict[str, Fusion]:
    """The L2 normalizations: ``ReduceL2(x)`` over one axis, keepdims, then ``Add`` of a scalar constant
    or ``Clip`` with a constant min and no max, then optionally ``Expand``, then ``Div(x, .)``; or
    ``ReduceL2`` straight into the Div. Every inner tensor read once, inside."""
    found: dict[str, Fusion] = {}
    for reduce in patterns.nodes:
        axis = _reduced_axis(reduce, patterns) if reduce.op_type == "ReduceL2" else None
        if axis is None:
            continue
        x, chain = reduce.input[0], [reduce]
        step = patterns.only_reader(reduce.output[0])
        epsilon = step is not None and (
            (step.op_type == "Add" and patterns.operand(step) == reduce.output[0])
            or (step.op_type == "Clip" and _clip_is_a_floor(step, patterns)))
        if epsilon:
            chain.append(step)
            step = patterns.only_reader(chain[-1].output[0])
            if step is not None and step.op_type == "Expand" and step.input[0] == chain[-1].output[0]:
                chain.append(step)
        divide = patterns.only_reader(chain[-1].output[0])
        if divide is None or divide.op_type != "Div" or list(divide.input) != [x, chain[-1].output[0]]:
            continue
        chain.append(divide)
        found[divide.output[0]] = Fusion("LpNormalization", x, tuple(node.output[0] for node in chain),
                                         (("axis", axis), ("p", 2)))
    return found


def _reduced_axis(reduce: onnx.NodeProto, patterns: _Patterns) -> int | None:
    """The one axis a ReduceL2 with keepdims reduces (an attribute before opset 18, an input from it)."""
    attributes = node_attributes(reduce)
    if not attributes.get("keepdims", 1):
        return None
    axes = attributes.get("axes")
    if axes is None and len(reduce.input) > 1 and reduce.input[1]:
        constant = patterns.constant(reduce.input[1])
        axes = None if constant is None else constant.reshape(-1).tolist()
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def _clip_is_a_floor(clip: onnx.NodeProto, patterns: _Patterns) -> bool:
    """Whether a Clip only floors its input at a constant (a min, as an input or attribute, and no max)."""
    attributes = node_attributes(clip)
    if "min" in attributes or "max" in attributes:
        return "min" in attributes and "max" not in attributes
    has_min = len(clip.input) > 1 and patterns.scalar(clip.input[1]) is not None
    return has_min and (len(clip.input) < 3 or not clip.input[2])


def _close(value: float | None, expected: float) -> bool:
    return value is not None and math.isclose(value, expected, rel_tol=1e-6)


def with_fused_ops(model: onnx.ModelProto, fusions: dict[str, Fusion]) -> None:
    """Replace each fusion's nodes in ``model`` (in place) by one node of its op where its last node
    was (a standard Gelu from opset 20, onnxruntime's com.microsoft Gelu before, declared if needed),
    and drop the nodes and initializers only the replaced nodes read (an Expand's Shape)."""
    if not fusions:
        return
    graph = model.graph
    opset = standard_opset(model)
    gelu_domain = "" if opset >= GELU_OPSET else MS_DOMAIN
    if any(f.op_type == "Gelu" for f in fusions.values()) and gelu_domain and not any(
            op.domain == gelu_domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(gelu_domain, 1))
    replaced = {name: fusion for fusion in fusions.values() for name in fusion.nodes}
    nodes, dropped = [], set()
    for node in graph.node:
        fusion = replaced.get(node.output[0]) if node.output else None
        if fusion is None:
            nodes.append(node)
            continue
        dropped.update(node.input)
        if node.output[0] == fusion.output:
            nodes.append(helper.make_node(fusion.op_type, [fusion.input], [fusion.output],
                                          name=f"{fusion.output}/fused_{fusion.op_type}",
                                          domain=gelu_domain if fusion.op_type == "Gelu" else "",
                                          **dict(fusion.attributes)))
    nodes = _without_unread(nodes, dropped, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read or init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _without_unread(nodes: list[onnx.NodeProto], dropped: set[str], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those that produced only inputs of replaced nodes, now read by nobody
    (repeatedly, so a chain that fed only them goes too); ``dropped`` gains their inputs."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        unread = [node for node in nodes if node.output and all(o in dropped and o not in read for o in node.output)]
        if not unread:
            return nodes
        for node in unread:
            dropped.update(node.input)
        gone = {id(node) for node in unread}
        nodes = [node for node in nodes if id(node) not in gone]
