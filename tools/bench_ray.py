"""Calibration on a local Ray cluster against the in-process pass: ``tools/bench_calibration.py --ray``.

Both passes read the same crops from raw files by path (an SNPE input list), as a user's data would
come; every Ray result is checked to give the in-process encodings byte for byte. Prints:
- the time of each pass with ``minmax`` and ``tf_enhanced`` (best of interleaved rounds, after a
  first Ray run that starts the cluster's workers; that cold run and the cluster's start apart);
- the driver's peak RSS (high-water mark, reset before each run) calibrating 500 samples and
  ``--ray-samples`` samples (the same 500 crops listed again and again);
- what the estimate of the speed-up on N machines needs: one task alone on a shard of 8 and of 128
  samples (so its fixed cost and its cost per sample), the driver's cost of merging one shard's
  statistics, and their size.
"""

from __future__ import annotations

import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxsnpe.data.datasets import Dataset, open_dataset, to_snpe_layout
from onnxsnpe.encode.encoding import Encoding
from onnxsnpe.encode.ranges import activation_encodings
from onnxsnpe.graph.load import model_inputs
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.stats import distributed
from onnxsnpe.stats.collect import available_cores, collect_statistics

MEMORY_BASE = 500
"""Samples of the memory baseline (the issue's target: 10,000 within 1.15x of 500)."""


def write_crops(folder: Path, data: Iterator[dict[str, np.ndarray]], count: int) -> list[Path]:
    """``count`` samples as raw float32 files (N,H,W,C, as SNPE reads them)."""
    paths = []
    for index, sample in zip(range(count), data, strict=False):
        path = folder / f"{index:05d}.raw"
        (value,) = sample.values()
        np.ascontiguousarray(to_snpe_layout(value), dtype="<f4").tofile(path)
        paths.append(path)
    return paths


def input_list(folder: Path, paths: list[Path], count: int) -> Path:
    """An input list of ``count`` lines, cycling through ``paths``."""
    listed = folder / f"list_{count}.txt"
    listed.write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(count)))
    return listed


def bench_ray(deploy: onnx.ModelProto, samples: Callable[..., Iterator[dict[str, np.ndarray]]], count: int,
              big: int, repeats: int, peak_rss_mb: Callable) -> None:
    """Print the Ray rows (see the module's docstring)."""
    targets = find_targets(deploy)
    floors = targets.floors()
    inputs = model_inputs(deploy)
    if len(inputs) != 1:
        raise SystemExit("--ray benchmarks single-input models (image crops)")

    def dataset(listed: Path) -> Dataset:
        return open_dataset(listed, inputs)

    def in_process(listed: Path, method: str) -> dict[str, Encoding]:
        stats = collect_statistics(deploy, targets.activations, iter(dataset(listed)), [method], floors=floors)
        return activation_encodings(stats, targets, method, 8)

    def on_ray(listed: Path, method: str) -> dict[str, Encoding]:
        stats = distributed.collect_on_ray(deploy, targets.activations, dataset(listed), [method], floors)
        return activation_encodings(stats, targets, method, 8)

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = Path(tmp)
        crops = write_crops(folder, samples(max(count, MEMORY_BASE)), max(count, MEMORY_BASE))
        timed_list, base_list, big_list = (input_list(folder, crops, n) for n in (count, MEMORY_BASE, big))
        start = time.perf_counter()
        ray = distributed.connect(None)
        started = time.perf_counter() - start
        start = time.perf_counter()
        on_ray(timed_list, "minmax")
        cold = time.perf_counter() - start
        cpus = distributed.cluster_cpus(ray)
        print(f"\nRay {ray.__version__}: local cluster of {cpus} CPUs started in {started:.2f} s; "
              f"first run over {count} samples (workers importing onnxsnpe) {cold:.2f} s")

        print(f"\ntime over {count} samples read from raw files by path, best of {repeats} interleaved rounds")
        print(f"{'method':<14}{'in-process s':>14}{'Ray s':>8}{'ratio':>8}   encodings")
        per_sample = {}
        for method in ("minmax", "tf_enhanced"):
            best = {"in-process": np.inf, "ray": np.inf}
            results = {}
            for _ in range(repeats):
                for label, run in (("in-process", in_process), ("ray", on_ray)):
                    start = time.perf_counter()
                    results[label] = run(timed_list, method)
                    best[label] = min(best[label], time.perf_counter() - start)
            same = _entries(results["ray"]) == _entries(results["in-process"])
            per_sample[method] = best["in-process"] / count
            print(f"{method:<14}{best['in-process']:>14.2f}{best['ray']:>8.2f}{best['ray'] / best['in-process']:>8.2f}"
                  f"   {'identical' if same else 'DIFFERENT'}")

        print("\ndriver peak RSS calibrating on Ray (minmax; RSS high-water mark of this process, MB)")
        rows = []
        for listed, n in ((base_list, MEMORY_BASE), (big_list, big)):
            start = time.perf_counter()
            peak, before = peak_rss_mb(lambda listed=listed: on_ray(listed, "minmax"))
            rows.append((n, peak, before, time.perf_counter() - start))
        for n, peak, before, seconds in rows:
            print(f"{n:>7} samples  peak {peak:7.0f}  (before {before:.0f})  {seconds:7.1f} s"
                  f"  {1000 * seconds / n:.2f} ms/sample")
        print(f"ratio {rows[1][1] / rows[0][1]:.3f}")

        print("\nfor the estimate on N machines (a task alone on the cluster, one CPU)")
        for method in ("minmax", "percentile"):
            times = {n: _best(lambda n=n, m=method: _one_task(ray, deploy, targets, dataset(timed_list), n, m),
                              repeats) for n in (8, 128)}
            task_sample = (times[128] - times[8]) / 120
            part = _one_task(ray, deploy, targets, dataset(timed_list), 128, method, keep=True)
            merge = _best(lambda part=part: distributed.merge_in_order([part, part]), repeats) / 2
            print(f"{method:<11} one task, 8 samples {times[8]:.3f} s, 128 samples {times[128]:.3f} s: "
                  f"fixed {times[8] - 8 * task_sample:.3f} s + {1000 * task_sample:.2f} ms/sample; merging one "
                  f"shard's statistics on the driver {1000 * merge:.1f} ms, "
                  f"their size {len(pickle.dumps(part)) / 2**20:.2f} MB")
        print(f"in-process pass on {available_cores()} cores: {1000 * per_sample['minmax']:.2f} ms/sample (minmax)")


def _entries(encodings: dict[str, Encoding]) -> dict:
    return {name: encoding.entries() for name, encoding in encodings.items()}


def _best(run: Callable[[], object], repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _one_task(ray, deploy: onnx.ModelProto, targets, dataset: Dataset, count: int, method: str, keep: bool = False):
    """One shard task of ``count`` samples, run alone, as collect_on_ray runs it (its result if ``keep``)."""
    task = ray.remote(num_cpus=1)(distributed._shard_task)
    ref = task.remote(model=deploy.SerializeToString(), tensors=targets.activations, methods=(method,),
                      floors=targets.floors(), dataset=distributed.dataset_part(dataset, 0, count), first_index=0,
                      continuing=None, sink=None, reporter=None, shard=1,
                      code=distributed.code_fingerprint())
    result = ray.get(ref)
    return result if keep else None
