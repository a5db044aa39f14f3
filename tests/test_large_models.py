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


def _matmul_model(size: int, count: int = 2) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), f"w{k}")
             for k in range(count)]
    nodes, previous = [], "x"
    for k in range(count):
        nodes.append(onnx.helper.make_node("MatMul", [previous, f"w{k}"], [f"y{k}"]))
        previous = f"y{k}"
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, size])],
        [onnx.helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, [1, size])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_spill_moves_weights_out_of_memory_with_the_same_values(monkeypatch):
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    model = _matmul_model(64)
    before = {init.name: onnx.numpy_helper.to_array(init).copy() for init in model.graph.initializer}
    size = large.tensor_bytes(model)
    large.spill(model)
    assert all(init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data
               for init in model.graph.initializer)
    assert large.tensor_bytes(model) == size  # a reference counts its bytes: the model stays large
    for init in model.graph.initializer:
        values = large.initializer_array(init)
        assert isinstance(values, np.memmap) and not values.flags.writeable
        assert np.array_equal(values, before[init.name])


def test_a_large_model_loads_without_its_weights_and_its_files_stay_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    from onnxsnpe.graph.load import load_model
    model = _matmul_model(64)
    expected = [onnx.numpy_helper.to_array(init).copy() for init in model.graph.initializer]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=1024)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    loaded = load_model(path)
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in loaded.graph.initializer)
    for init, values in zip(loaded.graph.initializer, expected, strict=True):
        assert np.array_equal(large.initializer_array(init), values)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_saving_a_spilled_model_streams_its_weights_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    monkeypatch.setattr(large, "COPY_CHUNK", 1000)  # several chunks a tensor
    model = _matmul_model(40)
    expected = [onnx.numpy_helper.to_array(init).copy() for init in model.graph.initializer]
    large.spill(model)
    names = large.save_model(model, tmp_path / "out.onnx")
    assert names == ["out.onnx", "out.onnx.data"]
    reloaded = onnx.load(str(tmp_path / "out.onnx"))
    for init, values in zip(reloaded.graph.initializer, expected, strict=True):
        assert np.array_equal(onnx.numpy_helper.to_array(init), values)


def test_slabs_cover_every_value_once_and_keep_the_channel_axis_whole(monkeypatch):
    monkeypatch.setattr(large, "SLAB_VALUES", 50)
    for shape, keep in [((7, 30), 1), ((30, 7), 0), ((6, 5, 3, 3), 0), ((6, 5, 3, 3), 1), ((100,), None),
                        ((100,), 0), ((), None), ((3, 4), None)]:
        seen = np.zeros(shape, dtype=np.int64)
        pieces = list(large.slabs(shape, keep))
        for index in pieces:
            seen[index] += 1
            if keep is not None and len(shape) > 1:
                assert seen[index].shape[keep] == shape[keep]
        assert np.all(seen == 1), (shape, keep)
        if len(shape) > 1 and int(np.prod(shape)) > 100:
            assert len(pieces) > 1


def test_compare_of_a_large_model_gives_the_figures_of_the_ordinary_path(tmp_path, tiny_model, npy_folder,
                                                                           monkeypatch):
    """Several configurations over one evaluator: a large model's FP32 session is dropped after each
    evaluation and made again, with the same figures."""
    from onnxsnpe.compare import compare
    options = dict(methods=["minmax", "mse"], act_bitwidths=[8], progress=False)
    normal = compare(tiny_model, npy_folder, tmp_path / "normal", **options)
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    big = compare(tiny_model, npy_folder, tmp_path / "big", **options)
    assert [c["outputs"] for c in big.report["configurations"]] == \
        [c["outputs"] for c in normal.report["configurations"]]


def test_a_large_model_folds_its_constant_subgraphs_and_batchnorms_as_a_small_one(tmp_path, monkeypatch):
    """Folding reads the weights from the workspace: a Transpose of a weight and a BatchNormalization
    fold as they do in memory, to the same values."""
    from onnxsnpe.graph.deploy import prepare_deploy_model
    from onnxsnpe.graph.load import load_model
    rng = np.random.default_rng(4)
    make = onnx.helper.make_node
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("conv_w", (16, 8, 3, 3)), ("scale", (16,)), ("bias", (16,)), ("mean", (16,)), ("w", (64, 16 * 36))]]
    inits.append(onnx.numpy_helper.from_array(np.abs(rng.standard_normal(16)).astype(np.float32) + 0.5, "var"))
    inits.append(onnx.numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat"))
    nodes = [make("Conv", ["x", "conv_w"], ["c"]),
             make("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
             make("Reshape", ["b", "flat"], ["f"]), make("Transpose", ["w"], ["wt"], perm=[1, 0]),
             make("MatMul", ["f", "wt"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                    [1, 8, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="m.data", size_threshold=1024)
    small, small_folded = prepare_deploy_model(load_model(path), {"x": (1, 8, 8, 8)})
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    big, big_folded = prepare_deploy_model(load_model(path), {"x": (1, 8, 8, 8)})
    assert big_folded == small_folded == 1
    assert [n.op_type for n in big.graph.node] == [n.op_type for n in small.graph.node] == ["Conv", "Reshape", "MatMul"]
    for mine, theirs in zip(big.graph.initializer, small.graph.initializer, strict=True):
        assert mine.name == theirs.name
        if mine.data_location == onnx.TensorProto.EXTERNAL:
            assert not mine.raw_data  # in the workspace only
        np.testing.assert_array_equal(large.initializer_array(mine), onnx.numpy_helper.to_array(theirs))
    assert sum(init.data_location == onnx.TensorProto.EXTERNAL for init in big.graph.initializer) >= 2


def test_exact_arithmetic_of_a_large_model_dequantizes_its_weights_in_the_graph(tmp_path, tiny_model, npy_folder,
                                                                                monkeypatch):
    """The large model's exact simulation stores integer weights behind DequantizeLinear nodes that
    give the ordinary simulation's weights bit for bit; in the pipeline (onnxruntime's kernels then
    take non-constant weights and round differently) its figures stay within float rounding."""
    from onnxsnpe.graph.runtime import make_session
    from onnxsnpe.simulate.fake_quant import build_simulation_model
    from onnxsnpe.stages import Settings, encode, prepare
    from onnxsnpe.stats.collect import collect_statistics

    ordinary = quantize(tiny_model, npy_folder, tmp_path / "normal", arithmetic="exact", progress=False)
    prepared = prepare(tiny_model, npy_folder, None, None, None, None)
    samples = [prepared.calib_set.load(i) for i in range(len(prepared.calib_set))]
    stats = collect_statistics(prepared.deploy, prepared.targets.activations, iter(samples), methods=["minmax"],
                               floors=prepared.targets.floors())
    encodings = encode(prepared, stats, Settings())
    normal, _ = build_simulation_model(prepared.deploy, prepared.targets, encodings.activations, encodings.params)
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    big, _ = build_simulation_model(prepared.deploy, prepared.targets, encodings.activations, encodings.params)
    stored = [node.output[0] for node in big.graph.node if node.op_type == "DequantizeLinear"]
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in normal.graph.initializer}
    assert stored and set(stored) <= set(encodings.weights) | set(encodings.constants)
    for name, values in zip(stored, make_session(big, stored).run(stored, samples[0]), strict=True):
        np.testing.assert_array_equal(values, weights[name])
    through = quantize(tiny_model, npy_folder, tmp_path / "big", arithmetic="exact", progress=False)
    assert abs(through.report["outputs"][0]["sqnr_db"] - ordinary.report["outputs"][0]["sqnr_db"]) < 1.0


def test_a_dequantized_param_is_the_fake_quantized_one():
    """DequantizeLinear over the stored codes gives encoding.fake_quantize's float32 values exactly."""
    import onnxruntime as ort

    from onnxsnpe.encode.encoding import asymmetric_encoding, fake_quantize, per_channel_symmetric, symmetric_encoding
    from onnxsnpe.simulate.qdq import MS_DOMAIN, dequantized_param
    rng = np.random.default_rng(8)
    values = (rng.standard_normal((6, 50)) * np.linspace(0.01, 30, 6)[:, None]).astype(np.float32)
    for enc, domain in [(asymmetric_encoding(float(values.min()), float(values.max()), 8), ""),
                        (per_channel_symmetric(np.abs(values).max(axis=1), 0, 8), ""),
                        (symmetric_encoding(float(np.abs(values).max()), 16), MS_DOMAIN),
                        (asymmetric_encoding(-0.3, 1.7, 16), MS_DOMAIN)]:
        node, inits = dequantized_param("w", values, enc, domain)
        graph = onnx.helper.make_graph([node], "g", [], [onnx.helper.make_tensor_value_info(
            "w", onnx.TensorProto.FLOAT, None)], inits)
        opsets = [onnx.helper.make_opsetid("", 17)] + ([onnx.helper.make_opsetid(domain, 1)] if domain else [])
        session = ort.InferenceSession(onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                                       providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"])
        np.testing.assert_array_equal(session.run(None, {})[0], fake_quantize(values, enc))


def _workspaces() -> set[str]:
    import tempfile
    from pathlib import Path
    return {p.name for p in Path(tempfile.gettempdir()).glob("onnxsnpe-weights-*")}


def test_outputs_under_the_limit_made_from_a_large_model_are_whole_and_the_workspace_goes(tmp_path, monkeypatch):
    """The deploy model is over the (lowered) limit, its QDQ model under it (int8 weights) while an
    int64 index table stays a workspace tensor: written in one file, it holds that table's values;
    nothing of the call's workspace is left behind."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((64, 8, 3, 3)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             onnx.numpy_helper.from_array(rng.integers(0, 64, 256).astype(np.int64), "idx")]
    make = onnx.helper.make_node
    nodes = [make("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]), make("Relu", ["c"], ["r"]),
             make("Gather", ["r", "idx"], ["y"], axis=1)]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256, 8, 8])], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for index in range(3):
        np.save(calib / f"{index}.npy", rng.standard_normal((1, 8, 8, 8)).astype(np.float32))
    normal = quantize(tmp_path / "m.onnx", calib, tmp_path / "normal", analysis_samples=1, progress=False)
    before = _workspaces()
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 15000)  # the deploy model is 20736 bytes, the QDQ under
    big = quantize(tmp_path / "m.onnx", calib, tmp_path / "big", analysis_samples=1, progress=False)
    assert _workspaces() == before
    assert (tmp_path / "big" / "snpe_deploy.onnx.data").is_file()
    assert not (tmp_path / "big" / "snpe_qdq.onnx.data").exists()
    written = onnx.load(str(tmp_path / "big" / "snpe_qdq.onnx"))
    original = onnx.load(str(tmp_path / "normal" / "snpe_qdq.onnx"))
    assert [onnx.numpy_helper.to_array(i).tobytes() for i in written.graph.initializer] == \
        [onnx.numpy_helper.to_array(i).tobytes() for i in original.graph.initializer]
    assert json.dumps(big.report["outputs"]) == json.dumps(normal.report["outputs"])


def test_external_data_without_lengths_and_inside_subgraphs(tmp_path, monkeypatch):
    """A data file whose entries give no length (it is optional), and an If whose branches hold
    external tensors, load on the large path with their values."""
    from onnxsnpe.graph.load import load_model
    from onnxsnpe.graph.runtime import make_session
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    branch_values = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(2)]
    branches = [onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["m", f"c{k}"], [f"o{k}"])], f"b{k}", [],
        [onnx.helper.make_tensor_value_info(f"o{k}", onnx.TensorProto.FLOAT, [1, 16])],
        [onnx.numpy_helper.from_array(branch_values[k], f"c{k}")]) for k in range(2)]
    make = onnx.helper.make_node
    nodes = [make("MatMul", ["x", "w"], ["m"]), make("ReduceSum", ["x"], ["s"], keepdims=0),
             make("Greater", ["s", "zero"], ["cond"]),
             make("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1])]
    inits = [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(np.float32(0), "zero")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                    [1, 16])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 16)).astype(np.float32)
    expected = make_session(model).run(None, {"x": x})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=32)  # the branches' 64-byte constants too
    stored = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(stored):
        kept = [entry for entry in tensor.external_data if entry.key != "length"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
    onnx.save(stored, str(path))
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)
    loaded = load_model(path)
    assert large.tensor_bytes(loaded) == weight.nbytes + sum(v.nbytes for v in branch_values) + 4
    np.testing.assert_array_equal(large.initializer_array(loaded.graph.initializer[0]), weight)
    np.testing.assert_array_equal(make_session(loaded).run(None, {"x": x})[0], expected)
    large.save_model(loaded, tmp_path / "out.onnx")
    np.testing.assert_array_equal(make_session(onnx.load(str(tmp_path / "out.onnx"))).run(None, {"x": x})[0],
                                  expected)


def test_no_room_for_a_large_models_weights_is_a_one_line_error(tmp_path, monkeypatch):
    import shutil

    import pytest

    from onnxsnpe.errors import OnnxSnpeError
    from onnxsnpe.graph.load import load_model
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(64), str(path), save_as_external_data=True, location="m.data", size_threshold=1024)
    monkeypatch.setattr(large, "EXTERNAL_DATA_BYTES", 100)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(OnnxSnpeError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and "TMPDIR" in message and "No space left" in message and str(path) in message
