"""Replace each ``If`` whose condition is a constant by the nodes of the branch it takes.

onnx-graphsurgeon's own flattening (``fold_constants(flatten_subgraphs=True)``, 0.6) loses tensors
when branches hold further ``If`` nodes: on Silero VAD (an ``If`` on the sample rate whose branches
hold three more, conditioned on shapes) the flattened graph read ``If_0_outputs_1``, which no node
produced any more. Here a branch is written into the graph as it is, at the ``If``'s place (its
nodes may read any tensor computed before the ``If``), its initializers join the graph's, and the
node computing each branch output writes the ``If`` output's name instead (an ``Identity`` copies
a branch output computed outside the branch). Nested ``If`` nodes become
top-level ones; folding their conditions (shape arithmetic, once the shapes are static) inlines
them in the next round (graph/deploy.py repeats both until nothing changes).
"""

from __future__ import annotations

import numpy as np
import onnx

from .large import initializer_array


def inline_constant_ifs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every ``If`` on a constant condition replaced by its branch; the number replaced.

    An ``If`` whose branch would reuse a tensor name of the graph stays (it is left to later
    folding or refused as an ``If`` on run-time values).
    """
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    constants.update({node.output[0]: attr.t for node in graph.node if node.op_type == "Constant"
                      for attr in node.attribute if attr.name == "value"})
    names = ({init.name for init in graph.initializer} | {value.name for value in graph.input}
             | {out for node in graph.node for out in node.output})
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    count = 0
    for node in graph.node:
        branch = _taken_branch(node, constants)
        if branch is None or _branch_names(branch) & names:
            nodes.append(node)
            continue
        produced = {out for inner in branch.node for out in inner.output}
        renames: dict[str, str] = {}
        copies = []
        for inner, outer in zip(branch.output, node.output, strict=True):
            if inner.name in produced and inner.name not in renames:
                renames[inner.name] = outer  # the producing node writes the If's output directly
            else:  # an outer tensor, an initializer, or an output given twice
                copies.append(onnx.helper.make_node("Identity", [inner.name], [outer],
                                                    name=f"{node.name or outer}_{inner.name}_out"))
        for inner in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            _rename(copy, renames)
            nodes.append(copy)
        nodes.extend(copies)
        initializers.extend(branch.initializer)
        names |= _branch_names(branch)
        count += 1
    if not count:
        return model, 0
    inlined = onnx.ModelProto()
    inlined.CopyFrom(model)
    del inlined.graph.node[:]
    inlined.graph.node.extend(nodes)
    inlined.graph.initializer.extend(initializers)
    return inlined, count


def _taken_branch(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> onnx.GraphProto | None:
    """The branch an ``If`` node takes when its condition is a constant, else None."""
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or node.input[0] not in constants:
        return None
    condition = initializer_array(constants[node.input[0]])
    if condition.size != 1:
        return None
    wanted = "then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"
    return next((attr.g for attr in node.attribute if attr.name == wanted), None)


def _branch_names(branch: onnx.GraphProto) -> set[str]:
    """The tensor names a branch defines at its own level."""
    return {init.name for init in branch.initializer} | {out for node in branch.node for out in node.output if out}


def _rename(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """Rename tensors in ``node``'s inputs and outputs, and in what its subgraphs read, in place."""
    for index, name in enumerate(node.input):
        node.input[index] = renames.get(name, name)
    for index, name in enumerate(node.output):
        node.output[index] = renames.get(name, name)
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in graph.node:
                _rename(inner, renames)
            for value in graph.output:  # a subgraph may return an outer tensor as it is
                value.name = renames.get(value.name, value.name)
