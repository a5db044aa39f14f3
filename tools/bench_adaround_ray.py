"""AdaRound on a local Ray cluster against the in-process run, on EfficientNet-Lite0 (crops of the real
photographs, tools/bench_calibration.py's), for both ``--adaround-inputs`` modes:

    python tools/bench_adaround_ray.py [--samples 16] [--iters 200]

Prints the waves of independent layers each mode has (adaround.layer_waves), the seconds of the
in-process call and of the Ray call (a local cluster with the machine's cores, started and warmed
beforehand), and whether the rounded weights and per-layer records are byte for byte the same.
"""

from __future__ import annotations

import argparse
import time

from bench_calibration import MODEL, image_samples

from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.optimize.adaround import adaround, adaround_layers, layer_waves
from onnxsnpe.optimize.adaround_on_ray import ray_runner
from onnxsnpe.stats.distributed import connect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    deploy, _ = prepare_deploy_model(load_model(MODEL), {"input": [1, 3, 224, 224]})
    weights = weight_encodings(deploy, find_targets(deploy), 8)
    samples = list(image_samples(args.samples))
    layers = adaround_layers(deploy, weights)
    start = time.perf_counter()
    ray = connect()
    runner = ray_runner()
    warm = adaround(deploy, weights, samples[:1], iterations=1, inputs="fp32", runner=runner)
    print(f"Ray {ray.__version__}: local cluster up and warm in {time.perf_counter() - start:.1f} s; "
          f"{len(layers)} layers, {args.samples} samples, {args.iters} iterations")
    del warm
    for inputs in ("fp32", "rounded"):
        waves = [layers] if inputs == "fp32" else layer_waves(deploy, layers)
        wide = sum(len(wave) for wave in waves if len(wave) > 1)
        start = time.perf_counter()
        local, local_rows = adaround(deploy, weights, samples, args.iters, inputs=inputs)
        here = time.perf_counter() - start
        start = time.perf_counter()
        remote, remote_rows = adaround(deploy, weights, samples, args.iters, inputs=inputs, runner=runner)
        there = time.perf_counter() - start
        same = ([i.SerializeToString() for i in local.graph.initializer]
                == [i.SerializeToString() for i in remote.graph.initializer]
                and [r.to_dict() for r in local_rows] == [r.to_dict() for r in remote_rows])
        print(f"{inputs:<8} {len(waves):>3} waves, {wide:>3} layers in waves of 2 or more; "
              f"in-process {here:7.1f} s, Ray {there:7.1f} s, ratio {there / here:.2f}; "
              f"weights {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
