"""Simulate the quantized model: the deploy graph with SNPE's fake quantization inserted.

Weights and biases are fake-quantized in numpy (encoding.fake_quantize). Activations are
fake-quantized inside the graph by a chain of standard ONNX ops that performs the same float32
arithmetic as encoding.fake_quantize, round half away from zero included, so onnxruntime runs the
whole simulation; tests check the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..encode.encoding import Encoding, ParamEncoding, fake_quantize, same_grid_wider
from ..graph.large import initializer_array, is_large
from ..graph.ops import standard_opset
from ..graph.targets import QuantTargets
from .qdq import dequantized_param, quantization_domain

SUFFIX = "__onnxsnpe_fq"


ROUNDINGS = ("half_away", "half_up", "float16", "half_even")
"""How a fake quantization rounds ``x / scale``: half away from zero (SNPE's encoding math, the
HTP's Quantize of a float graph input), ties up, ``floor(v + 0.5)`` (the HTP's requantized outputs),
half away from zero after rounding to float16 (the HTP's 8-bit output of an op that reads a
16-bit activation: tools/HTP.md finding 21), or ties to even (the HTP's 8-bit Add or Sub of a
one-element constant: finding 22)."""


def fake_quant_nodes(
    tensor: str, enc: Encoding, output: str, opset: int = 13, rounding: str = "half_away"
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes computing ``output = fake_quantize(tensor, enc)`` in float32, rounding as ``rounding`` says.

    Clamping ``x / scale`` to [offset, offset + 2^bw - 1] before rounding equals rounding then
    clamping the codes (the bounds are integers), and saves three ops per tensor. Rounding half
    away from zero is done exactly with casts, which truncate toward zero: ``t = trunc(c)``, then
    ``t + trunc(2 (c - t))`` (the difference and its double are exact in float32, and the second
    truncation is +-1 exactly when the fraction is at least one half). Only cheap vectorized ops:
    a Where/Sign chain cost four times the model's own convolutions in onnxruntime.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    if rounding == "half_even" and opset < 11:  # no Round before opset 11; ties up is the nearest
        rounding = "half_up"
    p = f"{tensor}{SUFFIX}/"
    consts = chain_constants(enc)
    if rounding == "half_up":
        consts["half"] = 0.5
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), p + k) for k, v in consts.items()]
    n = helper.make_node
    if opset >= 11:
        clip = n("Clip", [p + "v", p + "low", p + "high"], [p + "c"])
    else:
        clip = n("Clip", [p + "v"], [p + "c"], min=float(enc.offset), max=float(enc.offset + enc.levels))
    if rounding == "half_up":
        rounded = [n("Add", [p + "c", p + "half"], [p + "shifted"]), n("Floor", [p + "shifted"], [p + "round"])]
    elif rounding == "half_even":  # ONNX's Round rounds ties to even
        rounded = [n("Round", [p + "c"], [p + "round"])]
    else:
        int32, float32 = onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
        if rounding == "float16":  # the clamped value to float16 (round to nearest even) and back, then rounded
            clip.output[0] = p + "c32"
            rounded = [n("Cast", [p + "c32"], [p + "c16"], to=onnx.TensorProto.FLOAT16),
                       n("Cast", [p + "c16"], [p + "c"], to=float32)]
        else:
            rounded = []
        rounded += [
            n("Cast", [p + "c"], [p + "trunc"], to=int32),
            n("Cast", [p + "trunc"], [p + "whole"], to=float32),
            n("Sub", [p + "c", p + "whole"], [p + "frac"]),
            n("Add", [p + "frac", p + "frac"], [p + "twice"]),
            n("Cast", [p + "twice"], [p + "carry"], to=int32),
            n("Add", [p + "trunc", p + "carry"], [p + "code"]),
            n("Cast", [p + "code"], [p + "round"], to=float32),
        ]
    nodes = [n("Div", [tensor, p + "scale"], [p + "v"]), clip, *rounded,
             n("Mul", [p + "round", p + "scale"], [output])]
    return nodes, inits


NARROW_ROUNDING = 33279
"""The HTP converts a 16-bit code ``q16`` to 8 bits as ``floor((255 q16 + NARROW_ROUNDING) / 2^16)``
(tools/HTP.md finding 21)."""


def narrowed_nodes(tensor: str, enc: Encoding, output: str,
                   wide: Encoding | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes quantizing ``tensor``, computed on the 16-bit grid ``wide`` (by default that of its
    8-bit encoding ``enc``, encode.encoding.same_grid_wider), to ``enc`` as the HTP converts it: from
    the same grid, on raw codes, ``q8 = floor((255 q16 + 33279) / 2^16)`` (tools/HTP.md finding 21;
    exact rounding differs in 384 of the 65,536 codes, one step up), every step exact in float32; from
    an op's fixed grid (a HardSigmoid's 2^-16), fixed_grid_narrowed_nodes."""
    if wide is not None and wide != same_grid_wider(enc, 16):
        return fixed_grid_narrowed_nodes(tensor, enc, output, wide)
    p = f"{tensor}{SUFFIX}/"
    wide = same_grid_wider(enc, 16)
    consts = {"scale16": wide.scale, "raw16": -wide.offset, "times": 255.0, "plus": float(NARROW_ROUNDING),
              "down": 2.0**-16, "low": 0.0, "high": float(enc.levels), "offset": float(enc.offset), "scale": enc.scale}
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), p + k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [n("Div", [tensor, p + "scale16"], [p + "v16"]), n("Round", [p + "v16"], [p + "c16"]),
             n("Add", [p + "c16", p + "raw16"], [p + "q16"]), n("Mul", [p + "q16", p + "times"], [p + "t"]),
             n("Add", [p + "t", p + "plus"], [p + "t_plus"]), n("Mul", [p + "t_plus", p + "down"], [p + "t_down"]),
             n("Floor", [p + "t_down"], [p + "q8"]), n("Clip", [p + "q8", p + "low", p + "high"], [p + "q8_clipped"]),
             n("Add", [p + "q8_clipped", p + "offset"], [p + "c8"]), n("Mul", [p + "c8", p + "scale"], [output])]
    return nodes, inits


def fixed_grid_narrowed_nodes(tensor: str, enc: Encoding, output: str,
                              wide: Encoding) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes quantizing ``tensor`` to the 8-bit ``enc`` as the HTP converts a value it computed on a
    fixed 16-bit grid ``wide`` of zero point 0 (a HardSigmoid's 2^-16: encode.conversions.HTP_FIXED_16_BIT)
    to a graph's 8-bit encoding: the 16-bit code ``c = floor(v / s16 + 1/2)``, then

        q8 = floor((c + 1) s16 R + 1/2 + s16 2^-E) + z8,

    ``R`` the reciprocal ``1 / s8`` rounded to 14 significant bits, ``E = floor(log2 s8)``. Probed with
    s16 = 2^-16 only (tools/HTP.md finding 50: every input code of 20 probes, output ranges [0, 0.25]
    to [0, 1] and zero points 0 to 70: 6 of 1.3 M codes off, each where the 16-bit code was; with the
    16-bit HardSigmoid decoded since, finding 55, the four re-run are bit for bit). The product reaches
    31 bits: it runs in float64."""
    p = f"{tensor}{SUFFIX}/"
    s8 = float(np.float32(enc.scale))
    reciprocal = 1.0 / s8
    unit = 2.0 ** (np.floor(np.log2(reciprocal)) - 13)
    multiplier = float(np.floor(reciprocal / unit + 0.5) * unit * wide.scale)
    constant = 0.5 + wide.scale * 2.0 ** -np.floor(np.log2(s8))
    float32_consts = {"inverse16": 1.0 / wide.scale, "half": 0.5, "low16": 0.0, "high16": float(wide.levels),
                      "zero_point": float(-enc.offset), "low": 0.0, "high": float(enc.levels),
                      "offset": float(enc.offset), "scale": enc.scale}
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), p + k) for k, v in float32_consts.items()]
    inits += [numpy_helper.from_array(np.array(v), p + k) for k, v in
              (("one", 1.0), ("multiplier", multiplier), ("constant", constant))]
    n = helper.make_node
    nodes = [n("Mul", [tensor, p + "inverse16"], [p + "v16"]), n("Add", [p + "v16", p + "half"], [p + "v16_half"]),
             n("Floor", [p + "v16_half"], [p + "c16_raw"]), n("Clip", [p + "c16_raw", p + "low16", p + "high16"],
                                                              [p + "c16"]),
             n("Cast", [p + "c16"], [p + "c16_64"], to=onnx.TensorProto.DOUBLE),
             n("Add", [p + "c16_64", p + "one"], [p + "c16_next"]),
             n("Mul", [p + "c16_next", p + "multiplier"], [p + "t"]), n("Add", [p + "t", p + "constant"], [p + "t_k"]),
             n("Floor", [p + "t_k"], [p + "q64"]), n("Cast", [p + "q64"], [p + "q"], to=onnx.TensorProto.FLOAT),
             n("Add", [p + "q", p + "zero_point"], [p + "q8"]), n("Clip", [p + "q8", p + "low", p + "high"],
                                                                  [p + "q8_clipped"]),
             n("Add", [p + "q8_clipped", p + "offset"], [p + "c8"]), n("Mul", [p + "c8", p + "scale"], [output])]
    return nodes, inits


def chain_constants(enc: Encoding) -> dict[str, float]:
    """The constants of fake_quant_nodes' chain that depend on the encoding: the scale and the clamp
    bounds of ``x / scale`` (offset and offset + levels), held as float32."""
    return {"scale": enc.scale, "low": enc.offset, "high": enc.offset + enc.levels}


SWITCH_INPUT = "onnxsnpe_quantize_enabled"
ENCODING_INPUTS = {"scale": "onnxsnpe_scales", "low": "onnxsnpe_lows", "high": "onnxsnpe_highs"}
"""With ``encodings_as_inputs``, each of chain_constants' values as an input, one entry per switched
activation in switch order: one model serves every set of encodings (encoding_feed)."""


def encoding_feed(names: Sequence[str], activations: dict[str, Encoding]) -> dict[str, np.ndarray]:
    """The ENCODING_INPUTS values for the activations ``names``: the float32 constants
    fake_quant_nodes would hold, so the arithmetic is the same bit for bit."""
    rows = [chain_constants(activations[name]) for name in names]
    return {source: np.array([row[constant] for row in rows], dtype=np.float32).reshape(len(rows))
            for constant, source in ENCODING_INPUTS.items()}


def build_simulation_model(
    model: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
    quantize_activations: Iterable[str] | None = None,
    switchable: bool = False,
    switched_params: Sequence[str] = (),
    round_half_up: Iterable[str] = (),
    on_grid: Iterable[str] = (),
    encodings_as_inputs: bool = False,
    float16_rounded: Iterable[str] = (),
    narrowed: Mapping[str, Encoding] | None = None,
    half_even: Iterable[str] = (),
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The deploy model with quantized params and fake-quant after each chosen activation.

    ``quantize_activations`` defaults to every activation with its own encoding (aliases need none:
    data movement keeps the grid). With ``switchable``, the model takes one more input,
    ``SWITCH_INPUT``: a bool vector, one entry per chosen activation in order, then one per
    ``switched_params`` entry (params that are quantized only when switched on; the other params
    always are), that turns each quantization on or off, so one session serves every combination.
    The activations in ``round_half_up`` round ties up (the HTP's requantized outputs), the others
    half away from zero. The activations in ``on_grid`` are computed on their own grid already (the
    HTP arithmetic's integer ops requantize to it), where fake quantization changes nothing: they
    get an Identity instead of the chain. Returns the model and a map from each original tensor name
    to the name that carries its simulated value. With ``switchable`` and ``encodings_as_inputs``
    the switched activations' encodings are inputs too (ENCODING_INPUTS, fed from encoding_feed;
    ``activations`` then only needs their bitwidths right), for models of opset 11 or later (Clip's
    bounds as inputs). Without ``switchable``, the activations in ``float16_rounded`` round as
    ROUNDINGS' "float16", those in ``half_even`` round ties to even, and those in ``narrowed``
    (computed in the 16-bit encoding it maps them to) as narrowed_nodes.
    """
    half_up, exact, float16, narrow = set(round_half_up), set(on_grid), set(float16_rounded), dict(narrowed or {})
    even = set(half_even)
    sim = onnx.ModelProto()
    sim.CopyFrom(model)
    graph = sim.graph
    chosen = list(targets.activations if quantize_activations is None else quantize_activations)
    switched = set(switched_params) if switchable else set()
    opset = standard_opset(sim)
    if encodings_as_inputs and not (switchable and opset >= 11):
        raise ValueError("encodings as inputs need a switchable model of opset 11 or later")
    if switched:
        _switch_params(graph, params, list(switched_params), len(chosen))
    # a large model's weights stay integer codes, made float one at a time in each inference
    stored = [init.name for init in graph.initializer if init.name in params and init.name not in switched
              and params[init.name].bitwidth <= 16] if opset >= 13 and is_large(model) else []
    if stored:
        _dequantize_params(sim, params, stored)
    for init in graph.initializer:
        if init.name in params and init.name not in switched and init.name not in stored:
            values = initializer_array(init)
            init.CopyFrom(numpy_helper.from_array(fake_quantize(values, params[init.name]), init.name))

    renamed = {name: name + SUFFIX for name in chosen}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    chains, new_inits = [], []
    for index, name in enumerate(chosen):
        rounding = "half_up" if name in half_up else "half_away"
        if name in float16 and not switchable:
            rounding = "float16"
        elif name in even and not switchable:
            rounding = "half_even"
        if name in exact and not switchable:
            nodes, inits = [helper.make_node("Identity", [name], [renamed[name]])], []
        elif name in narrow and not switchable:
            nodes, inits = narrowed_nodes(name, activations[name], renamed[name], narrow[name])
        elif switchable:
            nodes, inits = _switched_fake_quant(name, activations[name], renamed[name], index, opset, rounding,
                                                encodings_as_inputs)
        else:
            nodes, inits = fake_quant_nodes(name, activations[name], renamed[name], opset, rounding)
        chains.append((name, nodes))
        new_inits.extend(inits)
    _insert_after_producers(graph, chains)
    graph.initializer.extend(new_inits)
    if switchable:
        graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, onnx.TensorProto.BOOL,
                                                         [len(chosen) + len(switched)]))
    if encodings_as_inputs:
        graph.input.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [len(chosen)])
                           for name in ENCODING_INPUTS.values())

    output_map = {name: renamed.get(name, name) for name in [*chosen, *(o.name for o in graph.output)]}
    for output in graph.output:
        output.name = output_map[output.name]
    return sim, output_map


def _switched_fake_quant(
    name: str, enc: Encoding, output: str, index: int, opset: int, rounding: str, from_inputs: bool = False
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``output = fake_quantize(name)`` if ``SWITCH_INPUT[index]`` else ``name``, computing only one
    branch; ``from_inputs``: the scale and bounds read from the ENCODING_INPUTS at ``index``."""
    quantized = f"{output}/on"
    index_name = f"{output}/index"
    nodes, inits = fake_quant_nodes(name, enc, quantized, opset, rounding)
    if from_inputs:  # the chain's constants of the same names, gathered in the branch
        p = f"{name}{SUFFIX}/"
        gathered = [helper.make_node("Gather", [source, index_name], [p + constant])
                    for constant, source in ENCODING_INPUTS.items()]
        nodes = [*gathered, *nodes]
        inits = [init for init in inits if init.name not in {p + constant for constant in ENCODING_INPUTS}]
    value = helper.make_tensor_value_info
    then_branch = helper.make_graph(nodes, f"{output}/then", [], [value(quantized, onnx.TensorProto.FLOAT, None)],
                                    inits)
    else_branch = helper.make_graph([helper.make_node("Identity", [name], [f"{output}/off"])], f"{output}/else", [],
                                    [value(f"{output}/off", onnx.TensorProto.FLOAT, None)])
    flag = helper.make_node("Gather", [SWITCH_INPUT, index_name], [f"{output}/enabled"])
    branch = helper.make_node("If", [f"{output}/enabled"], [output], then_branch=then_branch,
                              else_branch=else_branch)
    return [flag, branch], [numpy_helper.from_array(np.array(index, dtype=np.int64), index_name)]


def _switch_params(graph: onnx.GraphProto, params: dict[str, ParamEncoding], names: list[str], first: int) -> None:
    """Replace each named initializer by an If on ``SWITCH_INPUT[first + i]`` that yields its quantized
    or its FP32 value (both held as constants), placed before every node."""
    by_name = {init.name: init for init in graph.initializer}
    nodes = []
    for index, name in enumerate(names, start=first):
        values = initializer_array(by_name[name])
        branches = {}
        for label, array in (("on", fake_quantize(values, params[name])), ("off", values)):
            out = f"{name}{SUFFIX}/{label}"
            constant = helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out + "/value"))
            branches[label] = helper.make_graph([constant], out, [],
                                                [helper.make_tensor_value_info(out, by_name[name].data_type, None)])
        index_name = f"{name}{SUFFIX}/index"
        graph.initializer.append(numpy_helper.from_array(np.array(index, dtype=np.int64), index_name))
        nodes.append(helper.make_node("Gather", [SWITCH_INPUT, index_name], [f"{name}{SUFFIX}/enabled"]))
        nodes.append(helper.make_node("If", [f"{name}{SUFFIX}/enabled"], [name], then_branch=branches["on"],
                                      else_branch=branches["off"]))
    kept = [init for init in graph.initializer if init.name not in set(names)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [value for value in graph.input if value.name not in set(names)]
    del graph.input[:]
    graph.input.extend(inputs)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])


def _dequantize_params(model: onnx.ModelProto, params: dict[str, ParamEncoding], names: list[str]) -> None:
    """Store the named params as integer codes, each read through a DequantizeLinear placed just before
    its first reader (qdq.dequantized_param: the values encoding.fake_quantize gives, up to 16 bits)."""
    graph = model.graph
    domain = quantization_domain(model, [params[name] for name in names])
    by_name = {init.name: init for init in graph.initializer}
    placing: dict[str, onnx.NodeProto] = {}
    new_inits: list[onnx.TensorProto] = []
    for name in names:
        node, inits = dequantized_param(name, initializer_array(by_name[name]), params[name], domain)
        placing[name] = node
        new_inits.extend(inits)
    kept = [init for init in graph.initializer if init.name not in placing]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    inputs = [value for value in graph.input if value.name not in placing]
    del graph.input[:]
    graph.input.extend(inputs)
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        ordered.extend(placing.pop(name) for name in node.input if name in placing)
        ordered.append(node)
    existing = ordered
    del graph.node[:]
    graph.node.extend([*placing.values(), *existing])  # read only inside subgraphs: first


def _insert_after_producers(graph: onnx.GraphProto, chains: list[tuple[str, list[onnx.NodeProto]]]) -> None:
    """Place each fake-quant chain right after the node producing its tensor (keeps topological order)."""
    by_tensor = dict(chains)
    ordered = []
    for name in [v.name for v in graph.input]:
        ordered.extend(by_tensor.pop(name, []))
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered.extend(by_tensor.pop(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
