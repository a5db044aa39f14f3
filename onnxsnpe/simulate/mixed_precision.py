"""Where the HTP reads an 8-bit tensor through a conversion to 16 bits.

onnxruntime's quantizer writes a boundary between 8-bit and 16-bit regions as a DequantizeLinear
then QuantizeLinear (a QNN Convert). Without such a conversion the HTP emulator refuses to finalize
a Div that reads an 8-bit activation and writes a 16-bit one when a Conv reads its output
(QNN_COMMON_ERROR_MEM_ALLOC; PP-OCR cls's hard-swish tails under automatic mixed precision,
tools/HTP.md finding 16). Such an input is converted to the same grid at 16 bits
(encoding.same_grid_wider), which loses nothing; the QDQ export writes the conversion and the HTP
simulation computes the op with the 16-bit encoding the HTP then sees.
"""

from __future__ import annotations

import onnx

from ..encode.encoding import Encoding, same_grid_wider
from ..graph.targets import QuantTargets

WIDENED_READERS = ("Div",)
"""The op types that read their 8-bit activation inputs converted to 16 bits when their output is 16-bit."""


def widened_inputs(
    graph: onnx.GraphProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
) -> dict[str, dict[int, Encoding]]:
    """For each node (by its first output) that reads an 8-bit activation converted to 16 bits: the
    index of each such input and the 16-bit encoding it is converted to."""
    widened: dict[str, dict[int, Encoding]] = {}
    for node in graph.node:
        if node.op_type not in WIDENED_READERS or not node.output:
            continue
        out_enc = activations.get(targets.squashed.get(node.output[0], node.output[0]))
        if out_enc is None or out_enc.bitwidth != 16:
            continue
        for index, name in enumerate(node.input):
            enc = activations.get(name)
            if enc is not None and enc.bitwidth == 8 and not enc.is_symmetric:
                widened.setdefault(node.output[0], {})[index] = same_grid_wider(enc, 16)
    return widened
