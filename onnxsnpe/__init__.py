"""onnxsnpe: post-training quantization of FP32 ONNX models for Qualcomm SNPE and QNN.

The pipeline runs in stages, one subpackage each, data flowing one way:
graph -> data -> stats -> encode -> optimize -> simulate -> report, with export, api, compare and
cli on top. ``quantize`` and ``compare`` load on first use, so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .data.datasets import ImageOptions
from .errors import OnnxSnpeError

if TYPE_CHECKING:
    from .api import QuantizeResult, quantize
    from .compare import CompareResult, compare

_LAZY = {"quantize": "api", "QuantizeResult": "api", "compare": "compare", "CompareResult": "compare"}

__all__ = ["CompareResult", "ImageOptions", "OnnxSnpeError", "QuantizeResult", "__version__", "compare", "quantize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
