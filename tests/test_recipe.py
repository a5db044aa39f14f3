"""--optimize keeps a step only when the held-back score improves, and records the ablation."""

import json

from onnxsnpe import quantize


def test_recipe_keeps_only_steps_that_raise_the_held_back_score(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", optimize=True, adaround_iters=100, progress=False)
    recipe = result.report["optimizations"]["recipe"]
    rows = recipe["ablation"]
    assert [r["step"] for r in rows] == ["nearest rounding", "+ CLE", "+ AdaRound", "+ bias correction"]
    best = rows[0]["sqnr_db"]
    for row in rows[1:]:
        assert row["kept"] == (row["sqnr_db"] > best)
        best = max(best, row["sqnr_db"]) if row["kept"] else best
    settings = result.report["settings"]
    assert recipe["kept"] == [s for s in ("cle", "adaround", "bias_correction") if settings[s]]
    assert recipe["held_back_samples"] == 1
    assert set(result.report["optimizations"]) == {"recipe", *recipe["kept"]}
    assert len((result.out_dir / "data.txt").read_text().splitlines()) == 5
    json.dumps(result.report, allow_nan=False)
