"""Load an FP32 ONNX model and prepare the deploy graph SNPE's converter will see.

Preparation fixes the input shapes (SNPE needs static shapes), folds constant subgraphs (shape
arithmetic, Constant nodes become initializers whose names the param encodings use; If nodes with
a constant condition become their branch), unrolls Loops of constant trip count (unroll.py), folds
an Add, Sub, Mul or Div by a per-channel constant into the Conv or ConvTranspose before it and
BatchNormalization into a preceding Conv, ConvTranspose or Gemm, as the converter does
(SNPE.md section 4), and drops NaN guards (``Where(IsNaN(t), c, t)``) that a quantized ``t`` always
passes. Nothing else changes the model's meaning.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .inline_if import inline_constant_ifs
from .large import free_dropped_copies, infer_shapes, resolving_external_data, spill, tensor_bytes
from .shape_slices import split_shape_slices
from .unroll import unroll_loops

log = logging.getLogger(__name__)


ort.set_default_logger_severity(3)  # constant folding runs onnxruntime; keep its warnings quiet


def prepare_deploy_model(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, int]:
    """The deploy model: static input shapes, constants folded, BatchNorms folded.

    Returns the model and the number of BatchNormalization nodes folded.
    """
    weight_bytes = tensor_bytes(model)
    with resolving_external_data(model):  # a large model's weights are workspace files
        graph = _folded(gs.import_onnx(_with_input_shapes(model, input_shapes)), weight_bytes)
        written_out, loops = unroll_loops(gs.export_onnx(graph))
        if loops:  # a Loop whose trip count folded to a constant: its copies fold further
            graph = _folded(gs.import_onnx(_infer_shapes(written_out)), weight_bytes)
        del written_out
        free_dropped_copies(weight_bytes)  # the graphs left behind, with their weights
        drop_nan_guards(graph)
        elementwise = fold_into_convolutions(graph)  # first, so that a BatchNorm after them folds too
        folded = fold_batchnorms(graph)
        if elementwise:
            log.debug("folded %d Add/Sub/Mul/Div by a constant into the convolution before it", elementwise)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        prepared = _infer_shapes(gs.export_onnx(graph))
    prepared.producer_name = "onnxsnpe"
    del graph
    free_dropped_copies(weight_bytes)
    spill(prepared)  # weights made by folding go to the workspace too
    return prepared, folded


def _folded(graph: gs.Graph, weight_bytes: int) -> gs.Graph:
    """``graph`` (of ``weight_bytes`` of weights) with its constant subgraphs folded (If nodes with a
    constant condition flattened)."""
    split_shape_slices(graph)  # onnx-graphsurgeon folds them ignoring start and end
    previous = None
    for _ in range(8):  # folding shapes and inlining branches expose more constants; until nothing changes
        graph.fold_constants(fold_shapes=True, error_ok=True, flatten_subgraphs=False)
        graph.cleanup().toposort()
        exported, inlined = inline_constant_ifs(gs.export_onnx(graph))
        count = len(graph.nodes)
        if count == previous and not inlined:
            break
        previous = count
        graph = gs.import_onnx(_infer_shapes(exported))
        del exported
        free_dropped_copies(weight_bytes)  # the graph before, with its weights
        if inlined:
            split_shape_slices(graph)
    return graph


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = int(size)
    # stale intermediate shapes from the exporter would contradict the fixed ones
    del fixed.graph.value_info[:]
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    return _infer_shapes(fixed)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return infer_shapes(model)
    except Exception as exc:  # inference is a help, not a requirement
        log.debug("shape inference failed: %s", exc)
        return model


def drop_nan_guards(graph: gs.Graph) -> int:
    """Replace each ``Where(IsNaN(t), c, t)`` by ``t``; how many were.

    Transformer exports guard a Softmax this way against rows whose scores are all -inf. On the
    device ``t`` is quantized and can never be NaN, so the guard always passes ``t`` through, and
    SNPE has no IsNaN (the HTP fails to build a graph with one: measured with onnxruntime-qnn).
    Calibration refuses a tensor that takes NaN, so on the data it uses nothing changes. A guard
    whose output is a graph output stays.
    """
    outputs = {t.name for t in graph.outputs}
    dropped = 0
    for where in [n for n in graph.nodes if n.op == "Where" and len(n.inputs) == 3]:
        condition, guarded, out = where.inputs[0], where.inputs[2], where.outputs[0]
        test = condition.inputs[0] if len(condition.inputs) == 1 else None
        if test is None or test.op != "IsNaN" or test.inputs[0] is not guarded or out.name in outputs:
            continue
        for consumer in list(out.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    consumer.inputs[index] = guarded
        where.outputs.clear()
        dropped += 1
    return dropped


def fold_into_convolutions(graph: gs.Graph) -> int:
    """Fold each Add, Sub, Mul or Div by a constant into the Conv or ConvTranspose it follows, when the
    constant is one value or one per output channel (along axis 1 of the output) and the
    convolution's output is read by nothing else: ``conv + c`` and ``conv - c`` into its bias,
    ``conv * c`` and ``conv / c`` into its weights and bias. Until nothing is left to fold.

    SNPE's converter squashes these (its SQUASH_SUM, SQUASH_SUB, SQUASH_PROD and SQUASH_DIV
    optimizations, and a constant Mul then Add merged into a BatchNorm that it folds), so the
    device never computes them apart; the HTP left to itself does, and in the PP-OCRv4 detector's
    graph computed a ConvTranspose's bias Add *without* the bias (tools/HTP.md finding 24). The
    producer takes over the op's output tensor and name, as for a folded BatchNorm. Returns how many
    were folded.
    """
    outputs = {t.name for t in graph.outputs}
    folded = 0
    changed = True
    while changed:
        changed = False
        for op in [n for n in graph.nodes if n.op in ("Add", "Sub", "Mul", "Div") and len(n.inputs) == 2]:
            x, constant = op.inputs
            if op.op in ("Add", "Mul") and isinstance(x, gs.Constant):
                x, constant = constant, x
            if not isinstance(constant, gs.Constant) or isinstance(x, gs.Constant) or len(op.outputs) != 1:
                continue
            if len(x.inputs) != 1 or len(x.outputs) != 1 or x.name in outputs:
                continue
            producer = x.inputs[0]
            if producer.op not in ("Conv", "ConvTranspose") or not isinstance(producer.inputs[1], gs.Constant):
                continue
            if len(producer.inputs) > 2 and not isinstance(producer.inputs[2], gs.Constant):
                continue
            values = _per_channel(constant.values, x.shape)
            if values is None or (op.op == "Div" and not np.all(values)):
                continue
            ones, zeros = np.ones(values.shape[0]), np.zeros(values.shape[0])
            factor, shift = {"Add": (ones, values), "Sub": (ones, -values), "Mul": (values, zeros),
                             "Div": (1 / values, zeros)}[op.op]
            if not _fold_into(producer, factor, shift):
                continue
            producer.outputs = [op.outputs[0]]
            op.outputs.clear()
            op.inputs.clear()
            folded += 1
            changed = True
    return folded


def _per_channel(values: np.ndarray, shape: list | tuple | None) -> np.ndarray | None:
    """A constant applied to a tensor of ``shape`` (N, C, ...) as one value per channel ``C`` (float64), or
    None when it varies along another axis, would broadcast the tensor to another shape, or the
    channel count is unknown."""
    if not shape or len(shape) < 2 or not isinstance(shape[1], int) or values.ndim > len(shape):
        return None
    full = (1,) * (len(shape) - values.ndim) + values.shape
    if any(size != 1 for axis, size in enumerate(full) if axis != 1) or full[1] not in (1, shape[1]):
        return None
    return np.broadcast_to(values.astype(np.float64).reshape(-1), (shape[1],)).copy()


def fold_batchnorms(graph: gs.Graph) -> int:
    """Fold each BatchNormalization that follows a Conv, ConvTranspose or Gemm with constant weights.

    The producer takes over the BatchNorm's output tensor (and so its name), as SNPE's converter
    does. Returns how many were folded.
    """
    outputs = {t.name for t in graph.outputs}
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if len(bn.outputs) != 1 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1 or len(x.outputs) != 1 or x.name in outputs:
            continue
        producer = x.inputs[0]
        if producer.op not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        if len(producer.inputs) < 2 or not isinstance(producer.inputs[1], gs.Constant):
            continue
        if len(producer.inputs) > 2 and not isinstance(producer.inputs[2], gs.Constant):
            continue
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
        factor = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        if not _fold_into(producer, factor, beta - mean * factor):
            continue
        producer.outputs = [bn.outputs[0]]
        bn.outputs.clear()
        bn.inputs.clear()
        folded += 1
    return folded


def _fold_into(node: gs.Node, factor: np.ndarray, shift: np.ndarray) -> bool:
    """Make ``node`` compute ``factor * node(x) + shift`` per output channel; False if it cannot."""
    weight = node.inputs[1].values.astype(np.float64)
    channels = factor.shape[0]
    bias = node.inputs[2].values.astype(np.float64) if len(node.inputs) > 2 else np.zeros(channels)
    if node.op == "Conv":
        if weight.shape[0] != channels:
            return False
        weight = weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
    elif node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        if weight.shape[1] * group != channels:
            return False
        grouped = weight.reshape((group, weight.shape[0] // group, *weight.shape[1:]))
        per_group = factor.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        weight = (grouped * per_group).reshape(weight.shape)
    else:  # Gemm: Y = alpha * A @ B + beta * C
        trans_b = int(node.attrs.get("transB", 0))
        if weight.ndim != 2 or weight.shape[0 if trans_b else 1] != channels:
            return False
        weight = weight * (factor[:, None] if trans_b else factor[None, :])
        if bias.size not in (1, channels):
            return False
        bias = np.broadcast_to(bias.reshape(-1), (channels,)) * float(node.attrs.get("beta", 1.0))
        node.attrs["beta"] = 1.0
    if bias.shape != (channels,):
        return False
    new_bias = bias * factor + shift
    _set_constant(node, 1, weight.astype(np.float32))
    if len(node.inputs) > 2:
        _set_constant(node, 2, new_bias.astype(np.float32))
    else:
        node.inputs.append(gs.Constant(f"{node.outputs[0].name}_bias", new_bias.astype(np.float32)))
    return True


def _set_constant(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Replace a constant input's values, copying it first if other nodes share it."""
    constant = node.inputs[index]
    if len(constant.outputs) > 1:
        node.inputs[index] = gs.Constant(f"{constant.name}_bnfolded_{node.name}", values)
    else:
        constant.values = values
        constant.data_location = None  # in memory now, wherever the imported tensor's data was
