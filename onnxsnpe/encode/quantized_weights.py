"""A model with its weights fake-quantized: the network a calibration with quantized weights runs.

AIMET's calibration (``compute_encodings``) runs the network with its weight quantizers on and its
activation quantizers passing values through (SNPE.md section 5), so the statistics its
TF-enhanced analyzer sees are those of the network with quantized weights. Bias correction
measures the same network.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..graph.large import initializer_array
from .encoding import ParamEncoding, fake_quantize


def quantized_weights(model: onnx.ModelProto, weights: dict[str, ParamEncoding]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``weights`` are fake-quantized with their encodings."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(fake_quantize(initializer_array(init), weights[init.name]),
                                                  init.name))
    return copy
