"""Integer and boolean model inputs (token ids, attention masks): read as their own dtype, never quantized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import OnnxSnpeError, quantize
from onnxsnpe.data.datasets import Dataset, open_dataset
from onnxsnpe.export import InputListWriter, StagedOutput
from onnxsnpe.graph.load import InputSpec, load_model, model_inputs

ROWS = 10  # rows of the embedding table `ids` indexes
WIDTH = 4
SEQ = 6


def token_model(path: Path, mask_type: int = TensorProto.BOOL) -> Path:
    """ids int64 [1,6] -> Gather(table [10,4]) * Cast(mask -> float)[..., None] -> ReduceMean over tokens
    -> MatMul(4x3) = "out" [1,3]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(ROWS, WIDTH)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
        numpy_helper.from_array(rng.normal(size=(WIDTH, 3)).astype(np.float32), "fc.w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="embed"),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["mask_f", "axes"], ["mask_3d"], name="unsqueeze"),
        helper.make_node("Mul", ["emb", "mask_3d"], ["masked"], name="apply_mask"),
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "fc.w"], ["out"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "token_model",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ]),
            helper.make_tensor_value_info("mask", mask_type, [1, SEQ]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def token_sample(seed: int) -> dict[str, np.ndarray]:
    """One sample with batch dimension 1: ids in [-ROWS, ROWS), a mask with at least one True."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-ROWS, ROWS, size=(1, SEQ), dtype=np.int64)
    mask = rng.random((1, SEQ)) < 0.7
    mask[0, 0] = True
    return {"ids": ids, "mask": mask}


def npz_folder(folder: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    """The samples as ``00000.npz``, ``00001.npz``, ... in ``folder``."""
    folder.mkdir()
    for i, sample in enumerate(samples):
        np.savez(folder / f"{i:05d}.npz", **sample)
    return folder


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """The token model with a bool mask."""
    return token_model(tmp_path / "tokens.onnx")


@pytest.fixture
def inputs(model_path: Path) -> list[InputSpec]:
    """The token model's input specs."""
    return model_inputs(load_model(model_path))


def load_one(folder: Path, inputs: list[InputSpec], sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write ``sample`` as the only .npz in ``folder`` and read it back through a dataset."""
    npz_folder(folder, [sample])
    return open_dataset(folder, inputs).load(0)


def write_raw_list(tmp_path: Path, values: dict[str, np.ndarray]) -> Path:
    """A hand-written input list, one sample, each input's values as a float32 raw file."""
    lines = []
    for name, array in values.items():
        raw = tmp_path / f"{name}.raw"
        np.asarray(array, dtype="<f4").tofile(raw)
        lines.append(f"{name}:={raw}")
    listing = tmp_path / "list.txt"
    listing.write_text(" ".join(lines) + "\n")
    return listing


# --- the model's inputs ---------------------------------------------------------------------------------------


def test_model_inputs_dtypes_and_index_limit(inputs):
    by_name = {spec.name: spec for spec in inputs}
    assert [spec.name for spec in inputs] == ["ids", "mask"]
    assert by_name["ids"].dtype == np.dtype(np.int64)
    assert by_name["ids"].index_limit == ROWS
    assert by_name["ids"].dims == (1, SEQ)
    assert by_name["mask"].dtype == np.dtype(bool)
    assert by_name["mask"].index_limit is None


def test_int64_mask_has_no_index_limit(tmp_path):
    specs = model_inputs(load_model(token_model(tmp_path / "m.onnx", TensorProto.INT64)))
    assert [(s.name, s.dtype, s.index_limit) for s in specs] == [
        ("ids", np.dtype(np.int64), ROWS),
        ("mask", np.dtype(np.int64), None),
    ]


# --- .npz samples -------------------------------------------------------------------------------------------


def test_npz_samples_keep_integer_and_bool_dtypes(tmp_path, inputs):
    samples = [token_sample(i) for i in range(3)]
    # the first sample without its batch dimension: the dataset adds it
    stored = [{k: v[0] for k, v in samples[0].items()}, *samples[1:]]
    dataset = open_dataset(npz_folder(tmp_path / "calib", stored), inputs)
    assert isinstance(dataset, Dataset) and dataset.kind == "npz" and len(dataset) == 3
    loaded = list(dataset)
    assert len(loaded) == 3
    for got, want in zip(loaded, samples, strict=True):
        assert set(got) == {"ids", "mask"}
        assert got["ids"].dtype == np.int64 and got["ids"].shape == (1, SEQ)
        assert got["mask"].dtype == np.bool_ and got["mask"].shape == (1, SEQ)
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
    assert dataset.shapes == {"ids": (1, SEQ), "mask": (1, SEQ)}


def test_int32_ids_accepted_as_int64(tmp_path, inputs):
    ids = np.array([[0, 1, 2, 9, -1, 5]], dtype=np.int32)
    got = load_one(tmp_path / "calib", inputs, {"ids": ids, "mask": np.ones((1, SEQ), bool)})
    assert got["ids"].dtype == np.int64
    np.testing.assert_array_equal(got["ids"], ids.astype(np.int64))


def test_float_ids_refused(tmp_path, inputs):
    folder = tmp_path / "calib"
    with pytest.raises(OnnxSnpeError) as info:
        load_one(folder, inputs, {"ids": np.zeros((1, SEQ), np.float32), "mask": np.ones((1, SEQ), bool)})
    message = str(info.value)
    assert "'ids'" in message and "00000.npz" in message and str(folder) in message
    assert "float32" in message and "int64" in message
    assert len(message.splitlines()) == 1


def test_int_mask_for_bool_input_refused(tmp_path, inputs):
    with pytest.raises(OnnxSnpeError, match=r"00000\.npz: input 'mask' has dtype int64, the model expects bool"):
        load_one(tmp_path / "calib", inputs, {"ids": np.zeros((1, SEQ), np.int64), "mask": np.ones((1, SEQ), np.int64)})


@pytest.mark.parametrize("bad", [ROWS, -ROWS - 1], ids=["too-high", "too-low"])
def test_ids_out_of_table_refused(tmp_path, inputs, bad):
    ids = np.array([[0, 1, bad, 3, 4, 5]], dtype=np.int64)
    with pytest.raises(OnnxSnpeError) as info:
        load_one(tmp_path / "calib", inputs, {"ids": ids, "mask": np.ones((1, SEQ), bool)})
    message = str(info.value)
    assert "'ids'" in message and "00000.npz" in message
    assert f"{ROWS} rows" in message and str(bad) in message


def test_negative_ids_within_table_accepted(tmp_path, inputs):
    ids = np.array([[-1, -ROWS, 0, ROWS - 1, 3, -5]], dtype=np.int64)
    got = load_one(tmp_path / "calib", inputs, {"ids": ids, "mask": np.ones((1, SEQ), bool)})
    np.testing.assert_array_equal(got["ids"], ids)


# --- SNPE input lists with float32 raw files --------------------------------------------------------------------


def test_input_list_round_trip(tmp_path, inputs):
    samples = [token_sample(i) for i in range(2)]
    destination = tmp_path / "out"
    with StagedOutput(destination) as staged:
        writer = InputListWriter(staged, ["ids", "mask"])
        for sample in samples:
            writer.add(sample)
        writer.finish()
    listing = destination / "data.txt"
    lines = listing.read_text().splitlines()
    assert len(lines) == 2
    paths = [dict(token.split(":=") for token in line.split()) for line in lines]
    assert [list(p) for p in paths] == [["ids", "mask"], ["ids", "mask"]]
    for entry, sample in zip(paths, samples, strict=True):
        for name in ("ids", "mask"):
            raw = Path(entry[name])
            assert raw.parent == destination / "raw" and raw.is_file()
            assert raw.stat().st_size == SEQ * 4
            np.testing.assert_array_equal(np.fromfile(raw, "<f4"), sample[name].ravel().astype(np.float32))

    dataset = open_dataset(listing, inputs)  # static [1, 6] shapes: no input_shapes needed
    assert dataset.kind == "input_list" and len(dataset) == 2
    for got, want in zip(dataset, samples, strict=True):
        assert got["ids"].dtype == np.int64 and got["mask"].dtype == np.bool_
        assert got["ids"].shape == got["mask"].shape == (1, SEQ)
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_array_equal(got["mask"], want["mask"])


@pytest.mark.parametrize(
    "name, value, needle",
    [("ids", 2.5, "non-integer"), ("ids", np.nan, "non-integer"), ("mask", 2.0, "other than 0 and 1"),
     ("mask", -1.0, "other than 0 and 1"), ("mask", 0.5, "non-integer")],
    ids=["ids-fraction", "ids-nan", "mask-two", "mask-minus-one", "mask-fraction"],
)
def test_raw_values_that_do_not_fit_refused(tmp_path, inputs, name, value, needle):
    values = {"ids": np.arange(SEQ, dtype=np.float32), "mask": np.ones(SEQ, np.float32)}
    values[name][2] = value
    dataset = open_dataset(write_raw_list(tmp_path, values), inputs)
    with pytest.raises(OnnxSnpeError) as info:
        dataset.load(0)
    message = str(info.value)
    assert f"'{name}'" in message and f"{name}.raw" in message and needle in message
    assert len(message.splitlines()) == 1


def test_raw_ids_out_of_table_refused(tmp_path, inputs):
    values = {"ids": np.array([0, 1, 2, 3, 4, ROWS], np.float32), "mask": np.ones(SEQ, np.float32)}
    with pytest.raises(OnnxSnpeError, match=rf"input 'ids' holds indices in \[0, {ROWS}\].* {ROWS} rows"):
        open_dataset(write_raw_list(tmp_path, values), inputs).load(0)


def test_raw_whole_numbers_accepted(tmp_path, inputs):
    values = {"ids": np.array([0, -1, 9, -10, 4, 5], np.float32), "mask": np.array([1, 0, 1, 1, 0, 0], np.float32)}
    got = open_dataset(write_raw_list(tmp_path, values), inputs).load(0)
    np.testing.assert_array_equal(got["ids"], [[0, -1, 9, -10, 4, 5]])
    np.testing.assert_array_equal(got["mask"], [[True, False, True, True, False, False]])
    assert got["ids"].dtype == np.int64 and got["mask"].dtype == np.bool_


@pytest.mark.parametrize(
    "mask_type, value", [(TensorProto.INT64, 1e30), (TensorProto.INT32, 3e9)], ids=["int64", "int32"]
)
def test_raw_integers_outside_input_dtype_refused(tmp_path, mask_type, value):
    specs = model_inputs(load_model(token_model(tmp_path / "m.onnx", mask_type)))
    values = {"ids": np.arange(SEQ, dtype=np.float32), "mask": np.ones(SEQ, np.float32)}
    values["mask"][1] = value
    dataset = open_dataset(write_raw_list(tmp_path, values), specs)
    with np.errstate(invalid="ignore"), pytest.raises(OnnxSnpeError, match=r"'mask'.*mask\.raw|mask\.raw.*'mask'"):
        dataset.load(0)


@pytest.mark.parametrize("big", [2**24 + 1, -(2**24) - 1, 2**40], ids=["above", "below", "far-above"])
def test_integers_float32_cannot_hold_refused(tmp_path, big):
    specs = model_inputs(load_model(token_model(tmp_path / "m.onnx", TensorProto.INT64)))
    sample = {"ids": np.arange(SEQ, dtype=np.int64)[None], "mask": np.array([[1, 1, big, 0, 0, 0]], np.int64)}
    folder = npz_folder(tmp_path / "calib", [sample])
    with pytest.raises(OnnxSnpeError) as info:
        open_dataset(folder, specs).load(0)
    message = str(info.value)
    assert "'mask'" in message and "2^24" in message and "00000.npz" in message


def test_writer_accepts_two_to_the_24(tmp_path):
    destination = tmp_path / "out"
    with StagedOutput(destination) as staged:
        writer = InputListWriter(staged, ["ids", "mask"])
        writer.add({"ids": np.array([[2**24, -(2**24), 0, 1, 2, 3]], np.int64), "mask": np.ones((1, SEQ), bool)})
        writer.finish()
    raw = sorted((destination / "raw").iterdir())[0]
    assert raw.name.endswith("_ids.raw")
    np.testing.assert_array_equal(np.fromfile(raw, "<f4"), np.array([2**24, -(2**24), 0, 1, 2, 3], np.float32))


# --- the whole job -----------------------------------------------------------------------------------------


def test_quantize_token_model(tmp_path, model_path):
    calib = npz_folder(tmp_path / "calib", [token_sample(i) for i in range(4)])
    evaluation = npz_folder(tmp_path / "eval", [token_sample(10 + i) for i in range(2)])
    result = quantize(model_path, calib, tmp_path / "out", eval_data=evaluation, analysis_samples=0, progress=False)
    out = result.out_dir
    assert out == (tmp_path / "out").absolute()

    report = json.loads((out / "report.json").read_text())
    assert report["model"]["inputs"] == [
        {"name": "ids", "shape": [1, SEQ], "dtype": "int64"},
        {"name": "mask", "shape": [1, SEQ], "dtype": "bool"},
    ]
    assert report["calibration"]["num_samples"] == 4

    activations = json.loads((out / "snpe_clip_ranges.json").read_text())["activation_encodings"]
    assert activations, "the float tensors get encodings"
    assert "ids" not in activations and "mask" not in activations
    assert "out" in activations

    lines = (out / "data.txt").read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        tokens = line.split()
        assert [t.split(":=")[0] for t in tokens] == ["ids", "mask"]
        for token in tokens:
            raw = Path(token.split(":=", 1)[1])
            assert raw.is_absolute() and raw.parent == out / "raw" and raw.stat().st_size == SEQ * 4
    first = dict(t.split(":=") for t in lines[0].split())
    np.testing.assert_array_equal(np.fromfile(first["ids"], "<f4"), token_sample(0)["ids"].ravel())
    np.testing.assert_array_equal(np.fromfile(first["mask"], "<f4"), token_sample(0)["mask"].ravel())

    deploy = onnx.load(str(out / "snpe_deploy.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in deploy.graph.input}
    assert types == {"ids": TensorProto.INT64, "mask": TensorProto.BOOL}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_quantize_again_from_its_input_list(tmp_path, model_path):
    calib = npz_folder(tmp_path / "calib", [token_sample(i) for i in range(4)])
    first = quantize(model_path, calib, tmp_path / "a", analysis_samples=0, progress=False)
    again = quantize(model_path, first.out_dir / "data.txt", tmp_path / "b", analysis_samples=0, progress=False)
    assert again.report["model"]["inputs"] == first.report["model"]["inputs"]
    assert again.report["outputs"] == first.report["outputs"]
    overrides = "snpe_clip_ranges.json"
    assert (again.out_dir / overrides).read_text() == (first.out_dir / overrides).read_text()


def test_quantize_names_the_sample_with_integers_beyond_float32(tmp_path):
    model = token_model(tmp_path / "m.onnx", TensorProto.INT64)
    samples = [{"ids": s["ids"], "mask": s["mask"].astype(np.int64)} for s in map(token_sample, range(3))]
    samples[1]["mask"][0, 2] = 2**25
    calib = npz_folder(tmp_path / "calib", samples)
    with pytest.raises(OnnxSnpeError) as info:
        quantize(model, calib, tmp_path / "out", analysis_samples=0, progress=False)
    message = str(info.value)
    assert "'mask'" in message and "2^24" in message
    assert not (tmp_path / "out").exists()
    assert "00001.npz" in message


def test_quantize_refuses_ids_outside_table(tmp_path, model_path):
    samples = [token_sample(i) for i in range(3)]
    samples[2]["ids"][0, 1] = ROWS
    calib = npz_folder(tmp_path / "calib", samples)
    with pytest.raises(OnnxSnpeError) as info:
        quantize(model_path, calib, tmp_path / "out", analysis_samples=0, progress=False)
    message = str(info.value)
    assert "00002.npz" in message and "'ids'" in message and f"{ROWS} rows" in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_ids_that_reach_the_table_through_a_cast_are_checked_too(tmp_path):
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "ids64"], ["emb"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, SEQ])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, SEQ, 4])], [table])
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    (spec,) = model_inputs(load_model(path))
    assert spec.index_limit == 10


def test_sequence_and_string_inputs_are_refused_in_one_line(tmp_path):
    seq = helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("ConcatFromSequence", ["parts"], ["y"], axis=0)], "g", [seq],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(OnnxSnpeError, match="'parts' is not a tensor"):
        model_inputs(load_model(path))


def test_gathered_rows_share_their_tables_encoding(tmp_path, model_path):
    """A Gather keeps its table's grid (data movement; the HTP runs it quantized only so): the
    gathered tensor's activation encoding is the table's param encoding, at 8 and at 16 bits."""
    calib = npz_folder(tmp_path / "calib", [token_sample(i) for i in range(3)])
    for bits in (8, 16):
        out = tmp_path / f"out{bits}"
        quantize(model_path, calib, out, act_bitwidth=bits, analysis_samples=0, progress=False)
        overrides = json.loads((out / "snpe_clip_ranges.json").read_text())
        deploy = onnx.load(str(out / "snpe_deploy.onnx"))
        gather = next(n for n in deploy.graph.node if n.op_type == "Gather")
        assert overrides["activation_encodings"][gather.output[0]] == overrides["param_encodings"][gather.input[0]]
        assert overrides["param_encodings"][gather.input[0]][0]["bitwidth"] == bits
