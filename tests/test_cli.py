"""Bad input: a one-line error naming the problem, exit code 1, no traceback, no partial output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxsnpe.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_dir: Path, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxsnpe: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())
    leftovers = [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp-")]
    assert not leftovers


def test_missing_model(capsys, tmp_path, npy_folder):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tmp_path / "nope.onnx", "--calib", npy_folder, "--out", out)
    assert_clean_failure(code, err, out, "model not found", "nope.onnx")


def test_corrupt_model(capsys, tmp_path, npy_folder):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx file at all\x00\xff")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", bad, "--calib", npy_folder, "--out", out)
    assert_clean_failure(code, err, out, "bad.onnx")


def test_empty_calibration_folder(capsys, tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", empty, "--out", out)
    assert_clean_failure(code, err, out, "no samples", str(empty))


def test_missing_calibration_path(capsys, tmp_path, tiny_model):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", tmp_path / "nowhere", "--out", out)
    assert_clean_failure(code, err, out, "not found", "nowhere")


def _folder_with(tmp_path, name, array, good=3):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(good):
        np.save(folder / f"a{i}.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(folder / name, array, allow_pickle=True)
    return folder


@pytest.mark.parametrize(
    "array, needles",
    [
        (np.zeros((3, 8), np.float32), ["rank 2", "rank 4"]),
        (np.zeros((1, 3, 8, 8), np.int32), ["dtype int32"]),
        (np.zeros((1, 3, 9, 9), np.float32), ["shape [1, 3, 9, 9]"]),
        (np.full((1, 3, 8, 8), np.nan, np.float32), ["NaN or Inf"]),
        (np.full((3, 8, 8), np.inf, np.float32), ["NaN or Inf"]),
        (np.array([{"x": 1}], dtype=object), ["pickled"]),
    ],
    ids=["rank", "dtype", "shape", "nan", "inf", "pickled"],
)
def test_bad_npy_sample(capsys, tmp_path, tiny_model, array, needles):
    folder = _folder_with(tmp_path, "z_bad.npy", array)  # sorted last: fails mid-run, after outputs started
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", folder, "--out", out)
    assert_clean_failure(code, err, out, "z_bad.npy", *needles)


def test_npz_with_wrong_input_name(capsys, tmp_path, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "s0.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", folder, "--out", out)
    assert_clean_failure(code, err, out, "s0.npz", "'image'", "'x'")


def test_corrupt_npy(capsys, tmp_path, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "s0.npy").write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", folder, "--out", out)
    assert_clean_failure(code, err, out, "s0.npy")


def test_output_path_is_a_file(capsys, tmp_path, tiny_model, npy_folder):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", out)
    assert code == 1 and "output path is a file" in err and str(out) in err
    assert out.read_text() == "keep me"


def test_output_path_not_writable(capsys, tmp_path, tiny_model, npy_folder):
    out = Path("/proc/onnxsnpe-test/out")  # not creatable, even by root
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", out)
    assert code == 1 and "cannot write the output folder" in err and str(out) in err
    assert len(err.strip().splitlines()) == 1


def test_failed_run_keeps_previous_output(capsys, tmp_path, tiny_model, npy_folder):
    out = tmp_path / "out"
    assert run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", out, "--quiet")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    np.save(npy_folder / "z.npy", np.full((3, 8, 8), np.nan, np.float32))
    code, _, err = run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", out)
    assert code == 1 and "NaN" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_debug_shows_traceback(capsys, tmp_path, npy_folder):
    with pytest.raises(Exception, match="model not found"):
        main(["quantize", str(tmp_path / "nope.onnx"), "--calib", str(npy_folder), "--out", str(tmp_path / "o"),
              "--debug"])


def test_input_files_are_not_modified(capsys, tmp_path, tiny_model, npy_folder):
    before = {p: p.read_bytes() for p in [tiny_model, *npy_folder.iterdir()]}
    assert run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", tmp_path / "o", "--quiet")[0] == 0
    assert {p: p.read_bytes() for p in before} == before


def test_help_texts():
    for args in (["--help"], ["quantize", "--help"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, "-m", "onnxsnpe.cli", *args], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0
        assert "usage: onnxsnpe" in result.stdout
    quantize_help = subprocess.run([sys.executable, "-m", "onnxsnpe.cli", "quantize", "--help"],
                                   capture_output=True, text=True, check=False).stdout
    for flag in ("--calib", "--eval", "--num-samples", "--act-bitwidth", "--resize", "--mean", "--input-shape"):
        assert flag in quantize_help


def test_unknown_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--bogus"])
    assert info.value.code == 2


def test_encoding_format_option_writes_1_0_0(capsys, tmp_path, tiny_model, npy_folder):
    out = tmp_path / "o"
    code = run_cli(capsys, "quantize", tiny_model, "--calib", npy_folder, "--out", out, "--quiet",
                   "--analysis-samples", "0", "--per-channel", "--encoding-format", "1.0.0")[0]
    assert code == 0
    document = json.loads((out / "snpe_clip_ranges.json").read_text())
    assert document["version"] == "1.0.0"
    assert {e["enc_type"] for e in document["param_encodings"]} == {"PER_CHANNEL"}
    assert json.loads((out / "report.json").read_text())["settings"]["encoding_format"] == "1.0.0"
