"""Refuse, with one line naming the node, models that are not FP32 graphs of standard ONNX ops.

An already quantized model (onnxruntime's dynamic quantization: DynamicQuantizeLinear feeding
ConvInteger and MatMulInteger, as in ddddocr's common_old.onnx; or static QOperator models with
QLinearConv) computes in integers that onnxsnpe would calibrate as if they were float activations
and SNPE would receive as foreign ops: the FP32 model it was made from is what to quantize.
Ops outside the standard ONNX domain (onnxruntime's ``com.microsoft`` contrib ops such as
DynamicQuantizeLSTM or the fused Gelu its optimizer writes, ``ai.onnx.ml`` ops) have no SNPE
counterpart either (*ours*: SNPE's ONNX converter documentation lists standard ONNX ops only).
"""

from __future__ import annotations

import onnx

from ..errors import OnnxSnpeError

QUANTIZED_OPS = frozenset({
    "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
})
"""Standard ops that only a model quantized already holds."""

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def check_float_model(model: onnx.ModelProto, path: str) -> None:
    """Raise OnnxSnpeError for the first integer-arithmetic or non-standard op of ``model``."""
    for node in model.graph.node:
        label = f"{node.op_type} node '{node.name or node.output[0]}'"
        if node.domain in STANDARD_DOMAINS and node.op_type in QUANTIZED_OPS:
            raise OnnxSnpeError(f"{path}: {label}: the model is already quantized; give onnxsnpe the FP32 model "
                                "it was made from")
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            label = f"{node.op_type} node '{node.name or node.output[0]}'"
            raise OnnxSnpeError(f"{path}: {label} is a {node.domain} op, which SNPE's converter does not take; "
                                "export the model with standard ONNX ops only (and without onnxruntime's "
                                "graph optimizations)")
