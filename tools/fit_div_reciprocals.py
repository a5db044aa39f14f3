"""Measure the reciprocal table of the HTP's 8-bit Div (simulate/htp/div.py) on the emulator.

    python tools/fit_div_reciprocals.py [--print-table]

Needs onnxruntime-qnn. Each probe divides every pair of 8-bit codes (65,536 values) with one set of
encodings: three with power-of-two numerator and output scales, seven hand-picked, 16 random ones
(fitted) and eight more random ones held out. For each divisor code magnitude ``|c|`` the fit
scores relative errors ``r |c| - 1`` from -1.5e-3 to 1.5e-3 in steps of 5e-7 by how many codes
the model of div.py (13 significant bits) then misses over every fitting probe, and keeps the
lowest-miss value nearest a quadratic through ``1/m`` at each quarter's start, middle and end of
the mantissa ``m`` (the shape the fitted errors follow; it decides where the probes leave a code
free). It prints the misses on the held-out probes, with the table fitted here and with the one
in div.py, beside float division then rounding (tools/HTP.md finding 59).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from onnx import TensorProto, helper

from onnxsnpe.encode.encoding import Encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.htp.div import RECIPROCAL_ERROR, SIGNIFICANT_BITS
from onnxsnpe.simulate.qdq import build_qdq_model

FIXED_PROBES = (  # s_a, z_a, s_b, z_b, s_y, z_y
    (0.0625, 128, 0.03125, 0, 0.125, 128), (0.0625, 128, 0.015625, 0, 0.125, 128),
    (0.0625, 128, 0.0371, 0, 0.125, 128), (0.05, 100, 0.0213, 0, 0.07, 60), (0.0371, 128, 0.0117, 3, 0.3, 128),
    (0.0625, 128, 0.09, 0, 0.0161, 128), (0.011, 128, 0.0043, 0, 0.0313, 128), (0.023, 77, 0.0157, 128, 0.041, 140),
    (0.1, 128, 0.007, 0, 0.5, 128), (0.0031, 200, 0.0029, 0, 0.0437, 90),
)
RELATIVE = np.linspace(-1.5e-3, 1.5e-3, 6001)


def random_probes(seed: int, indices: range) -> list[tuple[float, int, float, int, float, int]]:
    """Random encodings, one per index: log-uniform scales, a divisor zero point 0 at even indices."""
    rng = np.random.default_rng(seed)
    probes = []
    for index in indices:
        s_a = float(np.exp(rng.uniform(np.log(0.003), np.log(0.2))))
        z_a = int(rng.integers(0, 256))
        s_b = float(np.exp(rng.uniform(np.log(0.002), np.log(0.1))))
        z_b = 0 if index % 2 == 0 else int(rng.integers(0, 256))
        s_y = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5))))
        probes.append((s_a, z_a, s_b, z_b, s_y, int(rng.integers(30, 226))))
    return probes


def emulator_codes(probe: tuple[float, int, float, int, float, int]) -> np.ndarray:
    """The HTP's output code for numerator code i and divisor code j, as a 256 x 256 array."""
    s_a, z_a, s_b, z_b, s_y, z_y = probe
    encodings = {"a": Encoding(8, s_a, -z_a), "b": Encoding(8, s_b, -z_b), "y": Encoding(8, s_y, -z_y)}
    graph = helper.make_graph([helper.make_node("Div", ["a", "b"], ["y"])], "div",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 65536]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 65536])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    a_codes, b_codes = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    feed = {name: ((codes.reshape(1, -1) - zero) * np.float32(scale)).astype(np.float32)
            for name, codes, scale, zero in (("a", a_codes, s_a, z_a), ("b", b_codes, s_b, z_b))}
    session = HtpSession(build_qdq_model(model, find_targets(model), encodings, {}),
                         {"a": encodings["a"], "b": encodings["b"]})
    out = session.run(feed)[0].reshape(256, 256)
    return np.round(out / np.float32(s_y) + z_y).astype(np.int64)


def round_significant(value: np.ndarray, bits: int) -> np.ndarray:
    """``value`` rounded to ``bits`` significant bits, to nearest (ties to even, as the split does)."""
    mantissa, exponent = np.frexp(value)
    return np.ldexp(np.round(np.ldexp(mantissa, bits)), exponent - bits)


def modeled(probe: tuple, numerators: np.ndarray, divisor: int, relative: np.ndarray) -> np.ndarray:
    """div.py's codes for centered ``numerators`` over one divisor code, for each relative error (rows)."""
    s_a, _, s_b, _, s_y, z_y = probe
    ratio = float(np.float32(s_a)) / (float(np.float32(s_b)) * float(np.float32(s_y)))
    value = numerators[None, :] * ((1 + relative)[:, None] / divisor * ratio)
    return np.clip(np.floor(round_significant(value, SIGNIFICANT_BITS) + z_y + 0.5), 0, 255)


def quarter_quadratic(magnitude: int) -> float:
    """``q(m) m - 1`` for ``q`` the quadratic through ``1/m`` at the quarter's start, middle and end."""
    m = magnitude / 2.0 ** np.floor(np.log2(magnitude))
    start = 1 + np.floor((m - 1) * 4) / 4
    nodes = start + np.array([0.0, 0.125, 0.25])
    return float(np.polyval(np.polyfit(nodes, 1 / nodes, 2), m) * m - 1)


def fit(probes: list[tuple], outputs: list[np.ndarray]) -> np.ndarray:
    """The relative error of each code magnitude 1 to 255 (module docstring)."""
    misses = np.zeros((256, len(RELATIVE)))
    for probe, codes in zip(probes, outputs, strict=True):
        numerators = np.arange(256) - probe[1]
        for column in range(256):
            divisor = column - probe[3]
            if divisor:
                misses[abs(divisor)] += (modeled(probe, numerators, divisor, RELATIVE) != codes[:, column]).sum(1)
    table = np.zeros(256)
    for magnitude in range(1, 256):
        best = RELATIVE[misses[magnitude] == misses[magnitude].min()]
        table[magnitude] = best[np.argmin(np.abs(best - quarter_quadratic(magnitude)))]
    return table[1:]


def misses(probe: tuple, codes: np.ndarray, table: np.ndarray | None) -> int:
    """Codes (non-zero divisors) the model with ``table`` misses; float division then rounding with None."""
    numerators = np.arange(256) - probe[1]
    total = 0
    for column in range(256):
        divisor = column - probe[3]
        if not divisor:
            continue
        if table is None:
            s_a, _, s_b, _, s_y, z_y = probe
            predicted = np.clip(np.floor(numerators * s_a / (divisor * s_b * s_y) + z_y + 0.5), 0, 255)
        else:
            predicted = modeled(probe, numerators, divisor, np.array([table[abs(divisor) - 1]]))[0]
        total += int((predicted != codes[:, column]).sum())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-table", action="store_true", help="print the fitted table in div.py's units")
    args = parser.parse_args()
    reason = qnn_unavailable_reason()
    if reason is not None:
        print(f"fit_div_reciprocals: the HTP emulator is unavailable: {reason}", file=sys.stderr)
        return 1
    fitting = [*FIXED_PROBES, *random_probes(7, range(16))]
    held_out = random_probes(11, range(16, 24))
    fitting_codes = [emulator_codes(probe) for probe in fitting]
    table = fit(fitting, fitting_codes)
    shipped = np.array(RECIPROCAL_ERROR, dtype=np.float64) * 1e-7
    print("probe | float division | fitted table | div.py's table")
    totals = np.zeros(3, dtype=np.int64)
    for probe in held_out:
        codes = emulator_codes(probe)
        row = np.array([misses(probe, codes, None), misses(probe, codes, table), misses(probe, codes, shipped)])
        totals += row
        print(" ".join(f"{v:.4g}" for v in probe), "|", " | ".join(str(v) for v in row))
    print(f"held out, {len(held_out)} x 65,280 codes:", " | ".join(str(v) for v in totals))
    if args.print_table:
        print(tuple(round(float(v) * 1e7) for v in table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
