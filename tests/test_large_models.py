"""Models with external data: read, and written with their tensors beside them when over 2 GB.

The 2 GB path is exercised here with a lowered limit (graph/large.EXTERNAL_DATA_BYTES); a real
model just over 2 GB is checked by tools/bench_large_model.py (it needs about 5 GB of memory)."""

from __future__ import annotations

import json

import numpy as np
import onnx

from onnxsnpe import quantize
from onnxsnpe.graph import large

from .conftest import shared_model


def _external_copy(source, folder):
    model = onnx.load(str(source))
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    assert (folder / "model.onnx.data").stat().st_size > path.stat().st_size
    return path


def test_a_real_model_with_external_data_gives_the_same_encodings(tmp_path):
    """EfficientNet-Lite0 saved as model.onnx + model.onnx.data quantizes like the single file."""
    source = shared_model("efficientnet_lite0.onnx")
    (tmp_path / "ext").mkdir()
    external = _external_copy(source, tmp_path / "ext")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        np.save(calib / f"{index}.npy", rng.normal(size=(1, 3, 224, 224)).astype(np.float32))
    single = quantize(source, calib, tmp_path / "single", analysis_samples=0, progress=False)
    split = quantize(external, calib, tmp_path / "split", analysis_samples=0, progress=False)
    name = "snpe_clip_ranges.json"
    assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    assert single.outputs[0].sqnr_db == split.outputs[0].sqnr_db
    assert not (tmp_path / "split" / "snpe_deploy.onnx.data").exists()  # small: written in one file


def test_over_the_limit_outputs_are_written_with_external_data(tmp_path, tiny_model, npy_folder, monkeypatch):
    normal = quantize(tiny_model, npy_folder, tmp_path / "normal", analysis_samples=1, progress=False)
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)  # every model here is now "over 2 GB"
    big = quantize(tiny_model, npy_folder, tmp_path / "big", analysis_samples=1, progress=False)
    out = tmp_path / "big"
    for name in ("snpe_deploy.onnx", "snpe_qdq.onnx"):
        assert (out / f"{name}.data").is_file()
        model = onnx.load(str(out / name), load_external_data=False)
        assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
        reloaded = onnx.load(str(out / name))
        original = onnx.load(str(tmp_path / "normal" / name))
        assert [onnx.numpy_helper.to_array(i).tobytes() for i in reloaded.graph.initializer] == \
            [onnx.numpy_helper.to_array(i).tobytes() for i in original.graph.initializer]
    assert "snpe_deploy.onnx.data" in big.report["files"] and "snpe_qdq.onnx.data" in big.report["files"]
    assert (out / "snpe_clip_ranges.json").read_bytes() == (tmp_path / "normal" / "snpe_clip_ranges.json").read_bytes()
    assert json.dumps(big.report["outputs"]) == json.dumps(normal.report["outputs"])
    assert big.report["tensors"]["figures"] == normal.report["tensors"]["figures"]


def test_tensor_bytes_counts_initializers():
    weights = onnx.numpy_helper.from_array(np.zeros((10, 10), np.float32), "w")
    graph = onnx.helper.make_graph([], "g", [], [], [weights])
    assert large.tensor_bytes(onnx.helper.make_model(graph)) == 400
    assert not large.is_large(onnx.helper.make_model(graph))
