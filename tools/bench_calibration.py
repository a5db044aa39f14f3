"""Benchmark calibration cost against plain FP32 inference, in one process and one run.

On EfficientNet-Lite0 (../shared/models) with real image crops (../shared/images and calib_data/),
it prints
- the peak memory (RSS high-water mark, reset before each run through /proc/self/clear_refs) of
  our calibration at 64 and 512 samples,
- what folding one sample's tensors into each method's statistics costs on one thread (as
  calibration folds them),
- the time of plain FP32 onnxruntime inference over the samples (default session, batch 1 and 4);
  of onnxruntime with the observed tensors as outputs but no statistics (the floor of our pass): in
  onnxruntime's blocked layout as calibration reads them (2 threads, 1 thread, and one-thread
  sessions side by side on every core, as calibration runs them), and as plain NCHW outputs; of our
  calibration with each method (statistics pass plus the range choice), and minmax at batch 4; of
  onnxruntime's own quantize_static with MinMax and Percentile on the same samples; each with its
  ratio to the faster plain inference;
- the whole command as a user runs it, from .npy files of the same samples (``--whole``, or only these
  rows with ``--whole-only``): ``quantize --method mse`` (report on its default 64 calibration
  samples), the same with ``--eval`` of 64 held-out samples, ``compare`` of 4 methods x 2 activation
  bitwidths; the stage timings of the first; and its peak memory at 64 and 512 samples. With
  ``--parts``, also both commands with the float simulation (``--arithmetic exact``) and with a
  report on one sample and no isolated analysis: what the HTP arithmetic and the report cost.

With ``--model minilm_l6``, the same on the MiniLM-L6 sentence encoder, its samples the sentences of
tools/sentences.txt tokenized (tools/text_samples.py; needs the ``tokenizers`` package), cycled.

With ``--ray`` (needs ``pip install -e ".[ray]"``), instead: calibration on a local Ray cluster
(stats/distributed.py, one shard per core) against the in-process pass, both reading the same
``--samples`` crops from raw files by path (an SNPE input list, as a user's data would come), and
the driver's peak RSS for ``--ray-samples`` samples (the same crops listed again and again) against
500; then what the estimate of the speed-up on N machines needs: a task's fixed cost and cost per
sample (shards of 8 and 128 samples, alone on the cluster), the driver's cost of merging one
shard's statistics, their size.

Usage: python tools/bench_calibration.py [--model efficientnet_lite0|minilm_l6] [--samples 256] [--repeats 3]
                                         [--skip-ort] [--stats-samples 16] [--whole | --whole-only]
                                         [--ray] [--ray-samples 10000]
This is not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from onnxsnpe.encode.methods import ACTIVATION_METHODS
from onnxsnpe.encode.ranges import activation_encodings
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.stats.collect import DEFAULT_BATCH_SIZE, available_cores, batch_dynamic_copy, collect_statistics
from onnxsnpe.stats.exposure import ExposedSession
from onnxsnpe.stats.folding import OutputFold
from onnxsnpe.stats.tensor_stats import TensorStats

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"
MODEL = MODELS / "efficientnet_lite0.onnx"
IMAGE_DIRS = [ROOT.parent / "shared" / "images", ROOT / "calib_data" / "calib", ROOT / "calib_data" / "eval"]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 224


def images() -> list[Image.Image]:
    """Every real photograph available, as RGB."""
    paths = sorted(p for folder in IMAGE_DIRS for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg"))
    return [Image.open(p).convert("RGB") for p in paths]


def text_samples(count: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """MiniLM-L6's inputs for tools/sentences.txt's sentences, cycled (``seed`` shifts the start)."""
    import tempfile

    from text_samples import split_sentences, write_samples

    sentences = split_sentences(96, 0)[0]
    with tempfile.TemporaryDirectory() as tmp:
        write_samples(Path(tmp), sentences)
        tokenized = [dict(np.load(path)) for path in sorted(Path(tmp).iterdir())]
    for index in range(count):
        yield tokenized[(index + seed) % len(tokenized)]


def samples(count: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The chosen model's samples (``--model``): image crops or tokenized sentences."""
    if MODEL.name == "minilm_l6.onnx":
        yield from text_samples(count, seed)
    else:
        yield from image_samples(count, seed)


def image_samples(count: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Random square crops (a third of the short side or more), resized, maybe mirrored; made lazily."""
    photos = images()
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(rng.integers(min(photo.size) // 3, min(photo.size) + 1))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        pixels = (np.asarray(crop, dtype=np.float32) / 255 - MEAN) / STD
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        yield {"input": np.ascontiguousarray(pixels.transpose(2, 0, 1)[np.newaxis])}


def timed(run: Callable[[], object]) -> float:
    """The wall time of one run."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def plain_inference(model: onnx.ModelProto, data: list[dict[str, np.ndarray]], batch: int) -> None:
    """What a user's FP32 inference costs: a default onnxruntime session over the samples."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for start in range(0, len(data), batch):
        part = data[start : start + batch]
        session.run(None, {name: np.concatenate([s[name] for s in part]) for name in part[0]})


def exposed_session(deploy: onnx.ModelProto, threads: int, blocked: bool = True) -> ExposedSession:
    """A session returning every computed tensor calibration observes."""
    inputs = {value.name for value in deploy.graph.input}
    return ExposedSession(deploy, [t for t in find_targets(deploy).activations if t not in inputs], threads, blocked)


def exposed_inference(
    deploy: onnx.ModelProto, data: list[dict[str, np.ndarray]], threads: int, blocked: bool, side_by_side: int = 1
) -> None:
    """Our onnxruntime side alone: the observed tensors written into reused arrays for every sample,
    by ``side_by_side`` threads sharing the samples (as calibration's workers do)."""
    session = exposed_session(deploy, threads, blocked)
    first = session.run(data[0])

    def run(part: list[dict[str, np.ndarray]]) -> None:
        arrays = [np.empty_like(raw) for raw in first]
        for sample in part:
            session.run_into(sample, arrays)

    workers = [threading.Thread(target=run, args=(data[i::side_by_side],)) for i in range(side_by_side)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def statistics_cost(deploy: onnx.ModelProto, data: list[dict[str, np.ndarray]], method: str) -> float:
    """CPU seconds per sample of folding already computed tensors into ``method``'s statistics on one
    thread, as calibration folds them (one compiled call per kind of statistic); every sample has
    its own output arrays, so they are not in cache."""
    session = exposed_session(deploy, 1)
    first = session.run(data[0])
    floors = find_targets(deploy).floors()
    stats = {name: TensorStats([method], floors.get(name)) for name in session.tensors}
    for name, values in session.values(first).items():  # the first sample fixes the PDF grids
        stats[name].update(values)
    folds = []
    for sample in data:
        arrays = [np.empty_like(raw) for raw in first]
        session.run_into(sample, arrays)
        pieces = [piece for piece in session.pieces(arrays) if piece[0] not in floors]  # masks: not folded
        folds.append(OutputFold(pieces, stats))
    start = time.thread_time()
    for fold in folds:
        fold.fold()
    return (time.thread_time() - start) / len(data)


def calibrate(deploy: onnx.ModelProto, data, method: str, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """Our calibration: the statistics pass and the range choice of every activation."""
    targets = find_targets(deploy)
    stats = collect_statistics(deploy, targets.activations, data, [method], batch_size, floors=targets.floors())
    activation_encodings(stats, targets, method, 8)


class Reader:
    """onnxruntime's CalibrationDataReader over our samples."""

    def __init__(self, data: list[dict[str, np.ndarray]]) -> None:
        self.data = iter(data)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.data, None)


def ort_quantize_static(path: Path, data: list[dict[str, np.ndarray]], method: str) -> None:
    """onnxruntime's own static quantization (QDQ) calibrated on the same samples; its chatter muted."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(path), str(Path(tmp) / "q.onnx"), Reader(data), quant_format=QuantFormat.QDQ,
            calibrate_method=getattr(CalibrationMethod, method),
        )


def peak_rss_mb(run: Callable[[], object]) -> tuple[float, float]:
    """(peak RSS during ``run``, RSS before it), in MB; the kernel's high-water mark is reset first."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    run()
    return _status("VmHWM"), before


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def write_samples(folder: Path, data: list[dict[str, np.ndarray]]) -> Path:
    """The samples as one .npy (single input) or .npz file each, as a user would hand them over."""
    folder.mkdir(parents=True)
    for index, sample in enumerate(data):
        if len(sample) == 1:
            np.save(folder / f"{index:05d}.npy", next(iter(sample.values())))
        else:
            np.savez(folder / f"{index:05d}.npz", **sample)
    return folder


def whole_command(deploy: onnx.ModelProto, samples_count: int, repeats: int, parts: bool = False) -> None:
    """The whole quantize and compare commands against plain inference over the same samples; with
    ``parts``, also what they cost with less of the report (the floor of the targets)."""
    from onnxsnpe import quantize
    from onnxsnpe.compare import compare
    from onnxsnpe.stages import Settings

    data = list(samples(samples_count))
    held_out = list(samples(64, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, evaluation = write_samples(root / "calib", data), write_samples(root / "eval", held_out)
        calib64, calib512 = write_samples(root / "calib64", data[:64]), write_samples(root / "calib512",
                                                                                  list(samples(512)))
        logging.getLogger().setLevel(logging.ERROR)
        reports = {}

        def run_quantize(folder: Path, out: str, **options) -> None:
            reports[out] = quantize(MODEL, folder, root / out, method="mse", progress=False, **options).report

        runs: dict[str, Callable[[], object]] = {
            "plain FP32, batch 1": lambda: plain_inference(deploy, data, 1),
            "quantize --method mse": lambda: run_quantize(calib, "q"),
            "quantize --method mse --eval (64)": lambda: run_quantize(calib, "qe", eval_data=evaluation),
            "compare 4 methods x A8,A16": lambda: compare(MODEL, calib, root / "c", methods=list(ACTIVATION_METHODS),
                                                          act_bitwidths=[8, 16], progress=False),
        }
        if parts:
            runs.update({
                "  ... --arithmetic exact": lambda: run_quantize(calib, "qx", arithmetic="exact"),
                "  ... report on 1 sample, no isolated": lambda: run_quantize(calib, "q1", eval_samples=1,
                                                                                analysis_samples=0),
                "  compare --arithmetic exact": lambda: compare(
                    MODEL, calib, root / "cx", methods=list(ACTIVATION_METHODS), act_bitwidths=[8, 16],
                    base=Settings(arithmetic="exact"), progress=False),
                "  compare, report on 1 sample, no isolated": lambda: compare(
                    MODEL, calib, root / "c1", methods=list(ACTIVATION_METHODS), act_bitwidths=[8, 16],
                    eval_samples=1, analysis_samples=0, progress=False),
            })
        run_quantize(calib64, "warm")  # compile the kernels outside the timings
        best = dict.fromkeys(runs, np.inf)
        for _ in range(repeats):  # interleaved, best of each
            for name, run in runs.items():
                best[name] = min(best[name], timed(run))
        baseline = best["plain FP32, batch 1"]
        print(f"\nthe whole command over {len(data)} samples, read from .npy files (ratio: to plain inference "
              "over the same samples in memory)")
        print(f"{'what':<40}{'seconds':>9}{'ratio':>8}")
        for name, seconds in best.items():
            print(f"{name:<40}{seconds:>9.2f}{seconds / baseline:>8.2f}")
        print("\nstage timings of the last quantize --method mse run (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in reports["q"]["timings"].items()))
        print("stage timings of the last quantize --method mse --eval run (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in reports["qe"]["timings"].items()))

        print("\npeak memory of quantize --method mse, report included (RSS high-water mark, MB)")
        print(f"{'report on':<36}{'64 samples':>12}{'512 samples':>13}{'ratio':>8}")
        for label, options in (("the default 64 samples", {}), ("every calibration sample", {"eval_samples": "all"})):
            peak64, _ = peak_rss_mb(lambda o=options: run_quantize(calib64, "m64", **o))
            peak512, _ = peak_rss_mb(lambda o=options: run_quantize(calib512, "m512", **o))
            print(f"{label:<36}{peak64:>12.0f}{peak512:>13.0f}{peak512 / peak64:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("efficientnet_lite0", "minilm_l6"), default="efficientnet_lite0")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; the best of each is kept")
    parser.add_argument("--skip-ort", action="store_true", help="skip onnxruntime's quantize_static (slow)")
    parser.add_argument("--stats-samples", type=int, default=16, help="samples for the statistics-alone costs")
    parser.add_argument("--whole", action="store_true", help="also time the whole quantize and compare commands")
    parser.add_argument("--whole-only", action="store_true", help="only the whole-command rows")
    parser.add_argument("--parts", action="store_true",
                        help="with the whole-command rows, also quantize and compare with the float simulation "
                             "(--arithmetic exact) and with a report on 1 sample and no isolated analysis")
    parser.add_argument("--ray", action="store_true", help="benchmark calibration on a local Ray cluster instead")
    parser.add_argument("--ray-samples", type=int, default=10_000, help="samples of --ray's memory run")
    args = parser.parse_args()
    global MODEL
    MODEL = MODELS / f"{args.model}.onnx"
    shapes = {name: value.shape for name, value in next(samples(1)).items()}
    deploy, _ = prepare_deploy_model(load_model(MODEL), shapes)
    targets = find_targets(deploy)
    sources = f"{len(list(images()))} source photos" if args.model == "efficientnet_lite0" else "96 sentences"
    print(f"model: {MODEL.name}, {len(targets.activations)} observed tensors, {sources}; "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    if args.ray:
        from bench_ray import bench_ray

        bench_ray(deploy, samples, args.samples, args.ray_samples, args.repeats, peak_rss_mb)
        return
    if args.whole_only:
        whole_command(deploy, args.samples, args.repeats, args.parts)
        return
    for method in ACTIVATION_METHODS:  # compile the kernels outside the timings
        calibrate(deploy, list(samples(2)), method)

    print("\npeak memory of our calibration (RSS high-water mark, MB)")
    print(f"{'method':<14}{'64 samples':>12}{'512 samples':>13}{'ratio':>8}   (RSS before: 64 / 512)")
    for method in ACTIVATION_METHODS:
        peak64, before64 = peak_rss_mb(lambda m=method: calibrate(deploy, samples(64), m))
        peak512, before512 = peak_rss_mb(lambda m=method: calibrate(deploy, samples(512), m))
        print(f"{method:<14}{peak64:>12.0f}{peak512:>13.0f}{peak512 / peak64:>8.3f}"
              f"   ({before64:.0f} / {before512:.0f})")

    print(f"\nstatistics alone: CPU ms per sample on one thread ({args.stats_samples} samples' tensors, "
          "out of cache)")
    subset = list(samples(args.stats_samples))
    for method in ACTIVATION_METHODS:
        print(f"{method:<14}{1000 * statistics_cost(deploy, subset, method):>8.2f}")

    data = list(samples(args.samples))
    cores = available_cores()
    dynamic = batch_dynamic_copy(deploy)
    batch = 4
    try:
        plain_inference(dynamic, data[:batch], batch)
    except Exception:  # a model whose folded shapes pin the batch of 1 (MiniLM's mask reshapes)
        dynamic = None
    runs: dict[str, Callable[[], object]] = {
        "plain FP32, batch 1": lambda: plain_inference(deploy, data, 1),
        **({f"plain FP32, batch {batch}": lambda: plain_inference(dynamic, data, batch)} if dynamic else {}),
        "tensors exposed as NCHW, 2 threads": lambda: exposed_inference(deploy, data, 0, False),
        "tensors exposed, 2 threads": lambda: exposed_inference(deploy, data, 0, True),
        "tensors exposed, 1 thread": lambda: exposed_inference(deploy, data, 1, True),
        f"tensors exposed, {cores} x 1 thread": lambda: exposed_inference(deploy, data, 1, True, cores),
        **{f"onnxsnpe {m}": (lambda m=m: calibrate(deploy, data, m)) for m in ACTIVATION_METHODS},
        **({f"onnxsnpe minmax, batch {batch}": lambda: calibrate(deploy, data, "minmax", batch)} if dynamic else {}),
    }
    best = dict.fromkeys(runs, np.inf)
    for _ in range(args.repeats):  # interleaved, best of each: other load on the machine hits all alike
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    rows = list(best.items())
    baseline = min(seconds for name, seconds in best.items() if name.startswith("plain FP32"))
    if not args.skip_ort:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "deploy.onnx"
            onnx.save(deploy, str(path))
            rows += [(f"onnxruntime quantize_static {m}", timed(lambda m=m: ort_quantize_static(path, data, m)))
                     for m in ("MinMax", "Percentile")]

    print(f"\ntime over {len(data)} samples (ratio: to the faster plain inference)")
    print(f"{'what':<40}{'seconds':>9}{'ms/sample':>11}{'ratio':>8}")
    for name, seconds in rows:
        print(f"{name:<40}{seconds:>9.2f}{1000 * seconds / len(data):>11.2f}{seconds / baseline:>8.2f}")
    if args.whole:
        whole_command(deploy, args.samples, args.repeats, args.parts)


if __name__ == "__main__":
    main()
