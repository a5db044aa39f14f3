"""Integer codes handed from one lowered op to the next, instead of dequantized and derived again.

A lowered op (model.py) ends by clamping its output codes and dequantizing them; the next lowered op
derives the same codes back from the dequantized tensor (codes.centered_codes: a Mul by the
inverse scale and a Round, two passes over the tensor). Where the encodings agree the codes are
already there: the consumer reads them directly, through a Pad between the two (which pads the
codes with the code of its constant). The results are the same numbers: centered_codes gives
exactly the codes its input was dequantized from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import INVERSE_SCALE, dequantizing_mul


@dataclass(frozen=True)
class Codes:
    """The tensor holding a dequantized tensor's centered codes, and its float32 scale."""

    name: str
    scale: np.float32


def produced_codes(chain: list[onnx.NodeProto], output: str, scale: float) -> Codes | None:
    """The codes of a lowering whose last node dequantizes them into ``output`` (codes.integer_op,
    codes.with_output_codes), or None."""
    last = dequantizing_mul(chain, output)
    return None if last is None else Codes(last.input[0], np.float32(scale))


def reuse_codes(chain: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                known: dict[str, Codes]) -> list[onnx.NodeProto]:
    """``chain`` with each code derivation (centered_codes' Mul and Round) of a tensor whose codes are
    ``known`` at the same scale replaced by an Identity of those codes (which onnxruntime removes)."""
    by_name = {init.name: init for init in inits}
    producers = {name: node for node in chain for name in node.output}
    dropped: set[int] = set()
    replaced: dict[int, onnx.NodeProto] = {}
    for position, node in enumerate(chain):
        scaling = producers.get(node.input[0]) if node.op_type == "Round" else None
        if scaling is None or scaling.op_type != "Mul" or not scaling.input[1].endswith(INVERSE_SCALE):
            continue
        codes = known.get(scaling.input[0])
        inverse = by_name.get(scaling.input[1])
        if codes is None or inverse is None or initializer_array(inverse) != np.float32(1) / codes.scale:
            continue
        dropped.add(id(scaling))
        replaced[position] = helper.make_node("Identity", [codes.name], list(node.output))
    return [replaced.get(position, node) for position, node in enumerate(chain) if id(node) not in dropped]


def pad_codes(node: onnx.NodeProto, known: dict[str, Codes],
              constants: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, onnx.TensorProto | None] | None:
    """A Pad of the codes of ``node``'s input, the same Pad on the dequantized tensor, or None
    (input codes unknown, or a pad value that is not a constant). Its output is named after the
    node's with a suffix; the pad value becomes its code, rounded as centered_codes rounds."""
    codes = known.get(node.input[0]) if node.op_type == "Pad" and node.input else None
    if codes is None:
        return None
    attrs = node_attributes(node)
    value = float(attrs.get("value", 0.0))  # before opset 11
    inputs = list(node.input)
    if len(inputs) > 2 and inputs[2]:
        if inputs[2] not in constants:
            return None
        value = float(initializer_array(constants[inputs[2]]))
    output = node.output[0] + "__onnxsnpe_codes"
    code = np.round(np.float32(value) * (np.float32(1) / codes.scale)).astype(np.float32)
    init = None
    inputs[0] = codes.name
    if len(inputs) > 2 and inputs[2]:
        init = numpy_helper.from_array(np.array(code), output + "/value")
        inputs[2] = init.name
    padded = helper.make_node("Pad", inputs, [output], name=output)
    for attr in node.attribute:
        padded.attribute.append(attr)
    if "value" in attrs:
        padded.attribute.remove(next(a for a in padded.attribute if a.name == "value"))
        padded.attribute.append(helper.make_attribute("value", float(code)))
    known[node.output[0]] = Codes(output, codes.scale)
    return padded, init
