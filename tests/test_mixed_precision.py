"""Automatic mixed precision: the greedy choice on a known score, and the flag end to end."""

import json

import pytest

from onnxsnpe import OnnxSnpeError, quantize
from onnxsnpe.optimize.mixed_precision import choose_16bit, held_back_count

GAINS = {"a": 6.0, "b": -1.0, "c": 3.0, "e": 0.05, "d": 0.5}


def _score(raised: list[str]) -> float:
    return 10.0 + sum(GAINS[name] for name in raised)


def test_greedy_choice_stops_at_the_target_and_skips_raises_that_do_not_help():
    choice = choose_16bit(["a", "b", "c", "d"], _score, target_db=18.0, budget=None)
    assert choice.raised == ["a", "c"] and choice.final_db == 19.0 and choice.target_met
    assert [(r.tensor, r.kept) for r in choice.tried] == [("a", True), ("b", False), ("c", True)]
    assert choice.to_dict()["evaluations"] == 4


def test_budget_limits_the_raises_and_a_missed_target_is_reported():
    choice = choose_16bit(["a", "b", "c", "d"], _score, target_db=40.0, budget=2)
    assert choice.raised == ["a", "c"] and choice.target_met is False
    spent = choose_16bit(["a", "b", "c", "e", "d"], _score, target_db=None, budget=5)
    assert spent.raised == ["a", "c", "d"] and spent.target_met is None  # e's 0.05 dB is below the margin
    with pytest.raises(ValueError):
        choose_16bit(["a"], _score, None, None)


def test_held_back_share():
    assert held_back_count(6) == 1 and held_back_count(64) == 8 and held_back_count(1000) == 16


def test_auto_precision_flag_raises_tensors_to_16_bits(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", auto_precision=True, max_16bit=2, progress=False)
    record = result.report["optimizations"]["auto_precision"]
    assert record["held_back_samples"] == 1 and 1 <= record["count"] <= 2
    encodings = json.loads((result.out_dir / "snpe_clip_ranges.json").read_text())["activation_encodings"]
    sixteen = {name for name, (entry,) in encodings.items() if entry["bitwidth"] == 16}
    assert set(record["raised"]) <= sixteen and sixteen
    assert len((result.out_dir / "data.txt").read_text().splitlines()) == 5  # one of six held back
    assert result.report["settings"]["max_16bit"] == 2


def test_auto_precision_needs_a_target_or_a_budget(tmp_path, tiny_model, npy_folder):
    with pytest.raises(OnnxSnpeError, match="--target-sqnr"):
        quantize(tiny_model, npy_folder, tmp_path / "out", auto_precision=True, progress=False)
    assert not (tmp_path / "out").exists()
