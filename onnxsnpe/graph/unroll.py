"""Unroll ``Loop`` nodes whose trip count is a constant and that never stop early.

SNPE has no Loop op. A Loop that runs a fixed number of times (a constant trip count, possibly
after ``--fix-input`` and constant folding, and a condition that stays true) is the same as its
body written out that many times: each copy reads the previous copy's loop-carried values, and
the per-iteration (scan) outputs are stacked along a new first axis, as Loop defines them.
Loops with a run-time trip count, an early exit, a nested subgraph or more than MAX_ITERATIONS
iterations are left as they are (control_flow.py refuses them with the reason).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .large import initializer_array
from .ops import standard_opset

MAX_ITERATIONS = 256
"""Loops longer than this are not unrolled (the graph would grow by that many bodies)."""


def unroll_loops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every unrollable top-level Loop written out; and how many were."""
    if not any(node.op_type == "Loop" for node in model.graph.node):
        return model, 0
    unrolled = onnx.ModelProto()
    unrolled.CopyFrom(model)
    graph = unrolled.graph
    constants = {init.name: init for init in graph.initializer}
    opset = standard_opset(unrolled)
    nodes, count = [], 0
    for node in graph.node:
        trips = unrollable_trips(node, constants)
        if trips is None:
            nodes.append(node)
            continue
        nodes += _written_out(node, trips, graph, opset)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return unrolled, count


def unrollable_trips(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int | None:
    """The trip count of a Loop that can be unrolled, or None (not a Loop, or it cannot be)."""
    if node.op_type != "Loop" or not node.input or node.input[0] not in constants:
        return None
    trips = initializer_array(constants[node.input[0]])
    if trips.size != 1 or not 0 < int(trips.reshape(-1)[0]) <= MAX_ITERATIONS:
        return None
    if len(node.input) > 1 and node.input[1]:
        cond = constants.get(node.input[1])
        if cond is None or not bool(initializer_array(cond).reshape(-1)[0]):
            return None
    body = helper.get_attribute_value(next(a for a in node.attribute if a.name == "body"))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in body.node for a in n.attribute):
        return None
    if not _condition_stays_true(body):
        return None
    return int(trips.reshape(-1)[0])


def _condition_stays_true(body: onnx.GraphProto) -> bool:
    """Whether the body's condition output is its condition input (or an Identity of it) or constant true."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    producer = next((n for n in body.node if cond_out in n.output), None)
    if producer is not None and producer.op_type == "Identity" and producer.input[0] == cond_in:
        return True
    init = next((i for i in body.initializer if i.name == cond_out), None)
    return init is not None and bool(initializer_array(init).reshape(-1)[0])


def _written_out(node: onnx.NodeProto, trips: int, graph: onnx.GraphProto, opset: int) -> list[onnx.NodeProto]:
    """The Loop's body ``trips`` times, then its outputs: final carried values and stacked scans."""
    body = helper.get_attribute_value(next(a for a in node.attribute if a.name == "body"))
    prefix = f"{node.name or node.output[0]}/unrolled"
    carried = list(node.input[2:])
    scan_count = len(body.output) - 1 - len(carried)
    scans: list[list[str]] = [[] for _ in range(scan_count)]
    renamed_inits = {}
    for init in body.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = f"{prefix}/{init.name}"
        graph.initializer.append(copy)
        renamed_inits[init.name] = copy.name
    written = []
    for index in range(trips):
        step = f"{prefix}/{index}"
        graph.initializer.append(numpy_helper.from_array(np.array(index, np.int64), f"{step}/iteration"))
        graph.initializer.append(numpy_helper.from_array(np.array(True), f"{step}/condition"))
        names = {**renamed_inits, body.input[0].name: f"{step}/iteration", body.input[1].name: f"{step}/condition"}
        names.update({value.name: outer for value, outer in zip(body.input[2:], carried, strict=True)})
        for body_node in body.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(body_node)
            copy.name = f"{step}/{body_node.name or body_node.output[0]}"
            copy.input[:] = [names.get(name, name) for name in body_node.input]
            outputs = [f"{step}/{name}" if name else "" for name in body_node.output]
            names.update({old: new for old, new in zip(body_node.output, outputs, strict=True) if old})
            copy.output[:] = outputs
            written.append(copy)
        results = [names.get(value.name, value.name) for value in body.output[1:]]
        carried = results[: len(carried)]
        for k, name in enumerate(results[len(carried):]):
            scans[k].append(name)
    for outer, final in zip(node.output[: len(carried)], carried, strict=True):
        if outer:
            written.append(helper.make_node("Identity", [final], [outer], name=f"{prefix}/{outer}"))
    axes = f"{prefix}/axes"
    if opset >= 13:
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    for outer, parts in zip(node.output[len(carried):], scans, strict=True):
        if not outer:
            continue
        stacked = []
        for index, part in enumerate(parts):
            name = f"{prefix}/{outer}/{index}"
            inputs, attrs = ([part, axes], {}) if opset >= 13 else ([part], {"axes": [0]})
            written.append(helper.make_node("Unsqueeze", inputs, [name], **attrs))
            stacked.append(name)
        written.append(helper.make_node("Concat", stacked, [outer], axis=0, name=f"{prefix}/{outer}"))
    return written
