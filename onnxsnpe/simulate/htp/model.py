"""The simulator with the QNN HTP backend's integer arithmetic where it differs from exact math.

fake_quant.build_simulation_model computes every op in float and rounds its output exactly. The HTP
does not, and the differences (each under one output step) grow through a network. Measured with
onnxruntime-qnn's HTP emulator on single-op QDQ models (tools/HTP.md has the evidence), for 8-bit
activations and weights:

- Rounding: requantized outputs round ties up (``floor(v + 0.5)``), not away from zero; only the
  Quantize of a float graph input rounds half away from zero.
- Conv, ConvTranspose, Gemm, MatMul (constant or two activations): with ``M = s_in * s_w / s_out``
  and ``acc`` the integer accumulator of centered codes, the output code is
  ``clamp(floor(t * m + 0.5))``, ``t = floor((acc + C) / 2^k)``, ``k = max(0, floor(-log2 M) - 3)``,
  ``m = float16(M * 2^k)``: the accumulator loses its low bits (up to 1/8 of an output step, always
  downwards) and the multiplier has 11 significant bits (an exact tie rounded upwards:
  codes.float16_ties_up). ``C = round(bias + z_out / M)`` folds the
  bias (in accumulator steps) and the output zero point into one integer, computed in float32 and
  rounded half away from zero once (requant_offset). Depthwise convolutions strided in both
  directions use ``k = 0`` and a 15-bit multiplier.
- Weights are multiplied as int8 with zero offset. An asymmetric uint8 weight encoding is
  re-expressed per output channel (Conv, Gemm, MatMul): a channel whose codes ``q + offset`` fit in
  [-128, 127] keeps them; otherwise it gets the step ``s = max(-min/128, max/127)`` rounded to
  1/2048 and codes ``round_half_away(code / s)``; its accumulator step is ``s_in * s_w * s``, so its
  bias in accumulator steps is ``bias_code / s``, a fraction that C rounds together with the zero
  point. Doubly strided depthwise convolutions and ConvTranspose keep the codes as they are, except
  a ConvTranspose whose kernel equals its stride: it runs as a 1x1 Conv with ``C_out * k * k``
  output channels and depth-to-space, re-expressed per (output channel, kernel position).
- GlobalAveragePool sums the centered codes and multiplies by ``s_in / (s_out * n)`` rounded to 15
  significant bits (at 16 bits adding a little before the floor: global_average_pool16_extra); an
  8-bit ReduceMean likewise, its 15-bit multiplier mostly scaled by 32767/32768
  (channelwise.reduce_mean_multiplier).
- Add and Sub run in fixed point on raw codes: see add_constants.
- Mul of two 8-bit tensors (activations or quantized constants) multiplies the centered codes and
  requantizes with a 15-bit multiplier and a constant that depends on the zero points: see
  mul_constants.
- Div of two 8-bit activations: the numerator's code times a measured reciprocal of the divisor's
  code, rounded to 13 significant bits before the zero point (div.py; approximate: a fifth of float
  division's misses).
- BatchNormalization (left standalone by the graph preparation) is folded into a per-channel scale
  and bias that are quantized again to 8 bits, then applied to the codes: see batch_norm_constants.
  A Mul by a constant vector over the last axis followed by an Add of one is computed the same way
  from the Mul's input codes (the HTP fuses the pair: scale_shift.py).
- An op that reads an 8-bit input converted to 16 bits (encode/conversions.py) is computed with
  the 16-bit encoding (the same grid, so the values do not change); one whose 8-bit output is
  computed on the 16-bit grid is lowered onto that grid and then quantized to its own encoding
  (no value of the finer grid lies halfway between two of the coarser one: 257 is odd).
- A Concat input that only the Concat reads is computed with the Concat's encoding (concat_encodings).
  A 16-bit Concat of 8-bit inputs converted to it requantizes each from its 8-bit code (concat.py).
- With 16-bit activations: Conv and Gemm with 8-bit weights (wide.py), the Add of two activations
  (elementwise.add16_constants), the Mul of two activations or of one and a constant (mul16.py) and
  GlobalAveragePool, as probed (tools/HTP.md, "16-bit activations", findings 31 and 60).
- HTP v73 and later (``arch``): 8-bit Conv and Gemm (linear.v73_conv_constants), A16W8 Conv and Gemm
  (wide.v73_wide_requant) and A16W16 Conv (wide_weights.py) requantize otherwise (tools/HTP.md
  findings 19 and 20).
- A fused GELU (graph/fusions.py) at 16 bits: the HTP's fixed-point erf per segment (gelu.py; at
  8 bits its Gelu is exact GELU then rounding, as the float chain computes).
- An 8-bit LayerNormalization: its row statistics on the codes, a float32 reciprocal square root
  by the magic-constant method and an integer multiplier per row (layer_norm.py); a 16-bit one on
  v73: a qf32 row mean on the raw codes and a 16-bit multiplier per row (layer_norm16.py).
- A MatMul of two 16-bit activations on v73: the second operand narrowed to an 8-bit grid and
  re-expressed per column, the sum truncated by 8 bits, a float32 multiplier (matmul16.py).
- A fused L2 normalization over the last axis: the sum of squared codes, the LayerNorm's reciprocal
  square root, the output truncated (at 8 bits in some rows through float16), and at 16 bits a
  value below the output's range at the top code (l2_norm.py).
- A Relu or Clip squashed into a lowered op narrows the op's clamp of its output codes (squash.py),
  and a lowered op reads the codes its producer computed instead of deriving them from the
  dequantized tensor (code_passing.py): the same numbers in fewer passes.

Other ops keep the exact float computation. The integer ops accumulate codes in float32 (exact while
partial sums stay below 2^24); requantization products run in float32 where that is exact
(codes.exact_in_float32: 11-bit multipliers), otherwise in float64, as the fixed-point Add does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import onnx

from ...encode.conversions import widened_inputs, widened_outputs
from ...encode.encoding import Encoding, ParamEncoding
from ...graph.ops import WIDE_WEIGHT_OPS, standard_opset
from ...graph.targets import QuantTargets
from ..emulator import A16W16_ARCH
from ..fake_quant import build_simulation_model
from .channelwise import lower_average_pool, lower_batch_norm, lower_global_average_pool, lower_reduce_mean
from .code_passing import Codes, pad_codes, produced_codes, reuse_codes
from .codes import Context, Lowered
from .concat import lower_concat16
from .div import lower_div
from .elementwise import is_scalar_sum, lower_add, lower_mul
from .gelu import lower_gelu16
from .hard_sigmoid import lower_hard_sigmoid16
from .l2_norm import lower_l2_norm
from .layer_norm import lower_layer_norm
from .layer_norm16 import lower_layer_norm16
from .linear import lower_linear
from .matmul16 import lower_matmul16
from .mul16 import lower_mul16
from .scale_shift import lower_scale_shift
from .softmax import lower_softmax
from .squash import absorb, activation_bounds, code_bounds
from .wide import lower_a16w8_conv
from .wide_weights import lower_a16w16_conv

LINEAR_LOWERINGS = (lower_linear, lower_a16w8_conv, lower_a16w16_conv)
"""Tried in turn for any other op: each returns None for a node it does not lower."""
LOWERINGS: dict[str, tuple[Callable[[onnx.NodeProto, Context], Lowered | None], ...]] = {
    "Add": (lower_scale_shift, lower_add), "Sub": (lower_add,), "Mul": (lower_gelu16, lower_mul, lower_mul16),
    "GlobalAveragePool": (lower_global_average_pool,), "BatchNormalization": (lower_batch_norm,),
    "AveragePool": (lower_average_pool,),
    "ReduceMean": (lower_reduce_mean,), "Softmax": (lower_softmax,), "Concat": (lower_concat16,),
    "LayerNormalization": (lower_layer_norm, lower_layer_norm16),
    "Div": (lower_l2_norm, lower_div), "MatMul": (lower_matmul16, *LINEAR_LOWERINGS),
    "HardSigmoid": (lower_hard_sigmoid16,),
}
"""The lowerings of each op type (model docstring)."""


def htp_simulation_model(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
    arch: str | None = None,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """fake_quant.build_simulation_model, with the ops the module docstring lists computed as the HTP does.

    Ops whose inputs, weights and output have 8-bit encodings are lowered, and the 16-bit ops the
    module docstring lists; everything else is simulated as before. ``arch`` is the HTP architecture
    (emulator.HTP_ARCHS); None takes the emulator's choice (default_arch). Returns the model and the
    output map.
    """
    model = onnx.ModelProto()
    model.CopyFrom(deploy)
    graph = model.graph
    activations = concat_encodings(graph, activations)
    constants = {init.name: init for init in graph.initializer}
    lowered_params: set[str] = set()
    on_grid: list[str] = []  # outputs the lowered ops requantize to their own encoding
    nodes: list[onnx.NodeProto] = []
    opset = standard_opset(deploy)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info]}
    context = Context(targets, activations, params, constants, shapes, graph, opset,
                      int(arch) if arch is not None else default_arch(deploy, params))
    widened = widened_inputs(graph, targets, activations)
    wide_outputs = widened_outputs(graph, targets, activations)  # computed on the 16-bit grid, converted after
    squashing = {node.input[0]: node for node in graph.node
                 if node.op_type in ("Relu", "Clip") and node.input and node.input[0] in targets.squashed}
    absorbed: set[str] = set()  # the outputs of Relu/Clip nodes computed as their producer's clamp
    known: dict[str, Codes] = {}  # tensors whose centered codes a lowered op computed
    pads: list[onnx.NodeProto] = []  # Pads whose codes were padded too, and the Pads of those codes
    half_even: list[str] = []  # the outputs of 8-bit Adds and Subs of a scalar, computed in float
    for node in graph.node:
        if node.output and node.output[0] in absorbed:
            continue
        codes_pad = pad_codes(node, known, constants)
        if codes_pad is not None:
            nodes += [node, codes_pad[0]]
            graph.initializer.extend([codes_pad[1]] if codes_pad[1] is not None else [])
            pads += [node, codes_pad[0]]
            continue
        node_context = context
        carrier = targets.squashed.get(node.output[0], node.output[0]) if node.output else None
        if node.output and (node.output[0] in widened or carrier in wide_outputs):
            reads = dict(targets.activation_inputs(node))  # a fused op's last node reads the fused op's input
            wide = {reads[index]: enc for index, enc in widened.get(node.output[0], {}).items()}
            wide.update({carrier: wide_outputs[carrier]} if carrier in wide_outputs else {})
            converted = {reads[index]: activations[reads[index]] for index in widened.get(node.output[0], {})}
            node_context = replace(context, activations={**activations, **wide}, converted=converted)
        lowered = next((result for lower in LOWERINGS.get(node.op_type, LINEAR_LOWERINGS)
                        if (result := lower(node, node_context)) is not None), None)
        if lowered is None:
            nodes.append(node)
            if is_scalar_sum(node, context):
                half_even.append(targets.squashed.get(node.output[0], node.output[0]))
            continue
        chain, inits, consumed = lowered
        chain = reuse_codes(chain, inits, known)
        requantized = node.output[0]  # the tensor on whose grid the chain ends
        activation = squashing.get(requantized)
        bounds = activation_bounds(activation, constants) if activation is not None else None
        if bounds is not None and absorb(chain, inits, requantized,
                                         code_bounds(node_context.activations[activation.output[0]], *bounds),
                                         activation.output[0]):
            absorbed.add(activation.output[0])
            requantized = activation.output[0]
        if requantized in activations and requantized not in targets.squashed and requantized not in wide_outputs:
            on_grid.append(requantized)
            codes = produced_codes(chain, requantized, activations[requantized].scale)
            if codes is not None:
                known[requantized] = codes
        nodes.extend(chain)
        graph.initializer.extend(inits)
        lowered_params.update(consumed)
    # the float Pad when every reader takes the codes, the codes' Pad when none does (neither reads the other)
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    unread = {id(pad) for pad in pads if pad.output[0] not in read}
    del graph.node[:]
    graph.node.extend(node for node in nodes if id(node) not in unread)
    remaining = {name: enc for name, enc in params.items() if name not in lowered_params}
    inputs = {v.name for v in deploy.graph.input}  # the HTP's Quantize of a float input rounds half away
    return build_simulation_model(model, targets, activations, remaining,
                                  round_half_up=[name for name in targets.activations if name not in inputs],
                                  on_grid=on_grid, float16_rounded=_float16_rounded(deploy, targets, activations,
                                                                                    wide_outputs),
                                  narrowed=wide_outputs, half_even=half_even)


def _float16_rounded(deploy: onnx.ModelProto, targets: QuantTargets, activations: dict[str, Encoding],
                     wide_outputs: dict[str, Encoding]) -> list[str]:
    """The 8-bit outputs (after a squashed Relu/Clip) of ops reading a 16-bit activation, which the HTP
    rounds in float16 (tools/HTP.md finding 21), except those computed on the 16-bit grid and
    converted (narrowed)."""
    rounded = []
    for node in deploy.graph.node:
        name = targets.squashed.get(node.output[0], node.output[0]) if node.output else None
        if name is None or name in wide_outputs:
            continue
        enc = activations.get(name)
        if enc is not None and enc.bitwidth == 8 and any(
                activations.get(i) is not None and activations[i].bitwidth == 16 for i in node.input):
            rounded.append(name)
    return rounded


def default_arch(deploy: onnx.ModelProto, params: dict[str, ParamEncoding]) -> int:
    """The architecture the emulator computes as when none is asked for (emulator.HtpSession): v73
    when a Conv, ConvTranspose, Gemm or MatMul weight or a LayerNormalization's gamma is 16-bit,
    else the backend's default, which computes as v68."""
    wide = any(node.op_type in WIDE_WEIGHT_OPS
               and any(params[name].bitwidth == 16 for name in node.input if name in params)
               for node in deploy.graph.node)
    return int(A16W16_ARCH) if wide else 68


def concat_encodings(graph: onnx.GraphProto, activations: dict[str, Encoding]) -> dict[str, Encoding]:
    """``activations`` with each Concat input that only the Concat reads given the Concat's encoding (8 or 16
    bits, the input's own bitwidth).

    The HTP writes such a producer's output straight into the concatenation, requantized once to
    the Concat's encoding: PP-OCR det's ``p2o.Add.277`` (scale 8.37) feeding ``p2o.Concat.1``
    (scale 17.25) is exactly an Add with the Concat's output encoding, and 2% of its values differ
    from requantizing the Add's own codes. At 16 bits too, and through a nearest Resize: a tensor only a
    Resize reads, which only the Concat reads, is computed in the Concat's encoding as well (det's neck
    Adds, upsampled into ``p2o.Concat.1``: det at A16 40.4 -> 66.5 dB; tools/HTP.md finding 56; not at
    8 bits, where det is bit for bit with the Adds on their own grids). Where
    the upsampled tensor has other readers (every tensor exposed) the HTP was seen requantizing the
    Resize's codes with a 15-bit multiplier instead; not modelled.
    """
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producers = {name: node for node in graph.node for name in node.output}
    updated = dict(activations)
    for node in graph.node:
        enc = activations.get(node.output[0]) if node.op_type == "Concat" else None
        if enc is None:
            continue
        for name in node.input:
            own = activations.get(name)
            if name in producers and name not in outputs and readers.get(name) == 1 and own is not None \
                    and own.bitwidth == enc.bitwidth:
                updated[name] = enc
                source = producers[name]
                if source.op_type == "Resize" and enc.bitwidth == 16:  # and through an upsampling
                    upsampled = source.input[0]
                    if upsampled in producers and upsampled not in outputs and readers.get(upsampled) == 1:
                        updated[upsampled] = enc
    return updated
