"""From statistics and weights to SNPE encodings: the range methods, calling encoding.py.

- ``minmax``: the global min and max over all samples.
- ``percentile``: each end clipped at a percentile (default 99.99) of an exact streaming histogram.
- ``mse``: the range minimising the expected squared error of SNPE's quantization (range_search).
- ``tf_enhanced``: what ``snpe-dlc-quantize --use_enhanced_quantizer`` picks, as AIMET implements it;
  it depends on the first calibration sample, as SNPE's does.

Outputs of Sigmoid and Softmax get [0, 1] and Tanh [-1, 1], the ranges the functions fix (as in
AIMET's HTP configs), unless ``fixed_ranges`` is off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import onnx

from ..errors import OnnxSnpeError
from ..graph.large import initializer_array
from ..graph.load import FLOAT_TYPES, initializer_values
from ..graph.ops import node_attributes
from ..graph.targets import QuantTargets
from ..stats.tensor_stats import TensorStats
from .conversions import HTP_FIXED_16_BIT
from .encoding import (
    ChannelEncodings,
    Encoding,
    ParamEncoding,
    asymmetric_encoding,
    bias_encoding,
    per_channel_symmetric,
    symmetric_encoding,
)
from .masks import masked_ranges
from .methods import DEFAULT_PERCENTILE, check_method
from .precision import int16_weight_cap
from .range_search import mse_range, percentile_range
from .tf_enhanced import tf_enhanced_range

FIXED_RANGES = {"Sigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
"""Output ranges fixed by the function itself."""
INT32_MAX = 2**31 - 1


def chosen_range(
    stats: TensorStats, method: str, bitwidth: int, percentile: float = DEFAULT_PERCENTILE
) -> tuple[float, float]:
    """The range a method chooses from a tensor's statistics (collected for that method)."""
    check_method(method, percentile)
    if method == "minmax":
        return stats.min, stats.max
    if method == "tf_enhanced":
        if stats.tf_enhanced is None:
            raise OnnxSnpeError("tf_enhanced needs statistics collected for it")
        return tf_enhanced_range(stats.tf_enhanced, bitwidth)
    if stats.histogram is None:
        raise OnnxSnpeError(f"{method} needs statistics collected with a histogram")
    if method == "percentile":
        return percentile_range(stats.histogram, percentile)
    return mse_range(stats.histogram, bitwidth)


def fixed_range_tensors(model: onnx.ModelProto, functions: bool = True) -> dict[str, tuple[float, float]]:
    """Tensors whose range is known without statistics: gathered_table_ranges, and with ``functions``
    the outputs of Sigmoid, Softmax and Tanh with the ranges those functions fix."""
    return {**(function_ranges(model) if functions else {}), **gathered_table_ranges(model)}


def function_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Outputs of Sigmoid, Softmax and Tanh with the ranges those functions fix."""
    return {
        node.output[0]: FIXED_RANGES[node.op_type] for node in model.graph.node if node.op_type in FIXED_RANGES
    }


def gathered_table_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """The rows gathered from a constant table (an embedding), with the table's range: they keep the
    table's grid, as every data-movement op keeps its input's (SNPE.md section 4; the HTP runs a
    Gather quantized only when its input and output encodings are the same). It reads every table:
    compute it once per model (stages.Prepared.table_ranges)."""
    tables = {init.name: init for init in model.graph.initializer if init.data_type in FLOAT_TYPES}
    ranges = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in tables:
            table = initializer_array(tables[node.input[0]])
            if table.size:
                ranges[node.output[0]] = (float(table.min()) + 0.0, float(table.max()) + 0.0)
    return ranges


def activation_encodings(
    stats: dict[str, TensorStats],
    targets: QuantTargets,
    method: str,
    bitwidth: int,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    fixed: dict[str, tuple[float, float]] | None = None,
    raised: Iterable[str] = (),
) -> dict[str, Encoding]:
    """An encoding for every activation, aliases included (they share their root's encoding).

    ``fixed`` maps tensors to ranges that override the statistics (see fixed_range_tensors);
    ``raised`` names tensors encoded at 16 bits whatever ``bitwidth`` is (mixed precision).
    Tensors carrying an attention mask get the ranges of encode/masks.py.
    """
    fixed = fixed or {}
    raised = set(raised)

    def bits(name: str) -> int:
        return 16 if name in raised else bitwidth

    ranges = {}
    for name in targets.activations:
        if name in fixed:
            ranges[name] = fixed[name]
            continue
        observer = stats[name]
        if observer.count == 0 and name not in targets.masks:
            raise OnnxSnpeError(f"tensor '{name}' produced no values on the calibration data")
        ranges[name] = chosen_range(observer, method, bits(name), percentile) if observer.count else (0.0, 0.0)
    ranges = masked_ranges(ranges, targets.masks, bits)
    encodings = {name: asymmetric_encoding(*ranges[name], bits(name)) for name in targets.activations}
    for alias, root in targets.aliases.items():
        encodings[alias] = encodings[root]
    return encodings


def with_htp_fixed_encodings(
    model: onnx.ModelProto, targets: QuantTargets, activations: dict[str, Encoding]
) -> dict[str, Encoding]:
    """``activations`` with each 16-bit output of an op in HTP_FIXED_16_BIT (and its aliases) given
    the encoding the HTP computes it in, and each 16-bit output of a fused L2 normalization the
    range [-1, 1].

    The HTP writes a 16-bit HardSigmoid on the grid 2^-16 from 0 whatever encoding its output has
    (every one of the 65,536 input codes, four input and output ranges): with a calibrated range
    such as [0, 0.6] the device's values would be garbage, up to 26,213 steps off. With this
    encoding the overrides say what the HTP computes. Its 16-bit L2Norm writes a value below its
    output range at the top code (simulate/htp/l2_norm.py): a calibrated range, which new data can
    leave, would turn such a value from about -0.2 into +0.2 on the device; [-1, 1] holds every
    output and still has steps of 3e-5."""
    fixed = {}
    for node in model.graph.node:
        encoding = HTP_FIXED_16_BIT.get(node.op_type)
        output = node.output[0] if node.output else None
        if encoding is not None and output in activations and activations[output].bitwidth == 16:
            fixed[output] = encoding
    for fusion in targets.fusions.values():
        encoding = activations.get(fusion.output)
        if fusion.op_type == "LpNormalization" and encoding is not None and encoding.bitwidth == 16:
            fixed[fusion.output] = asymmetric_encoding(-1.0, 1.0, 16)
    if not fixed:
        return activations
    aliases = {alias: fixed[root] for alias, root in targets.aliases.items() if root in fixed}
    return {**activations, **fixed, **aliases}


def weight_encodings(
    model: onnx.ModelProto,
    targets: QuantTargets,
    bitwidth: int,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    per_channel: bool = False,
    raised: Iterable[str] = (),
) -> dict[str, ParamEncoding]:
    """Encodings of the weights, each range chosen by ``method``.

    Per tensor (SNPE's default): asymmetric. ``per_channel`` (QAIRT's
    ``--use_per_channel_quantization``): symmetric per output channel wherever the weight has an
    output-channel axis (targets.weight_axes), each channel's range chosen by ``method`` and made
    symmetric around zero; the others stay per tensor. ``raised`` weights (mixed precision) are
    encoded at 16 bits and symmetric, per tensor or per channel, as HTP takes a 16-bit weight.
    """
    check_method(method, percentile, "--weight-method")
    raised = set(raised)
    readers: dict[str, onnx.NodeProto] = {}  # each raised weight's first reader, whose kernel sets its cap
    for node in model.graph.node:
        if len(node.input) > 1 and node.input[1] in raised:
            readers.setdefault(node.input[1], node)
    encodings: dict[str, ParamEncoding] = {}
    for name, array in initializer_values(model, targets.weights):
        axis = targets.weight_axes.get(name) if per_channel else None
        if name in raised:
            encodings[name] = _sixteen_bit_weight(readers.get(name), array, axis, method, percentile)
            continue
        if axis is None:
            encodings[name] = asymmetric_encoding(*_weight_range(array, method, bitwidth, percentile), bitwidth)
            continue
        encodings[name] = per_channel_symmetric(_channel_absmax(array, axis, method, bitwidth, percentile), axis,
                                                bitwidth)
    return encodings


def _sixteen_bit_weight(reader: onnx.NodeProto | None, array: np.ndarray, axis: int | None, method: str,
                        percentile: float) -> ParamEncoding:
    """A raised weight's symmetric 16-bit encoding, per tensor or per channel, its range widened so
    that no positive code passes the cap above which the HTP computes another value than the code
    (precision.int16_weight_cap: 32639 of 32767, 0.4% of the range; 0.8% in some strided Convs)."""
    cap = int16_weight_cap(node_attributes(reader) if reader is not None else {}, array.shape)
    widen = (2**15 - 1) / cap
    if axis is None:
        low, high = _weight_range(array, method, 16, percentile)
        return symmetric_encoding(max(-low, high) * widen, 16)
    return per_channel_symmetric(_channel_absmax(array, axis, method, 16, percentile) * widen, axis, 16)


def _channel_absmax(array: np.ndarray, axis: int, method: str, bitwidth: int, percentile: float) -> np.ndarray:
    """Each channel's symmetric bound: the larger magnitude of the range ``method`` chooses for it."""
    channels = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    ranges = [_weight_range(channel, method, bitwidth, percentile) for channel in channels]
    return np.array([max(-low, high) for low, high in ranges])


def _weight_range(array: np.ndarray, method: str, bitwidth: int, percentile: float) -> tuple[float, float]:
    """The range ``method`` chooses for a constant, the whole array taken as one sample."""
    if method == "minmax":
        return float(array.min()) + 0.0, float(array.max()) + 0.0
    stats = TensorStats([method])
    stats.update(array[np.newaxis])
    return chosen_range(stats, method, bitwidth, percentile)


BIAS_FIT_MARGIN = 1.0 + 2.0**-20
"""A widened weight scale's margin over the exact fit, so that float rounding of ``s_in * s_w`` never
leaves the bias needing more than int32."""


def widened_for_biases(
    model: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    weights: dict[str, ParamEncoding],
) -> dict[str, ParamEncoding]:
    """``weights`` with the scale of each weight (or weight channel) whose bias would need more than
    int32 at the step ``s_in * s_w`` widened until it fits (AIMET's way; zero stays a code).

    The HTP reads a 32-bit bias at that step only and saturates it there (tools/HTP.md findings 8
    and 11, measured on the emulator): widening the bias scale instead, as onnxruntime's quantizer
    does, gives a model the device does not compute (EfficientNet-Lite0's stem at 16-bit weights:
    thousands of steps off). With 8-bit weights this happens to near-zero channels only; with
    16-bit weights (scales 256 times finer) to ordinary convolutions.
    """
    widened = dict(weights)
    values = dict(initializer_values(model, [ref.bias for ref in targets.biases]))
    for ref in targets.biases:
        weight = widened.get(ref.weight)
        if ref.input not in activations or weight is None:
            continue
        need = np.abs(values[ref.bias].reshape(-1)).astype(np.float64) / (activations[ref.input].scale * INT32_MAX)
        need *= BIAS_FIT_MARGIN
        if isinstance(weight, Encoding):
            if weight.scale < need.max(initial=0.0):
                widened[ref.weight] = replace(weight, scale=float(need.max()))
        elif need.size == len(weight.channels) and np.any(need > weight.scales()):
            widened[ref.weight] = ChannelEncodings(weight.axis, tuple(
                replace(channel, scale=float(n)) if channel.scale < n else channel
                for channel, n in zip(weight.channels, need, strict=True)))
    return widened


def bias_encodings(
    model: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    weights: dict[str, ParamEncoding],
    bitwidth: int,
) -> dict[str, ParamEncoding]:
    """Bias encodings as ``snpe-dlc-quantize --bias_bitwidth`` makes them.

    32 bits: scale = input scale x weight scale (per channel where the weight is per channel),
    signed; where the largest bias would not fit in int32 the bias scale is widened, which the HTP
    does not follow: the pipeline widens the weight scale first (widened_for_biases), so that this
    only happens to encodings made elsewhere. 8 bits: the bias's own min-max.
    """
    encodings: dict[str, ParamEncoding] = {}
    values = dict(initializer_values(model, [ref.bias for ref in targets.biases]))
    for ref in targets.biases:
        array = values[ref.bias]
        weight = weights.get(ref.weight)
        if bitwidth != 32:
            encodings[ref.bias] = asymmetric_encoding(float(array.min()), float(array.max()), bitwidth)
        elif ref.input in activations and isinstance(weight, Encoding):
            scale = activations[ref.input].scale * weight.scale
            encodings[ref.bias] = bias_encoding(max(scale, float(np.abs(array).max(initial=0.0)) / INT32_MAX), 32)
        elif ref.input in activations and weight is not None and array.size == len(weight.channels):
            scales = activations[ref.input].scale * weight.scales()
            scales = np.maximum(scales, np.abs(array.reshape(-1)).astype(np.float64) / INT32_MAX)
            encodings[ref.bias] = ChannelEncodings(0, tuple(bias_encoding(float(s), 32) for s in scales))
    return encodings
