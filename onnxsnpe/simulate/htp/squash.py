"""A Relu or Clip squashed into a lowered op, computed as a narrower clamp of the op's output codes.

SNPE keeps only the activation's output (graph/targets.py): the op requantizes straight to the
Relu/Clip's encoding, and the simulation used to run the float Relu/Clip on those on-grid values and
fake-quantize the result again (six elementwise passes). For a monotone rounding ``g`` (fake
quantization, ties up) and an on-grid ``x`` (``g(x) = x``),
``g(clamp(x, lo, hi)) = clamp(x, g(lo), g(hi))``, so the same values come from clamping the op's
output codes to the codes of ``lo`` and ``hi`` as the fake quantization computes them (float32,
ties up): no pass at all.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...encode.encoding import Encoding
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import dequantizing_mul


def activation_bounds(
    node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
) -> tuple[float, float] | None:
    """The (lo, hi) a Relu or Clip clamps to, or None when a bound is not a constant."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    attrs = node_attributes(node)
    bounds = [float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))]  # before opset 11
    for position, name in enumerate(node.input[1:3]):
        if not name:
            continue
        if name not in constants:
            return None
        bounds[position] = float(initializer_array(constants[name]))
    return bounds[0], bounds[1]


def code_bounds(enc: Encoding, lo: float, hi: float) -> tuple[float, float]:
    """The centered codes (value / scale) that fake quantization with ties up gives ``lo`` and ``hi``,
    in its float32 arithmetic (simulate/fake_quant.py)."""
    scale = np.float32(enc.scale)
    low, high = np.float32(enc.offset), np.float32(enc.offset + enc.levels)
    with np.errstate(over="ignore", divide="ignore"):
        codes = np.clip(np.array([lo, hi], dtype=np.float32) / scale, low, high)
    rounded = np.floor(codes + np.float32(0.5))
    return float(rounded[0]), float(rounded[1])


def absorb(
    chain: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    output: str,
    bounds: tuple[float, float],
    new_output: str,
) -> bool:
    """Clamp a lowered op's output codes to centered ``bounds`` too and write its dequantized output
    to ``new_output`` (in place). False, changing nothing, when ``chain`` does not end in the
    requantization of simulate/htp/codes.py (codes clamped by a Clip, maybe uncentered by a Sub,
    dequantized by a Mul writing ``output``)."""
    last = dequantizing_mul(chain, output)
    if last is None:
        return False
    producers = {name: node for node in chain for name in node.output}
    clamp, shift = producers.get(last.input[0]), 0.0
    by_name = {init.name: init for init in inits}
    if clamp is not None and clamp.op_type == "Sub" and clamp.input[1] in by_name:  # uncentered codes
        shift = float(initializer_array(by_name[clamp.input[1]]))
        clamp = producers.get(clamp.input[0])
    if clamp is None or clamp.op_type != "Clip" or len(clamp.input) != 3 or not all(
        name in by_name for name in clamp.input[1:]
    ):
        return False
    old = [float(initializer_array(by_name[name])) for name in clamp.input[1:]]
    low = max(old[0], bounds[0] + shift)
    high = min(old[1], bounds[1] + shift)
    if low > high:
        return False
    for name, value in zip(clamp.input[1:], (low, high), strict=True):  # the lowering's own constants
        by_name[name].CopyFrom(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
    last.output[0] = new_output
    return True
