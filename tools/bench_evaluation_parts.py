"""Where one evaluation sample's time goes: the exposed FP32 model, the simulated model, the fold.

    python tools/bench_evaluation_parts.py [--samples 16] [--act-bitwidth 8|16]

On EfficientNet-Lite0 (../shared/models) with calib_data/calib, min-max encodings (8-bit activations,
or 16-bit with ``--act-bitwidth 16``), 8-bit per-tensor weights: milliseconds a sample on one thread
for plain FP32 inference, FP32 with every quantized activation exposed (what the evaluation runs),
the simulated model in each arithmetic (outputs only, and with every tensor exposed), and the
compiled fold of one sample's tensors (report/folding.py).
This is not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from onnxsnpe.graph.runtime import make_session
from onnxsnpe.report.evaluation import HISTOGRAM_BINS
from onnxsnpe.report.folding import Accumulator, TensorBins, fold, typed_arrays
from onnxsnpe.simulate.arithmetic import ARITHMETICS, simulation_model
from onnxsnpe.stages import Settings, encode, prepare
from onnxsnpe.stats.collect import collect_statistics

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "efficientnet_lite0.onnx"


def per_sample_ms(run: Callable[[dict], object], samples: list[dict]) -> float:
    """Milliseconds a sample, after one warm-up run."""
    run(samples[0])
    start = time.perf_counter()
    for sample in samples:
        run(sample)
    return (time.perf_counter() - start) / len(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--act-bitwidth", type=int, choices=(8, 16), default=8)
    args = parser.parse_args()
    prepared = prepare(MODEL, ROOT / "calib_data" / "calib", None, None, None, None)
    samples = list(prepared.calib_set)[: args.samples]
    targets = prepared.targets
    stats = collect_statistics(prepared.deploy, targets.activations, iter(samples), methods=["minmax"],
                               floors=targets.floors())
    encodings = encode(prepared, stats, Settings(act_bitwidth=args.act_bitwidth))
    inputs = {value.name for value in prepared.deploy.graph.input}
    exposed = [name for name in targets.activations if name not in inputs]
    outputs = [o.name for o in prepared.deploy.graph.output]
    rows = {}
    plain = make_session(prepared.deploy, [], 1)
    fp32 = make_session(prepared.deploy, exposed, 1)
    rows["plain FP32"] = per_sample_ms(lambda s: plain.run(None, s), samples)
    rows["FP32, quantized tensors exposed"] = per_sample_ms(lambda s: fp32.run(None, s), samples)
    exposed_sessions = {}
    for arithmetic in ARITHMETICS:
        model, output_map = simulation_model(prepared.deploy, targets, encodings.activations, encodings.weights,
                                             arithmetic)
        names = list(dict.fromkeys(output_map[n] for n in [*outputs, *exposed]))
        alone, with_tensors = make_session(model, [], 1), make_session(model, names, 1)
        exposed_sessions[arithmetic] = (with_tensors, [output_map[n] for n in exposed])
        rows[f"simulated ({arithmetic}), outputs only"] = per_sample_ms(lambda s, a=alone: a.run(None, s), samples)
        rows[f"simulated ({arithmetic}), tensors exposed"] = per_sample_ms(
            lambda s, w=with_tensors, n=names: w.run(n, s), samples)
    references = fp32.run(exposed, samples[0])
    session, simulated_names = exposed_sessions["htp"]  # the default arithmetic's tensors, as the evaluation folds
    simulated = session.run(simulated_names, samples[0])
    ranges = [(float(r.min()), float(r.max()) if r.max() > r.min() else float(r.min()) + 1.0) for r in references]
    bins = TensorBins(ranges, ranges, HISTOGRAM_BINS)
    accumulator = Accumulator(len(exposed), HISTOGRAM_BINS)
    ref_list, sim_list = typed_arrays(references), typed_arrays(simulated)
    rows[f"fold of {sum(r.size for r in references) / 1e6:.1f} M values"] = per_sample_ms(
        lambda _: fold(bins, ref_list, sim_list, accumulator), samples)
    print(f"{len(samples)} samples of calib_data/calib, A{args.act_bitwidth}W8, one thread; ms a sample")
    for label, ms in rows.items():
        print(f"{label:45s} {ms:7.1f}")


if __name__ == "__main__":
    main()
