"""Cross-layer equalization: rescale consecutive convolutions so each channel's weight range is balanced.

Nagel et al. 2019 ("Data-Free Quantization"). For two Convs where the first's output channel ``c``
feeds the second's input channel ``c`` only through ops that commute with a positive per-channel
scale (Relu; a zero-valued constant Pad; nothing), dividing the first's channel (weights and bias)
by ``s_c`` and multiplying the second's input channel by ``s_c`` computes the same function. With
``s_c = sqrt(r1_c / r2_c)`` (``r`` the channels' largest weight magnitudes) both ranges become
``sqrt(r1_c r2_c)``, so a per-tensor grid fits every channel better. Pairs are equalized in graph
order, over a few sweeps (a middle layer of a chain is balanced with both neighbours).

Clipped activations (Clip, ReLU6) do not commute with a scale: ``min(x / s, 6) != min(x, 6) / s``,
and ONNX's Clip takes one bound for all channels, so such pairs are left as they are rather than
turning ReLU6 into Relu (the deploy model must compute the input model's function and keep the op
types SNPE fuses). Second convolutions must be ungrouped or depthwise. High-bias absorption, which
needs calibration data, is optimize/bias_absorption.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.large import initializer_array
from ..graph.ops import node_attributes

SWEEPS = 4
PASS_THROUGH = frozenset({"Relu"})
"""Elementwise ops that commute with a positive per-channel scale."""


@dataclass(frozen=True)
class Pair:
    """Two Convs equalized together: the producer's weight and bias, and the consumer's weight."""

    first_weight: str
    first_bias: str | None
    second_weight: str
    depthwise_second: bool

    def to_dict(self) -> dict:
        return {"first": self.first_weight, "second": self.second_weight}


def equalize(model: onnx.ModelProto, sweeps: int = SWEEPS) -> tuple[onnx.ModelProto, list[Pair]]:
    """A copy of ``model`` with every equalizable Conv pair rescaled (module docstring), and the pairs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    pairs = _pairs(copy)
    values = {init.name: initializer_array(init).astype(np.float64) for init in copy.graph.initializer}
    for _ in range(sweeps):
        for pair in pairs:
            _balance(pair, values)
    touched = {name for pair in pairs for name in (pair.first_weight, pair.first_bias, pair.second_weight) if name}
    for init in copy.graph.initializer:
        if init.name in touched:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
    return copy, pairs


def _balance(pair: Pair, values: dict[str, np.ndarray]) -> None:
    first, second = values[pair.first_weight], values[pair.second_weight]
    r1 = np.abs(first.reshape(first.shape[0], -1)).max(axis=1)
    moved = second if pair.depthwise_second else np.moveaxis(second, 1, 0)
    r2 = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0)
    values[pair.first_weight] = first / scale.reshape((-1,) + (1,) * (first.ndim - 1))
    if pair.first_bias is not None:
        values[pair.first_bias] = values[pair.first_bias] / scale
    shape = [1] * second.ndim
    shape[0 if pair.depthwise_second else 1] = -1
    values[pair.second_weight] = second * scale.reshape(shape)


def _pairs(model: onnx.ModelProto) -> list[Pair]:
    """Conv pairs whose channels connect one to one through pass-through ops, each weight in one pair
    as a producer and one as a consumer, its initializers read by no other node."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    pairs, firsts, seconds = [], set(), set()
    for node in graph.node:
        if not _own_conv(node, inits, readers) or node.input[1] in firsts:
            continue
        tensor, follower = node.output[0], None
        while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
            follower = consumers[tensor][0]
            if follower.op_type in PASS_THROUGH or _zero_pad(follower, inits):
                tensor, follower = follower.output[0], None
                continue
            break
        if follower is None or follower.input[0] != tensor or not _own_conv(follower, inits, readers):
            continue
        if follower.input[1] in seconds:
            continue
        groups = node_attributes(follower).get("group", 1)
        channels = inits[node.input[1]].dims[0]
        depthwise = groups > 1 and groups == channels and inits[follower.input[1]].dims[1] == 1
        if groups != 1 and not depthwise:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        pairs.append(Pair(node.input[1], bias, follower.input[1], depthwise))
        firsts.add(node.input[1])
        seconds.add(follower.input[1])
    return pairs


def _own_conv(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], readers: dict[str, int]) -> bool:
    """A Conv with constant weights (and bias) that no other node reads."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    constants = [name for name in node.input[1:] if name]
    return all(name in inits and readers.get(name) == 1 for name in constants)


def _zero_pad(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A constant-mode Pad that pads with zeros and leaves the channel axis alone."""
    if node.op_type != "Pad" or node_attributes(node).get("mode", b"constant") not in (b"constant", "constant"):
        return False
    if len(node.input) > 3 and node.input[3]:  # pads for chosen axes only
        return False
    if len(node.input) > 2 and node.input[2]:
        value = inits.get(node.input[2])
        if value is None or np.any(initializer_array(value) != 0):
            return False
    pads = initializer_array(inits[node.input[1]]) if len(node.input) > 1 and node.input[1] in inits else None
    if pads is None:
        return False
    rank = len(pads) // 2
    return rank >= 2 and pads[1] == 0 and pads[rank + 1] == 0

