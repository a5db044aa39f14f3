"""onnxsnpe: post-training quantization of FP32 ONNX models for Qualcomm SNPE and QNN."""

__version__ = "0.1.0"

from .api import QuantizeResult, quantize
from .calibration import ImageOptions
from .errors import OnnxSnpeError

__all__ = ["ImageOptions", "OnnxSnpeError", "QuantizeResult", "__version__", "quantize"]
