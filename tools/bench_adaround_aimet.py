"""onnxsnpe's AdaRound against aimet-onnx's, on the same model, data and iterations, timed in one run.

Run with the Python of a separate environment that has aimet-onnx (and so torch) installed, with
onnxsnpe importable from the source tree (aimet and torch are never dependencies of onnxsnpe):

    PYTHONPATH=. /work/aimet-venv/bin/python tools/bench_adaround_aimet.py \
        [--model efficientnet_lite0.onnx] [--calib 128] [--eval 32] [--iters 1000] \
        [--aimet-batch 32] [--inputs rounded,fp32]

Data: tools/accuracy_table.py's crops (crop_sets, same seeds): ``--calib`` calibration crops from
the top three quarters of each photograph and ``--eval`` held-out crops from the bottom quarter.
All ``--calib`` crops are fed to both AdaRounds and to both activation calibrations (nothing is held
back: the 16 samples tools/ablation_table.py holds back judge automatic choices, which this
benchmark makes none of). aimet-onnx gets them as ``--calib / --aimet-batch`` batches (its
AdaRound draws up to 32 samples of one batch per iteration, so the default batch of 32 lets every
iteration see 32 crops; onnxsnpe's iterations see all samples through their Gram matrices).

Quantization, both sides: the FP32 graph onnxsnpe prepares (folded constants, fixed shapes; for
aimet the same graph at batch ``--aimet-batch``), 8-bit per-tensor asymmetric min-max weights,
8-bit asymmetric min-max activations, biases unquantized by aimet (32-bit in onnxsnpe), Conv+Clip
fused (no quantizer between them). aimet-onnx gets a config file saying so (its default makes
weights symmetric); its graph rules (which tensors carry a quantizer) are its own.

Rows: nearest rounding and AdaRound for each tool; onnxsnpe with ``--inputs`` (``rounded``, its
default, and/or ``fp32``). Each AdaRound row is evaluated in its own tool's simulation (onnxsnpe:
stages.evaluate_encodings as tools/ablation_table.py, in HTP arithmetic and in exact arithmetic;
aimet: its QuantizationSimModel after compute_encodings), and aimet's AdaRounded weights are also
evaluated in onnxsnpe's exact simulation on aimet's own weight grids, to separate the rounding from
the simulation. Figures: logits SQNR against the FP32 model and top-1 agreement on the held-out
crops. Times are wall-clock seconds of the AdaRound call alone (each tool's apply_adaround,
including its own activation gathering); the machine is shared, so compare the ratio, measured in
the same run, more than the seconds. Prints one JSON line per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from accuracy_table import SHARED, crop_sets
from onnx import numpy_helper

from onnxsnpe.encode.encoding import Encoding, ParamEncoding
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.report.metrics import OutputComparison
from onnxsnpe.stages import Prepared, Settings, apply_adaround, encode, evaluate_encodings, prepare
from onnxsnpe.stats.collect import collect_statistics

AIMET_CONFIG = {
    "defaults": {
        "ops": {"is_output_quantized": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "False"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "False",
        "per_channel_quantization": "False",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Cast": {"is_output_quantized": "False"}},
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Conv", "Clip"]},
                    {"op_list": ["Add", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
"""aimet-onnx's default config (aimet_common/quantsim_config/default_config.json) with asymmetric weights."""


def _onnxsnpe_figures(prepared: Prepared, settings: Settings) -> dict:
    """Calibrate the activations of ``prepared``'s deploy model, encode, and evaluate on its eval set
    in HTP and exact arithmetic (as tools/ablation_table.py does)."""
    stats = collect_statistics(prepared.deploy, prepared.targets.activations, iter(prepared.calib_set),
                               methods=[settings.method], floors=prepared.targets.floors())
    encodings = encode(prepared, stats, settings)
    figures = {}
    for arithmetic in ("htp", "exact"):
        output = evaluate_encodings(prepared, stats, encodings, arithmetic, 0, False).outputs[0].to_dict()
        figures[arithmetic] = {"sqnr_db": output["sqnr_db"], "top1": output.get("top1_agreement")}
    return figures


def _fp32_outputs(prepared: Prepared) -> list[np.ndarray]:
    """The FP32 model's first output on each held-out sample."""
    session = make_session(prepared.reference, [])
    name = prepared.reference.graph.output[0].name
    return [session.run([name], sample)[0] for sample in prepared.eval_set]


def _batches(samples: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Samples of batch 1 stacked into batches of ``size`` along axis 0."""
    return [{name: np.concatenate([s[name] for s in samples[i:i + size]]) for name in samples[0]}
            for i in range(0, len(samples), size)]


def _aimet_figures(sim, batches: list[dict[str, np.ndarray]], reference: list[np.ndarray]) -> dict:
    """aimet's simulation (float quantize-dequantize) against the FP32 outputs on the held-out samples."""
    comparison = OutputComparison("logits")
    index = 0
    for batch in batches:
        out = sim.session.run(None, batch)[0]
        for row in range(out.shape[0]):
            comparison.update(reference[index], out[row:row + 1])
            index += 1
    output = comparison.to_dict()
    return {"aimet": {"sqnr_db": output["sqnr_db"], "top1": output.get("top1_agreement")}}


def _aimet_sim(model: onnx.ModelProto, config: Path):
    from aimet_onnx import QuantizationSimModel, int8

    return QuantizationSimModel(model, param_type=int8, activation_type=int8, quant_scheme="min_max",
                                config_file=str(config))


def _aimet_weights(sim, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, ParamEncoding]]:
    """The weights in aimet's sim and their frozen per-tensor encodings (as onnxsnpe ParamEncodings)."""
    values = {init.name: numpy_helper.to_array(init) for init in sim.model.model.graph.initializer
              if init.name in names}
    encodings = {}
    for name in names:
        enc = sim.qc_quantize_op_dict[name].get_encodings()[0]  # real = (q + offset) * delta, as SNPE's
        encodings[name] = Encoding(bitwidth=int(enc.bw), scale=float(enc.delta), offset=int(enc.offset))
    return values, encodings


def _grid_differences(ours: dict[str, ParamEncoding], aimet: dict[str, ParamEncoding]) -> dict:
    """How far aimet's weight grids are from onnxsnpe's: largest relative scale difference, offsets that differ."""
    relative = max(abs(aimet[n].scale - ours[n].scale) / ours[n].scale for n in aimet)
    return {"max_relative_scale_difference": relative,
            "offsets_differing": sum(aimet[n].offset != ours[n].offset for n in aimet), "weights": len(aimet)}


def _with_weights(prepared: Prepared, values: dict[str, np.ndarray], encodings: dict) -> Prepared:
    """``prepared`` with its deploy weights replaced by ``values`` and their encodings fixed to ``encodings``."""
    deploy = onnx.ModelProto()
    deploy.CopyFrom(prepared.deploy)
    for init in deploy.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].reshape(tuple(init.dims)), init.name))
    return replace(prepared, deploy=deploy, weight_encodings=encodings, fp32_deploy=prepared.deploy)


def _row(tool: str, step: str, seconds: float | None, figures: dict, **extra) -> dict:
    row = {"tool": tool, "step": step, "adaround_seconds": None if seconds is None else round(seconds, 1),
           **figures, **extra}
    print(json.dumps(row), flush=True)
    return row


def _cell(figures: dict | None) -> str:
    if figures is None:
        return "-"
    top1 = "" if figures["top1"] is None else f" ({100 * figures['top1']:.0f}%)"
    return f"{figures['sqnr_db']:.2f}{top1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0.onnx")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--aimet-batch", type=int, default=32)
    parser.add_argument("--inputs", default="rounded,fp32",
                        help="onnxsnpe --adaround-inputs modes to run, in order (empty: none)")
    args = parser.parse_args()
    if args.calib % args.aimet_batch or args.eval % args.aimet_batch:
        parser.error("--calib and --eval must be multiples of --aimet-batch (default 32: lower it for fewer crops)")
    import torch
    from aimet_onnx import apply_adaround as aimet_apply_adaround

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, held_out, options = crop_sets(Path(tmp), args.model, args.calib, args.eval)
        model_path = SHARED / "models" / args.model
        prepared = prepare(model_path, calib, held_out, None, None, options)
        reference = _fp32_outputs(prepared)
        settings = Settings(adaround_iters=args.iters, adaround_samples=args.calib)

        rows.append(_row("onnxsnpe", "nearest", None, _onnxsnpe_figures(prepared, settings)))
        for mode in filter(None, args.inputs.split(",")):
            mode_settings = replace(settings, adaround=True, adaround_inputs=mode)
            start = time.perf_counter()
            rounded, record = apply_adaround(prepared, mode_settings, False)
            seconds = time.perf_counter() - start
            rows.append(_row("onnxsnpe", f"AdaRound ({mode} inputs)", seconds,
                             _onnxsnpe_figures(rounded, mode_settings), samples=record["samples"],
                             layers=record["layers"], kept_nearest=sum(w["kept_nearest"] for w in record["weights"]),
                             flipped=sum(w["flipped"] for w in record["weights"])))

        shapes = {name: (args.aimet_batch, *shape[1:]) for name, shape in prepared.shapes.items()}
        batched, _ = prepare_deploy_model(load_model(model_path), shapes)
        config = Path(tmp, "aimet_config.json")
        config.write_text(json.dumps(AIMET_CONFIG))
        calib_batches = _batches(list(prepared.calib_set), args.aimet_batch)
        eval_batches = _batches(list(prepared.eval_set), args.aimet_batch)

        sim = _aimet_sim(batched, config)
        sim.compute_encodings(calib_batches)
        rows.append(_row("aimet-onnx", "nearest", None, _aimet_figures(sim, eval_batches, reference)))

        torch.manual_seed(0)
        np.random.seed(0)
        sim = _aimet_sim(batched, config)
        start = time.perf_counter()
        aimet_apply_adaround(sim, calib_batches, num_iterations=args.iters)
        seconds = time.perf_counter() - start
        sim.compute_encodings(calib_batches)
        figures = _aimet_figures(sim, eval_batches, reference)
        names = list(prepared.targets.weights)
        values, encodings = _aimet_weights(sim, names)
        figures |= {"onnxsnpe_exact": _onnxsnpe_figures(_with_weights(prepared, values, encodings),
                                                        replace(settings, arithmetic="exact"))["exact"]}
        ours = weight_encodings(prepared.deploy, prepared.targets, settings.weight_bitwidth, settings.weight_method)
        rows.append(_row("aimet-onnx", "AdaRound", seconds, figures, samples=args.calib, batch=args.aimet_batch,
                         grids=_grid_differences(ours, encodings)))

    onnxsnpe_rounded = next((r for r in rows if r["step"].startswith("AdaRound (rounded")), None)
    print()
    print(f"model: {args.model}, {args.calib} calibration crops (all fed to both), {args.eval} held-out crops, "
          f"{args.iters} iterations, aimet batches of {args.aimet_batch}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print("| tool | step | AdaRound s | ratio to onnxsnpe (rounded) | own simulation: SQNR dB (top-1) "
          "| onnxsnpe exact arithmetic |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        seconds = row["adaround_seconds"]
        ratio = ("-" if seconds is None or onnxsnpe_rounded is None
                 else f"{seconds / onnxsnpe_rounded['adaround_seconds']:.2f}")
        own = _cell(row.get("htp") or row.get("aimet"))
        own = f"{own} (HTP)" if "htp" in row else own
        print(f"| {row['tool']} | {row['step']} | {'-' if seconds is None else seconds} | {ratio} | {own} "
              f"| {_cell(row.get('exact') or row.get('onnxsnpe_exact'))} |")


if __name__ == "__main__":
    main()
