"""Where the HTP emulator refuses a QDQ model: the first refused prefix and the shortest refused window.

    python tools/bisect_htp.py OUT/snpe_qdq.onnx [--htp-arch 73]

Needs onnxruntime-qnn. A whole model the emulator will not finalize (QNN_COMMON_ERROR_MEM_ALLOC
says nothing of where) is cut at the dequantized activations of the QDQ export, in graph order: the
first prefix (graph inputs to one activation) that is refused is found by bisection, then the
latest activation it is computed from such that the window between them, the start's
Quantize/Dequantize pair included, is still refused. Prints both and the window's nodes with the
integer type of each Q/DQ: how the refusals of tools/HTP.md finding 16 and "Not done" were found.
"""

from __future__ import annotations

import argparse
import sys

import onnx
from onnx import numpy_helper

from onnxsnpe.errors import HtpRefused
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.qdq import SUFFIX

RENAMED = ("/float", "/wide", "/computed")
"""Endings of the QDQ export's internal tensor names (the float value before its pair, conversions)."""


def with_renamed_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with shapes inferred and copied to the QDQ export's internal names, which the
    com.microsoft Q/DQ nodes hide from onnx's shape inference (the Extractor needs them)."""
    model = onnx.shape_inference.infer_shapes(model)
    for info in list(model.graph.value_info):
        for ending in RENAMED:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = f"{info.name}{SUFFIX}{ending}"
            model.graph.value_info.append(copy)
    return model


def ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Every tensor ``tensor`` is computed from."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found, todo = set(), [tensor]
    while todo:
        node = producer.get(todo.pop())
        for name in node.input if node is not None else ():
            if name and name not in found:
                found.add(name)
                todo.append(name)
    return found


def window_inputs(model: onnx.ModelProto, start: str, end: str) -> list[str]:
    """The inputs of the window from ``start`` to ``end``: ``start`` and every graph input ``end`` is
    still computed from without passing through it (an attention mask's branch), which the window
    must declare or onnxruntime rejects it as invalid, not the emulator."""
    producer = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {value.name for value in model.graph.input}
    found, seen, todo = set(), set(), [end]
    while todo:
        name = todo.pop()
        if name in seen or name == start:
            continue
        seen.add(name)
        if name in graph_inputs:
            found.add(name)
        elif name in producer:
            todo.extend(tensor for tensor in producer[name].input if tensor)
    return [start, *sorted(found)]


def finalizes(extractor: onnx.utils.Extractor, inputs: list[str], outputs: list[str], arch: str | None) -> bool:
    """Whether the emulator finalizes the part of the model from ``inputs`` to ``outputs``."""
    try:
        HtpSession(extractor.extract_model(inputs, outputs), {}, arch)
        return True
    except HtpRefused:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a QDQ model (snpe_qdq.onnx)")
    parser.add_argument("--htp-arch", help="the HTP architecture to ask for (default: as --htp chooses)")
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    model = with_renamed_shapes(onnx.load(args.model))
    constants = {init.name for init in model.graph.initializer}
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    cuts = [node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"
            and node.input[0] not in constants and not node.output[0].endswith(RENAMED)
            and node.output[0] not in inputs]
    extractor = onnx.utils.Extractor(model)
    if finalizes(extractor, inputs, outputs, args.htp_arch):
        print("the emulator finalizes the whole model")
        return 0
    low, high = 0, len(cuts) - 1
    if finalizes(extractor, inputs, [cuts[high]], args.htp_arch):
        print("every prefix up to the last activation finalizes: the refusal is in the graph outputs' tail")
        return 0
    while low < high:
        middle = (low + high) // 2
        if finalizes(extractor, inputs, [cuts[middle]], args.htp_arch):
            low = middle + 1
        else:
            high = middle
    end = cuts[low]
    print(f"first refused prefix: graph inputs -> {end} ({low + 1} of {len(cuts)} activations)")
    above = ancestors(model, end)
    start = next((cut for cut in reversed(cuts[:low]) if cut in above
                  and not finalizes(extractor, window_inputs(model, cut + SUFFIX + "/float", end), [end],
                                    args.htp_arch)), None)
    if start is None:
        print("no shorter window is refused: the refusal needs the graph inputs' part too")
        return 0
    print(f"shortest refused window: {start} (its Q/DQ included) -> {end}")
    window = extractor.extract_model(window_inputs(model, start + SUFFIX + "/float", end), [end])
    values = {init.name: numpy_helper.to_array(init) for init in window.graph.initializer}
    for node in window.graph.node:
        kind = ""
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            kind = f" [{values[node.input[2]].dtype}]" if node.input[2] in values else ""
        print(f"  {node.op_type}{kind}: {', '.join(node.input)} -> {', '.join(node.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
