"""Our ``tf_enhanced`` ranges against aimet-onnx's own TF-enhanced calibration, tensor by tensor.

    PYTHONPATH=. /work/aimet-venv/bin/python tools/tf_enhanced_parity.py [--samples 64] [--show 10]

Runs only where aimet-onnx is importable. It needs torch, so it lives in a virtual environment of
its own, never in onnxsnpe's dependencies; there, with onnxsnpe's own dependencies beside it:

    python3 -m venv /work/aimet-venv
    /work/aimet-venv/bin/pip install torch==2.13.0     # a CPU build, so pip does not take a CUDA one
    /work/aimet-venv/bin/pip install aimet-onnx==2.42.0 onnx-graphsurgeon numba matplotlib

Both calibrate the deploy model of EfficientNet-Lite0 (../shared/models; BatchNorms folded, as
onnxsnpe writes it) on the same crops of the real photographs that tools/accuracy_table.py makes
(its first ``--samples`` calibration crops), fed one sample at a time in file order. AIMET runs its
QuantizationSimModel with ``quant_scheme="tf_enhanced"`` and its per-tensor configuration
(``default_config.json``; 8-bit activations). Its calibration runs the network with the weights
quantized (SNPE.md section 5), so three comparisons are printed:

1. onnxsnpe calibrating the FP32 deploy model (what it did before it quantized the weights
   first), against AIMET with its own weight encodings;
2. onnxsnpe calibrating the deploy model with AIMET's own weight encodings applied, against the
   same AIMET run: the histogram and the search alone;
3. onnxsnpe's pipeline (stages.calibrate: the weights it exports, 8-bit per-tensor min-max,
   quantized) against AIMET with those same weight encodings loaded and frozen.

For every tensor both calibrate, it lists the farthest ones (AIMET's [min, max], ours, the distance
of each end in AIMET's steps) and the share of tensors whose two ends are both within 2 steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxsnpe import ImageOptions
from onnxsnpe.encode.encoding import Encoding
from onnxsnpe.encode.quantized_weights import quantized_weights
from onnxsnpe.encode.ranges import chosen_range
from onnxsnpe.stages import Settings, prepare, weight_set
from onnxsnpe.stats.collect import collect_statistics

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "efficientnet_lite0.onnx"
TOLERANCE_STEPS = 2.0


def _accuracy_table():
    """tools/accuracy_table.py as a module, for its crops (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("accuracy_table", ROOT / "tools" / "accuracy_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aimet_ranges(deploy, samples: list[dict[str, np.ndarray]], bitwidth: int,
                 weights: dict[str, Encoding] | None = None) -> tuple[dict, dict]:
    """aimet-onnx's TF-enhanced activation [min, max] per tensor name, samples fed one at a time, with
    its per-tensor configuration; and its weights' encodings as its calibration used them. With
    ``weights``, AIMET's weight quantizers take those encodings, frozen, instead of their own."""
    from aimet_onnx.common import libpymo
    from aimet_onnx.common.quantsim_config import quantsim_config
    from aimet_onnx.quantsim import QuantizationSimModel

    config = Path(quantsim_config.__file__).parent / "default_config.json"  # per tensor ("default" is per channel)
    sim = QuantizationSimModel(deploy, quant_scheme="tf_enhanced", activation_type=f"int{bitwidth}",
                               param_type="int8", config_file=str(config), providers=["CPUExecutionProvider"])
    for name, encoding in (weights or {}).items():
        quantizer = sim.qc_quantize_op_dict.get(name)
        if quantizer is None or not quantizer.enabled:
            continue
        frozen = libpymo.TfEncoding()
        frozen.bw, frozen.delta, frozen.offset = encoding.bitwidth, encoding.scale, encoding.offset
        frozen.min, frozen.max = encoding.min, encoding.max
        quantizer.use_symmetric_encodings = encoding.is_symmetric
        quantizer.load_encodings([frozen])
        quantizer.freeze_encodings()
    sim.compute_encodings(samples)
    ranges = {}
    for name in sim.activation_names:
        quantizer = sim.qc_quantize_op_dict.get(name)
        if quantizer is None or not quantizer.enabled or not quantizer.is_initialized():
            continue
        (encoding,) = quantizer.get_encodings()
        ranges[name] = (float(encoding.min), float(encoding.max))
    weights = {}
    for name in sim.param_names:
        quantizer = sim.qc_quantize_op_dict.get(name)
        if quantizer is not None and quantizer.enabled and quantizer.is_initialized():
            weights[name] = [(e.delta, e.offset, 2**e.bw - 1) for e in quantizer.get_encodings()]
    return ranges, weights


def with_quantized_weights(deploy: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """``deploy`` with each weight AIMET quantized replaced by its quantize-dequantized values
    (per-tensor encodings), as AIMET's calibration runs the network."""
    copy = onnx.ModelProto()
    copy.CopyFrom(deploy)
    for init in copy.graph.initializer:
        if init.name in weights and len(weights[init.name]) == 1:
            ((delta, offset, top),) = weights[init.name]
            values = numpy_helper.to_array(init).astype(np.float64)
            codes = np.clip(np.round(values / delta) - offset, 0, top)
            init.CopyFrom(numpy_helper.from_array(((codes + offset) * delta).astype(np.float32), init.name))
    return copy


def our_ranges(model: onnx.ModelProto, prepared, samples: list[dict[str, np.ndarray]],
               bitwidth: int) -> dict[str, tuple[float, float]]:
    """onnxsnpe's ``tf_enhanced`` [min, max] per activation target, from one calibration pass of ``model``."""
    stats = collect_statistics(model, prepared.targets.activations, samples, methods=["tf_enhanced"],
                               floors=prepared.targets.floors())
    return {name: chosen_range(observed, "tf_enhanced", bitwidth) for name, observed in stats.items()}


def compare(aimet: dict, ours: dict, bitwidth: int) -> list[tuple[str, tuple, tuple, float, float]]:
    """Rows (name, AIMET's range, ours, distance of min and of max in AIMET's steps) for shared tensors."""
    rows = []
    for name in ours:
        if name not in aimet:
            continue
        (a_min, a_max), (o_min, o_max) = aimet[name], ours[name]
        step = (a_max - a_min) / (2**bitwidth - 1)
        rows.append((name, (a_min, a_max), (o_min, o_max), abs(o_min - a_min) / step, abs(o_max - a_max) / step))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--bitwidth", type=int, default=8)
    parser.add_argument("--show", type=int, default=10, help="list this many of the farthest tensors")
    args = parser.parse_args()
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        print("tf_enhanced_parity: aimet-onnx is not importable here (see this script's docstring)", file=sys.stderr)
        return 1
    table = _accuracy_table()
    size, norm = table.MODELS[MODEL.name]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib"
        table.make_crops(calib, size, args.samples, "top", seed=1)
        prepared = prepare(MODEL, calib, None, args.samples, None, ImageOptions(resize=size, **norm))
        samples = list(prepared.calib_set)
    aimet, weights = aimet_ranges(prepared.deploy, samples, args.bitwidth)
    ours_fp32 = our_ranges(prepared.deploy, prepared, samples, args.bitwidth)
    ours_aimet_weights = our_ranges(with_quantized_weights(prepared.deploy, weights), prepared, samples,
                                    args.bitwidth)
    settings = Settings(method="tf_enhanced", act_bitwidth=args.bitwidth)
    exported = weight_set(prepared, settings)  # the weights onnxsnpe exports, as its calibration quantizes them
    aimet_exported, _ = aimet_ranges(prepared.deploy, samples, args.bitwidth, exported)
    ours_pipeline = our_ranges(quantized_weights(prepared.deploy, exported), prepared, samples, args.bitwidth)
    runs = (
        ("1. onnxsnpe on the FP32 deploy model vs AIMET", aimet, ours_fp32),
        ("2. onnxsnpe with AIMET's own weight encodings (per tensor, TF-enhanced) vs AIMET", aimet,
         ours_aimet_weights),
        ("3. onnxsnpe's pipeline (its exported 8-bit per-tensor min-max weights) vs AIMET with them frozen",
         aimet_exported, ours_pipeline),
    )
    for label, reference, ours in runs:
        rows = compare(reference, ours, args.bitwidth)
        within = [row for row in rows if max(row[3], row[4]) <= TOLERANCE_STEPS]
        rows.sort(key=lambda row: -max(row[3], row[4]))
        print(f"\n{label}; farthest tensors:")
        print(f"{'tensor':50s} {'AIMET min':>10s} {'max':>10s} {'ours min':>10s} {'max':>10s}  steps off")
        for name, (a_min, a_max), (o_min, o_max), d_min, d_max in rows[: args.show]:
            print(f"{name[-50:]:50s} {a_min:10.4f} {a_max:10.4f} {o_min:10.4f} {o_max:10.4f} {d_min:6.2f} {d_max:6.2f}")
        print(f"{len(within)} of {len(rows)} tensors within {TOLERANCE_STEPS:g} steps of AIMET at both ends "
              f"({100 * len(within) / max(len(rows), 1):.1f}%)")
    print(f"\n{MODEL.name}, {args.samples} crops, {args.bitwidth}-bit activations, "
          f"aimet-onnx {_version('aimet-onnx')} per-tensor configuration")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
