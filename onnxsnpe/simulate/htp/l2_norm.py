"""The HTP's L2Norm (a fused L2 normalization: graph/fusions.py) over the last axis, at 8 and 16 bits.

Decoded from a helper's emulator probes (tools/HTP.md finding 41; v68, v73, v75 and v79 alike). Per
row of centered input codes ``c`` (the input's scale and zero point matter no further):

- ``S = sum(c^2)``, an exact integer rounded to float32, and ``r`` its reciprocal square root by the
  LayerNorm's magic-constant method with two float32 Newton steps (layer_norm.rsqrt_nodes);
- ``v = float32(float32(c r) / s_out)``, and at 8 bits, in the rows the kernel's tiling leaves over
  (float16_rows), ``v`` rounded to float16;
- ``out = trunc(v) + z_out``, truncated towards zero (about half the codes one step from exact
  rounding), clamped, except that at 16 bits a code below 0 comes out as the top code, 65,535 (as
  if saturated as an unsigned number; the encode stage gives a 16-bit L2 normalization the range
  [-1, 1] so that it cannot happen: ranges.with_htp_fixed_encodings).

Bit for bit on every one of 430,737 8-bit probe values; at 16 bits 96 of 430,737 one step off (the
HTP's ``r``, and its ``S`` past 2^22, differ from this model by a few float32 units, not decoded).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .codes import SUFFIX, Context, Lowered, centered_codes, reduction, with_output_codes
from .layer_norm import rsqrt_nodes

TILE = 8
"""The kernel's rows come in blocks of 8 along QNN's H and W axes (float16_rows)."""
WIDE_ROWS = 64
"""A leftover row keeps float32 only when W is a multiple of TILE and at least this."""


def float16_rows(shape: list[int]) -> np.ndarray:
    """Which rows of an 8-bit L2Norm over the last axis of ``shape`` round ``v`` to float16 (shape
    ``shape[:-1] + [1]``). QNN sees the input as [B, H, W, N] (a rank-2 or rank-3 input with H = 1 and
    W its row count); rows in whole blocks of 8 along H keep float32 when W >= 8, the rows left over
    (all of them when H < 8) only when W is a multiple of 8 and at least 64. Measured on about 90
    shapes: MiniLM-L6's [1, 384] rounds; [1, 128, 384] would not."""
    lead = list(shape[:-1])
    if len(lead) <= 2:
        batches, height, width = 1, 1 if len(lead) < 2 else lead[0], lead[-1] if lead else 1
    else:
        batches, height, width = int(np.prod(lead[:-2])), lead[-2], lead[-1]
    rounded = np.ones((batches, height, width), dtype=bool)
    whole = height // TILE * TILE
    if width >= TILE:
        rounded[:, :whole, :] = False
    if width % TILE == 0 and width >= WIDE_ROWS:
        rounded[:, whole:, :] = False
    return rounded.reshape([*lead, 1])


def lower_l2_norm(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The last node (a Div) of a fused L2 normalization over the last axis with asymmetric 8- or
    16-bit input and output and a static shape, as the HTP computes it; None otherwise."""
    fusion = context.targets.fusions.get(node.output[0]) if node.output else None
    if fusion is None or fusion.op_type != "LpNormalization":
        return None
    x_enc, y_enc = context.activations.get(fusion.input), context.activations.get(fusion.output)
    shape = context.shapes.get(fusion.input)
    if (x_enc is None or y_enc is None or x_enc.is_symmetric or y_enc.is_symmetric
            or y_enc.bitwidth not in (8, 16) or not shape or any(d is None for d in shape)
            or dict(fusion.attributes)["axis"] not in (-1, len(shape) - 1)):
        return None
    p = f"{fusion.output}{SUFFIX}/"
    make = helper.make_node
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    chain, inits = centered_codes(fusion.input, x_enc, p + "c")
    total, axes_init = reduction("ReduceSum", p + "squares", p + "sum", [len(shape) - 1], True, context.opset)
    chain += [make("Cast", [p + "c"], [p + "c64"], to=double), make("Mul", [p + "c64", p + "c64"], [p + "squares"]),
              total]
    rsqrt, rsqrt_inits = rsqrt_nodes(p + "sum", p + "r64", p)
    inits += [*axes_init, *rsqrt_inits,
              numpy_helper.from_array(np.array(y_enc.scale, dtype=np.float32), p + "scale32"),
              numpy_helper.from_array(np.array(-y_enc.offset, dtype=np.float64), p + "zero_point64")]
    chain += [*rsqrt, make("Cast", [p + "r64"], [p + "r"], to=single), make("Mul", [p + "c", p + "r"], [p + "y"]),
              make("Div", [p + "y", p + "scale32"], [p + "v32"])]
    value = p + "v32"
    rows = float16_rows(shape) if y_enc.bitwidth == 8 else np.zeros(1, dtype=bool)
    if rows.any():
        inits.append(numpy_helper.from_array(rows, p + "float16_rows"))
        chain += [make("Cast", [value], [p + "v16"], to=onnx.TensorProto.FLOAT16),
                  make("Cast", [p + "v16"], [p + "v16_32"], to=single),
                  make("Where", [p + "float16_rows", p + "v16_32", value], [p + "v"])]
        value = p + "v"
    chain += [make("Abs", [value], [p + "magnitude"]), make("Floor", [p + "magnitude"], [p + "whole"]),
              make("Sign", [value], [p + "sign"]), make("Mul", [p + "whole", p + "sign"], [p + "truncated"]),
              make("Cast", [p + "truncated"], [p + "truncated64"], to=double),
              make("Add", [p + "truncated64", p + "zero_point64"], [p + "code64"])]
    code = p + "code64"
    if y_enc.bitwidth == 16:
        inits += [numpy_helper.from_array(np.array(0.0), p + "zero"),
                  numpy_helper.from_array(np.array(float(y_enc.levels)), p + "top")]
        chain += [make("Less", [code, p + "zero"], [p + "below"]),
                  make("Where", [p + "below", p + "top", code], [p + "wrapped"])]
        code = p + "wrapped"
    return with_output_codes(chain, inits, p, y_enc, code, fusion.output)
