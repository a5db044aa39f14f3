"""How closely onnxruntime's CPU and onnxsnpe's simulations follow Qualcomm's HTP, on the four real models.

    python tools/htp_agreement.py [--models effnet,det,rec,cls,minilm] [--extra-crops 56] [--per-op]
                                  [--weights asymmetric|symmetric|per-channel] [--act-bitwidth 8|16]
                                  [--auto-precision DB] [--htp-arch 73]
    python tools/htp_agreement.py --matrix [--models ...] [--modes A8,A16,auto] [--auto-precision DB]
                                  [--save rows.json]
    python tools/htp_agreement.py --graph-order [--models ...] [--weights ...] [--act-bitwidth 8|16]
                                  [--htp-arch 73]

Needs onnxruntime-qnn (``pip install 'onnxsnpe[qnn]'``). Each model is calibrated with min-max on
calib_data/calib (fixed [0, 1] ranges for Sigmoid/Softmax outputs, 8-bit activations and weights,
32-bit biases, 8-bit min-max encodings for the other constants; ``--act-bitwidth 16`` for 16-bit
activations), exported as a QDQ model, and run
on the HTP emulator over calib_data/eval plus ``--extra-crops`` deterministic crops of the
photographs in ../shared/images (agreement between two executions of one quantized model does not
need held-out data). ``--weights symmetric`` encodes the weights signed symmetric per tensor
(encoding.symmetric_encoding of the largest magnitude), ``--weights per-channel`` signed symmetric
per output channel (``--per-channel``: int8 with zero point 0, biases per channel), instead of
onnxsnpe's default per-tensor asymmetric min-max. Every execution is compared with the HTP's outputs:

- ``ort-cpu``: onnxruntime's CPU execution of the same QDQ model;
- ``simulate``: simulate.build_simulation_model, onnxsnpe's simulation;
- ``htp-model``: htp_model.htp_simulation_model, the simulation with the HTP's measured arithmetic.

Prints a Markdown table: SQNR in dB and the largest error in steps of the output encoding, top-1
agreement for class-score outputs (per sample, or per time step for the recogniser), and the nodes
onnxruntime kept on the CPU besides the graph input/output (de)quantization.

``minilm`` (the MiniLM-L6 sentence encoder) runs through the pipeline's own ``--htp`` instead
(measure_minilm), on ``8 + --extra-crops / 2`` held-out sentences (at most 32); ``--per-op`` skips it.
So does every model with ``--auto-precision DB``: ``quantize --auto-precision --target-sqnr DB`` (8-bit
activations and the ``--weights`` kind, the tensors it raises at 16 bits; each row names how many),
then its ``--htp`` on the same evaluation images; the rows compare its two arithmetics (no ort-cpu).

``--matrix`` measures every model x {per-tensor asymmetric, per-channel weights} x {8-bit
activations, 16-bit activations, auto precision at ``--auto-precision`` dB (25 by default)} and
prints one table, a row per model, output and configuration with both simulations and ort-cpu side
by side (``--save`` keeps the rows as JSON after each configuration, so a long run's finished part
is never lost).

With ``--per-op``, also each op in isolation: every quantized op (with a Relu/Clip squashed into it)
is cut out of the model, fed the same on-grid inputs (taken from the htp-model simulation of the
first evaluation sample) on the HTP and in both simulations, and the share of its output values
that differ from the HTP's is summed per op type. This separates the arithmetic of single ops from
the way differences grow through a network.

With ``--graph-order``, instead, where the differences start in the whole model: every activation is
exposed on both sides (the QDQ model's and the htp-model simulation's), the first evaluation
sample runs through both, and the first tensors in graph order whose values differ by a step or
more are listed with the channels they differ in, then how many tensors differ at all. Exposing
every tensor can change how the HTP fuses ops; a difference that the op alone does not show
(``--per-op``) comes from the graph around it.

``--htp-arch`` has the emulator and the htp-model simulation compute as that HTP architecture (the
default: the emulator's own, v68) in the A8/A16 rows, ``--per-op`` and ``--graph-order``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from onnxsnpe.data.datasets import ImageOptions, open_dataset
from onnxsnpe.encode.completion import completed_encodings
from onnxsnpe.encode.encoding import Encoding, symmetric_encoding
from onnxsnpe.encode.ranges import (
    activation_encodings,
    fixed_range_tensors,
    weight_encodings,
)
from onnxsnpe.errors import HtpRefused
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import initializer_values, load_model, model_inputs
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import QuantTargets, find_targets
from onnxsnpe.report.agreement import measure_agreement
from onnxsnpe.simulate.emulator import HTP_ARCHS, HtpSession, cpu_runner, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.fake_quant import SUFFIX, build_simulation_model
from onnxsnpe.simulate.htp.model import concat_encodings, htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model
from onnxsnpe.stats.collect import collect_statistics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5,), "std": (0.5,)}
MODELS = {
    "effnet": ("efficientnet_lite0.onnx", (224, 224), IMAGENET),
    "det": ("ch_PP-OCRv4_det_infer.onnx", (320, 320), IMAGENET),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", (48, 320), HALF),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192), HALF),
}
RUNS = ("ort-cpu", "simulate", "htp-model")
WEIGHTS = ("asymmetric", "symmetric", "per-channel")


def write_crops(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` crops of random size, position and mirroring from the shared photographs, as PNG."""
    rng = np.random.default_rng(seed)
    photos = sorted(p for p in (SHARED / "images").iterdir() if p.suffix in (".png", ".jpg"))
    for index in range(count):
        photo = Image.open(photos[index % len(photos)]).convert("RGB")
        width, height = photo.size
        crop_w, crop_h = int(width * rng.uniform(0.3, 1.0)), int(height * rng.uniform(0.3, 1.0))
        x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        crop = photo.crop((x, y, x + crop_w, y + crop_h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"crop_{index:03d}.png")


def symmetric_weight_encodings(model: onnx.ModelProto, targets: QuantTargets, bitwidth: int) -> dict[str, Encoding]:
    """Signed symmetric per-tensor encodings of the weights, from each weight's largest magnitude."""
    return {name: symmetric_encoding(float(np.abs(array).max()), bitwidth)
            for name, array in initializer_values(model, targets.weights)}


def calibrate(key: str, weights_kind: str = "asymmetric", act_bitwidth: int = 8):
    """The deploy model, targets, encodings and datasets of one model, calibrated as the docstring says."""
    file, size, norm = MODELS[key]
    model = load_model(SHARED / "models" / file)
    inputs = model_inputs(model)
    options = ImageOptions(resize=size, **norm)
    calib = open_dataset(ROOT / "calib_data" / "calib", inputs, options)
    calib.load(0)
    deploy, _ = prepare_deploy_model(model, dict(calib.shapes))
    targets = find_targets(deploy)
    stats = collect_statistics(deploy, targets.activations, calib, methods=["minmax"], floors=targets.floors())
    acts = activation_encodings(stats, targets, "minmax", act_bitwidth, fixed=fixed_range_tensors(deploy))
    if weights_kind == "symmetric":
        weights = symmetric_weight_encodings(deploy, targets, 8)
    else:
        weights = weight_encodings(deploy, targets, 8, per_channel=weights_kind == "per-channel")
    done = completed_encodings(deploy, targets, acts, weights)  # as the pipeline encodes (stages.encode)
    params = {**done.weights, **done.biases, **done.constants}
    acts = done.activations
    return deploy, targets, acts, params, inputs, options, calib


def measure_minilm(weights_kind: str, act_bitwidth: int, samples: int, target_sqnr: float | None = None) -> list[dict]:
    """MiniLM-L6 through the pipeline's own ``--htp`` (its masks, Gather tables and integer inputs
    as ``quantize`` handles them): calibrated on the first 64 sentences of tools/sentences.txt,
    compared on the last ``samples``; no ort-cpu row (the pipeline compares its two arithmetics)."""
    from text_samples import split_sentences, write_samples

    with tempfile.TemporaryDirectory() as tmp:
        calib_sentences, held_out = split_sentences(64, samples)
        write_samples(Path(tmp, "calib"), calib_sentences)
        write_samples(Path(tmp, "eval"), held_out)
        model = SHARED / "models" / "minilm_l6.onnx"
        data = (Path(tmp, "calib"), Path(tmp, "eval"), Path(tmp, "out"), samples, weights_kind, act_bitwidth,
                target_sqnr)
        return pipeline_rows("minilm", model, *data)


def measure_auto_precision(key: str, crops: Path | None, weights_kind: str, target_sqnr: float) -> list[dict]:
    """An image model through the pipeline with ``--auto-precision --target-sqnr`` and its own
    ``--htp`` on the evaluation images (calib_data/eval and the crops), as ``measure`` takes them."""
    file, size, norm = MODELS[key]
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = Path(tmp, "eval")
        evaluation.mkdir()
        for folder, prefix in [(ROOT / "calib_data" / "eval", "eval"), *([(crops, "crop")] if crops else [])]:
            for image in sorted(folder.iterdir()):
                if image.suffix.lower() in (".png", ".jpg"):
                    shutil.copy(image, evaluation / f"{prefix}_{image.name}")
        count = sum(1 for _ in evaluation.iterdir())
        return pipeline_rows(key, SHARED / "models" / file, ROOT / "calib_data" / "calib", evaluation, Path(tmp, "out"),
                             count, weights_kind, 8, target_sqnr, ImageOptions(resize=size, **norm))


def pipeline_rows(key: str, model: Path, calib: Path, evaluation: Path, out: Path, samples: int, weights_kind: str,
                  act_bitwidth: int, target_sqnr: float | None, options: ImageOptions | None = None) -> list[dict]:
    """quantize with ``--htp samples`` (and auto precision at ``target_sqnr`` when given): the
    agreement rows of both arithmetics against the HTP, each saying how many tensors were raised."""
    from onnxsnpe.api import quantize

    report = quantize(model, calib, out, eval_data=evaluation, act_bitwidth=act_bitwidth,
                      per_channel=weights_kind == "per-channel", analysis_samples=0, htp_samples=samples,
                      image_options=options, auto_precision=target_sqnr is not None, target_sqnr=target_sqnr,
                      progress=False).report
    if "refused" in report["htp"]:
        raise HtpRefused(report["htp"]["refused"])
    precision = report["optimizations"].get("auto_precision")
    label = key if precision is None else f"{key} (auto precision, {len(precision['raised'])} raised)"
    runs = {"htp": "htp-model", "exact": "simulate"}
    return [{"model": label, "run": runs[arithmetic], "samples": report["htp"]["samples"], **row,
             "cpu_nodes": [tuple(n) for n in report["htp"]["cpu_fallback_ops"] or []],
             "float_nodes": [tuple(n) for n in report["htp"]["float_ops"]]}
            for arithmetic, rows in report["htp"]["agreement"].items() for row in rows]


def measure(key: str, crops: Path | None, weights_kind: str = "asymmetric", act_bitwidth: int = 8,
            arch: str | None = None) -> list[dict]:
    """Calibrate one model, run it on the HTP (as ``arch``; None: the emulator's default), and compare
    every execution with it."""
    deploy, targets, acts, params, inputs, options, calib = calibrate(key, weights_kind, act_bitwidth)
    qdq = build_qdq_model(deploy, targets, acts, params)
    input_encodings = {spec.name: acts[spec.name] for spec in inputs}
    htp = HtpSession(qdq, input_encodings, arch)
    names = htp.output_names
    candidates = {
        "ort-cpu": cpu_runner(qdq, input_encodings, names),
        "simulate": simulation_runner(*build_simulation_model(deploy, targets, acts, params), names),
        "htp-model": simulation_runner(*htp_simulation_model(deploy, targets, acts, params, htp.arch), names),
    }
    folders = [ROOT / "calib_data" / "eval"] + ([crops] if crops else [])
    datasets = [open_dataset(folder, inputs, options) for folder in folders]
    for dataset in datasets:
        dataset.shapes.update(calib.shapes)
    samples = [sample for dataset in datasets for sample in dataset]
    htp_outputs = [htp.run(sample) for sample in samples]  # the emulator is the slow part: run it once
    rows = []
    for run, candidate in candidates.items():
        outputs = iter(htp_outputs)
        for agreement in measure_agreement(lambda _s, it=outputs: next(it), candidate, names, acts, samples):
            rows.append({"model": key, "run": run, "samples": len(samples), **agreement.to_dict(),
                         "cpu_nodes": htp.cpu_nodes, "float_nodes": htp.float_nodes})
    return rows


def per_op(key: str, weights_kind: str = "asymmetric", act_bitwidth: int = 8,
           arch: str | None = None) -> dict[str, list[int]]:
    """Per op type: [ops, output values, values where simulate differs, values where htp-model differs],
    each op run alone on the HTP computing as ``arch`` (None: the emulator's default)."""
    deploy, targets, acts, params, inputs, options, _ = calibrate(key, weights_kind, act_bitwidth)
    sample = open_dataset(ROOT / "calib_data" / "eval", inputs, options).load(0)
    modeled, _ = htp_simulation_model(deploy, targets, acts, params, arch)
    produced = {out for node in modeled.graph.node for out in node.output}
    visible = [name + SUFFIX for name in targets.activations] + [a for a in targets.aliases if a in produced]
    session = make_session(modeled, visible)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, sample), strict=True))
    producer = {out: node for node in deploy.graph.node for out in node.output}
    constants = {init.name for init in deploy.graph.initializer}
    extractor = onnx.utils.Extractor(deploy)
    totals: dict[str, list[int]] = {}
    for tensor in targets.activations:
        node = producer.get(tensor)
        if node is None:
            continue
        group = [node]
        if node.input and node.input[0] in targets.squashed:
            group.insert(0, producer[node.input[0]])
        first = group[0]
        if first.input and first.input[0] in targets.aliases and first.input[0] not in produced:
            group.insert(0, producer[first.input[0]])  # a Pad whose codes the simulation padded instead
        made = {out for member in group for out in member.output}
        feeds = list(dict.fromkeys(i for member in group for i in member.input
                                   if i and i not in constants and i not in made))
        if not feeds or not all(name in acts for name in feeds):
            continue
        sub = extractor.extract_model(feeds, [tensor])
        sub_targets = QuantTargets(activations=[*feeds, tensor],
                                   squashed={k: v for k, v in targets.squashed.items() if k in made},
                                   aliases={k: v for k, v in targets.aliases.items() if k in made})
        sub_acts = {name: acts[name] for name in [*sub_targets.activations, *sub_targets.aliases] if name in acts}
        sub_params = {k: v for k, v in params.items() if k in {i.name for i in sub.graph.initializer}}
        feed = {name: values.get(name + SUFFIX, values.get(name)) for name in feeds}
        htp = HtpSession(build_qdq_model(sub, sub_targets, sub_acts, sub_params), {}, arch)
        reference = htp.run(feed)[0]
        step = acts[tensor].scale / 2
        row = totals.setdefault("+".join(member.op_type for member in group), [0, 0, 0, 0])
        row[0] += 1
        row[1] += reference.size
        for column, build in ((2, build_simulation_model), (3, partial(htp_simulation_model, arch=arch))):
            got = simulation_runner(*build(sub, sub_targets, sub_acts, sub_params), [tensor])(feed)[0]
            row[column] += int((np.abs(got - reference) > step).sum())
    return totals


def graph_order(key: str, weights_kind: str = "asymmetric", act_bitwidth: int = 8, shown: int = 12,
                arch: str | None = None) -> str:
    """The first tensors in graph order where the htp-model simulation and the HTP differ, every
    activation exposed on both sides, on the first evaluation sample (see the module docstring)."""
    deploy, targets, acts, params, inputs, options, _ = calibrate(key, weights_kind, act_bitwidth)
    sample = open_dataset(ROOT / "calib_data" / "eval", inputs, options).load(0)
    graph_inputs = {value.name for value in deploy.graph.input}
    names = [n for n in targets.activations if n not in graph_inputs]
    modeled, output_map = htp_simulation_model(deploy, targets, acts, params, arch)
    reencoded = {name for name, enc in concat_encodings(deploy.graph, acts).items() if enc != acts.get(name)}
    simulated = dict(zip(names, make_session(modeled, [output_map[n] for n in names]).run(
        [output_map[n] for n in names], sample), strict=True))
    qdq = build_qdq_model(deploy, targets, acts, params)
    present = {o.name for o in qdq.graph.output}
    qdq.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    htp = HtpSession(qdq, {spec.name: acts[spec.name] for spec in inputs}, arch)  # inputs rounded as the pipeline does
    on_htp = dict(zip(htp.output_names, htp.run(sample), strict=True))
    producer = {out: node for node in deploy.graph.node for out in node.output}
    where = f", HTP v{arch}" if arch else ""
    lines, differing = [f"{key}, {weights_kind} weights, A{act_bitwidth}{where}: first differences in graph order"], 0
    for name in (out for node in deploy.graph.node for out in node.output if out in simulated and out not in reencoded):
        steps = np.abs(simulated[name].astype(np.float64) - on_htp[name]) / acts[name].scale
        bad = steps > 0.5
        if not bad.any():
            continue
        differing += 1
        if differing <= shown:
            channels = np.nonzero(bad.any(axis=(0, *range(2, bad.ndim))))[0] if bad.ndim >= 2 else []
            listed = ", ".join(str(c) for c in channels[:6]) + (" ..." if len(channels) > 6 else "")
            lines.append(f"  {producer[name].op_type:<12} {name:<40} {int(bad.sum()):>8} of {bad.size:<9} "
                         f"up to {steps.max():.0f} steps, channels {listed}")
    skipped = len(reencoded & simulated.keys())
    lines.append(f"  {differing} of {len(simulated) - skipped} tensors differ"
                 + (f" ({skipped} Concat inputs the simulation computes on the Concat's grid not compared:"
                    " exposed, the HTP writes them on their own; the Concat's output is compared)" if skipped else ""))
    return "\n".join(lines)


def per_op_table(results: dict[str, dict[str, list[int]]]) -> str:
    """Markdown: per model and op type, the share of isolated output values that differ from the HTP."""
    lines = ["| model | op | ops | values | simulate differs | htp-model differs |", "|---|---|---|---|---|---|"]
    for key, totals in results.items():
        for op, (count, size, plain, modeled) in sorted(totals.items(), key=lambda kv: -kv[1][2]):
            shares = f"{100 * plain / size:.3f}% | {100 * modeled / size:.3f}%"
            lines.append(f"| {key} | {op} | {count} | {size} | {shares} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """The Markdown table of all rows."""
    lines = ["| model | output | samples | run | SQNR vs HTP (dB) | max error (LSB) | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        sqnr = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
        top1 = "" if row["top1_agreement"] is None else f"{100 * row['top1_agreement']:.1f}%"
        lines.append(f"| {row['model']} | {row['name']} | {row['samples']} | {row['run']} | {sqnr} | "
                     f"{row['max_error_lsb']:.0f} | {top1} |")
    fallbacks = {row["model"]: row["cpu_nodes"] for row in rows}
    lines.append("")
    for model, nodes in fallbacks.items():
        text = "unknown (this onnxruntime cannot report placement)" if nodes is None else (
            ", ".join(f"{op} {name}" for op, name in nodes) or "none")
        lines.append(f"- {model}: nodes on the CPU besides graph input/output (de)quantization: {text}")
    for model, nodes in {row["model"]: row.get("float_nodes") for row in rows}.items():
        if nodes:
            lines.append(f"- {model}: ops the HTP computes in float: {float_ops_text(nodes)}")
    return "\n".join(lines)


MATRIX_WEIGHTS = ("asymmetric", "per-channel")
MATRIX_ACTIVATIONS = ("A8", "A16", "auto")


def measure_config(key: str, crops: Path | None, weights_kind: str, activations: str, target_sqnr: float | None,
                   extra_crops: int, arch: str | None = None) -> list[dict]:
    """One model in one configuration (``activations``: A8, A16 or auto precision at ``target_sqnr``):
    its agreement rows, or one row saying why the emulator refused it."""
    try:
        if activations == "auto":
            if key == "minilm":
                return measure_minilm(weights_kind, 8, min(32, 8 + extra_crops // 2), target_sqnr)
            return measure_auto_precision(key, crops, weights_kind, target_sqnr)
        bitwidth = 16 if activations == "A16" else 8
        if key == "minilm":
            return measure_minilm(weights_kind, bitwidth, min(32, 8 + extra_crops // 2))
        return measure(key, crops, weights_kind, bitwidth, arch)
    except HtpRefused as exc:
        return [{"model": key, "refused": str(exc)}]


def float_ops_text(nodes: list[tuple[str, str]]) -> str:
    """The ops the HTP computes in float: by name when there are a few, else counted by QNN op type."""
    if len(nodes) <= 3:
        return ", ".join(f"{op} {name}" for op, name in nodes)
    counts = Counter(op for op, _ in nodes)
    return ", ".join(f"{count} {op}" for op, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def matrix_table(results: list[dict]) -> str:
    """Markdown: one row per model, output and configuration; each run's SQNR, max error and top-1."""
    lines = ["| model | weights | activations | output | samples | htp arithmetic | exact arithmetic | ort-cpu |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(row: dict | None) -> str:
        if row is None:
            return ""
        sqnr = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f} dB"
        top1 = "" if row["top1_agreement"] is None else f", {100 * row['top1_agreement']:.1f}%"
        return f"{sqnr}, {row['max_error_lsb']:.0f} LSB{top1}"

    for result in results:
        head = f"| {result['model']} | {result['weights']} | {result['activations']} |"
        refused = [row for row in result["rows"] if "refused" in row]
        if refused:
            reason = re.search(r"QNN_\w+|INVALID_GRAPH|Unrecognized attribute[^,.]*", refused[0]["refused"])
            why = reason.group(0) if reason else refused[0]["refused"]
            lines.append(f"{head} | | refused by the emulator ({why}) | | |")
            continue
        outputs = list(dict.fromkeys(row["name"] for row in result["rows"]))
        for output in outputs:
            runs = {row["run"]: row for row in result["rows"] if row["name"] == output}
            label = result["rows"][0]["model"].removeprefix(result["model"]).strip(" (),")
            name = f"{output} ({label})" if label else output
            samples = next(iter(runs.values()))["samples"]
            lines.append(f"{head} {name} | {samples} | {cell(runs.get('htp-model'))} | "
                         f"{cell(runs.get('simulate'))} | {cell(runs.get('ort-cpu'))} |")
    lines.append("")
    for result in results:
        nodes = next((row.get("float_nodes") for row in result["rows"] if "refused" not in row), None)
        if nodes:
            lines.append(f"- {result['model']} {result['weights']} {result['activations']}: "
                         f"ops the HTP computes in float: {float_ops_text(nodes)}")
    return "\n".join(lines).rstrip()


def run_matrix(models: list[str], modes: list[str], crops: Path | None, target_sqnr: float, extra_crops: int,
               save: Path | None) -> list[dict]:
    """Every model in every configuration of the matrix (activation ``modes`` of MATRIX_ACTIVATIONS),
    saved after each one when ``save`` is given."""
    results = []
    for weights_kind in MATRIX_WEIGHTS:
        for activations in modes:
            for key in models:
                start = time.perf_counter()
                rows = measure_config(key, crops, weights_kind, activations, target_sqnr, extra_crops)
                seconds = time.perf_counter() - start
                results.append({"model": key, "weights": weights_kind, "activations": activations,
                                "seconds": round(seconds, 1), "rows": rows})
                print(f"{key} {weights_kind} {activations}: {seconds:.0f} s", file=sys.stderr, flush=True)
                if save is not None:
                    save.write_text(json.dumps(results, indent=1, default=list))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*MODELS, "minilm"]),
                        help="comma-separated subset of " + ",".join([*MODELS, "minilm"]))
    parser.add_argument("--extra-crops", type=int, default=56, help="crops of ../shared/images added to eval")
    parser.add_argument("--per-op", action="store_true", help="also compare each op in isolation")
    parser.add_argument("--weights", choices=WEIGHTS, default="asymmetric",
                        help="weight encodings: per-tensor asymmetric min-max (onnxsnpe's default), per-tensor "
                             "symmetric, or symmetric per output channel")
    parser.add_argument("--act-bitwidth", type=int, choices=(8, 16), default=8, help="activation bitwidth")
    parser.add_argument("--auto-precision", type=float, metavar="DB",
                        help="the pipeline's --auto-precision --target-sqnr DB (8-bit activations, raised where it "
                             "pays), compared through its own --htp")
    parser.add_argument("--matrix", action="store_true",
                        help="every model x {asymmetric, per-channel} weights x {A8, A16, auto precision}, one table")
    parser.add_argument("--modes", default=",".join(MATRIX_ACTIVATIONS),
                        help="with --matrix, a comma-separated subset of " + ",".join(MATRIX_ACTIVATIONS))
    parser.add_argument("--save", type=Path, help="with --matrix, keep the rows as JSON here")
    parser.add_argument("--htp-arch", choices=HTP_ARCHS,
                        help="the HTP architecture the emulator and the htp-model simulation compute as (default: "
                             "the backend's; not with --matrix or --auto-precision, which use the pipeline's)")
    parser.add_argument("--graph-order", action="store_true",
                        help="where the differences start: the first differing tensors with every one exposed")
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    if args.graph_order:
        for key in args.models.split(","):
            if key in MODELS:
                print(graph_order(key, args.weights, args.act_bitwidth, arch=args.htp_arch))
        return 0
    rows, measured, refused = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        crops = None
        if args.extra_crops:
            crops = Path(tmp)
            write_crops(crops, args.extra_crops)
        if args.matrix:
            target = 25.0 if args.auto_precision is None else args.auto_precision
            results = run_matrix(args.models.split(","), args.modes.split(","), crops, target, args.extra_crops,
                                 args.save)
            print(matrix_table(results))
            return 0
        for key in args.models.split(","):
            start = time.perf_counter()
            if (key == "minilm" or args.auto_precision is not None) and args.weights == "symmetric":
                refused.append(f"- {key}: not measured: per-tensor symmetric weights are not a pipeline option")
                continue
            mode = "auto" if args.auto_precision is not None else f"A{args.act_bitwidth}"
            found = measure_config(key, crops, args.weights, mode, args.auto_precision, args.extra_crops, args.htp_arch)
            if "refused" in found[0]:  # the emulator refused the model: go on
                refused.append(f"- {key}: not measured: {found[0]['refused']}")
            else:
                rows.extend(found)
                if key != "minilm" and mode != "auto":
                    measured.append(key)
            print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(table(rows))
    print("\n".join(refused))
    if args.per_op:
        print()
        print(per_op_table({key: per_op(key, args.weights, args.act_bitwidth, args.htp_arch) for key in measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
