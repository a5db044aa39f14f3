"""The ``onnxsnpe`` command: quantize an FP32 ONNX model for SNPE, or run the bundled demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .data.datasets import ImageOptions
from .encode.methods import ACTIVATION_METHODS, DEFAULT_PERCENTILE, WEIGHT_METHODS
from .errors import OnnxSnpeError
from .export import ENCODING_FORMATS
from .optimize.adaround import DEFAULT_INPUTS as DEFAULT_ADAROUND_INPUTS
from .optimize.adaround import DEFAULT_ITERATIONS as DEFAULT_ADAROUND_ITERATIONS
from .optimize.adaround import DEFAULT_SAMPLES as DEFAULT_ADAROUND_SAMPLES
from .optimize.adaround import INPUT_MODES as ADAROUND_INPUTS
from .optimize.bias_correction import DEFAULT_SAMPLES as DEFAULT_CORRECTION_SAMPLES
from .report.document import summary_text
from .report.sensitivity import DEFAULT_ANALYSIS_SAMPLES
from .simulate.arithmetic import ARITHMETICS
from .simulate.emulator import A16W16_ARCH, HTP_ARCHS

DEMO_MODEL = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
DEMO_IMAGES = ImageOptions(resize=(48, 192), mean=(0.5,), std=(0.5,))  # the model's own preprocessing

DESCRIPTION = """\
Post-training quantization of an FP32 ONNX model for Qualcomm SNPE.

From a model and a folder of representative inputs, `onnxsnpe quantize` writes what
snpe-onnx-to-dlc and snpe-dlc-quantize need: the deploy ONNX, the --quantization_overrides
JSON with every activation and weight encoding, the data.txt input list with its raw files,
and report.json with the simulated accuracy of the quantized model against FP32.

Try it on the bundled model:  onnxsnpe demo
"""

QUANTIZE_EPILOG = """\
calibration data (--calib, --eval):
  a folder of .npy files   one sample each, single-input models, batch dim optional
  a folder of .npz files   one sample each, keys = the model's input names
  a folder of images       .jpg/.jpeg/.png/.bmp, preprocessed by the image options below
  an input list (.txt)     SNPE's data.txt of raw float32 files (4-D inputs in N,H,W,C)

examples:
  onnxsnpe quantize model.onnx --calib images/ --out snpe/ --resize 224,224 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
  onnxsnpe quantize model.onnx --calib samples_npz/ --eval heldout_npz/ --out snpe/ --act-bitwidth 16
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got '{text}'")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _eval_samples(text: str) -> int | str:
    if text == "all":
        return text
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all', got '{text}'")
    return values[0]


def _resize(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH, got '{text}'")
    return values[0], values[1]


def _input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    return (name if sep else None), _int_list(dims)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the FP32 ONNX model")
    parser.add_argument("--calib", type=Path, required=True, help="calibration samples (see below)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files in it are replaced)")
    parser.add_argument("--eval", type=Path, help="held-out samples for the report (default: the calibration samples)")
    parser.add_argument("--num-samples", type=int, help="use only the first N calibration samples (sorted by name)")
    parser.add_argument(
        "--eval-samples", type=_eval_samples, metavar="N|all",
        help="measure the report on the first N evaluation samples (default: every --eval sample, or without "
        "--eval the first 64 calibration samples; all: every one)",
    )
    parser.add_argument(
        "--input-shape", type=_input_shape, action="append", default=[], metavar="[NAME:]DIMS",
        help="fix an input's shape, e.g. x:1,3,320,320 (needed for raw input lists with dynamic dims)",
    )
    parser.add_argument(
        "--fix-input", type=_fixed_input, action="append", default=[], metavar="NAME=VALUE",
        help="make an input a constant, e.g. sr=16000, so that the If branches that depend on it fold away "
        "(samples then leave it out; repeatable)",
    )
    parser.add_argument(
        "--ray", nargs="?", const=True, metavar="ADDRESS",
        help="run the model-heavy stages (calibration, isolated analysis, ranking, AdaRound layers, compare's "
        "configurations) on a Ray cluster (pip install 'onnxsnpe[ray]'): the one at ADDRESS (e.g. 127.0.0.1:6379, "
        "after 'ray start --head'), or a local one without it (give it last or as --ray=ADDRESS); same results",
    )
    images = parser.add_argument_group("image preprocessing (folders of images)")
    images.add_argument("--resize", type=_resize, metavar="H,W", help="resize to H,W (default: the model's size)")
    images.add_argument("--color", choices=("rgb", "bgr", "gray"), default="rgb", help="channel order (default rgb)")
    images.add_argument("--scale", type=float, default=1 / 255, help="multiply pixels by this first (default 1/255)")
    images.add_argument("--mean", type=_float_list, default=(0.0,), help="subtract, per channel (default 0)")
    images.add_argument("--std", type=_float_list, default=(1.0,), help="then divide, per channel (default 1)")
    images.add_argument("--layout", choices=("nchw", "nhwc"), help="model input layout (default: guessed)")


def _add_setting_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--percentile", type=float, default=DEFAULT_PERCENTILE,
        help=f"for the percentile method: clip each end at this percentile (default {DEFAULT_PERCENTILE})",
    )
    parser.add_argument(
        "--weight-method", choices=WEIGHT_METHODS, default="minmax", help="weight range method (default minmax)"
    )
    parser.add_argument(
        "--no-fixed-ranges", dest="fixed_ranges", action="store_false",
        help="calibrate Sigmoid/Softmax outputs and Tanh too (default: fixed [0, 1] and [-1, 1])",
    )
    parser.add_argument("--weight-bitwidth", type=int, choices=(8, 16), default=8, help="weight bits (default 8)")
    parser.add_argument(
        "--per-channel", action="store_true",
        help="symmetric weight encodings per output channel (Conv, ConvTranspose, Gemm, constant MatMul operands), "
        "as QAIRT's --use_per_channel_quantization (default: per tensor, asymmetric)",
    )
    parser.add_argument(
        "--optimize", action="store_true",
        help="try CLE, AdaRound, then bias correction, each kept only if the simulated model does better on held-back "
        "calibration samples; the report shows the ablation",
    )
    parser.add_argument(
        "--cle", action="store_true",
        help="cross-layer equalization: rescale Conv pairs joined by Relu/zero Pad so each channel's weight range "
        "is balanced (the same function; clipped activations such as ReLU6 are left alone)",
    )
    parser.add_argument(
        "--adaround", action="store_true",
        help="learn for each Conv/Gemm/MatMul weight whether it rounds up or down so the layer's output on "
        "calibration samples is reproduced (AdaRound; the weights in snpe_deploy.onnx are written on the "
        "exported grids)",
    )
    parser.add_argument("--adaround-iters", type=int, default=DEFAULT_ADAROUND_ITERATIONS, metavar="N",
                        help=f"AdaRound iterations per layer (default {DEFAULT_ADAROUND_ITERATIONS})")
    parser.add_argument("--adaround-samples", type=int, default=DEFAULT_ADAROUND_SAMPLES, metavar="N",
                        help=f"calibration samples AdaRound fits on (default {DEFAULT_ADAROUND_SAMPLES})")
    parser.add_argument("--adaround-inputs", choices=ADAROUND_INPUTS, default=DEFAULT_ADAROUND_INPUTS,
                        help="the layer inputs AdaRound fits on: rounded (the network's with the earlier layers "
                        "already rounded; two passes per layer) or fp32 (the FP32 network's; "
                        f"default {DEFAULT_ADAROUND_INPUTS})")
    parser.add_argument(
        "--auto-precision", action="store_true",
        help="raise to 16 bits the activations and weights whose 8-bit quantization costs most, until "
        "--target-sqnr is met (fewest raised, by bisection) or --max-16bit are raised (judged on held-back "
        "calibration samples)",
    )
    parser.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                        help="with --auto-precision: the output SQNR to reach")
    parser.add_argument("--max-16bit", type=int, default=None, metavar="N",
                        help="with --auto-precision: raise at most this many tensors (a raised weight "
                        "also raises its layer's input and output)")
    parser.add_argument(
        "--bias-correction", action="store_true",
        help="subtract from each layer's bias the mean shift weight quantization adds to its output, measured "
        "layer by layer on calibration samples (changes the biases in snpe_deploy.onnx)",
    )
    parser.add_argument(
        "--correction-samples", type=int, default=DEFAULT_CORRECTION_SAMPLES, metavar="N",
        help=f"calibration samples bias correction measures on (default {DEFAULT_CORRECTION_SAMPLES})",
    )
    parser.add_argument(
        "--bias-bitwidth", type=int, choices=(8, 32), default=32,
        help="bias bits, as snpe-dlc-quantize --bias_bitwidth (default 32)",
    )
    parser.add_argument(
        "--write-bias-encodings", action="store_true",
        help="also write bias entries to the overrides (default: leave biases to snpe-dlc-quantize)",
    )
    parser.add_argument(
        "--encoding-format", choices=ENCODING_FORMATS, default="legacy",
        help="the overrides file's format: legacy (every SNPE and QAIRT converter) or 1.0.0 (AIMET's, read by "
        "newer QAIRT, not by SNPE 2.5 and older; default legacy)",
    )
    parser.add_argument(
        "--arithmetic", choices=ARITHMETICS, default="htp",
        help="how the simulation computes: htp, the integer arithmetic measured on Qualcomm's HTP (as the "
        "emulator computes by default: v68's, v73's when a weight is 16-bit); htp-v73, as HTP v73 and later "
        "compute (their 8-bit convolutions requantize differently; --htp-arch 73 or later implies it); or "
        "exact, float ops with exactly rounded fake quantization (default htp)",
    )


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ACTIVATION_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(ACTIVATION_METHODS)}; got '{text}'")
    return methods


def _bitwidth_list(text: str) -> list[int]:
    values = list(_int_list(text))
    if any(v not in (8, 16) for v in values):
        raise argparse.ArgumentTypeError(f"activation bitwidths are 8 and 16; got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``onnxsnpe`` command."""
    parser = argparse.ArgumentParser(
        prog="onnxsnpe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"onnxsnpe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = commands.add_parser(
        "quantize",
        help="calibrate a model and write the SNPE deploy files",
        description="Calibrate an FP32 ONNX model and write the files SNPE's converter and quantizer need.",
        epilog=QUANTIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_args(q)
    q.add_argument(
        "--method", choices=ACTIVATION_METHODS, default="minmax",
        help="activation range method: minmax, percentile, mse, or tf_enhanced (what snpe-dlc-quantize "
        "--use_enhanced_quantizer picks; depends on the first sample) (default minmax)",
    )
    q.add_argument("--act-bitwidth", type=int, choices=(8, 16), default=8, help="activation bits (default 8)")
    _add_setting_args(q)
    q.add_argument(
        "--analysis-samples", type=int, default=DEFAULT_ANALYSIS_SAMPLES, metavar="N",
        help="evaluation samples for the per-tensor isolated errors (one run per tensor each; 0 skips; "
        f"default {DEFAULT_ANALYSIS_SAMPLES})",
    )
    q.add_argument(
        "--htp", type=int, default=0, metavar="N",
        help="run N evaluation samples on Qualcomm's HTP emulator and report how closely the simulation follows "
        "it (needs onnxsnpe[qnn], i.e. onnxruntime-qnn, on x86-64 Linux)",
    )
    q.add_argument(
        "--htp-arch", choices=HTP_ARCHS, default=None,
        help="with --htp: the HTP architecture the emulator computes as (default: the emulator's own, which "
        f"computes as v68; v{A16W16_ARCH} when a weight is 16-bit, which older HTPs cannot run); the simulation "
        "follows it",
    )
    _add_common(q)

    c = commands.add_parser(
        "compare",
        help="calibrate once and report several methods and bitwidths side by side",
        description="Calibrate once, then encode, simulate and report every combination of --methods and "
        "--act-bitwidth in one table (compare.json, compare.html), with one overrides file per configuration.",
        epilog=QUANTIZE_EPILOG.split("examples:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_args(c)
    c.add_argument(
        "--methods", type=_method_list, default=list(ACTIVATION_METHODS), metavar="M1,M2",
        help=f"activation range methods to compare (default {','.join(ACTIVATION_METHODS)})",
    )
    c.add_argument(
        "--act-bitwidth", type=_bitwidth_list, default=[8], metavar="B1,B2", help="activation bits, e.g. 8,16"
    )
    _add_setting_args(c)
    c.add_argument(
        "--analysis-samples", type=int, default=1, metavar="N",
        help="evaluation samples for finding each configuration's costliest tensors (0 skips; default 1)",
    )
    _add_common(c)

    d = commands.add_parser(
        "demo",
        help="quantize the bundled PP-OCR text direction classifier on the bundled images",
        description="Run `quantize` on the bundled model (PP-OCR mobile v2.0 text direction classifier, "
        "Apache-2.0): calibrate on calib_data/calib, report on the held-out calib_data/eval.",
    )
    d.add_argument("--out", type=Path, default=Path("onnxsnpe_demo"), help="output folder (default ./onnxsnpe_demo)")
    d.add_argument("--data", type=Path, help="the bundled calib_data/ folder (default: found beside the package)")
    _add_common(d)
    return parser


def find_demo_data(explicit: Path | None) -> Path:
    """The bundled calib_data/ folder: beside the package (editable install) or in the cwd."""
    candidates = [explicit] if explicit else [Path(__file__).resolve().parents[1] / "calib_data", Path("calib_data")]
    for folder in candidates:
        if (folder / DEMO_MODEL).is_file():
            return folder
    raise OnnxSnpeError(
        f"bundled demo data not found (looked for {DEMO_MODEL} in {', '.join(map(str, candidates))}); "
        "run from the project's root or install it with 'pip install -e .'"
    )


def _run(args: argparse.Namespace) -> int:
    from .api import quantize  # the pipeline loads when a command runs, not for --help

    if args.command == "compare":
        return _run_compare(args)
    if args.command == "demo":
        data = find_demo_data(args.data)
        result = quantize(
            data / DEMO_MODEL,
            data / "calib",
            args.out,
            eval_data=data / "eval",
            image_options=DEMO_IMAGES,
            progress=not args.quiet,
        )
    else:
        result = quantize(
            args.model,
            args.calib,
            args.out,
            eval_data=args.eval,
            num_samples=args.num_samples,
            method=args.method,
            percentile=args.percentile,
            weight_method=args.weight_method,
            fixed_ranges=args.fixed_ranges,
            act_bitwidth=args.act_bitwidth,
            weight_bitwidth=args.weight_bitwidth,
            per_channel=args.per_channel,
            optimize=args.optimize,
            cle=args.cle,
            adaround=args.adaround,
            adaround_iters=args.adaround_iters,
            adaround_samples=args.adaround_samples,
            adaround_inputs=args.adaround_inputs,
            bias_correction=args.bias_correction,
            correction_samples=args.correction_samples,
            auto_precision=args.auto_precision,
            target_sqnr=args.target_sqnr,
            max_16bit=args.max_16bit,
            bias_bitwidth=args.bias_bitwidth,
            write_bias_encodings=args.write_bias_encodings,
            encoding_format=args.encoding_format,
            arithmetic=args.arithmetic,
            input_shapes=dict(args.input_shape),
            fixed_inputs=dict(args.fix_input),
            analysis_samples=args.analysis_samples,
            eval_samples=args.eval_samples,
            htp_samples=args.htp,
            htp_arch=args.htp_arch,
            image_options=_image_options(args),
            progress=not args.quiet,
            ray=args.ray,
        )
    if not args.quiet:
        print(summary_text(result.report, result.out_dir, result.seconds))
    return 0


def _fixed_input(text: str) -> tuple[str, list[float]]:
    from .graph.fixed_inputs import parse_fixed_input

    try:
        return parse_fixed_input(text)
    except OnnxSnpeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(resize=args.resize, color=args.color, scale=args.scale, mean=args.mean, std=args.std,
                        layout=args.layout)


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import compare, comparison_summary
    from .stages import Settings

    base = Settings(percentile=args.percentile, weight_method=args.weight_method, fixed_ranges=args.fixed_ranges,
                    weight_bitwidth=args.weight_bitwidth, per_channel=args.per_channel,
                    optimize=args.optimize, cle=args.cle, adaround=args.adaround, adaround_iters=args.adaround_iters,
                    adaround_samples=args.adaround_samples, adaround_inputs=args.adaround_inputs,
                    bias_correction=args.bias_correction, correction_samples=args.correction_samples,
                    auto_precision=args.auto_precision, target_sqnr=args.target_sqnr, max_16bit=args.max_16bit,
                    bias_bitwidth=args.bias_bitwidth,
                    write_bias_encodings=args.write_bias_encodings, encoding_format=args.encoding_format,
                    arithmetic=args.arithmetic)
    result = compare(
        args.model, args.calib, args.out, methods=args.methods, act_bitwidths=args.act_bitwidth, base=base,
        eval_data=args.eval, num_samples=args.num_samples, input_shapes=dict(args.input_shape),
        fixed_inputs=dict(args.fix_input),
        image_options=_image_options(args), analysis_samples=args.analysis_samples, eval_samples=args.eval_samples,
        progress=not args.quiet, ray=args.ray,
    )
    if not args.quiet:
        print(comparison_summary(result.report, result.out_dir, result.seconds))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn OnnxSnpeError into a one-line message and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    try:
        return _run(args)
    except OnnxSnpeError as exc:
        if args.debug:
            raise
        print(f"onnxsnpe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxsnpe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head: the outputs are written, only the summary was cut
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
