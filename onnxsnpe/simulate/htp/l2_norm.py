"""The HTP's 16-bit L2Norm (a fused L2 normalization: graph/fusions.py): an output below its encoding
comes out at the top code.

Probes of ``DQ -> LpNormalization(p=2) -> Q`` on the emulator (tools/HTP.md finding 41; uint16 in
and out, three output encodings, 16 x 384 values each): every value whose exactly rounded code lies
below 0 comes out as 65,535, the largest code, not 0 (as if a negative code were saturated as an
unsigned number); values above the range saturate at 65,535 as usual. At 8 bits both ends saturate
as expected. MiniLM-L6 at A16 meets it: a held-out sentence's embedding value just under the range
calibrated for it comes out at +0.21 instead of -0.20. Inside the range the kernel is not decoded
(about half its codes are one step from exact rounding, either way), so the value is exact float
then rounding, as the simulation computes elsewhere.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .codes import SUFFIX, Context, Lowered, of_bitwidth, with_output_codes


def lower_l2_norm16(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The last node (a Div) of a fused L2 normalization with a 16-bit asymmetric output, as the HTP
    computes it; None otherwise."""
    fusion = context.targets.fusions.get(node.output[0]) if node.output else None
    if fusion is None or fusion.op_type != "LpNormalization":
        return None
    y_enc = context.activations.get(fusion.output)
    if not of_bitwidth(16, y_enc) or y_enc.is_symmetric:
        return None
    p = f"{fusion.output}{SUFFIX}/"
    make = helper.make_node
    inits = [numpy_helper.from_array(np.array(y_enc.scale, dtype=np.float64), p + "scale64"),
             numpy_helper.from_array(np.array(0.5 - y_enc.offset, dtype=np.float64), p + "zero_point_half"),
             numpy_helper.from_array(np.array(0.0, dtype=np.float64), p + "zero"),
             numpy_helper.from_array(np.array(y_enc.levels + 0.5, dtype=np.float64), p + "top")]
    chain = [
        make("Div", list(node.input), [p + "y"]),
        make("Cast", [p + "y"], [p + "y64"], to=onnx.TensorProto.DOUBLE),
        make("Div", [p + "y64", p + "scale64"], [p + "steps"]),
        make("Add", [p + "steps", p + "zero_point_half"], [p + "shifted_in_range"]),
        make("Less", [p + "shifted_in_range", p + "zero"], [p + "below"]),
        make("Where", [p + "below", p + "top", p + "shifted_in_range"], [p + "shifted"]),
    ]
    return with_output_codes(chain, inits, p, y_enc, p + "shifted", fusion.output)
