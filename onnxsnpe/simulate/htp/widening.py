"""A Conv or Gemm that reads an 8-bit activation and writes a 16-bit one, as the HTP computes it in a network.

Automatic mixed precision puts such ops at every boundary from an 8-bit region into a 16-bit one.
Alone (its input a graph input nothing else reads) the HTP rounds it about exactly; but when its
input comes from a Conv or Gemm (through a squashed Relu/Clip, a Pad or a Flatten), or another op
reads it too (a Conv, an Add or a Relu in the probes; for a graph input a Conv or a
GlobalAveragePool), it computes as if the centered input codes ``c`` were
``f(c) = c + 1`` where ``c`` is a nonzero multiple of 4 (``c`` otherwise) and the input scale were
``h = float16(s_x)``, with the bias at the true ``s_x s_w`` (tools/HTP.md finding 30, two helpers'
probes: 98-99.9% of in-range codes exact, every miss one step, at a rounding boundary):

    code = floor((sum f(c) w h s_w + b s_x s_w) / s_y + z_y + 1/2)

``w`` the weight codes minus their zero point (an asymmetric weight is not re-expressed as the
8-bit kernels do), ``s_w`` per output channel with per-channel weights, ``b`` the int32 bias code.
Finding 21's "c = 0 mod 4 read as c + 1" and slope ``1 + 4.17e-4 = float16(s_x) / s_x``. A small
offset per valid tap (about 1.2e-4 input steps) is not modelled. Elsewhere exact rounding stays,
though EfficientNet-Lite0's residual sums narrowed to 8 bits and read by its expand Convs alone follow
the rule on the HTP where generated ones do not (finding 30: not settled).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...encode.encoding import ChannelEncodings
from ...graph.large import initializer_array
from ...graph.ops import node_attributes
from .codes import (
    SUFFIX,
    Context,
    Lowered,
    centered_codes,
    constant_bias,
    of_bitwidth,
    output_encoding,
    with_output_codes,
)
from .linear import stored_codes, weight_axis, weight_codes

PASSED_THROUGH = ("Pad", "Flatten")
"""Ops between a Conv and the 16-bit Conv or Gemm that leave the trigger as it is (probed)."""
TRIGGER_READERS = ("Conv", "GlobalAveragePool")
"""Ops whose reading a graph input into an 8-bit output makes a 16-bit-output Conv read it as f(c)
(module docstring); any second reader of another tensor does."""


def lower_widening_conv(node: onnx.NodeProto, context: Context) -> Lowered | None:
    """The Conv or Gemm reading an 8-bit activation into a 16-bit output, as the module docstring
    says, or None when it is not one or does not read its input so (shares_with_conv)."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in context.constants:
        return None
    attrs = node_attributes(node)
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (
            1.0, 1.0, 0):
        return None
    x_enc = context.activations.get(node.input[0])
    y_enc = output_encoding(node, context.targets, context.activations)
    w_enc = context.params.get(node.input[1])
    if not (of_bitwidth(8, x_enc, w_enc) and of_bitwidth(16, y_enc)) or not shares_with_conv(node, context):
        return None
    weight = initializer_array(context.constants[node.input[1]])
    axis = weight_axis(node, context.constants[node.input[1]])
    per_channel = isinstance(w_enc, ChannelEncodings)
    if per_channel and w_enc.axis != axis:
        return None
    outputs = weight.shape[axis]
    w_scale = w_enc.scales().astype(np.float64) if per_channel else np.full(outputs, w_enc.scale)
    codes = weight_codes(weight, w_enc, w_enc.along(w_scale, weight.ndim) if per_channel else w_enc.scale, axis)
    bias, bias_scale, consumed = constant_bias(node.input[2] if len(node.input) > 2 else "", context)
    bias_real = np.zeros(outputs) if bias is None else bias * np.asarray(bias_scale, dtype=np.float64)
    out_scale = float(np.float32(y_enc.scale))
    multiplier = float(np.float16(x_enc.scale)) * w_scale / out_scale
    constant = bias_real / out_scale - y_enc.offset + 0.5
    channel = (-1,) + (1,) * (weight.ndim - 2) if node.op_type == "Conv" else (-1,)

    p = f"{node.output[0]}{SUFFIX}/"
    nodes, inits = centered_codes(node.input[0], x_enc, p + "x")
    read = np.arange(2**8) + x_enc.offset  # f of each code's centered value, indexed by the code
    table = read + ((read % 4 == 0) & (read != 0))
    stored, cast = stored_codes(codes, p + "w")
    inits += [
        numpy_helper.from_array(table.astype(np.float32), p + "read"),
        numpy_helper.from_array(np.array(-x_enc.offset, dtype=np.float32), p + "x_zero_point"),
        stored,
        numpy_helper.from_array(multiplier.reshape(channel), p + "multiplier"),
        numpy_helper.from_array(constant.reshape(channel), p + "constant"),
    ]
    conv = onnx.NodeProto()
    conv.CopyFrom(node)
    del conv.input[:], conv.output[:]
    conv.input.extend([p + "read_codes", p + "w"])
    conv.output.append(p + "acc")
    conv.name = p + node.op_type
    make = helper.make_node
    nodes += [
        make("Add", [p + "x", p + "x_zero_point"], [p + "raw"]),
        make("Cast", [p + "raw"], [p + "index"], to=onnx.TensorProto.INT64),
        make("Gather", [p + "read", p + "index"], [p + "read_codes"]),
        cast,
        conv,
        make("Cast", [p + "acc"], [p + "acc64"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [p + "acc64", p + "multiplier"], [p + "real"]),
        make("Add", [p + "real", p + "constant"], [p + "real_half"]),
    ]
    chain, inits, _ = with_output_codes(nodes, inits, p, y_enc, p + "real_half", node.output[0])
    return chain, inits, {node.input[1]} | consumed


def shares_with_conv(node: onnx.NodeProto, context: Context) -> bool:
    """Whether ``node`` reads its input as f(c) (module docstring): the input comes from a Conv or
    Gemm (through a squashed Relu/Clip, a Pad or a Flatten), or another op reads it too (for a graph
    input, only a Conv with an 8-bit output or a GlobalAveragePool was seen to count)."""
    name = node.input[0]
    producers = {out: n for n in context.graph.node for out in n.output}
    producer = producers.get(name)
    while producer is not None and (producer.op_type in PASSED_THROUGH or (
            producer.op_type in ("Relu", "Clip") and producer.input[0] in context.targets.squashed)):
        producer = producers.get(producer.input[0])
    if producer is not None and producer.op_type in ("Conv", "Gemm"):
        return True
    others = [other for other in context.graph.node if other is not node and name in other.input]
    if name in producers:
        return bool(others)
    return any(other.op_type in TRIGGER_READERS and name in other.input[:1]
               and of_bitwidth(8, output_encoding(other, context.targets, context.activations)) for other in others)
