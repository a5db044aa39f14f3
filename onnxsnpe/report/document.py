"""report.json (what was done, and how far the simulated model is from FP32) and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__

if TYPE_CHECKING:  # the command imports the summary; evaluation (numba) loads when a run needs it
    from .evaluation import Evaluation
    from .weight_analysis import WeightFigures

WORST_COUNT = 10


def build_report(
    *,
    model_path: Path,
    input_shapes: dict[str, tuple[int, ...]],
    input_dtypes: dict[str, str],
    fixed_inputs: dict[str, list[float]],
    output_names: list[str],
    calibration: dict,
    evaluation: dict,
    settings: dict,
    graph: dict,
    encodings: dict,
    evaluation_figures: Evaluation,
    weights: list[WeightFigures],
    files: list[str],
) -> dict:
    """The machine-readable report; contains nothing that changes between identical runs (the
    caller adds the stage timings)."""
    from .evaluation import worst_isolated

    return {
        "tool": {"name": "onnxsnpe", "version": __version__},
        "model": {
            "path": str(model_path),
            "inputs": [{"name": n, "shape": list(s), "dtype": input_dtypes[n]} for n, s in input_shapes.items()],
            "outputs": output_names,
            "fixed_inputs": {name: [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
                             for name, values in fixed_inputs.items()},
        },
        "calibration": calibration,
        "evaluation": evaluation,
        "settings": settings,
        "graph": graph,
        "encodings": encodings,
        "outputs": [c.to_dict() for c in evaluation_figures.outputs],
        "tensors": {
            "isolated_samples": evaluation_figures.isolated_samples,
            "worst_isolated": [f.name for f in worst_isolated(evaluation_figures.tensors, WORST_COUNT)],
            "figures": [f.to_dict() for f in evaluation_figures.tensors],
        },
        "weights": {
            "most_gain_per_channel": [w.name for w in _top(weights, "per_channel_gain_db")],
            "most_gain_16_bit": [w.name for w in _top(weights, "sixteen_bit_gain_db")],
            "figures": [w.to_dict() for w in weights],
        },
        "files": files,
    }


def htp_arch_phrase(htp: dict) -> str:
    """", computing as HTP vN" when the emulator was asked for an architecture (report.json's
    htp.htp_arch), else nothing."""
    return f", computing as HTP v{htp['htp_arch']}" if htp.get("htp_arch") else ""


def summary_text(report: dict, out_dir: Path, seconds: float) -> str:
    """A one-screen summary of a quantize run for the terminal."""
    enc = report["encodings"]
    ev = report["evaluation"]
    lines = [
        f"onnxsnpe: quantized {report['model']['path']} in {seconds:.1f} s",
        f"  calibration: {report['calibration']['num_samples']} samples from {report['calibration']['path']}"
        f" ({report['settings']['method']}, A{report['settings']['act_bitwidth']}"
        f"W{report['settings']['weight_bitwidth']}, bias {report['settings']['bias_bitwidth']}-bit)",
        f"  encodings: {enc['activation_count']} activations ({enc['alias_count']} sharing their input's),"
        f" {enc['param_count']} params; {report['graph']['batchnorms_folded']} BatchNorms folded",
        f"  simulated ({report['settings']['arithmetic']} arithmetic) vs FP32 on "
        + (ev["subset"] if ev.get("subset") else
           f"{ev['num_samples']} {'held-out' if ev['held_out'] else 'calibration'} samples") + ":",
    ]
    lines[-1:-1] = _optimization_lines(report.get("optimizations", {}))  # before the figures header
    width = max(len(o["name"]) for o in report["outputs"])
    for o in report["outputs"]:
        sqnr = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:7.2f} dB"
        agreement = f"   top-1 agree {100 * o['top1_agreement']:.1f}%" if "top1_agreement" in o else ""
        cosine = "" if o.get("cosine") is None else f"   cosine {o['cosine']:.4f}"
        lines.append(f"    {o['name']:<{width}}  SQNR {sqnr}{cosine}   max |err| {o['max_abs_error']:.4g}{agreement}")
    if "htp" in report and "refused" in report["htp"]:
        lines.append(f"  Qualcomm's HTP emulator refused the QDQ model: {report['htp']['refused']}")
    elif "htp" in report:
        htp = report["htp"]
        lines.append(f"  agreement with Qualcomm's HTP emulator on {htp['samples']} samples{htp_arch_phrase(htp)} "
                     "(SQNR, max error in LSB):")
        for label, rows in htp["agreement"].items():
            for row in rows:
                sqnr = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f} dB"
                lines.append(f"    {label} arithmetic: {row['name']}  {sqnr}  {row['max_error_lsb']:g} LSB")
        fallback = htp["cpu_fallback_ops"]
        lines.append(f"    ops that fell back to the CPU: {len(fallback) if fallback is not None else 'unknown'}")
        if htp.get("float_ops"):
            lines.append(f"    ops the HTP computes in float: {len(htp['float_ops'])}")
    worst = report["tensors"]["worst_isolated"][:3]
    if worst:
        figures = {t["name"]: t for t in report["tensors"]["figures"]}
        lines.append("  tensors whose quantization alone costs the most (output SQNR):")
        for name in worst:
            lines.append(f"    {name}  {figures[name]['isolated_output_sqnr_db']:.2f} dB")
    lines.append(f"  wrote {out_dir}/  (open report.html for the full report)")
    for name in report["files"]:
        lines.append(f"    {name}")
    lines.append("  next, with the SNPE SDK:")
    lines.append(f"    snpe-onnx-to-dlc --input_network {out_dir}/snpe_deploy.onnx --output_path model.dlc \\")
    lines.append(f"        --quantization_overrides {out_dir}/snpe_clip_ranges.json")
    lines.append(f"    snpe-dlc-quantize --input_dlc model.dlc --input_list {out_dir}/data.txt \\")
    lines.append(f"        --override_params --bias_bitwidth {report['settings']['bias_bitwidth']}")
    lines += integer_input_lines(report["model"]["inputs"])
    return "\n".join(lines)



def integer_input_lines(inputs: list[dict]) -> list[str]:
    """What a model with integer or boolean inputs needs from SNPE's tools (SNPE.md section 3)."""
    names = [i["name"] for i in inputs if i["dtype"] != "float32"]
    if not names:
        return []
    return [
        f"  integer/boolean inputs {', '.join(names)}: never quantized; data.txt's raw files hold them as",
        "    float32, which snpe-dlc-quantize reads by default (do not pass --use_native_input_files);",
        "    the converter narrows int64 inputs to int32 unless told --preserve_io datatype",
    ]


def _optimization_lines(done: dict) -> list[str]:
    """One line per accuracy step that ran (report.json's ``optimizations``), and the recipe's ablation."""
    lines = []
    if "recipe" in done:
        lines.append(f"  --optimize, judged on {done['recipe']['held_back_samples']} held-back calibration samples:")
        for row in done["recipe"]["ablation"]:
            sqnr = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f} dB"
            lines.append(f"    {row['step']:<20} {sqnr:>10}  {'kept' if row['kept'] else 'not kept'}")
    lines += [f"  {fact}" for fact in step_facts(done)]
    if "auto_precision" in done:
        a = done["auto_precision"]
        met = {True: ", target met", False: ", target not met", None: ""}[a["target_met"]]
        lines.append(f"  auto precision: {a['count']} raised by {a['strategy']} ({a['activations_at_16_bits']}"
                     f" activations and {a['weights_at_16_bits']} weights at 16 bits), held-back SQNR"
                     f" {a['baseline_sqnr_db']:.2f} -> {a['final_sqnr_db']:.2f} dB{met} ({a['seconds']:.1f} s)")
    return lines


def step_facts(done: dict) -> list[str]:
    """One line for each weight-changing step that ran (CLE, AdaRound, bias correction): what it did."""
    facts = []
    if "cle" in done:
        facts.append(f"CLE: {done['cle']['pairs']} Conv pairs equalized, {len(done['cle']['absorbed'])} offsets "
                     f"absorbed ({done['cle']['seconds']:.1f} s)")
    if "adaround" in done:
        a = done["adaround"]
        facts.append(f"AdaRound: {a['layers']} weights, {a['iterations']} iterations on {a['samples']} samples, "
                     f"{a['inputs']} inputs ({a['seconds']:.1f} s)")
    if "bias_correction" in done:
        b = done["bias_correction"]
        facts.append(f"bias correction: {b['layers']} layers on {b['samples']} samples ({b['seconds']:.1f} s)")
    return facts


def _top(weights: list[WeightFigures], attribute: str) -> list[WeightFigures]:
    """The weights that gain the most by ``attribute``, at most WORST_COUNT, largest gain first."""
    gains = [(getattr(w, attribute), w.name, w) for w in weights if getattr(w, attribute) is not None]
    return [w for gain, _, w in sorted(gains, key=lambda g: (-g[0], g[1])) if gain > 0][:WORST_COUNT]
