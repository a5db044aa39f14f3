"""Which rule for the A16W8 Conv offset ``C`` fits the HTP emulator, channel by channel, on a real model.

    python tools/fit_a16w8_offset.py [--model effnet|det|rec|cls] [--weights asymmetric|per-channel]

Needs onnxruntime-qnn. The model is calibrated as tools/htp_agreement.py does at 16-bit activations,
its QDQ model runs on the emulator with every truncating Conv's input and output exposed (first
evaluation sample), and for each output channel the exact ``sum(u w)`` is computed in float64 from
the HTP's own input codes (so differences upstream do not matter). A channel's outputs then say
which values of ``floor(C / 2^8)`` are consistent with them (simulate/htp/wide.py's formula); each
candidate way of computing ``C`` is scored by the channels it contradicts (one block of 2^8 off:
the float rounding of ``C`` near a multiple of 2^8; further: something other than the offset; channels
no value within two blocks explains are listed apart). Only ``floor(C / 2^8)``
is seen, so only channels whose ``C`` lies within a few float32 steps of a multiple of 2^8 tell the
rules apart. Doubly strided depthwise Convs (no truncation) and padded or dilated ones are skipped.
This is not a test: it measures the emulator, and prints the channels every rule contradicts.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from htp_agreement import ROOT, calibrate
from numpy.lib.stride_tricks import sliding_window_view

from onnxsnpe.data.datasets import open_dataset
from onnxsnpe.encode.encoding import ChannelEncodings, fake_quantize, quantize, round_half_away
from onnxsnpe.graph.large import initializer_array
from onnxsnpe.graph.ops import node_attributes
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.htp.codes import output_encoding, requant_offset
from onnxsnpe.simulate.htp.linear import int8_weights
from onnxsnpe.simulate.qdq import build_qdq_model

f32 = np.float32


def truncating_convs(deploy: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Convs with 8-bit weights whose accumulator loses 8 bits (not doubly strided depthwise),
    unpadded and undilated (the models pad explicitly)."""
    convs = []
    for node in deploy.graph.node:
        attrs = node_attributes(node)
        if node.op_type != "Conv" or any(attrs.get("pads", [0])) or any(d != 1 for d in attrs.get("dilations", [1])):
            continue
        if attrs.get("group", 1) > 1 and all(s > 1 for s in attrs.get("strides", [1])):
            continue
        convs.append(node)
    return convs


def candidates(x_enc, y_enc, w_scale: np.ndarray, steps: np.ndarray, bias_codes: np.ndarray,
               bias_scale) -> dict[str, np.ndarray]:
    """Ways of computing C (before rounding half away from zero), per channel."""
    s_in, s_out, z_out = f32(x_enc.scale), f32(y_enc.scale), f32(-y_enc.offset)
    w32, st32 = w_scale.astype(f32), steps.astype(f32)
    ratio = w32 / w32.max()
    base = s_in * w32.max()
    b32 = bias_codes.astype(f32)
    sb32 = np.asarray(bias_scale, dtype=np.float64).astype(f32)
    bias_term = (b32 * sb32) / (base * st32) / ratio
    step = float(s_in) * w_scale.astype(np.float64) * steps
    multiplier = step / float(s_out)
    return {
        "float64: B + z_out / M": bias_codes * np.asarray(bias_scale, dtype=np.float64) / step
        + float(z_out) / multiplier,
        # what simulate/htp/wide.py computes (already rounded; rounding again changes nothing)
        "float32, the 8-bit rule": requant_offset(x_enc.scale, w_scale, y_enc.scale, -y_enc.offset, steps,
                                                  bias_codes, bias_scale),
        "float32, z s_out / base": (z_out * s_out) / (base * ratio) / st32 + bias_term,
        "float32, z / M": z_out / (s_in * w32 * st32 / s_out) + bias_term,
        "float32, (z s_out + b s_b) / base": ((z_out * s_out + b32 * sb32) / (base * ratio)) / st32,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="effnet", choices=("effnet", "det", "rec", "cls"))
    parser.add_argument("--weights", default="asymmetric", choices=("asymmetric", "per-channel"))
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    deploy, targets, acts, params, inputs, options, _ = calibrate(args.model, args.weights, 16)
    sample = open_dataset(ROOT / "calib_data" / "eval", inputs, options).load(0)
    inits = {init.name: init for init in deploy.graph.initializer}
    convs = [n for n in truncating_convs(deploy) if n.input[1] in params]
    qdq = build_qdq_model(deploy, targets, acts, params)
    present = {o.name for o in qdq.graph.output}
    exposed = list(dict.fromkeys(t for n in convs for t in (n.input[0], n.output[0]) if t not in present))
    qdq.graph.output.extend(onnx.ValueInfoProto(name=t) for t in exposed)
    session = HtpSession(qdq, {s.name: acts[s.name] for s in inputs})
    on_htp = {**sample, **dict(zip(session.output_names, session.run(sample), strict=True))}
    scores: dict[str, list[int]] = {}
    contradicted: dict[str, list[str]] = {}
    unexplained: list[str] = []
    for node in convs:
        attrs = node_attributes(node)
        x_enc, y_enc = acts.get(node.input[0]), output_encoding(node, targets, acts)
        if x_enc is None or y_enc is None or y_enc.bitwidth != 16 or node.output[0] not in on_htp:
            continue
        weight, w_enc = initializer_array(inits[node.input[1]]), params[node.input[1]]
        per_channel = isinstance(w_enc, ChannelEncodings)
        w_scale = f32(w_enc.scales()) if per_channel else np.full(weight.shape[0], f32(w_enc.scale))
        along = w_scale.astype(np.float64).reshape(-1, 1, 1, 1)
        codes = np.round(fake_quantize(weight, w_enc).astype(np.float64) / along)
        codes, steps = int8_weights(codes, 0)
        bias_codes, bias_scale = np.zeros(weight.shape[0]), 1.0
        if len(node.input) > 2 and node.input[2] in params:
            b_enc = params[node.input[2]]
            offset = b_enc.offsets() if isinstance(b_enc, ChannelEncodings) else b_enc.offset
            bias_codes = quantize(initializer_array(inits[node.input[2]]).reshape(-1), b_enc) + offset
            bias_scale = b_enc.scales() if isinstance(b_enc, ChannelEncodings) else b_enc.scale
        step = float(f32(x_enc.scale)) * w_scale.astype(np.float64) * steps
        mantissa = (step / float(f32(y_enc.scale)) * 256).astype(np.float16).astype(np.float64)
        u = np.round(on_htp[node.input[0]].astype(np.float64) / float(f32(x_enc.scale))) - x_enc.offset
        y = np.round(on_htp[node.output[0]].astype(np.float64) / float(f32(y_enc.scale))) - y_enc.offset
        kernel, strides = weight.shape[2:], attrs.get("strides", [1, 1])
        windows = sliding_window_view(u[0], tuple(kernel), axis=(1, 2))[:, ::strides[0], ::strides[1]]
        if attrs.get("group", 1) == 1:
            sums = np.einsum("chwij,ocij->ohw", windows, codes)
        else:
            sums = np.einsum("chwij,cij->chw", windows, codes[:, 0])
        zero_sum = -x_enc.offset * codes.reshape(codes.shape[0], -1).sum(axis=1)
        rules = {name: round_half_away(np.asarray(v, dtype=np.float64))
                 for name, v in candidates(x_enc, y_enc, w_scale, steps, bias_codes, bias_scale).items()}
        reference = rules["float32, the 8-bit rule"]
        for c in range(codes.shape[0]):
            base = np.floor(sums[c] / 256) - np.floor(zero_sum[c] / 256 + 0.5)  # ties up (finding 49)
            fits = {q for q in range(int(np.floor(reference[c] / 256)) - 2, int(np.floor(reference[c] / 256)) + 3)
                    if np.array_equal(np.clip(np.floor((base + q) * mantissa[c] + 0.5), 0, 65535), y[0, c])}
            if not fits:  # no offset explains this channel (something else differs there)
                unexplained.append(f"{node.output[0]} channel {c}")
                continue
            for name, rule in rules.items():
                score = scores.setdefault(name, [0, 0, 0])
                score[0] += 1
                distance = min(abs(q - int(np.floor(rule[c] / 256))) for q in fits)
                if distance:
                    score[1 if distance == 1 else 2] += 1
                    contradicted.setdefault(name, []).append(f"{node.output[0]} channel {c} ({distance})")
    channels = next(iter(scores.values()))[0] if scores else 0
    print(f"{args.model}, {args.weights} weights, A16: channels each rule for C contradicts (of {channels})")
    for name, (_, near, far) in scores.items():
        print(f"  {name:<36} {near + far:5d}: {near} one block of 2^8 off, {far} further")
    print("contradicting the 8-bit rule: " + "; ".join(contradicted.get("float32, the 8-bit rule", [])))
    print(f"channels no offset explains ({len(unexplained)}): " + "; ".join(unexplained[:20])
          + (" ..." if len(unexplained) > 20 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
