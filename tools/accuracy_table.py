"""Simulated output SQNR of each method on the four real models, for the README's accuracy table.

    python tools/accuracy_table.py [--methods minmax,percentile,mse,tf_enhanced] [--calib 128] [--eval 32]

Calibration and evaluation images are crops of the real photographs in ../shared/images and of
calib_data/page.png (printed text), cut at
each model's aspect ratio: calibration crops from the top three quarters of every photograph,
evaluation crops from the bottom quarter, so the two sets never share pixels. Crops are drawn with
a fixed seed, so the table is reproducible. Prints a Markdown table and the worst tensors per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from onnxsnpe import ImageOptions
from onnxsnpe.compare import compare
from onnxsnpe.stages import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5,), "std": (0.5,)}
MODELS = {
    "efficientnet_lite0.onnx": ((224, 224), IMAGENET),
    "ch_PP-OCRv4_det_infer.onnx": ((320, 320), IMAGENET),
    "ch_PP-OCRv4_rec_infer.onnx": ((48, 320), HALF),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ((48, 192), HALF),
}


def make_crops(folder: Path, size: tuple[int, int], count: int, part: str, seed: int) -> None:
    """Write ``count`` crops with the aspect of ``size`` (H, W) from the ``part`` ("top"/"bottom") of each image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = sorted(p for p in (SHARED / "images").iterdir() if p.suffix in (".png", ".jpg"))
    photos.append(ROOT / "calib_data" / "page.png")  # printed text, for the OCR models
    aspect = size[1] / size[0]
    for index in range(count):
        photo = Image.open(photos[index % len(photos)]).convert("RGB")
        width, height = photo.size
        top, bottom = (0, int(height * 0.75)) if part == "top" else (int(height * 0.75), height)
        region_h = bottom - top
        crop_h = int(min(region_h, width / aspect) * rng.uniform(0.4, 1.0))
        crop_w = max(1, int(crop_h * aspect))
        x = int(rng.integers(0, width - crop_w + 1))
        y = top + int(rng.integers(0, region_h - crop_h + 1))
        photo.crop((x, y, x + crop_w, y + crop_h)).resize((size[1], size[0]), Image.Resampling.BILINEAR).save(
            folder / f"{index:04d}.png"
        )


def crop_sets(root: Path, name: str, calib: int, evaluation: int) -> tuple[Path, Path, ImageOptions]:
    """Calibration and held-out crops for model ``name`` under ``root``, and its preprocessing."""
    size, norm = MODELS[name]
    calib_dir, eval_dir = Path(root, name, "calib"), Path(root, name, "eval")
    make_crops(calib_dir, size, calib, "top", seed=1)
    make_crops(eval_dir, size, evaluation, "bottom", seed=2)
    return calib_dir, eval_dir, ImageOptions(resize=size, **norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="minmax,percentile,mse,tf_enhanced")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--weight-bitwidth", type=int, default=8, help="16 isolates the activation methods' effect")
    parser.add_argument("--arithmetic", choices=("htp", "exact"), default="htp", help="the simulation's arithmetic")
    args = parser.parse_args()
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            calib, held_out, options = crop_sets(Path(tmp), name, args.calib, args.eval)
            base = Settings(weight_bitwidth=args.weight_bitwidth, arithmetic=args.arithmetic)
            result = compare(SHARED / "models" / name, calib, Path(tmp, name, "out"), methods=methods,
                             act_bitwidths=[8], base=base,
                             eval_data=held_out, image_options=options, analysis_samples=2, progress=False)
            cells = []
            for config in result.report["configurations"]:
                output = config["outputs"][0]
                top1 = output.get("top1_agreement")
                cells.append(f"{output['sqnr_db']:.2f}" + (f" ({100 * top1:.0f}%)" if top1 is not None else ""))
                print(json.dumps({"model": name, "configuration": config["name"], "output": output,
                                  "worst_isolated": config["worst_isolated"][:3]}), flush=True)
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| model | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
