"""How well each weight tensor survives quantization, and what per-channel or 16 bits would gain.

Figures are SQNRs of the weight values themselves (fast, no data needed): as exported (per-tensor,
the chosen bitwidth), per-channel symmetric at the same bitwidth (SNPE's per-channel mode), and
per-tensor at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..encode.encoding import Encoding, asymmetric_encoding, fake_quantize, symmetric_encoding
from ..graph.load import initializer_values
from .metrics import inner, json_db, sqnr_db


@dataclass
class WeightFigures:
    """SQNRs of one weight tensor's quantization."""

    name: str
    op: str
    shape: tuple[int, ...]
    encoding: Encoding
    sqnr_db: float
    per_channel_sqnr_db: float | None
    sixteen_bit_sqnr_db: float

    @property
    def per_channel_gain_db(self) -> float | None:
        if self.per_channel_sqnr_db is None:
            return None
        return self.per_channel_sqnr_db - self.sqnr_db

    @property
    def sixteen_bit_gain_db(self) -> float:
        return self.sixteen_bit_sqnr_db - self.sqnr_db

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "bitwidth": self.encoding.bitwidth,
            "sqnr_db": json_db(self.sqnr_db),
            "per_channel_sqnr_db": None if self.per_channel_sqnr_db is None else json_db(self.per_channel_sqnr_db),
            "sixteen_bit_sqnr_db": json_db(self.sixteen_bit_sqnr_db),
            "per_channel_gain_db": None if self.per_channel_gain_db is None else json_db(self.per_channel_gain_db),
            "sixteen_bit_gain_db": json_db(self.sixteen_bit_gain_db),
        }


def output_channel_axis(op: str, node: onnx.NodeProto, weight_rank: int, input_index: int) -> int | None:
    """The axis of a weight that indexes output channels, or None where there is none."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm" and weight_rank == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op == "MatMul" and input_index == 1 and weight_rank >= 2:
        return weight_rank - 1
    return None


def analyze_weights(model: onnx.ModelProto, weights: dict[str, Encoding]) -> list[WeightFigures]:
    """Figures for every weight with an encoding, in initializer order."""
    values = initializer_values(model, list(weights))
    users = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in weights and name not in users:
                users[name] = (node, index)
    figures = []
    for name, array in values.items():
        node, index = users[name]
        enc = weights[name]
        axis = output_channel_axis(node.op_type, node, array.ndim, index)
        sixteen = asymmetric_encoding(float(array.min()), float(array.max()), 16)
        figures.append(
            WeightFigures(
                name=name,
                op=node.op_type,
                shape=tuple(array.shape),
                encoding=enc,
                sqnr_db=_sqnr(array, fake_quantize(array, enc)),
                per_channel_sqnr_db=None if axis is None else _sqnr(array, _per_channel(array, axis, enc.bitwidth)),
                sixteen_bit_sqnr_db=_sqnr(array, fake_quantize(array, sixteen)),
            )
        )
    return figures


def _per_channel(array: np.ndarray, axis: int, bitwidth: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    quantized = np.stack(
        [fake_quantize(channel, symmetric_encoding(float(np.abs(channel).max()), bitwidth)) for channel in moved]
    )
    return np.moveaxis(quantized, 0, axis)


def _sqnr(reference: np.ndarray, quantized: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    err = quantized.astype(np.float64) - ref
    return sqnr_db(inner(ref, ref), inner(err, err))
