"""Simulate the quantized model: the deploy graph with SNPE's fake quantization inserted.

Weights and biases are fake-quantized in numpy (encoding.fake_quantize). Activations are
fake-quantized inside the graph by a chain of standard ONNX ops that performs the same float32
arithmetic as encoding.fake_quantize, round half away from zero included, so onnxruntime runs the
whole simulation; tests check the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .encoding import Encoding, fake_quantize
from .metrics import OutputComparison
from .runtime import make_session
from .targets import QuantTargets

SUFFIX = "__onnxsnpe_fq"


def fake_quant_nodes(tensor: str, enc: Encoding, output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes computing ``output = fake_quantize(tensor, enc)`` in float32."""
    p = f"{tensor}{SUFFIX}/"
    consts = {
        "scale": enc.scale,
        "offset": enc.offset,
        "half": 0.5,
        "one": 1.0,
        "zero": 0.0,
        "levels": enc.levels,
    }
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), p + k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [
        n("Div", [tensor, p + "scale"], [p + "v"]),
        n("Abs", [p + "v"], [p + "abs"]),
        n("Floor", [p + "abs"], [p + "whole"]),
        n("Sub", [p + "abs", p + "whole"], [p + "frac"]),
        n("Less", [p + "frac", p + "half"], [p + "down"]),
        n("Add", [p + "whole", p + "one"], [p + "up"]),
        n("Where", [p + "down", p + "whole", p + "up"], [p + "rabs"]),
        n("Sign", [p + "v"], [p + "sign"]),
        n("Mul", [p + "rabs", p + "sign"], [p + "round"]),
        n("Sub", [p + "round", p + "offset"], [p + "q0"]),
        n("Max", [p + "q0", p + "zero"], [p + "q1"]),
        n("Min", [p + "q1", p + "levels"], [p + "q"]),
        n("Add", [p + "q", p + "offset"], [p + "qo"]),
        n("Mul", [p + "qo", p + "scale"], [output]),
    ]
    return nodes, inits


def build_simulation_model(
    model: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    quantize_activations: Iterable[str] | None = None,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The deploy model with quantized params and fake-quant after each chosen activation.

    ``quantize_activations`` defaults to every activation with its own encoding (aliases need none:
    data movement keeps the grid). Returns the model and a map from each original output name to
    the name that carries its simulated value.
    """
    sim = onnx.ModelProto()
    sim.CopyFrom(model)
    graph = sim.graph
    for init in graph.initializer:
        if init.name in params:
            values = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(fake_quantize(values, params[init.name]), init.name))

    chosen = list(targets.activations if quantize_activations is None else quantize_activations)
    renamed = {name: name + SUFFIX for name in chosen}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    new_nodes, new_inits = [], []
    for name in chosen:
        nodes, inits = fake_quant_nodes(name, activations[name], renamed[name])
        new_nodes.append((name, nodes))
        new_inits.extend(inits)
    _insert_after_producers(graph, new_nodes)
    graph.initializer.extend(new_inits)

    output_map = {}
    for output in graph.output:
        output_map[output.name] = renamed.get(output.name, output.name)
        if output.name in renamed:
            output.name = renamed[output.name]
    return sim, output_map


def _insert_after_producers(graph: onnx.GraphProto, chains: list[tuple[str, list[onnx.NodeProto]]]) -> None:
    """Place each fake-quant chain right after the node producing its tensor (keeps topological order)."""
    by_tensor = dict(chains)
    ordered = []
    for name in [v.name for v in graph.input]:
        ordered.extend(by_tensor.pop(name, []))
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered.extend(by_tensor.pop(out, []))
    del graph.node[:]
    graph.node.extend(ordered)


def compare_outputs(
    reference: onnx.ModelProto,
    simulated: onnx.ModelProto,
    output_map: dict[str, str],
    samples: Iterable[dict[str, np.ndarray]],
) -> list[OutputComparison]:
    """Run both models over ``samples`` and accumulate the error of each output, streaming."""
    ref_session = make_session(reference)
    sim_session = make_session(simulated)
    names = [o.name for o in ref_session.get_outputs()]
    sim_names = [output_map[name] for name in names]
    comparisons = [OutputComparison(name) for name in names]
    for sample in samples:
        ref_values = ref_session.run(names, sample)
        sim_values = sim_session.run(sim_names, sample)
        for comparison, ref, sim in zip(comparisons, ref_values, sim_values, strict=False):
            comparison.update(ref, sim)
    return comparisons
