"""AdaRound: learn, per weight, whether it rounds up or down so each layer's output is reproduced.

Nagel et al. 2020 ("Up or Down? Adaptive Rounding for Post-Training Quantization"), in numpy. For
a layer ``y = W x`` (a Conv as a matrix product over its input patches, a Gemm, a MatMul with a
constant operand) the output error of a rounded weight ``W~`` over the calibration data is
``sum_o (W~_o - W_o) C (W~_o - W_o)^T`` with ``C = sum x x^T``, the Gram matrix of the layer's input
patches: it is gathered once, streaming (memory does not grow with the samples), and every
iteration then costs a product with ``C`` instead of a pass over the data. Each weight's code is
``floor(w / s) + h(v)`` with the rectified sigmoid ``h`` (zeta 1.1, gamma -0.1), clamped to the
encoding's codes; ``v`` is learned with Adam on the output error plus ``lambda sum(1 - |2h - 1|^beta)``
(lambda 0.01, beta annealed from 20 to 2 after a 20% warm start: the defaults AIMET is known for,
not checked against its source), which drives every ``h`` to 0 or 1. Where ``C`` is large (more
than ``FULL_RANK`` inputs per output) the iterations use its leading eigenvectors (``RANK`` of them);
the result is judged on the exact ``C``.

With ``inputs="fp32"`` the inputs ``x`` are those of the FP32 network. With ``inputs="rounded"`` (the
default) the layers are
rounded in graph order and each one's inputs ``x~`` are those of the network with the layers before
it already rounded (activations float), so a layer also makes up for the error its inputs carry:
the objective becomes ``E ||W x - W~ x~||^2``, which is the first form with ``C~ = E x~ x~^T`` and the
target ``T = W + W (E x x~^T - C~)(C~ + lambda I)^-1`` in place of ``W`` (the ridge keeps ``T`` near
``W`` where ``C~`` is poorly determined; ``T = W`` when the inputs carry no error). It costs two
passes over the samples per layer. The weights written are exactly on the grid of the
weight encodings (which AdaRound does not change), so ``snpe-dlc-quantize --override_params``
with the exported encodings gives back the same integers; a layer keeps nearest rounding when the
learned rounding does not lower its output error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from ..encode.encoding import ChannelEncodings, ParamEncoding, dequantize, quantize
from ..graph.large import initializer_array
from ..graph.ops import node_attributes
from ..graph.runtime import make_session

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_ITERATIONS = 1000
DEFAULT_SAMPLES = 128
"""Calibration samples whose Gram matrices AdaRound fits (the cost of gathering them grows with the count)."""
ZETA, GAMMA = 1.1, -0.1
REGULARIZATION = 0.01
BETA_START, BETA_END, WARM_START = 20.0, 2.0, 0.2
LEARNING_RATE = 1e-2
"""Adam's step on v. On EfficientNet-Lite0 (16 samples, 300 iterations) 1e-2 cut the median layer output
error by 4.4 dB against nearest rounding, 1e-3 by 2.9 dB; 3e-2 gave 4.5 dB."""
FULL_RANK = 512
RANK = 256


@dataclass
class RoundedLayer:
    """What AdaRound did to one layer's weight: output error (sum of squares per position) before and after."""

    weight: str
    op: str
    nearest_error: float
    adaround_error: float
    flipped: int  # weights rounded the other way than nearest
    kept_nearest: bool

    def to_dict(self) -> dict:
        return {"weight": self.weight, "op": self.op, "nearest_error": self.nearest_error,
                "adaround_error": self.adaround_error, "flipped": self.flipped, "kept_nearest": self.kept_nearest}


@dataclass
class Layer:
    """A Conv/Gemm/MatMul AdaRound rounds: its node, weight and input, and the shape it is fitted in."""

    node: onnx.NodeProto
    weight: str
    input: str
    groups: int
    kernel: tuple[int, ...] = ()  # a Conv's kernel size (from its weight: kernel_shape is optional)


INPUT_MODES = ("rounded", "fp32")
DEFAULT_INPUTS = "rounded"
"""On EfficientNet-Lite0 (128 crops, 1000 iterations, 32 held-out crops) rounded inputs gave 15.8 dB
per tensor where FP32 inputs gave 9.7 dB, and 17.8 against 17.2 dB per channel (README)."""
RIDGE = 1e-3
"""lambda of the rounded-inputs target, relative to the mean of C~'s diagonal."""


@dataclass
class LayerJob:
    """One layer's rounding once its statistics are gathered: what _round_layer needs, and nothing of
    the samples (a Ray task gets exactly this)."""

    layer: Layer
    matrix: np.ndarray
    nearest: np.ndarray
    encoding: tuple[np.ndarray, np.ndarray, int]
    gram: np.ndarray
    positions: int
    iterations: int
    target: np.ndarray | None

    def run(self) -> tuple[np.ndarray, RoundedLayer]:
        """The layer's codes and what AdaRound did (_round_layer)."""
        return _round_layer(self.layer, self.matrix, self.nearest, self.encoding, self.gram, self.positions,
                            self.iterations, self.target)


Runner = Callable[[Iterable[LayerJob]], Iterable[tuple[np.ndarray, RoundedLayer]]]
"""Runs the jobs of one wave of independent layers and yields their results in the jobs' order. The
jobs come lazily: a runner that takes them one at a time holds one layer's job at a time."""


def run_here(jobs: Iterable[LayerJob]) -> Iterator[tuple[np.ndarray, RoundedLayer]]:
    """The jobs one after the other, in this process, each built when its turn comes."""
    return (job.run() for job in jobs)


def adaround(
    model: onnx.ModelProto,
    weights: dict[str, ParamEncoding],
    samples: Iterable[dict[str, np.ndarray]],
    iterations: int = DEFAULT_ITERATIONS,
    progress: Callable[[Sequence[Layer]], Iterable[Layer]] = lambda layers: layers,
    inputs: str = DEFAULT_INPUTS,
    runner: Runner = run_here,
) -> tuple[onnx.ModelProto, list[RoundedLayer]]:
    """A copy of ``model`` whose encoded Conv/Gemm/MatMul weights are AdaRounded on ``weights``' grids.

    ``samples`` are calibration samples (FP32 inputs); ``progress`` wraps the list of layers;
    ``inputs`` "fp32" or "rounded" (module docstring). The layers go in waves (``layer_waves``):
    every layer's statistics are gathered here, then ``runner`` rounds the wave's layers (Ray tasks,
    optimize/adaround_on_ray.py); the result does not depend on the runner.
    """
    if inputs not in INPUT_MODES:
        raise ValueError(f"unknown AdaRound inputs {inputs!r}")
    layers = adaround_layers(model, weights)
    samples = list(samples)
    grams = _gram_matrices(model, layers, samples) if inputs == "fp32" else {}
    fed = {value.name for value in model.graph.input}
    layer_inputs = [name for name in dict.fromkeys(layer.input for layer in layers) if name not in fed]
    reference = make_session(model, layer_inputs) if inputs == "rounded" else None  # FP32: one session
    values = {init.name: initializer_array(init) for init in model.graph.initializer if init.name in weights}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {init.name: init for init in copy.graph.initializer}

    def job(layer: Layer) -> LayerJob:
        array, enc = values[layer.weight], weights[layer.weight]
        matrix = _as_matrix(layer, array)
        nearest = _as_matrix(layer, quantize(array, enc))  # SNPE's own rounding, half away from zero
        if inputs == "fp32":
            (gram, positions), target = grams.pop(layer.weight), None
        else:  # on the model as rounded so far: every layer upstream of this one is
            gram, cross, positions = _paired_grams(reference, copy, layer, samples)
            target = _rounded_inputs_target(matrix.astype(np.float64), gram, cross)
        return LayerJob(layer, matrix, nearest, _matrix_encoding(layer, array, enc), gram, positions, iterations,
                        target)

    waves = [layers] if inputs == "fp32" else layer_waves(model, layers)
    outcomes = (outcome for wave in waves for outcome in zip(wave, runner(job(layer) for layer in wave),
                                                             strict=True))
    results = {}
    # the last result of a wave is written before the next wave's statistics are gathered
    for _, (layer, (codes, result)) in zip(progress([layer for wave in waves for layer in wave]), outcomes,
                                           strict=True):
        rounded = dequantize(_from_matrix(layer, codes, values[layer.weight].shape), weights[layer.weight])
        initializers[layer.weight].CopyFrom(numpy_helper.from_array(rounded, layer.weight))
        results[layer.weight] = result
    return copy, [results[layer.weight] for layer in layers]


def layer_waves(model: onnx.ModelProto, layers: list[Layer]) -> list[list[Layer]]:
    """The layers (graph order) in waves for rounded inputs: a layer goes one wave after the latest
    layer upstream of its input, so no layer of a wave feeds another and each one's inputs are the same
    as when the layers are rounded one by one in graph order. A chain of layers is one layer per
    wave; parallel branches share waves. One layer per wave where that cannot be told (a weight also
    read by another node, subgraphs)."""
    by_weight = {layer.weight: layer for layer in layers}
    readers = [name for node in model.graph.node for name in node.input if name in by_weight]
    if len(readers) > len(set(readers)) or any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                for node in model.graph.node for attr in node.attribute):
        return [[layer] for layer in layers]
    latest: dict[str, int] = {}  # per tensor: the latest wave of the layers upstream of it
    waves: list[list[Layer]] = []
    for node in model.graph.node:
        layer = by_weight.get(node.input[1]) if len(node.input) > 1 else None  # its weight's one reader
        if layer is not None:
            wave = latest.get(layer.input, -1) + 1
            latest[layer.weight] = wave
            waves.extend([] for _ in range(wave + 1 - len(waves)))
            waves[wave].append(layer)
        upstream = max((latest.get(name, -1) for name in node.input), default=-1)
        for name in node.output:
            latest[name] = upstream
    return waves


def _paired_grams(
    reference: ort.InferenceSession, current: onnx.ModelProto, layer: Layer, samples: Sequence[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, int]:
    """``sum x~ x~^T`` and ``sum x~ x^T`` per group (float64) of the layer's input patches in ``current``
    (x~) and in the FP32 ``reference`` session, which exposes every layer's input (x); and the number
    of patches."""
    fed = {value.name for value in current.graph.input}
    exposed = [] if layer.input in fed else [layer.input]
    sessions = [make_session(current, exposed), reference]
    gram, cross, count = 0.0, 0.0, 0
    for sample in samples:
        rounded, fp32 = (_patches(layer, session.run(exposed, sample)[0] if exposed else sample[layer.input])
                         for session in sessions)
        gram = gram + np.einsum("gkp,glp->gkl", rounded, rounded).astype(np.float64)
        cross = cross + np.einsum("gkp,glp->gkl", rounded, fp32).astype(np.float64)
        count += rounded.shape[2]
    return gram, cross, count


def _rounded_inputs_target(matrix: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """``T = W + W (E x x~^T - C~)(C~ + lambda I)^-1`` per group (module docstring); ``matrix`` [G, O, K],
    ``gram`` = sum x~ x~^T and ``cross`` = sum x~ x^T, [G, K, K]."""
    size = gram.shape[-1]
    scale = np.trace(gram, axis1=1, axis2=2) / size
    alive = scale > 0  # a group whose inputs are all zero keeps T = W
    target = matrix.copy()
    if not alive.any():
        return target
    ridge = RIDGE * scale[alive, None, None] * np.eye(size)
    difference = np.transpose(cross[alive], (0, 2, 1)) - gram[alive]  # sum x x~^T - sum x~ x~^T
    # W D (C~ + lambda)^-1 = ((C~ + lambda)^-1 D^T W^T)^T, C~ symmetric
    correction = np.linalg.solve(gram[alive] + ridge,
                                 np.transpose(difference, (0, 2, 1)) @ np.transpose(matrix[alive], (0, 2, 1)))
    target[alive] += np.transpose(correction, (0, 2, 1))
    return target


def adaround_layers(model: onnx.ModelProto, weights: dict[str, ParamEncoding]) -> list[Layer]:
    """The layers AdaRound handles, in graph order (for layer_waves), each weight once (its first reader)."""
    seen, layers = set(), []
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in weights or node.input[1] in seen:
            continue
        attrs = node_attributes(node)
        dims = shapes[node.input[1]]
        if node.op_type == "Conv" and len(dims) == 4 and attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"):
            layers.append(Layer(node, node.input[1], node.input[0], int(attrs.get("group", 1)), tuple(dims[2:])))
        elif node.op_type == "Gemm" and len(dims) == 2 and not attrs.get("transA", 0):
            layers.append(Layer(node, node.input[1], node.input[0], 1))
        elif node.op_type == "MatMul" and len(dims) == 2 and node.input[0] not in shapes:
            layers.append(Layer(node, node.input[1], node.input[0], 1))
        else:
            continue
        seen.add(node.input[1])
    return layers


def _as_matrix(layer: Layer, array: np.ndarray) -> np.ndarray:
    """The weight as [groups, outputs per group, inputs per output] (Conv inputs ordered (channel, ky, kx))."""
    op = layer.node.op_type
    if op == "Conv":
        return array.reshape(layer.groups, array.shape[0] // layer.groups, -1)
    trans_b = op == "Gemm" and any(a.name == "transB" and a.i for a in layer.node.attribute)
    return (array if trans_b else array.T)[np.newaxis]


def _from_matrix(layer: Layer, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of _as_matrix."""
    op = layer.node.op_type
    if op == "Conv":
        return matrix.reshape(shape)
    trans_b = op == "Gemm" and any(a.name == "transB" and a.i for a in layer.node.attribute)
    return matrix[0] if trans_b else matrix[0].T


def _matrix_encoding(layer: Layer, array: np.ndarray, enc: ParamEncoding) -> tuple[np.ndarray, np.ndarray, int]:
    """Scale and offset per output row of _as_matrix (broadcast shape [groups, outputs, 1]), and the code count."""
    rows = _as_matrix(layer, np.empty(array.shape, np.int8)).shape[:2]
    if isinstance(enc, ChannelEncodings):
        scale = enc.scales().reshape((*rows, 1))
        offset = enc.offsets().reshape((*rows, 1)).astype(np.float64)
    else:
        scale = np.full((*rows, 1), enc.scale)
        offset = np.full((*rows, 1), float(enc.offset))
    return scale, offset, enc.levels


def _gram_matrices(
    model: onnx.ModelProto, layers: list[Layer], samples: Iterable[dict[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, int]]:
    """Per weight, the Gram matrix of its layer's input patches per group (float64) and the number of patches."""
    fed = {value.name for value in model.graph.input}
    exposed = [name for name in dict.fromkeys(layer.input for layer in layers) if name not in fed]
    session = make_session(model, exposed)
    grams: dict[str, tuple[np.ndarray, int]] = {}
    for sample in samples:
        computed = session.run(exposed, sample) if exposed else []  # no names would mean every output
        values = dict(zip(exposed, computed, strict=True)) | sample
        for layer in layers:
            patches = _patches(layer, values[layer.input])  # [groups, inputs, positions]
            gram = (patches[0] @ patches[0].T)[np.newaxis] if len(patches) == 1 else np.einsum(
                "gkp,glp->gkl", patches, patches)
            gram = gram.astype(np.float64)
            total, count = grams.get(layer.weight, (0.0, 0))
            grams[layer.weight] = (total + gram, count + patches.shape[2])
    return grams


def _patches(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's inputs as columns: [groups, inputs per output, positions], float32, contiguous."""
    x = np.asarray(x, dtype=np.float32)
    if layer.node.op_type != "Conv":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)[np.newaxis]
    attrs = node_attributes(layer.node)
    kernel = layer.kernel
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    batch, channels = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    # [N, C, Ho, Wo, kh, kw] -> [groups, C / groups * kh * kw, N * Ho * Wo]
    groups = layer.groups
    per_group = channels // groups
    windows = windows.reshape(batch, groups, per_group, *windows.shape[2:])
    return np.ascontiguousarray(windows.transpose(1, 2, 5, 6, 0, 3, 4)).reshape(
        groups, per_group * kernel[0] * kernel[1], -1)


def _round_layer(
    layer: Layer,
    matrix: np.ndarray,
    nearest_codes: np.ndarray,
    encoding: tuple[np.ndarray, np.ndarray, int],
    gram: np.ndarray,
    positions: int,
    iterations: int,
    target: np.ndarray | None = None,
) -> tuple[np.ndarray, RoundedLayer]:
    """The codes (``q`` in [0, levels], shaped like ``matrix``) AdaRound picks for one layer: each
    weight rounded down or up, so that the output error against ``target`` (default: the weights
    themselves) under ``gram`` is lowest."""
    scale, offset, levels = encoding
    weights = matrix.astype(np.float64)
    goal = weights if target is None else target
    scaled = weights / scale
    floor = np.floor(scaled)
    low, high = offset, offset + levels  # the representable scaled values
    gram = gram / max(positions, 1)
    factor = _factor(gram)
    nearest = nearest_codes + offset
    rest = np.clip(scaled - floor, 0.01, 0.99)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
    v = v.astype(np.float32)
    m, s = np.zeros_like(v), np.zeros_like(v)
    factor32 = factor.astype(np.float32)
    goal32, scale32 = goal.astype(np.float32), scale.astype(np.float32)
    floor32, low32, high32 = floor.astype(np.float32), low.astype(np.float32), high.astype(np.float32)
    warm = int(iterations * WARM_START)
    for step in range(iterations):
        sig = 1 / (1 + np.exp(-v))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
        soft = floor32 + h
        inside = (soft >= low32) & (soft <= high32)
        error = np.clip(soft, low32, high32) * scale32 - goal32  # [G, O, K]
        projected = _batched(error, factor32)  # [G, O, r]
        grad_w = 2 * _batched(projected, factor32.transpose(0, 2, 1))  # d(error C error^T)/d(error)
        grad_h = grad_w * scale32 * inside
        if step >= warm:
            beta = BETA_START + (BETA_END - BETA_START) * (step - warm) / max(iterations - warm, 1)
            centered = 2 * h - 1
            grad_h = grad_h - REGULARIZATION * beta * 2 * np.sign(centered) * np.abs(centered) ** (beta - 1)
        active = (h > 0) & (h < 1)
        grad = grad_h * active * sig * (1 - sig) * (ZETA - GAMMA)
        m = 0.9 * m + 0.1 * grad
        s = 0.999 * s + 0.001 * grad * grad
        v -= LEARNING_RATE * (m / (1 - 0.9 ** (step + 1))) / (np.sqrt(s / (1 - 0.999 ** (step + 1))) + 1e-8)
    learned = np.clip(floor + (v >= 0), low, high)
    nearest_error, learned_error = (_output_error(c * scale - goal, gram) for c in (nearest, learned))
    keep = learned_error >= nearest_error
    chosen = nearest if keep else learned
    codes = (chosen - offset).astype(np.int64)
    result = RoundedLayer(layer.weight, layer.node.op_type, nearest_error, min(learned_error, nearest_error),
                          int(np.count_nonzero(chosen != nearest)), bool(keep))
    return codes, result


def _factor(gram: np.ndarray) -> np.ndarray:
    """``L`` with ``L L^T`` = the Gram matrix per group: exact up to FULL_RANK inputs, else from its top RANK
    eigenvectors."""
    values, vectors = np.linalg.eigh(gram)
    if gram.shape[-1] > FULL_RANK:
        values, vectors = values[:, -RANK:], vectors[:, :, -RANK:]
    return vectors * np.sqrt(np.maximum(values, 0))[:, np.newaxis, :]


def _output_error(error: np.ndarray, gram: np.ndarray) -> float:
    """``sum_o error_o C error_o^T`` over every group and output (float64)."""
    return float(np.sum(_batched(error, gram) * error))


def _batched(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` per group: one BLAS product for one group, einsum for many small ones (numpy's stacked
    matmul of small transposed matrices took seconds where einsum takes milliseconds)."""
    if a.shape[0] == 1:
        return (a[0] @ b[0])[np.newaxis]
    return np.einsum("gij,gjk->gik", a, b)
