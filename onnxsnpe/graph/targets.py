"""Which tensors SNPE quantizes in a prepared graph (SNPE.md section 4).

- Every float32 graph input and node output gets an activation encoding, except a tensor whose
  only consumer is a Relu or Clip squashed into its producer (only the post-activation tensor
  survives conversion).
- Outputs of data-movement ops keep their input's grid: they reuse (alias) its encoding.
- Constant weights of Conv, ConvTranspose and Gemm, and constant MatMul operands, get param
  encodings; biases of Conv, ConvTranspose and Gemm are listed for 32-bit bias quantization, and so
  is a LayerNormalization's constant bias (at its input's step times its gamma's: tools/HTP.md
  finding 36).
- Integer and shape tensors are never quantized.
- Tensors that carry an additive attention mask are marked (graph/masks.py).
- The tensors inside an op pattern SNPE's converter fuses (a written-out GELU) get no encoding: only
  the fused op's input and output exist on the device (graph/fusions.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx

from .fusions import Fusion, find_fusions
from .load import FLOAT_TYPES
from .masks import MaskedTensor, find_masks
from .ops import DATA_MOVEMENT, SQUASHED_ACTIVATIONS, SQUASHING_PRODUCERS, WEIGHTED_OPS, node_attributes


@dataclass(frozen=True)
class BiasRef:
    """A bias initializer with the tensors its 32-bit encoding derives from."""

    bias: str
    weight: str
    input: str


@dataclass
class QuantTargets:
    """What gets an encoding, in graph order."""

    activations: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    squashed: dict[str, str] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)
    biases: list[BiasRef] = field(default_factory=list)
    weight_axes: dict[str, int | None] = field(default_factory=dict)
    """Each weight's output-channel axis (for per-channel encodings), None where it has none."""
    weight_layers: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Each weight's layer: the activation it multiplies and the layer's output (its first consumer's)."""
    masks: dict[str, MaskedTensor] = field(default_factory=dict)
    """The activations on an additive attention mask's chain (graph/masks.py)."""
    fusions: dict[str, Fusion] = field(default_factory=dict)
    """The op patterns SNPE fuses, by the fused op's output (graph/fusions.py)."""

    def fused_node_outputs(self) -> set[str]:
        """The outputs of every node that is part of a fused op (its inner tensors and its output)."""
        return {name for fusion in self.fusions.values() for name in fusion.nodes}

    def activation_inputs(self, node: onnx.NodeProto) -> list[tuple[int, str]]:
        """``node``'s inputs by index, except that a fused op's last node reads the fused op's input (at 0)."""
        fusion = self.fusions.get(node.output[0]) if node.output else None
        return [(0, fusion.input)] if fusion is not None else list(enumerate(node.input))

    def floors(self) -> dict[str, float]:
        """Each masked activation's floor: values at or below it are masked positions."""
        return {name: mask.floor for name, mask in self.masks.items()}

    def root(self, tensor: str) -> str:
        """The tensor whose encoding ``tensor`` uses (itself unless it is an alias)."""
        return self.aliases.get(tensor, tensor)


def find_targets(model: onnx.ModelProto) -> QuantTargets:
    """List the tensors SNPE will quantize in a prepared (static, folded) model."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    elem_types = _elem_types(model)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    targets = QuantTargets(fusions=find_fusions(model))
    inner = {name for fusion in targets.fusions.values() for name in fusion.inner}
    encoded: set[str] = set()
    for value in graph.input:
        if value.name not in constants and elem_types.get(value.name) in FLOAT_TYPES:
            targets.activations.append(value.name)
            encoded.add(value.name)

    for node in graph.node:
        for out in node.output:
            if not out or elem_types.get(out) not in FLOAT_TYPES or out in inner:
                continue
            users = consumers.get(out, [])
            if node.op_type in DATA_MOVEMENT and node.input and node.input[0] in encoded:
                targets.aliases[out] = targets.root(node.input[0])
            elif (
                out not in graph_outputs
                and node.op_type in SQUASHING_PRODUCERS
                and len(users) == 1
                and users[0].op_type in SQUASHED_ACTIVATIONS
                and users[0].input[0] == out
            ):
                targets.squashed[out] = users[0].output[0]
                continue
            else:
                targets.activations.append(out)
            encoded.add(out)

    ranks = {init.name: len(init.dims) for init in graph.initializer}
    weights: dict[str, int | None] = {}
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in constants:
            weights.setdefault(node.input[1], output_channel_axis(node, ranks[node.input[1]], 1))
            targets.weight_layers.setdefault(node.input[1], (node.input[0], node.output[0]))
            if len(node.input) > 2 and node.input[2] in constants:
                targets.biases.append(BiasRef(node.input[2], node.input[1], node.input[0]))
        elif node.op_type == "LayerNormalization" and len(node.input) > 2 and {*node.input[1:3]} <= constants:
            targets.biases.append(BiasRef(node.input[2], node.input[1], node.input[0]))
        elif node.op_type == "MatMul":
            for index, name in enumerate(node.input):
                if name in constants:
                    weights.setdefault(name, output_channel_axis(node, ranks[name], index))
                    targets.weight_layers.setdefault(name, (node.input[1 - index], node.output[0]))
    targets.weights = list(weights)
    targets.weight_axes = weights
    targets.masks = _encoded_masks(find_masks(model), targets)
    return targets


def _encoded_masks(masks: dict[str, MaskedTensor], targets: QuantTargets) -> dict[str, MaskedTensor]:
    """The masked tensors that have their own encoding, their sinks named by the tensor whose encoding
    they use (a Softmax may read the mask's sum through a Reshape, which aliases it)."""
    activations = set(targets.activations)
    encoded = {}
    for name, mask in masks.items():
        if name not in activations:
            continue
        sinks = tuple(sorted({replace(sink, tensor=targets.root(sink.tensor)) for sink in mask.sinks
                              if targets.root(sink.tensor) in masks}))
        if sinks:
            encoded[name] = replace(mask, sinks=sinks)
    return encoded


def output_channel_axis(node: onnx.NodeProto, weight_rank: int, input_index: int) -> int | None:
    """The axis of a weight that indexes the op's output channels, or None where there is none.

    Conv: axis 0 (groups included: output channel o has its own row). ConvTranspose: axis 1 when
    ungrouped (grouped, an output channel spans one column of each group's rows: no single axis).
    Gemm: axis 0 with transB, else 1. MatMul: the last axis of a constant second operand.
    """
    attrs = node_attributes(node)
    if node.op_type == "Conv" and weight_rank >= 3:
        return 0
    if node.op_type == "ConvTranspose" and weight_rank >= 3 and attrs.get("group", 1) == 1:
        return 1
    if node.op_type == "Gemm" and weight_rank == 2:
        return 0 if attrs.get("transB", 0) else 1
    if node.op_type == "MatMul" and input_index == 1 and weight_rank >= 2:
        return weight_rank - 1
    return None


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
