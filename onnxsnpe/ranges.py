"""From statistics and weights to SNPE encodings: the range methods, calling encoding.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .encoding import Encoding, asymmetric_encoding, bias_encoding
from .errors import OnnxSnpeError
from .statistics import Observer
from .targets import QuantTargets

ACTIVATION_METHODS = ("minmax",)
WEIGHT_METHODS = ("minmax",)
INT32_MAX = 2**31 - 1


def observed_range(observer: Observer, method: str) -> tuple[float, float]:
    """The range a method chooses from a tensor's statistics."""
    if method == "minmax":
        return observer.min, observer.max
    raise OnnxSnpeError(f"unknown range method '{method}'; choose from {', '.join(ACTIVATION_METHODS)}")


def activation_encodings(
    stats: dict[str, Observer], targets: QuantTargets, method: str, bitwidth: int
) -> dict[str, Encoding]:
    """An encoding for every activation, aliases included (they share their root's encoding)."""
    encodings = {}
    for name in targets.activations:
        observer = stats[name]
        if observer.count == 0:
            raise OnnxSnpeError(f"tensor '{name}' produced no values on the calibration data")
        encodings[name] = asymmetric_encoding(*observed_range(observer, method), bitwidth)
    for alias, root in targets.aliases.items():
        encodings[alias] = encodings[root]
    return encodings


def weight_encodings(
    model: onnx.ModelProto, targets: QuantTargets, bitwidth: int, method: str = "minmax"
) -> dict[str, Encoding]:
    """Per-tensor asymmetric encodings of the weights (the seed's SNPE default)."""
    if method not in WEIGHT_METHODS:
        raise OnnxSnpeError(f"unknown weight method '{method}'; choose from {', '.join(WEIGHT_METHODS)}")
    values = initializer_values(model, targets.weights)
    return {
        name: asymmetric_encoding(float(array.min()), float(array.max()), bitwidth)
        for name, array in values.items()
    }


def bias_encodings(
    model: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    weights: dict[str, Encoding],
    bitwidth: int,
) -> dict[str, Encoding]:
    """Bias encodings as ``snpe-dlc-quantize --bias_bitwidth`` makes them.

    32 bits: scale = input scale x weight scale, signed, widened where the largest bias would
    not fit in int32 (*inferred*: SNPE's quantizer is closed source; onnxruntime widens too).
    8 bits: the bias's own min-max.
    """
    encodings = {}
    values = initializer_values(model, [ref.bias for ref in targets.biases])
    for ref in targets.biases:
        array = values[ref.bias]
        if bitwidth != 32:
            encodings[ref.bias] = asymmetric_encoding(float(array.min()), float(array.max()), bitwidth)
        elif ref.input in activations and ref.weight in weights:
            scale = activations[ref.input].scale * weights[ref.weight].scale
            scale = max(scale, float(np.abs(array).max(initial=0.0)) / INT32_MAX)
            encodings[ref.bias] = bias_encoding(scale, 32)
    return encodings


def initializer_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The float arrays of the named initializers."""
    wanted = set(names)
    return {
        init.name: numpy_helper.to_array(init).astype(np.float32)
        for init in model.graph.initializer
        if init.name in wanted
    }
