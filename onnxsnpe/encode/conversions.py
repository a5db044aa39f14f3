"""Where an 8-bit tensor is converted to the same grid at 16 bits around an op: every op computes at one bitwidth.

onnxruntime's quantizer writes a boundary between 8-bit and 16-bit regions as a DequantizeLinear
then QuantizeLinear (a QNN Convert). An op whose activation inputs and output differ in bitwidth is
not one the HTP runs as written (tools/HTP.md findings 16, 30 and 32):
- the QNN execution provider hands such an op to the HTP as a float island (DequantizeLinear, the op
  in float, QuantizeLinear: its QNN graph dump shows Conv, GlobalAveragePool and Sigmoid so), whose
  DequantizeLinear misreads 8-bit codes by rules that depend on the graph around it (Conv, Gemm,
  Add, Sub and Mul in probes and real graphs);
- the emulator refuses to finalize some of them outright: a Div (QNN_COMMON_ERROR_MEM_ALLOC when a
  Conv reads it, whatever the bitwidth of its constant; PP-OCR cls's hard-swish tails), a
  HardSigmoid (PP-OCRv4 rec), a Sqrt (probes), a grouped Conv with unequal strides (PP-OCR cls's
  ``conv10_depthwise``) and a MatMul with a 16-bit input whose bias Add is 8-bit (MiniLM-L6's query
  projections under automatic mixed precision).
So every op but those that only move data (which share their input's encoding) runs at the wider
of the two bitwidths, a constant it reads (a Div's, an Add's) encoded at it
(constants.constant_encodings), and the 8-bit side moves to the same grid at 16 bits
(encoding.same_grid_wider): an 8-bit input is converted before the op, which loses nothing, and an
8-bit output is computed on the 16-bit grid and converted after it (a second rounding that differs
from rounding once only at ties). The QDQ export writes the conversions, and the HTP computes every
op quantized (emulator.HtpSession.float_nodes checks it); the HTP simulation computes an op with a
converted input with the 16-bit encoding the HTP sees (for a Conv, the A16W8 rules), and one with a
converted output on the 16-bit grid, narrowed after.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from ..graph.ops import DATA_MOVEMENT
from ..graph.targets import QuantTargets
from .encoding import Encoding, same_grid_wider

HTP_FIXED_16_BIT = {"HardSigmoid": Encoding(bitwidth=16, scale=2.0**-16, offset=0)}
"""Output encodings the HTP uses at 16 bits whatever the graph says (tools/HTP.md finding 17;
ranges.with_htp_fixed_encodings gives them)."""
def runs_at_wider_bitwidth(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s activation inputs and output are put at one bitwidth: all but the ops that
    only move data (module docstring)."""
    return node.op_type not in DATA_MOVEMENT


def operating_bitwidth(node: onnx.NodeProto, targets: QuantTargets, activations: dict[str, Encoding]) -> int | None:
    """The bitwidth ``node`` computes in: its output's (that of a Relu/Clip squashed into it), or where
    runs_at_wider_bitwidth the widest of its output and activation inputs; None when its output has
    no encoding."""
    output = activations.get(targets.squashed.get(node.output[0], node.output[0])) if node.output else None
    if output is None:
        return None
    if not runs_at_wider_bitwidth(node):
        return output.bitwidth
    return max([output.bitwidth, *(activations[name].bitwidth for _, name in targets.activation_inputs(node)
                                   if name in activations)])


def _computing_at_16_bits(
    graph: onnx.GraphProto, targets: QuantTargets, activations: dict[str, Encoding]
) -> Iterator[onnx.NodeProto]:
    """The nodes that need one bitwidth (runs_at_wider_bitwidth) and compute in 16 bits."""
    return (node for node in graph.node
            if runs_at_wider_bitwidth(node) and operating_bitwidth(node, targets, activations) == 16)


def widened_inputs(
    graph: onnx.GraphProto, targets: QuantTargets, activations: dict[str, Encoding]
) -> dict[str, dict[int, Encoding]]:
    """For each node (by its first output) that reads an 8-bit activation converted to 16 bits: the
    index of each such input and the 16-bit encoding it is converted to (a fused op's last node: its
    input, at 0, as the fused op reads it)."""
    widened: dict[str, dict[int, Encoding]] = {}
    for node in _computing_at_16_bits(graph, targets, activations):
        for index, name in targets.activation_inputs(node):
            enc = activations.get(name)
            if enc is not None and enc.bitwidth == 8 and not enc.is_symmetric:
                widened.setdefault(node.output[0], {})[index] = same_grid_wider(enc, 16)
    return widened


def widened_outputs(
    graph: onnx.GraphProto, targets: QuantTargets, activations: dict[str, Encoding]
) -> dict[str, Encoding]:
    """Each 8-bit output of a node that computes it at 16 bits, by the name of the tensor that carries
    its encoding (that of a Relu/Clip squashed into the node), with the 16-bit encoding it is
    computed in before it is converted: the same grid at 16 bits, or the one the HTP fixes for the op
    (HTP_FIXED_16_BIT: a HardSigmoid's)."""
    widened: dict[str, Encoding] = {}
    for node in _computing_at_16_bits(graph, targets, activations):
        name = targets.squashed.get(node.output[0], node.output[0])
        output = activations[name]
        if output.bitwidth == 8 and not output.is_symmetric:
            widened[name] = HTP_FIXED_16_BIT.get(node.op_type) or same_grid_wider(output, 16)
    return widened
