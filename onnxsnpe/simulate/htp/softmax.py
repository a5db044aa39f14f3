"""The HTP's 8-bit Softmax over its last axis, for the output encoding Softmax has, [0, 1] in steps of 1/255.

Over two values (decoded exactly; tools/HTP.md finding 26, a helper's probes: 80,000 outputs, every
one; float softmax then rounding missed 839) the HTP computes the second value as a sigmoid of the
code difference and the first as what is left of 255: ``out1 = floor(255 sigmoid(s (q1 - q0)) +
1/2)``, ``out0 = 255 - out1`` (so two equal inputs give 127 and 128).

Over 17 values or more it runs a fixed-point kernel: a Q15 table of ``2^-x`` indexed by each code's
distance ``k`` below the row's largest, ``x = k c'`` with ``c' = s / ln 2`` truncated to 8
significant bits and a multiple of 2^-13, ``e_k = P(frac x) >> floor x``; then ``min(255,
floor(255 e / (S - 1) + 1/2))`` with ``S`` the row's sum of ``e``. The table's values ``P`` are not
decoded exactly: EXP_TABLE_FIT is a quadratic per quarter of ``frac x`` fitted to 431 values measured
on the emulator (83% of held-out ones exact, none more than 1 off), and ``255 / (S - 1)`` stands for a
reciprocal that stays within 6e-5 of it. So this kernel is not bit-exact: on held-out probes (rows of
17 to 6,625 values, 8 encodings) 21 of 479,353 outputs differ, where float softmax then rounding
differs in 3,067. Rows of 3 to 16 values run yet another kernel, not decoded: left to the float
computation.

A 16-bit Softmax with the output encoding [0, 1] in steps of 1/65535 (rows of 17 values or more) runs
the same table kernel (tools/HTP.md finding 47): ``c'`` is a multiple of 2^-22 instead, the table is
the same Q15 ``P(frac x) >> floor x`` over all 65,536 code distances, and the output is
``min(65535, floor(65536 e / S))``: floored, and the sum not reduced by one. On held-out probes
(rows of 24 to 6,625 values, 6 input encodings) 0.7% of outputs are off, by at most two steps, where
float softmax then rounding misses 41%; the remaining steps are the fitted table's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import Encoding
from ...graph.ops import node_attributes
from .codes import (
    SUFFIX,
    Context,
    Lowered,
    centered_codes,
    int8,
    of_bitwidth,
    output_encoding,
    reduction,
    with_output_codes,
)

LEVELS = 255
"""The output codes of an 8-bit Softmax on [0, 1]."""

WIDE_LEVELS = 65535
"""The output codes of a 16-bit Softmax on [0, 1]."""

WIDE_MULTIPLIER_BITS = 22
"""A 16-bit Softmax's ``c'``: ``s / ln 2`` in float32 floored to a multiple of 2^-22 (tools/HTP.md finding 47)."""

TABLE_ROWS = 17
"""The shortest row the HTP computes with its exponential table (rows of 3 to 16 run another kernel)."""

EXP_TABLE_FIT = np.array([[32767.517, -5663.136, 450.232],
                          [27554.638, -4764.670, 380.580],
                          [23170.596, -4006.007, 319.586],
                          [19483.854, -3368.914, 268.953]])
"""Per quarter ``q`` of ``f`` in [0, 1): ``P = a + b t + c t^2`` with ``t = 4 f - q``, the HTP's Q15 table
of ``2^15 2^-f`` as fitted to 431 measured values (tools/HTP.md finding 26; not an exact rule)."""


def exp_table(in_scale: float, levels: int = LEVELS) -> np.ndarray:
    """The HTP's exponential for each code distance ``k`` = 0..``levels`` below a row's largest code, as
    EXP_TABLE_FIT models it (int64; 0 from ``k c' >= 15``); ``levels`` 65535 for a 16-bit input."""
    multiplier = float(np.float32(np.float32(in_scale) * np.float32(1 / np.log(2))))
    if levels == LEVELS:
        shift = min(13, 7 - int(np.floor(np.log2(multiplier))))  # 8 significant bits, a multiple of 2^-13
    else:
        shift = WIDE_MULTIPLIER_BITS
    multiplier = np.floor(multiplier * 2.0**shift) / 2.0**shift
    x = np.arange(levels + 1) * multiplier
    whole = np.floor(x).astype(np.int64)
    fraction = x - whole
    quarter = np.minimum(np.floor(fraction * 4), 3).astype(np.int64)
    t = fraction * 4 - quarter
    a, b, c = EXP_TABLE_FIT[quarter].T
    table = np.minimum(np.round(a + b * t + c * t * t), 2**15 - 1).astype(np.int64)
    table[fraction == 0] = 2**15 - 1
    return table >> np.minimum(whole, 62)


def lower_softmax(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """An 8-bit Softmax over a last axis of two, or of TABLE_ROWS or more, or a 16-bit one over TABLE_ROWS or
    more, with the [0, 1] output encoding, as the HTP computes it (the module docstring); None for other
    rows, left to the float computation."""
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    shape = context.shapes.get(node.input[0]) or []
    axis = node_attributes(node).get("axis", -1 if context.opset >= 13 else 1)
    if not shape or axis % len(shape) != len(shape) - 1 or not isinstance(shape[-1], int):
        return None
    if of_bitwidth(16, x_enc, y_enc):
        if y_enc.offset != 0 or not np.isclose(y_enc.scale, 1 / WIDE_LEVELS, rtol=1e-6) or shape[-1] < TABLE_ROWS:
            return None
        return _table_softmax(node, context, x_enc, y_enc, wide=True)
    if not int8(x_enc, y_enc):
        return None
    if y_enc.offset != 0 or not np.isclose(y_enc.scale, 1 / LEVELS, rtol=1e-6):
        return None
    if shape[-1] >= TABLE_ROWS:
        return _table_softmax(node, context, x_enc, y_enc)
    if shape[-1] != 2:
        return None
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = centered_codes(node.input[0], x_enc, p + "codes32")
    inits += [
        numpy_helper.from_array(np.array([[-1.0], [1.0]]), p + "difference"),  # q1 - q0 as a product
        numpy_helper.from_array(np.array(float(np.float32(x_enc.scale))), p + "in_scale"),
        numpy_helper.from_array(np.array(float(LEVELS)), p + "levels"),
        numpy_helper.from_array(np.array(0.5), p + "half"),
        numpy_helper.from_array(np.array(LEVELS + 0.5), p + "rest"),
    ]
    chain += [
        make("Cast", [p + "codes32"], [p + "codes"], to=onnx.TensorProto.DOUBLE),
        make("MatMul", [p + "codes", p + "difference"], [p + "steps"]),
        make("Mul", [p + "steps", p + "in_scale"], [p + "argument"]),
        make("Sigmoid", [p + "argument"], [p + "sigmoid"]),
        make("Mul", [p + "sigmoid", p + "levels"], [p + "scaled"]),
        make("Add", [p + "scaled", p + "half"], [p + "second"]),  # out1 + 1/2 before the floor
        make("Floor", [p + "second"], [p + "second_code"]),
        make("Sub", [p + "rest", p + "second_code"], [p + "first"]),  # 255 - out1, + 1/2
        make("Concat", [p + "first", p + "second"], [p + "shifted"], axis=-1),
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])


def _table_softmax(node: onnx.NodeProto, context: Context, x_enc: Encoding, y_enc: Encoding,
                   wide: bool = False) -> Lowered:
    """The table kernel (module docstring) in float64: distances from the row's largest code, the table
    gathered, the row sum, ``255 e / (S - 1) + 1/2`` floored and clamped by with_output_codes; with
    ``wide`` (16 bits) ``65536 e / S`` floored."""
    p = f"{node.output[0]}{SUFFIX}/"
    make = helper.make_node
    chain, inits = centered_codes(node.input[0], x_enc, p + "codes32")
    levels = WIDE_LEVELS if wide else LEVELS
    inits += [
        numpy_helper.from_array(exp_table(x_enc.scale, levels).astype(np.float64), p + "table"),
        # the output's numerator: 2^16 at 16 bits, 255 at 8
        numpy_helper.from_array(np.array(float(levels + 1 if wide else levels)), p + "numerator"),
    ]
    if not wide:
        inits += [numpy_helper.from_array(np.array(1.0), p + "one"), numpy_helper.from_array(np.array(0.5), p + "half")]
    largest, largest_inits = reduction("ReduceMax", p + "codes32", p + "largest", [-1], True, context.opset)
    total, total_inits = reduction("ReduceSum", p + "exp", p + "sum", [-1], True, context.opset)
    inits += largest_inits + total_inits
    chain += [
        largest,
        make("Sub", [p + "largest", p + "codes32"], [p + "distance32"]),
        make("Cast", [p + "distance32"], [p + "distance"], to=onnx.TensorProto.INT64),
        make("Gather", [p + "table", p + "distance"], [p + "exp"], axis=0),
        total,
    ]
    if wide:  # 65536 e / S, floored by with_output_codes
        chain += [
            make("Div", [p + "exp", p + "sum"], [p + "share"]),
            make("Mul", [p + "share", p + "numerator"], [p + "shifted"]),
        ]
    else:
        chain += [
            make("Sub", [p + "sum", p + "one"], [p + "divisor"]),
            make("Div", [p + "exp", p + "divisor"], [p + "share"]),
            make("Mul", [p + "share", p + "numerator"], [p + "scaled"]),
            make("Add", [p + "scaled", p + "half"], [p + "shifted"]),
        ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", node.output[0])
