"""Write ``Shape`` nodes with ``start``/``end`` attributes (opset 15) as ``Shape`` then ``Slice``.

onnx-graphsurgeon's constant folding (0.6) replaces the output of every ``Shape`` node of a static
input by the input's whole shape and ignores ``start`` and ``end``: a ``Shape(x, start=1, end=2)``
of x [1, 64] folds to [1, 64] instead of [64], and the graph downstream breaks (measured on
khmersm's word segmenter, exported by torch.onnx's dynamo exporter: onnxruntime then refuses its
``Slice`` with "Incorrect or missing input value for starts and ends"). A plain ``Shape`` followed
by a ``Slice`` on axis 0 computes the same (both clamp negative and out-of-range bounds the same
way) and folds correctly.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_LAST = np.iinfo(np.int64).max


def split_shape_slices(graph: gs.Graph) -> None:
    """Replace each ``Shape`` with ``start``/``end`` by ``Shape`` + ``Slice``."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)):
            continue
        start = int(node.attrs.pop("start", 0))
        end = node.attrs.pop("end", None)
        if start == 0 and end is None:
            continue
        whole = gs.Variable(f"{node.outputs[0].name}_whole_shape", dtype=np.int64)
        sliced = node.outputs[0]
        node.outputs = [whole]
        bounds = [gs.Constant(f"{sliced.name}_{part}", np.array([value], np.int64))
                  for part, value in (("start", start), ("end", _LAST if end is None else int(end)))]
        graph.nodes.append(gs.Node("Slice", f"{node.name or sliced.name}_slice", inputs=[whole, *bounds],
                                   outputs=[sliced]))
        count += 1
    if count:
        graph.toposort()
