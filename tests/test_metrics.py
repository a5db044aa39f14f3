"""The error figures of report/metrics.py on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np

from onnxsnpe.report.metrics import TensorComparison


def _compared(reference, simulated) -> TensorComparison:
    comparison = TensorComparison("t")
    comparison.update(np.asarray(reference, dtype=np.float32), np.asarray(simulated, dtype=np.float32))
    return comparison


def test_an_output_stuck_at_zero_has_cosine_zero_and_sqnr_zero() -> None:
    """The PP-OCRv4 detector per channel at W8A8 outputs zeros on the HTP: cosine 0, not 1."""
    stuck = _compared([0.2, 0.9, 0.0], [0.0, 0.0, 0.0])
    assert stuck.cosine == 0.0 and stuck.sqnr_db == 0.0


def test_all_zero_on_both_sides_is_identical() -> None:
    both = _compared([0.0, 0.0], [0.0, 0.0])
    assert both.cosine == 1.0 and math.isinf(both.sqnr_db)


def test_cosine_and_sqnr_of_a_hand_worked_pair() -> None:
    """reference (3, 4), simulated (4, 3): cosine 24/25, noise 2, signal 25: 10 log10(12.5) dB."""
    pair = _compared([3.0, 4.0], [4.0, 3.0])
    assert math.isclose(pair.cosine, 24 / 25) and math.isclose(pair.sqnr_db, 10 * math.log10(12.5))
