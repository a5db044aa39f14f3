"""Op patterns SNPE's converter fuses into one op: only the fused op's input and output exist on the device.

SNPE's converter matches a GELU written out as ``x * (erf(x / sqrt 2) + 1) * 1/2`` (``Div -> Erf ->
Add -> Mul -> Mul``, tools/HTP.md "Not done", the converter's pattern fusions; Qualcomm's list of the
ONNX ops snpe-onnx-to-dlc supports takes Erf only where it matches a GeLU) and builds one Gelu op, so
the tensors inside the pattern are never quantized there. The HTP computes a quantized Gelu as
exact GELU then rounding (tools/HTP.md finding 37), while the pattern written out, as a QDQ model
hands it over, is computed wrongly when a MatMul follows it. So the chain's inner tensors get no
encoding, the simulation computes it in float between its quantized input and output, and the QDQ
export writes a Gelu node (with_fused_ops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import helper

from .large import initializer_array

GELU_OPSET = 20
"""The standard domain has Gelu from this opset; before it, onnxruntime's com.microsoft Gelu (same math)."""
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Fusion:
    """A fused op: its type, its input, and the outputs of the nodes it replaces (the last is its output)."""

    op_type: str
    input: str
    nodes: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.nodes[-1]

    @property
    def inner(self) -> tuple[str, ...]:
        """The tensors inside the pattern, which do not exist after fusion."""
        return self.nodes[:-1]


def find_fusions(model: onnx.ModelProto) -> dict[str, Fusion]:
    """Every written-out GELU of a prepared model (module docstring), by its output. The constants must
    be sqrt 2 (or its inverse, as a Mul), 1 and 1/2, and every inner tensor read once, inside."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def scalar(name: str) -> float | None:
        if name not in constants:
            return None
        values = initializer_array(constants[name]).reshape(-1)
        return float(values[0]) if values.size == 1 else None

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        users = readers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    def operands(node: onnx.NodeProto, value: float) -> str | None:
        """The other input of a binary node one of whose inputs is the constant ``value``."""
        for index in (0, 1):
            constant = scalar(node.input[index])
            if constant is not None and math.isclose(constant, value, rel_tol=1e-6):
                return node.input[1 - index]
        return None

    found: dict[str, Fusion] = {}
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        scaling = producers.get(erf.input[0])
        x = None
        if scaling is not None and scaling.op_type == "Div" and _close(scalar(scaling.input[1]), math.sqrt(2)):
            x = scaling.input[0]
        elif scaling is not None and scaling.op_type == "Mul":
            x = operands(scaling, 1 / math.sqrt(2))
        if x is None or only_reader(scaling.output[0]) is not erf:
            continue
        plus_one = only_reader(erf.output[0])
        if plus_one is None or plus_one.op_type != "Add" or operands(plus_one, 1.0) != erf.output[0]:
            continue
        times_x = only_reader(plus_one.output[0])
        if times_x is None or times_x.op_type != "Mul" or sorted(times_x.input) != sorted([x, plus_one.output[0]]):
            continue
        half = only_reader(times_x.output[0])
        if half is None or half.op_type != "Mul" or operands(half, 0.5) != times_x.output[0]:
            continue
        chain = (scaling, erf, plus_one, times_x, half)
        found[half.output[0]] = Fusion("Gelu", x, tuple(node.output[0] for node in chain))
    return found


def _close(value: float | None, expected: float) -> bool:
    return value is not None and math.isclose(value, expected, rel_tol=1e-6)


def with_fused_ops(model: onnx.ModelProto, fusions: dict[str, Fusion]) -> None:
    """Replace each fusion's nodes in ``model`` (in place) by one node of its op where its last node
    was: a standard Gelu from opset 20, onnxruntime's com.microsoft Gelu before (declared if needed)."""
    if not fusions:
        return
    graph = model.graph
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 1)
    domain = "" if opset >= GELU_OPSET else MS_DOMAIN
    if domain and not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
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
                                          name=f"{fusion.output}/fused_{fusion.op_type}", domain=domain))
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read or init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)

