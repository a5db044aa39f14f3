"""Empirical bias correction: remove the mean shift that weight quantization adds to each layer's output.

Quantizing a weight moves every output channel's mean by a roughly constant amount (the rounding
errors of a channel's weights do not average out over its inputs). For each Conv, ConvTranspose and
Gemm with constant weights, in graph order, the mean per output channel of its output is measured
on calibration samples twice: in FP32, and with every weight fake-quantized with its exported
encoding and the biases corrected so far in place (so a layer sees its inputs as the quantized
network upstream produces them: correcting all layers at once from FP32 inputs over-corrects on
deep models). The difference is subtracted from the layer's bias; a layer without a bias gets one.

Activations stay in float while the means are measured, as AIMET's statistics are gathered
(SNPE.md section 5): activation rounding is close to unbiased, weight rounding is not, and the
shift is measured where it arises. Only biases change, so the deploy model keeps its op types; SNPE
quantizes the corrected biases it finds there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..encode.encoding import ParamEncoding
from ..encode.quantized_weights import quantized_weights
from ..graph.large import initializer_array
from ..graph.ops import node_attributes
from ..graph.runtime import make_session

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")
CHANNEL_AXIS = 1
"""The output axis of the channels, for all of CORRECTED_OPS (NCHW convolutions, [N, C] Gemm)."""
DEFAULT_SAMPLES = 32
"""Calibration samples the shifts are measured on (a choice, not tuned: 32 gave the gains in the README)."""


@dataclass(frozen=True)
class Layer:
    """A layer whose bias is corrected: its output tensor, weight, bias initializer and channel count."""

    output: str
    weight: str
    bias: str
    channels: int


@dataclass
class Correction:
    """What bias correction changed in one layer."""

    output: str
    bias: str
    largest_shift: float  # the largest |shift| over the layer's channels
    relative_shift: float  # the largest |shift| over the layer's mean channel standard deviation

    def to_dict(self) -> dict:
        return {"output": self.output, "bias": self.bias, "largest_shift": self.largest_shift,
                "relative_shift": self.relative_shift}


def correct_biases(
    model: onnx.ModelProto,
    weights: dict[str, ParamEncoding],
    samples: Sequence[dict[str, np.ndarray]],
    progress: Callable[[Sequence[Layer]], Iterable[Layer]] = lambda layers: layers,
    reference: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, list[Correction]]:
    """A copy of ``model`` with the bias of every layer with an encoded weight corrected (module docstring).

    ``weights`` are the weight encodings the quantized model uses; ``samples`` the calibration
    samples to measure on; ``progress`` wraps the list of layers (e.g. in a progress bar);
    ``reference`` the FP32 model whose means are the target, with the same tensor names (default
    ``model``; after AdaRound, the model before it, whose weights ``model``'s rounded ones stand for).

    The quantized network runs once over the samples, one segment per layer (the nodes after the
    previous layer up to this one), from the tensors the earlier segments left; a layer's cached
    output is shifted by its correction before later segments read it, which is what the corrected
    bias computes. So every node runs once per sample, as in one inference pass.
    """
    corrected, layers = _with_biases(model, weights)
    if not layers:  # nothing to correct (e.g. MatMul layers only)
        return corrected, []
    outputs = [layer.output for layer in layers]
    target = corrected if reference is None else reference
    reference_moments = _channel_moments(make_session(target, outputs), outputs, layers, samples)
    quantized = quantized_weights(corrected, weights)
    biases = {init.name: initializer_array(init).astype(np.float64) for init in corrected.graph.initializer
              if init.name in {layer.bias for layer in layers}}
    caches = [dict(sample) for sample in samples]
    corrections = []
    for layer, segment in zip(progress(layers), _segments(quantized, layers, samples[0]), strict=True):
        session = make_session(segment.model)
        for cache in caches:
            values = session.run(segment.outputs, {name: cache[name] for name in segment.inputs})
            cache.update(zip(segment.outputs, values, strict=True))
        mean, _ = _channel_moments(None, [layer.output], [layer], caches)[layer.output]
        ref_mean, ref_std = reference_moments[layer.output]
        shift = mean - ref_mean
        along = np.expand_dims(shift.astype(np.float32),
                               tuple(a for a in range(caches[0][layer.output].ndim) if a != CHANNEL_AXIS))
        for cache in caches:
            cache[layer.output] -= along
            for name in segment.released:
                cache.pop(name, None)
        biases[layer.bias] = biases[layer.bias] - shift.reshape(biases[layer.bias].shape)
        spread = float(np.mean(ref_std)) or 1.0
        corrections.append(Correction(layer.output, layer.bias, float(np.abs(shift).max(initial=0.0)),
                                      float(np.abs(shift).max(initial=0.0)) / spread))
    for init in corrected.graph.initializer:
        if init.name in biases:
            init.CopyFrom(numpy_helper.from_array(biases[init.name].astype(np.float32), init.name))
    return corrected, corrections


@dataclass
class _Segment:
    """The nodes that lead from the previous layer to one layer, as a model of their own."""

    model: onnx.ModelProto
    inputs: list[str]  # tensors it reads from the samples or from earlier segments
    outputs: list[str]  # tensors it computes that this or a later segment reads (the layer's output first)
    released: list[str]  # cached tensors no later segment reads


def _segments(model: onnx.ModelProto, layers: list[Layer], sample: dict[str, np.ndarray]) -> list[_Segment]:
    """Cut the graph's nodes, in order, into one segment per layer, ending at the layer's node."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    ends = {layer.output for layer in layers}
    groups: list[list[onnx.NodeProto]] = [[]]
    for node in graph.node:
        if len(groups) > len(layers):
            break
        groups[-1].append(node)
        if node.output[0] in ends:
            groups.append([])
    groups = groups[: len(layers)]
    last_read: dict[str, int] = {}
    for index, nodes in enumerate(groups):
        for node in nodes:
            for name in node.input:
                last_read[name] = index
    types = {v.name: v for v in [*graph.input, *graph.value_info]}
    segments, available = [], set(sample)
    for index, (layer, nodes) in enumerate(zip(layers, groups, strict=True)):
        produced = [name for node in nodes for name in node.output if name]
        reads = {name for node in nodes for name in node.input if name}
        inputs = sorted(reads & available - set(produced))
        outputs = [layer.output] + [n for n in produced if n != layer.output and last_read.get(n, -1) > index]
        value_inputs = [types.get(name) or _value_info(name, sample.get(name)) for name in inputs]
        sub = helper.make_graph(
            nodes, f"{graph.name}_segment{index}", value_inputs,
            [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
            [constants[name] for name in sorted(reads & set(constants))],
            value_info=[v for v in graph.value_info if v.name in set(produced)],
        )
        segments.append(_Segment(helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version),
                                 inputs, outputs, [n for n in inputs if last_read.get(n, -1) <= index]))
        available |= set(outputs)
    return segments


def _value_info(name: str, value: np.ndarray | None) -> onnx.ValueInfoProto:
    """A graph input for a tensor whose type the model does not record (from the sample, else float)."""
    if value is None:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))


def _with_biases(model: onnx.ModelProto, weights: dict[str, ParamEncoding]) -> tuple[onnx.ModelProto, list[Layer]]:
    """A copy of ``model`` where every correctable layer has a bias of its own (zeros where it had none,
    a copy where it shared one), and the layers in graph order."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    inits = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    layers = []
    for node in graph.node:
        if node.op_type not in CORRECTED_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        channels = _output_channels(node, inits[node.input[1]])
        if channels is None:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and (bias not in inits or int(np.prod(inits[bias].dims)) != channels):
            continue  # a bias from a graph input, or broadcast from one value: left alone
        if bias is None or readers[bias] > 1:
            values = np.zeros(channels, np.float32) if bias is None else initializer_array(inits[bias])
            name = f"{node.output[0]}_corrected_bias"
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
            if bias is None:
                node.input.append(name)
            else:
                node.input[2] = name
            bias = name
        layers.append(Layer(node.output[0], node.input[1], bias, channels))
    return copy, layers


def _output_channels(node: onnx.NodeProto, weight: onnx.TensorProto) -> int | None:
    """How many output channels the layer has (None: unsupported); they are its output's axis 1."""
    attrs = node_attributes(node)
    dims = list(weight.dims)
    if node.op_type == "Conv":
        return dims[0]
    if node.op_type == "ConvTranspose":
        return dims[1] * attrs.get("group", 1)
    if len(dims) != 2 or attrs.get("beta", 1.0) != 1.0:
        return None
    return dims[0] if attrs.get("transB", 0) else dims[1]


def _channel_moments(
    session,
    outputs: list[str],
    layers: list[Layer],
    samples: Sequence[dict[str, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per output, the mean and standard deviation of each channel over ``samples`` (sums in float64);
    with no session, the samples hold the outputs themselves."""
    sums = {layer.output: np.zeros(layer.channels) for layer in layers}
    squares = {layer.output: np.zeros(layer.channels) for layer in layers}
    counts = dict.fromkeys(sums, 0)
    for sample in samples:
        values = session.run(outputs, sample) if session is not None else [sample[name] for name in outputs]
        for layer, value in zip(layers, values, strict=True):
            rows = np.moveaxis(value, CHANNEL_AXIS, 0).reshape(layer.channels, -1)  # a view for batch 1
            sums[layer.output] += rows.sum(axis=1, dtype=np.float64)
            squares[layer.output] += np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
            counts[layer.output] += rows.shape[1]
    moments = {}
    for name, total in sums.items():
        mean = total / max(counts[name], 1)
        variance = np.maximum(squares[name] / max(counts[name], 1) - mean**2, 0.0)
        moments[name] = (mean, np.sqrt(variance))
    return moments
