"""How well each weight tensor survives quantization, and what per-channel or 16 bits would gain.

Figures are SQNRs of the weight values themselves (fast, no data needed): as exported (per-tensor,
the chosen bitwidth), per-channel symmetric at the same bitwidth (SNPE's per-channel mode), and
per-tensor at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..encode.encoding import ChannelEncodings, ParamEncoding, asymmetric_encoding, fake_quantize, per_channel_symmetric
from ..graph.load import initializer_values
from .metrics import inner, json_db, sqnr_db


@dataclass
class WeightFigures:
    """SQNRs of one weight tensor's quantization."""

    name: str
    op: str
    shape: tuple[int, ...]
    encoding: ParamEncoding
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
            "per_channel": isinstance(self.encoding, ChannelEncodings),
            "sqnr_db": json_db(self.sqnr_db),
            "per_channel_sqnr_db": None if self.per_channel_sqnr_db is None else json_db(self.per_channel_sqnr_db),
            "sixteen_bit_sqnr_db": json_db(self.sixteen_bit_sqnr_db),
            "per_channel_gain_db": None if self.per_channel_gain_db is None else json_db(self.per_channel_gain_db),
            "sixteen_bit_gain_db": json_db(self.sixteen_bit_gain_db),
        }


def analyze_weights(
    model: onnx.ModelProto,
    weights: dict[str, ParamEncoding],
    axes: dict[str, int | None],
    exported: onnx.ModelProto | None = None,
) -> list[WeightFigures]:
    """Figures for every weight with an encoding, in initializer order; ``axes`` maps each weight to
    its output-channel axis (graph.targets.QuantTargets.weight_axes). ``exported`` holds the weights
    as written when a step rounded them (AdaRound): "as exported" is then their error against ``model``'s."""
    written = initializer_values(exported, list(weights)) if exported is not None else {}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            if name in weights and name not in users:
                users[name] = node.op_type
    figures = []
    for name, array in initializer_values(model, list(weights)).items():
        enc = weights[name]
        axis = axes.get(name)
        sixteen = asymmetric_encoding(float(array.min()), float(array.max()), 16)
        per_channel = None
        if axis is not None:
            absmax = np.abs(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)).max(axis=1)
            per_channel = _sqnr(array, fake_quantize(array, per_channel_symmetric(absmax, axis, enc.bitwidth)))
        figures.append(
            WeightFigures(
                name=name,
                op=users[name],
                shape=tuple(array.shape),
                encoding=enc,
                sqnr_db=_sqnr(array, fake_quantize(written.get(name, array), enc)),
                per_channel_sqnr_db=per_channel,
                sixteen_bit_sqnr_db=_sqnr(array, fake_quantize(array, sixteen)),
            )
        )
    return figures


def _sqnr(reference: np.ndarray, quantized: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    err = quantized.astype(np.float64) - ref
    return sqnr_db(inner(ref, ref), inner(err, err))
