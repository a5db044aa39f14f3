"""Conv with 16-bit activations and 16-bit weights (A16W16) as HTP v73 and later compute it.

Only v73 and later run 16-bit weights (the emulator refuses them below). Probed on single Convs
(tools/HTP.md finding 20): with ``u`` the uncentered 16-bit input codes (padding at the zero point
``z``), the symmetric int16 weight codes ``w`` after the HTP's cap (capped_codes), ``S = sum(u w)``
and ``B`` the bias in accumulator steps (linear.v73_bias),

    t = floor(S / 2^16) + round(B / 2^16) - floor(z sum(w) / 2^16 + 1/2),

``round`` half away from zero (a negative tie rounds down: tools/HTP.md finding 49),

then requantized as the v73 A16W8 Conv with the point 23 (wide.v73_wide_requant): the output
zero point after the product, a 22-bit multiplier from float32. Bit for bit on 30 sweeps and 128
Conv probes (1x1, 3x3, depthwise 3x3 and 5x5, strided), and a Gemm as a 1x1 Conv (12 probes); the
simulation's exact rounding, which this replaces, was 1 to 9 steps off, and up to 2,135 where a weight code is capped.

``S`` reaches 2^42: the weights are split in two bytes and the input codes in digits
(wide.digit_chain), each Conv's sum exact in float32, combined in float64.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...encode.encoding import ChannelEncodings, fake_quantize, round_half_away
from ...encode.precision import INT16_WEIGHT_CAP, int16_weight_cap
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import Context, Lowered, constant_bias, of_bitwidth, output_encoding
from .linear import v73_bias
from .wide import INT32_HIGH, INT32_LOW, digit_bits, digit_chain, v73_wide_requant

A16W16_SHIFT = 16
"""Bits the HTP drops from the A16W16 accumulator."""


def capped_codes(codes: np.ndarray, attrs: dict) -> np.ndarray:
    """The int16 weight codes the HTP computes with: those above the node's cap
    (encode.precision.int16_weight_cap) become the cap. The encode stage keeps its own 16-bit weight
    encodings below it; codes from elsewhere (a user's fixed ranges) may not be."""
    cap = int16_weight_cap(attrs, codes.shape)
    return np.where(codes > INT16_WEIGHT_CAP, cap, codes)


def lower_a16w16_conv(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The A16W16 Conv, or Gemm ``x W^T + b`` (as a 1x1 Conv), in v73's arithmetic (module docstring),
    or None where it does not apply: other architectures, ops, bitwidths, asymmetric 16-bit weights or
    weights not on the output-channel axis."""
    if (context.arch < 73 or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2
            or node.input[1] not in context.constants):
        return None
    attrs = node_attributes(node)
    if node.op_type == "Gemm" and tuple(attrs.get(key, default) for key, default in (
            ("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))) != (1.0, 1.0, 0, 1):
        return None
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    w_enc = context.params.get(node.input[1])
    weight = initializer_array(context.constants[node.input[1]])
    if not of_bitwidth(16, x_enc, y_enc, w_enc) or weight.ndim != (2 if node.op_type == "Gemm" else 4):
        return None
    per_channel = isinstance(w_enc, ChannelEncodings)
    if not w_enc.is_symmetric or (per_channel and w_enc.axis != 0):  # the codes as int16, zero at 0
        return None
    w_scale = np.float32(w_enc.scales()) if per_channel else np.full(weight.shape[0], np.float32(w_enc.scale))
    along = (-1,) + (1,) * (weight.ndim - 1)
    codes = capped_codes(np.round(fake_quantize(weight, w_enc).astype(np.float64) / w_scale.astype(np.float64)
                                  .reshape(along)), attrs)
    bias_codes, bias_scale, bias_consumed = constant_bias(node.input[2] if len(node.input) > 2 else "", context)
    consumed = {node.input[1]} | bias_consumed
    steps = np.ones(codes.shape[0])
    bias = np.clip(v73_bias(x_enc.scale, w_scale, steps, bias_codes, bias_scale), INT32_LOW, INT32_HIGH)
    zero_sum = -x_enc.offset * codes.sum(axis=tuple(range(1, codes.ndim)))
    # the bias's share rounds half away from zero, the input zero point's ties up (finding 49)
    constant = round_half_away(bias / 2.0**A16W16_SHIFT) - np.floor(zero_sum / 2.0**A16W16_SHIFT + 0.5)
    requant = v73_wide_requant(x_enc.scale, w_scale, y_enc.scale, steps, point=23)
    high = np.floor(codes / 2.0**8)
    parts = [(high, 2.0**8), (codes - high * 2.0**8, 1.0)]  # int16 codes in two bytes
    bits = digit_bits(int(np.prod(codes.shape[1:])), 2.0**8)
    if bits is None:
        return None
    chain, inits = digit_chain(node, x_enc, y_enc, parts, bits, zero_sum, constant, requant, A16W16_SHIFT)
    return chain, inits, consumed
