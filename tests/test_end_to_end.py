"""The whole command on the four real models, and what SNPE will read from its outputs."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsnpe import ImageOptions, quantize
from onnxsnpe.cli import main
from onnxsnpe.data.datasets import open_dataset
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.load import load_model, model_inputs
from onnxsnpe.graph.runtime import make_session

from .conftest import CALIB_DATA, ROOT, shared_model

IMAGENET = {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225"}
HALF = {"mean": "0.5", "std": "0.5"}
REAL_MODELS = {
    "efficientnet_lite0.onnx": ("224,224", IMAGENET),
    "ch_PP-OCRv4_det_infer.onnx": ("160,160", IMAGENET),
    "ch_PP-OCRv4_rec_infer.onnx": ("48,320", HALF),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ("48,192", HALF),
}


def check_overrides(path, deploy):
    doc = json.loads(path.read_text())
    assert set(doc) == {"activation_encodings", "param_encodings"}
    initializers = {i.name for i in deploy.graph.initializer}
    tensors = {v.name for v in deploy.graph.input} | {o for n in deploy.graph.node for o in n.output}
    assert doc["param_encodings"] and set(doc["param_encodings"]) <= initializers
    assert doc["activation_encodings"] and set(doc["activation_encodings"]) <= tensors
    for entries in [*doc["activation_encodings"].values(), *doc["param_encodings"].values()]:
        (entry,) = entries
        assert set(entry) == {"bitwidth", "dtype", "is_symmetric", "min", "max", "scale", "offset"}
        assert entry["dtype"] == "int" and entry["is_symmetric"] == "False"
        levels = 2 ** entry["bitwidth"] - 1
        assert isinstance(entry["offset"], int) and -levels <= entry["offset"] <= 0
        assert entry["min"] == pytest.approx(entry["offset"] * entry["scale"], rel=1e-12, abs=1e-30)
        assert entry["max"] == pytest.approx(entry["min"] + levels * entry["scale"], rel=1e-12, abs=1e-12)
    return doc


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_quantize_real_model(capsys, tmp_path, name):
    model = shared_model(name)
    resize, norm = REAL_MODELS[name]
    out = tmp_path / "out"
    code = main(["quantize", str(model), "--calib", str(CALIB_DATA / "calib"), "--eval", str(CALIB_DATA / "eval"),
                 "--num-samples", "4", "--analysis-samples", "1", "--out", str(out), "--resize", resize,
                 "--mean", norm["mean"], "--std", norm["std"]])
    summary = capsys.readouterr().out
    assert code == 0
    assert "SQNR" in summary and str(out) in summary

    deploy = onnx.load(str(out / "snpe_deploy.onnx"))
    onnx.checker.check_model(deploy)
    assert "BatchNormalization" not in [n.op_type for n in deploy.graph.node] or name.startswith("ch_PP-OCRv4_det")
    check_overrides(out / "snpe_clip_ranges.json", deploy)

    # the deploy model computes what the input model computes
    original = load_model(model)
    spec = model_inputs(original)[0]
    h, w = map(int, resize.split(","))
    evals = open_dataset(CALIB_DATA / "eval", model_inputs(original),
                         ImageOptions(resize=(h, w), mean=tuple(map(float, norm["mean"].split(","))),
                                      std=tuple(map(float, norm["std"].split(",")))), num_samples=2)
    for sample in evals:
        want = make_session(original).run(None, sample)
        got = make_session(deploy).run(None, sample)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))

    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["num_samples"] == 4
    assert report["evaluation"] == {**report["evaluation"], "num_samples": 8, "held_out": True}
    assert report["model"]["inputs"] == [{"name": spec.name, "shape": [1, 3, h, w], "dtype": "float32"}]
    (output,) = report["outputs"]
    assert output["name"] == original.graph.output[0].name
    assert output["sqnr_db"] is not None and output["max_abs_error"] > 0

    lines = (out / "data.txt").read_text().splitlines()
    assert len(lines) == 4
    raw = np.fromfile(lines[0], dtype="<f4")
    assert raw.size == 3 * h * w


def test_raw_files_are_nhwc_copies_byte_for_byte(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", progress=False)
    lines = (result.out_dir / "data.txt").read_text().splitlines()
    arrays = [np.load(p) for p in sorted(npy_folder.glob("*.npy"))]
    assert len(lines) == len(arrays)
    for line, array in zip(lines, arrays, strict=True):
        assert line.startswith("/")
        expected = array[np.newaxis].transpose(0, 2, 3, 1).astype("<f4").tobytes()
        with open(line, "rb") as f:
            assert f.read() == expected


def test_image_raw_files_match_the_preprocessed_images(tmp_path):
    model = shared_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    options = ImageOptions(resize=(48, 192), mean=(0.5,), std=(0.5,))
    result = quantize(model, CALIB_DATA / "calib", tmp_path / "out", num_samples=3, image_options=options,
                      progress=False)
    dataset = open_dataset(CALIB_DATA / "calib", model_inputs(load_model(model)), options, num_samples=3)
    lines = (result.out_dir / "data.txt").read_text().splitlines()
    for line, sample in zip(lines, dataset, strict=True):
        with open(line, "rb") as f:
            assert f.read() == sample["x"].transpose(0, 2, 3, 1).astype("<f4").tobytes()


def test_input_list_round_trip_gives_same_encodings(tmp_path, tiny_model, npy_folder):
    first = quantize(tiny_model, npy_folder, tmp_path / "a", progress=False)
    second = quantize(tiny_model, first.out_dir / "data.txt", tmp_path / "b", progress=False)
    assert second.report["calibration"]["format"] == "input_list"
    a = json.loads((first.out_dir / "snpe_clip_ranges.json").read_text())
    b = json.loads((second.out_dir / "snpe_clip_ranges.json").read_text())
    assert a == b


def test_same_inputs_give_byte_identical_outputs(tmp_path, tiny_model, npy_folder):
    out = tmp_path / "out"
    files = ["snpe_deploy.onnx", "snpe_clip_ranges.json", "data.txt", "report.html", "raw/00000.raw"]
    quantize(tiny_model, npy_folder, out, progress=False)
    first = {name: (out / name).read_bytes() for name in files}
    report = json.loads((out / "report.json").read_text())
    quantize(tiny_model, npy_folder, out, progress=False)
    assert {name: (out / name).read_bytes() for name in files} == first
    again = json.loads((out / "report.json").read_text())
    assert set(report.pop("timings")) >= {"prepare", "calibration", "evaluation", "report_html", "total"}
    again.pop("timings")
    assert again == report  # all but the stage timings


def test_batch_dimension_optional_and_num_samples(tmp_path, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(5)
    np.save(folder / "a.npy", rng.normal(size=(3, 8, 8)).astype(np.float32))
    np.save(folder / "b.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float64))
    np.save(folder / "c.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    result = quantize(tiny_model, folder, tmp_path / "out", num_samples=2, progress=False)
    assert result.report["calibration"]["num_samples"] == 2
    assert len((result.out_dir / "data.txt").read_text().splitlines()) == 2
    assert result.report["evaluation"]["held_out"] is False and result.report["evaluation"]["note"]


def test_dynamic_model_shapes_fixed_from_data(tmp_path):
    from .conftest import conv_model

    model = conv_model(tmp_path / "dyn.onnx", dynamic=True)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"{i}.npy", np.random.default_rng(i).normal(size=(3, 8, 8)).astype(np.float32))
    result = quantize(model, folder, tmp_path / "out", progress=False)
    deploy = onnx.load(str(result.out_dir / "snpe_deploy.onnx"))
    assert model_inputs(deploy)[0].dims == (1, 3, 8, 8)


def test_two_input_model_with_npz_and_input_list(tmp_path):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 4]) for n in ("a", "b/in")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b/in"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
        "two", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    model_path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model_path))
    folder = tmp_path / "npz"
    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        sample = {"a": rng.normal(size=(2, 4, 4)).astype(np.float32),
                  "b/in": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)}
        np.savez(folder / f"{i}.npz", **sample)
        samples.append(sample)
    result = quantize(model_path, folder, tmp_path / "out", progress=False)
    lines = (result.out_dir / "data.txt").read_text().splitlines()
    assert len(lines) == 3
    tokens = lines[0].split()
    assert [t.split(":=")[0] for t in tokens] == ["a", "b/in"]
    with open(tokens[1].split(":=")[1], "rb") as f:
        assert f.read() == samples[0]["b/in"].transpose(0, 2, 3, 1).astype("<f4").tobytes()
    again = quantize(model_path, result.out_dir / "data.txt", tmp_path / "out2", progress=False)
    assert again.report["outputs"] == result.report["outputs"]


def test_bias_encodings_on_request(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", write_bias_encodings=True, progress=False)
    params = json.loads((result.out_dir / "snpe_clip_ranges.json").read_text())["param_encodings"]
    assert set(params) == {"conv.w", "conv.b", "fc.w", "fc.b"}
    assert params["conv.b"][0]["bitwidth"] == 32 and params["conv.b"][0]["offset"] == -(2**31)
    default = quantize(tiny_model, npy_folder, tmp_path / "out2", progress=False)
    params = json.loads((default.out_dir / "snpe_clip_ranges.json").read_text())["param_encodings"]
    assert set(params) == {"conv.w", "fc.w"}


def test_sixteen_bit_activations_are_more_accurate(tmp_path, tiny_model, npy_folder):
    a8 = quantize(tiny_model, npy_folder, tmp_path / "a8", progress=False)
    a16 = quantize(tiny_model, npy_folder, tmp_path / "a16", act_bitwidth=16, weight_bitwidth=16, progress=False)
    assert a16.outputs[0].sqnr_db > a8.outputs[0].sqnr_db + 20
    enc = json.loads((a16.out_dir / "snpe_clip_ranges.json").read_text())["activation_encodings"]
    assert {e[0]["bitwidth"] for e in enc.values()} == {16}


def test_demo_runs_and_writes_the_recorded_bytes(capsys, tmp_path):
    """The demo's SNPE files (overrides, deploy and QDQ models, raw inputs) are byte-identical to the
    recorded ones (tests/demo_outputs.sha256, written before the stage-subpackage layout, re-recorded when
    graph preparation began folding the classifier's 18 Conv bias Adds as SNPE's converter does: 18
    activation and 18 param encodings fewer, every other entry unchanged; snpe_qdq.onnx again when
    the QDQ export moved this opset-11 model to opset 13 for its MaxPool, tools/HTP.md finding 40,
    the SNPE files unchanged): a change that moves a bit
    of them shows here. Recorded on the project's x86-64 machine; onnxruntime kernels on
    another CPU could round a calibration range differently."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert "SQNR" in capsys.readouterr().out
    recorded = dict(line.split()[::-1] for line in (ROOT / "tests" / "demo_outputs.sha256").read_text().splitlines())
    written = sorted(str(p.relative_to(out)) for p in (out / "raw").iterdir())
    assert written == sorted(name for name in recorded if name.startswith("raw/"))
    for name, digest in recorded.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_qdq_model_is_written_and_runs(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", progress=False)
    qdq = onnx.load(str(result.out_dir / "snpe_qdq.onnx"))
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sample = {"x": np.load(sorted(npy_folder.glob("*.npy"))[0])[np.newaxis]}
    (out,) = make_session(qdq).run(None, sample)
    assert out.shape == (1, 5) and np.all(np.isfinite(out))


def test_htp_flag(capsys, tmp_path, tiny_model, npy_folder):
    from onnxsnpe.simulate.emulator import qnn_unavailable_reason

    out = tmp_path / "out"
    args = ["quantize", str(tiny_model), "--calib", str(npy_folder), "--out", str(out), "--htp", "2"]
    reason = qnn_unavailable_reason()
    code = main(args)
    captured = capsys.readouterr()
    if reason:  # without onnxruntime-qnn: a clean one-line error, nothing written
        assert code == 1 and "--htp" in captured.err and len(captured.err.strip().splitlines()) == 1
        assert not out.exists()
        pytest.skip(f"HTP emulator unavailable: {reason}")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["htp"]["samples"] == 2 and report["htp"]["cpu_fallback_ops"] == []
    for rows in report["htp"]["agreement"].values():
        assert rows[0]["name"] == "out" and rows[0]["max_error_lsb"] >= 0


def test_a_model_the_htp_refuses_is_reported_and_every_output_written(capsys, tmp_path, tiny_model, npy_folder,
                                                                       monkeypatch):
    """The backend's refusal is a finding about the model: the command succeeds, the summary and
    both reports say so, and the SNPE outputs are written as without --htp."""
    from onnxsnpe import api
    from onnxsnpe.errors import HtpRefused

    def refuse(*_args, **_kwargs):
        raise HtpRefused("the QNN HTP backend rejected the model: QNN_COMMON_ERROR_MEM_ALLOC")

    monkeypatch.setattr(api, "HtpSession", refuse)
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_model), "--calib", str(npy_folder), "--out", str(out), "--htp", "2"])
    captured = capsys.readouterr()
    assert code == 0 and "HTP emulator refused the QDQ model: the QNN HTP backend rejected" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["htp"]["refused"].endswith("QNN_COMMON_ERROR_MEM_ALLOC") and report["htp"]["samples"] == 0
    assert "It refused the QDQ model" in (out / "report.html").read_text()
    assert {"snpe_clip_ranges.json", "snpe_qdq.onnx", "data.txt"} <= {p.name for p in out.iterdir()}


def _against_the_htp(out: Path, name: str = "efficientnet_lite0.onnx", num_samples: int | None = 8,
                     **options) -> tuple[dict, dict]:
    """A real model quantized on ``num_samples`` crops (None: all 16) and run on the HTP emulator for
    4 held-out ones: the agreement rows of the htp and the exact arithmetic."""
    from onnxsnpe.simulate.emulator import qnn_unavailable_reason

    if reason := qnn_unavailable_reason():
        pytest.skip(f"HTP emulator unavailable: {reason}")
    resize, norm = REAL_MODELS[name]
    image_options = ImageOptions(resize=tuple(int(v) for v in resize.split(",")),
                                 mean=tuple(float(v) for v in norm["mean"].split(",")),
                                 std=tuple(float(v) for v in norm["std"].split(",")))
    result = quantize(shared_model(name), CALIB_DATA / "calib", out, eval_data=CALIB_DATA / "eval",
                      num_samples=num_samples, image_options=image_options, analysis_samples=0, htp_samples=4,
                      progress=False, **options)
    (htp,) = result.report["htp"]["agreement"]["htp"]
    (exact,) = result.report["htp"]["agreement"]["exact"]
    return htp, exact


def test_htp_arithmetic_simulation_equals_the_htp_on_efficientnet(tmp_path):
    """The report's default simulation computes what Qualcomm's HTP computes, bit for bit, on a real model."""
    htp, exact = _against_the_htp(tmp_path / "out")
    assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None and htp["top1_agreement"] == 1.0
    assert exact["max_error_lsb"] > 0  # float arithmetic with exact rounding does not get there


def test_htp_v73_arithmetic_simulation_equals_the_htp_v73_on_efficientnet(tmp_path):
    """With --htp-arch 73 the emulator computes 8-bit convolutions as HTP v73 does (tools/HTP.md,
    finding 19) and the simulation follows it, bit for bit; v68's arithmetic would not."""
    htp, _ = _against_the_htp(tmp_path / "out", htp_arch="73")
    assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None and htp["top1_agreement"] == 1.0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["arithmetic"] == "htp-v73" and report["htp"]["htp_arch"] == "73"
    assert "computing as HTP v73" in (tmp_path / "out" / "report.html").read_text()


def test_htp_arithmetic_simulation_equals_the_htp_on_the_detector(tmp_path):
    """The PP-OCRv4 detector (at 160 x 160 here) bit for bit on the default architecture since graph
    preparation folds its ConvTranspose bias Adds as SNPE's converter does (tools/HTP.md finding 24:
    the HTP computed that Add without its bias; 16.4 dB before, over 64 samples at 320 x 320)."""
    htp, exact = _against_the_htp(tmp_path / "out", "ch_PP-OCRv4_det_infer.onnx")
    assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None
    assert exact["max_error_lsb"] > 0


def test_htp_v73_arithmetic_simulation_equals_the_htp_v73_with_per_channel_weights(tmp_path):
    """EfficientNet-Lite0 with per-channel weights on v73 bit for bit (tools/HTP.md findings 25 and 29:
    the bias on one grid, the multiplier from float32 scales relative to the largest; 27.9 dB over
    64 samples before both)."""
    htp, _ = _against_the_htp(tmp_path / "out", per_channel=True, htp_arch="73")
    assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None and htp["top1_agreement"] == 1.0


def test_htp_v73_arithmetic_simulation_equals_the_htp_v73_on_the_detector_with_per_channel_weights(tmp_path):
    """The detector per channel on v73 bit for bit: its one-channel ConvTranspose takes its bias per
    tensor, and a Conv channel whose multiplier lands on a tie rounds it up (finding 29; 23.4 dB over
    64 samples before)."""
    htp, _ = _against_the_htp(tmp_path / "out", "ch_PP-OCRv4_det_infer.onnx", per_channel=True, htp_arch="73")
    assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_htp_arithmetic_simulation_follows_the_htp_with_16_bit_activations(tmp_path, per_channel):
    """At A16W8 on a real model, per tensor and per channel, bit for bit (over the matrix's 64 samples
    too since findings 52 and 57; per tensor 61.1 dB there before findings 49 and 51), where exact
    rounding stays below 45 dB."""
    htp, exact = _against_the_htp(tmp_path / "out", act_bitwidth=16, per_channel=per_channel)
    assert htp["top1_agreement"] == 1.0 and htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None
    assert exact["sqnr_db"] < 45 and exact["max_error_lsb"] > 10


CLASSIFIER_MODES = {  # options, and the htp arithmetic's least SQNR against the emulator (4 samples; None: bit for bit)
    # bit for bit since the QDQ model of this opset-11 model moves to opset 13 for its MaxPool (finding 40)
    "per tensor, A8": ({}, None),
    "per channel, A8": ({"per_channel": True}, None),  # 34.5 dB before
    "per tensor, A16": ({"act_bitwidth": 16}, 50.0),  # 57.8
    # bit for bit and 36.5 dB since finding 40 (36.5 and 36.3 dB before; 7.4 and 8.0 before findings 30-32)
    "per tensor, auto precision": ({"auto_precision": True, "target_sqnr": 25.0, "num_samples": None}, 40.0),
    "per channel, auto precision": ({"per_channel": True, "auto_precision": True, "target_sqnr": 25.0,
                                     "num_samples": None}, 30.0),
}


@pytest.mark.parametrize("mode", list(CLASSIFIER_MODES))
def test_the_htp_runs_and_the_simulation_follows_it_in_every_mode_on_the_classifier(tmp_path, mode):
    """The PP-OCR classifier (opset 11, hard-swish Divs, a depthwise Conv with strides [2, 1]) in the
    modes EfficientNet-Lite0's tests leave out. The emulator refused per channel A8 (per-axis Dequantize
    before opset 13) and the auto-precision ones (mixed 8/16-bit Div and strided depthwise Conv,
    tools/HTP.md finding 16); each floor is some dB under what tools/htp_agreement.py --matrix
    measured on 8 samples (README). Auto precision runs on v73 (its 16-bit weights need it), whose
    Conv kernels are decoded (tools/HTP.md findings 19, 20), and every op runs at one bitwidth
    (finding 32): its floor guards that it runs and stays near, not bit-exactness."""
    options, floor = CLASSIFIER_MODES[mode]
    htp, _ = _against_the_htp(tmp_path / "out", "ch_ppocr_mobile_v2.0_cls_infer.onnx", **options)
    if floor is None:
        assert htp["max_error_lsb"] == 0 and htp["sqnr_db"] is None
    else:
        assert htp["sqnr_db"] is None or htp["sqnr_db"] >= floor


def test_report_measures_on_the_first_calibration_samples_by_default(tmp_path, tiny_model, npy_folder, monkeypatch):
    from onnxsnpe import stages

    monkeypatch.setattr(stages, "DEFAULT_EVAL_SAMPLES", 4)
    result = quantize(tiny_model, npy_folder, tmp_path / "out", progress=False)
    evaluation = result.report["evaluation"]
    assert (evaluation["num_samples"], evaluation["available_samples"]) == (4, 6)
    assert evaluation["subset"].startswith("the first 4 of 6 calibration samples")
    assert result.report["calibration"]["num_samples"] == 6
    every = quantize(tiny_model, npy_folder, tmp_path / "all", eval_samples="all", progress=False)
    assert every.report["evaluation"]["num_samples"] == 6 and "subset" not in every.report["evaluation"]
    held_out = quantize(tiny_model, npy_folder, tmp_path / "eval", eval_data=npy_folder, progress=False)
    assert held_out.report["evaluation"]["num_samples"] == 6  # with --eval: all of it
    with pytest.raises(OnnxSnpeError, match="--eval-samples"):
        quantize(tiny_model, npy_folder, tmp_path / "bad", eval_samples=0, progress=False)
