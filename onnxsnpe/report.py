"""report.json (what was done, and how far the simulated model is from FP32) and the summary."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .metrics import OutputComparison


def build_report(
    *,
    model_path: Path,
    input_shapes: dict[str, tuple[int, ...]],
    output_names: list[str],
    calibration: dict,
    evaluation: dict,
    settings: dict,
    graph: dict,
    encodings: dict,
    outputs: list[OutputComparison],
    files: list[str],
) -> dict:
    """The machine-readable report; contains nothing that changes between identical runs."""
    return {
        "tool": {"name": "onnxsnpe", "version": __version__},
        "model": {
            "path": str(model_path),
            "inputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in input_shapes.items()],
            "outputs": output_names,
        },
        "calibration": calibration,
        "evaluation": evaluation,
        "settings": settings,
        "graph": graph,
        "encodings": encodings,
        "outputs": [c.to_dict() for c in outputs],
        "files": files,
    }


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
        f"  simulated vs FP32 on {ev['num_samples']} {'held-out' if ev['held_out'] else 'calibration'} samples:",
    ]
    width = max(len(o["name"]) for o in report["outputs"])
    for o in report["outputs"]:
        sqnr = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:7.2f} dB"
        lines.append(f"    {o['name']:<{width}}  SQNR {sqnr}   max |err| {o['max_abs_error']:.4g}")
    lines.append(f"  wrote {out_dir}/")
    for name in report["files"]:
        lines.append(f"    {name}")
    lines.append("  next, with the SNPE SDK:")
    lines.append(f"    snpe-onnx-to-dlc --input_network {out_dir}/snpe_deploy.onnx --output_path model.dlc \\")
    lines.append(f"        --quantization_overrides {out_dir}/snpe_clip_ranges.json")
    lines.append(f"    snpe-dlc-quantize --input_dlc model.dlc --input_list {out_dir}/data.txt \\")
    lines.append(f"        --override_params --bias_bitwidth {report['settings']['bias_bitwidth']}")
    return "\n".join(lines)

