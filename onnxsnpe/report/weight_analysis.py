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
from ..graph.large import initializer_array, slabs
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
    rounded = exported is not None and exported is not model
    written = {init.name: init for init in exported.graph.initializer} if rounded else {}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            if name in weights and name not in users:
                users[name] = node.op_type
    figures = []
    for name, array in initializer_values(model, list(weights)):
        enc = weights[name]
        axis = axes.get(name)
        sixteen = asymmetric_encoding(float(array.min()), float(array.max()), 16)
        per_channel = None if axis is None else per_channel_symmetric(_channel_absmax(array, axis), axis,
                                                                        enc.bitwidth)
        exported = initializer_array(written[name]).astype(np.float32, copy=False) if name in written else array
        # signal and noise of: as exported, per channel, 16 bits; a large weight slab by slab
        sums = np.zeros((3, 2))
        for index in _slabs(array, axis, enc):
            ref = array[index]
            quantized = [fake_quantize(exported[index], enc), None if per_channel is None else
                         fake_quantize(ref, per_channel), fake_quantize(ref, sixteen)]
            reference = ref.astype(np.float64)
            for row, values in enumerate(quantized):
                if values is not None:
                    error = values.astype(np.float64) - reference
                    sums[row] += inner(reference, reference), inner(error, error)
        figures.append(
            WeightFigures(
                name=name,
                op=users[name],
                shape=tuple(array.shape),
                encoding=enc,
                sqnr_db=sqnr_db(*sums[0]),
                per_channel_sqnr_db=None if per_channel is None else sqnr_db(*sums[1]),
                sixteen_bit_sqnr_db=sqnr_db(*sums[2]),
            )
        )
    return figures


def _channel_absmax(array: np.ndarray, axis: int) -> np.ndarray:
    """Each output channel's largest magnitude, slab by slab."""
    others = tuple(a for a in range(array.ndim) if a != axis % array.ndim)
    absmax = np.zeros(array.shape[axis], dtype=array.dtype)
    for index in slabs(array.shape, axis):
        np.maximum(absmax, np.abs(array[index]).max(axis=others), out=absmax)
    return absmax


def _slabs(array: np.ndarray, axis: int | None, enc: ParamEncoding):
    """A large model's weight (a memory map) in slabs that keep both the analysed channel axis and the
    encoding's own channel axis whole; any other weight whole (its sums in one order, as always)."""
    own = enc.axis if isinstance(enc, ChannelEncodings) else None
    whole = [tuple(slice(None) for _ in array.shape)]
    if not isinstance(array, np.memmap) or (axis is not None and own is not None
                                            and own % array.ndim != axis % array.ndim):
        return whole
    return slabs(array.shape, axis if axis is not None else own)
