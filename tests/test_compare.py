"""``onnxsnpe compare``: one calibration pass, every configuration reported, each as quantize would."""

import json

import pytest

from onnxsnpe import quantize, stages
from onnxsnpe.cli import main
from onnxsnpe.compare import compare
from onnxsnpe.stages import Settings


def test_compare_calibrates_once_and_matches_quantize(monkeypatch, tmp_path, tiny_model, npy_folder):
    calls = []
    original = stages.collect_statistics

    def counting(*args, **kwargs):
        calls.append(kwargs.get("methods"))
        return original(*args, **kwargs)

    monkeypatch.setattr(stages, "collect_statistics", counting)
    result = compare(tiny_model, npy_folder, tmp_path / "cmp", methods=["minmax", "mse"], act_bitwidths=[8, 16],
                     progress=False)
    assert len(calls) == 1 and set(calls[0]) >= {"minmax", "mse"}
    names = [c["name"] for c in result.report["configurations"]]
    assert names == ["minmax A8W8", "minmax A16W8", "mse A8W8", "mse A16W8"]
    for config in result.report["configurations"]:
        doc = json.loads((result.out_dir / config["overrides"]).read_text())
        assert set(doc) == {"activation_encodings", "param_encodings"}
    for name in ("compare.json", "compare.html", "snpe_deploy.onnx", "data.txt"):
        assert (result.out_dir / name).is_file()

    single = quantize(tiny_model, npy_folder, tmp_path / "q", method="mse", act_bitwidth=16, progress=False)
    mse16 = result.report["configurations"][3]
    assert mse16["outputs"] == single.report["outputs"]
    assert json.loads((result.out_dir / mse16["overrides"]).read_text()) == json.loads(
        (single.out_dir / "snpe_clip_ranges.json").read_text()
    )


def test_compare_command(capsys, tmp_path, tiny_model, npy_folder):
    code = main(["compare", str(tiny_model), "--calib", str(npy_folder), "--out", str(tmp_path / "c"),
                 "--methods", "minmax,percentile", "--act-bitwidth", "8,16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "percentile A16W8" in out and "compared 4 configurations" in out
    page = (tmp_path / "c" / "compare.html").read_text()
    assert page.count("<svg") == 1 and "minmax A8W8" in page


def test_compare_rejects_unknown_method(capsys, tmp_path, tiny_model, npy_folder):
    with pytest.raises(SystemExit) as info:
        main(["compare", str(tiny_model), "--calib", str(npy_folder), "--out", str(tmp_path / "c"),
              "--methods", "minmax,kl"])
    assert info.value.code == 2
    assert "kl" in capsys.readouterr().err


def test_settings_are_checked():
    with pytest.raises(Exception, match="--act-bitwidth"):
        Settings(act_bitwidth=4).check()
