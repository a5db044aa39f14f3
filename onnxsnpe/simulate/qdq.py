"""Export the deploy model as a QDQ ONNX model carrying exactly onnxsnpe's encodings.

Every quantized tensor gets a QuantizeLinear/DequantizeLinear pair with ``scale`` = the encoding's
scale and ``zero_point = -offset``, so onnxruntime (CPU) and onnxruntime-qnn (HTP) run the same
integer grids the simulation uses:

- Activations: a Q/DQ pair after the producer; the dequantized value keeps the tensor's name, so
  graph outputs and intermediate tensors keep theirs.
- Aliases (outputs of data-movement ops) get a pair with their input's encoding: QNN builds a
  quantized op only from a DQ -> op -> Q group, and data movement keeps the grid anyway.
- A tensor squashed into a following Relu/Clip gets the post-activation encoding, so the op runs
  quantized (QNN has no Conv+Relu fusion across Q/DQ) and the activation changes nothing after it.
- Params are stored quantized with a DequantizeLinear: unsigned with ``zero_point = -offset`` when
  asymmetric, signed with zero point 0 when symmetric (int32 biases among them).

8-bit Q/DQ use the standard domain (opset >= 10; older models are upgraded to opset 13 with
onnx.version_converter, and so are models before opset 12 with a MaxPool, which onnxruntime
quantizes only from MaxPool-12). 16-bit encodings need opset 21 and per-channel ones (DequantizeLinear's
``axis``) opset 13, so when the model is older than what its encodings need, the Q/DQ nodes use
onnxruntime's ``com.microsoft`` domain, which both onnxruntime and its QNN execution provider
accept; the float graph is never rewritten for it. An op pattern SNPE fuses (graph/fusions.py) is
written as the fused op, whose inner tensors have no encoding. Where the HTP needs an 8-bit input or output of
an op converted to 16 bits (encode/conversions.py), a second Q/DQ pair on the 16-bit grid does it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ..encode.constants import STRUCTURAL_INPUTS
from ..encode.conversions import widened_inputs, widened_outputs
from ..encode.encoding import ChannelEncodings, Encoding, ParamEncoding, quantize
from ..graph.fusions import with_fused_ops
from ..graph.large import initializer_array, slabs
from ..graph.ops import standard_opset
from ..graph.targets import QuantTargets

SUFFIX = "__onnxsnpe_qdq"


MS_DOMAIN = "com.microsoft"
QUANTIZED_MAXPOOL_OPSET = 12


def build_qdq_model(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
) -> onnx.ModelProto:
    """The deploy model with Q/DQ pairs carrying ``activations`` and DQ-stored ``params``.

    ``activations`` maps every activation and alias to its encoding (as ranges.activation_encodings
    returns); ``params`` maps initializer names to encodings (weights, biases, constants). A param
    initializer that also feeds a structural input (a Clip bound, a Resize scale) keeps a float
    copy there.
    """
    model = onnx.ModelProto()
    model.CopyFrom(deploy)
    if _needs_upgrade(model):
        model = version_converter.convert_version(model, 13)
    with_fused_ops(model, targets.fusions)
    domain = quantization_domain(model, [*activations.values(), *params.values()])
    graph = model.graph
    inputs = {v.name for v in graph.input}
    widened = widened_inputs(graph, targets, activations)

    pairs: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    wide_outputs = widened_outputs(graph, targets, activations)
    for tensor, enc in _activation_plan(graph, targets, activations):
        carrier = targets.squashed.get(tensor)
        if carrier in wide_outputs:  # an op and its squashed Relu/Clip both compute on the 16-bit grid
            enc = wide_outputs[carrier]
        nodes, inits = _qdq_pair(tensor, enc, domain)
        if tensor in wide_outputs:  # computed on the 16-bit grid, then converted (encode/conversions.py)
            wide, wide_inits = _qdq_pair(f"{tensor}{SUFFIX}/computed", wide_outputs[tensor], domain)
            wide[-1].output[0] = nodes[0].input[0] = f"{tensor}{SUFFIX}/computed"
            nodes, inits = wide + nodes, wide_inits + inits
        pairs[tensor] = nodes
        new_inits.extend(inits)

    # graph inputs: consumers read the dequantized copy; node outputs: the producer writes the float
    # value under a new name and the DQ writes the original name, so names seen outside stay.
    read_as = {name: nodes[-1].output[0] for name, nodes in pairs.items() if name in inputs}
    float_names = {name: name + SUFFIX + "/float" for name in pairs if name not in inputs}
    for name, float_name in float_names.items():
        pairs[name][0].input[0] = float_name
        pairs[name][-1].output[0] = name
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = read_as.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = float_names.get(name, name)

    param_nodes, kept = _quantize_params(graph, params, domain)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    quantized = {node.output[0] for node in param_nodes}
    kept_inputs = [v for v in graph.input if v.name not in quantized]
    del graph.input[:]
    graph.input.extend(kept_inputs)

    converts, convert_inits = _widening_converts(graph, widened, domain)
    graph.initializer.extend(convert_inits)
    producer_of = {float_name: name for name, float_name in float_names.items()}
    ordered = list(param_nodes)
    for name in read_as:
        ordered.extend(pairs[name])
    for node in graph.node:
        ordered.extend(converts.get(node.output[0], []) if node.output else [])
        ordered.append(node)
        for out in node.output:
            if out in producer_of:
                ordered.extend(pairs[producer_of[out]])
    del graph.node[:]
    graph.node.extend(ordered)
    model.producer_name = "onnxsnpe"
    return model


def _widening_converts(
    graph: onnx.GraphProto,
    widened: dict[str, dict[int, Encoding]],
    domain: str,
) -> tuple[dict[str, list[onnx.NodeProto]], list[onnx.TensorProto]]:
    """The Q/DQ pairs of conversions.widened_inputs (keyed by the original name of the reading
    node's first output), keyed by the first output of the node they feed, which is rewired to read
    them."""
    converts: dict[str, list[onnx.NodeProto]] = {}
    inits: list[onnx.TensorProto] = []
    done: set[str] = set()
    for node in graph.node:
        inputs = widened.get(node.output[0].removesuffix(SUFFIX + "/float")) if node.output else None
        for index, enc in (inputs or {}).items():
            name = node.input[index]
            wide = f"{name}{SUFFIX}/wide"
            if wide not in done:
                nodes, pair_inits = _qdq_pair(wide, enc, domain)
                nodes[0].input[0] = name
                nodes[-1].output[0] = wide
                converts.setdefault(node.output[0], []).extend(nodes)
                inits.extend(pair_inits)
                done.add(wide)
            node.input[index] = wide
    return converts, inits


def quantization_domain(model: onnx.ModelProto, encodings: list[Encoding | ParamEncoding]) -> str:
    """The domain of ``model``'s Q/DQ nodes for ``encodings``, declared in the model: com.microsoft
    when some are 16-bit before opset 21 or per channel before opset 13, else the standard one."""
    opset = standard_opset(model)
    wide = any(enc.bitwidth == 16 for enc in encodings)
    per_axis = any(isinstance(enc, ChannelEncodings) for enc in encodings)
    domain = MS_DOMAIN if (wide and opset < 21) or (per_axis and opset < 13) else ""
    if domain and not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return domain


def _needs_upgrade(model: onnx.ModelProto) -> bool:
    """Whether the QDQ model must move to opset 13: standard Q/DQ need opset 10, and onnxruntime
    (its QNN execution provider too) groups DQ -> MaxPool -> Q into a quantized op only from
    MaxPool-12, the version that takes 8-bit integers; before it the HTP runs MaxPool in float
    between the pair (tools/HTP.md, finding 40)."""
    opset = standard_opset(model)
    return opset < 10 or (opset < QUANTIZED_MAXPOOL_OPSET and any(n.op_type == "MaxPool" for n in model.graph.node))


def _activation_plan(
    graph: onnx.GraphProto, targets: QuantTargets, activations: dict[str, Encoding]
) -> list[tuple[str, Encoding]]:
    """Each tensor that gets a Q/DQ pair, with its encoding, in graph order."""
    plan = []
    for value in graph.input:
        if value.name in activations:
            plan.append((value.name, activations[value.name]))
    for node in graph.node:
        for out in node.output:
            if out in targets.squashed and targets.squashed[out] in activations:
                plan.append((out, activations[targets.squashed[out]]))
            elif out in activations:
                plan.append((out, activations[out]))
    return plan


def _structural_uses(graph: onnx.GraphProto) -> set[str]:
    """Initializers read as settings (Clip bounds, Resize scales, Pad values) by some node."""
    uses = set()
    for node in graph.node:
        for index in STRUCTURAL_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index]:
                uses.add(node.input[index])
    return uses


def _storage(enc: ParamEncoding) -> tuple[np.dtype, np.ndarray]:
    """Integer dtype and zero point(s) for an encoding: signed with zero point 0 when symmetric
    (per-channel encodings are), one zero point per channel for a per-channel encoding."""
    offsets = enc.offsets() if isinstance(enc, ChannelEncodings) else np.array(enc.offset)
    if enc.is_symmetric:
        return np.dtype(f"int{enc.bitwidth}"), np.zeros_like(offsets)
    return np.dtype(f"uint{enc.bitwidth}"), -offsets


def _qparams(prefix: str, enc: ParamEncoding) -> list[onnx.TensorProto]:
    dtype, zero_point = _storage(enc)
    scale = enc.scales() if isinstance(enc, ChannelEncodings) else np.array(enc.scale)
    return [
        numpy_helper.from_array(scale.astype(np.float32), prefix + "scale"),
        numpy_helper.from_array(zero_point.astype(dtype), prefix + "zero_point"),
    ]


def _qdq_pair(tensor: str, enc: Encoding, domain: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Q then DQ of ``tensor`` with ``enc``; the caller wires the pair's first input and last output."""
    p = f"{tensor}{SUFFIX}/"
    inits = _qparams(p, enc)
    q = helper.make_node(
        "QuantizeLinear", [tensor, p + "scale", p + "zero_point"], [p + "q"], name=p + "Q", domain=domain
    )
    dq = helper.make_node(
        "DequantizeLinear", [p + "q", p + "scale", p + "zero_point"], [p + "dq"], name=p + "DQ", domain=domain
    )
    return [q, dq], inits


def _quantize_params(
    graph: onnx.GraphProto, params: dict[str, ParamEncoding], domain: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """DequantizeLinear nodes over quantized copies of the param initializers, and the initializers to keep.

    Each DQ output takes the initializer's name; nodes reading the initializer as a setting (a Clip
    bound, a Resize scale) get a float copy instead.
    """
    structural = _structural_uses(graph)
    nodes, kept = [], []
    for init in graph.initializer:
        enc = params.get(init.name)
        if enc is None:
            kept.append(init)
            continue
        values = initializer_array(init)
        p = f"{init.name}{SUFFIX}/"
        dequantize, inits = dequantized_param(init.name, values, enc, domain)
        nodes.append(dequantize)
        kept.extend(inits)
        if init.name in structural:
            kept.append(numpy_helper.from_array(values, p + "float"))
            for node in graph.node:
                for index in STRUCTURAL_INPUTS.get(node.op_type, ()):
                    if index < len(node.input) and node.input[index] == init.name:
                        node.input[index] = p + "float"
    return nodes, kept


def dequantized_param(name: str, values: np.ndarray, enc: ParamEncoding,
                      domain: str = "") -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A DequantizeLinear writing ``name`` from the codes of ``values`` in their storage type, and
    its initializers (codes, scale, zero point). For up to 16 bits it computes what
    encoding.fake_quantize does (one float32 product of an integer code and the scale); ``domain``
    is com.microsoft for 16-bit storage before opset 21."""
    dtype, _ = _storage(enc)
    p = f"{name}{SUFFIX}/"
    inits = [numpy_helper.from_array(_stored_codes(values, enc, dtype), p + "q"), *_qparams(p, enc)]
    per_axis = {"axis": enc.axis} if isinstance(enc, ChannelEncodings) else {}
    node = helper.make_node("DequantizeLinear", [p + "q", p + "scale", p + "zero_point"], [name], name=p + "DQ",
                            domain=domain, **per_axis)
    return node, inits


def _stored_codes(values: np.ndarray, enc: ParamEncoding, dtype: np.dtype) -> np.ndarray:
    """A param's codes in their storage type (signed storage for symmetric encodings: centered on the
    zero point), computed slab by slab so that a large weight has no int64 copy."""
    codes = np.empty(values.shape, dtype=dtype)
    per_channel = isinstance(enc, ChannelEncodings)
    for index in slabs(values.shape, enc.axis if per_channel else None):
        slab = quantize(values[index], enc)
        if enc.is_symmetric:
            slab += enc.along(enc.offsets(), slab.ndim) if per_channel else enc.offset
        codes[index] = slab
    return codes
