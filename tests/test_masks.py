"""Additive attention masks: found in the graph, left out of statistics, given ranges that keep them masked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe import quantize
from onnxsnpe.encode.masks import softmax_margin
from onnxsnpe.encode.ranges import activation_encodings
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.stats.collect import collect_statistics
from onnxsnpe.stats.tensor_stats import TensorStats

LENGTH = 8
SCORES = [1, 2, 4, LENGTH]


def _model(path: Path, form: str, softmax: bool = True) -> Path:
    """scores [1,2,4,8] + a mask from ``keep`` [1,1,1,8] -> Softmax (or Relu) -> "out".

    ``form``: "where" (Where(keep, 0, -inf), keep bool), "scaled" ((1 - keep) * -10000, keep float)
    or "floatmin" (keep * -3.4e38 with keep = 1 at masked positions).
    """
    make = helper.make_node
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    keep_type = TensorProto.BOOL if form == "where" else TensorProto.FLOAT
    if form == "where":
        inits.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf"))
        nodes = [make("Where", ["keep", "zero", "minus_inf"], ["mask"])]
    elif form == "scaled":
        inits.append(numpy_helper.from_array(np.array(-10000.0, np.float32), "big"))
        nodes = [make("Sub", ["one", "keep"], ["inverted"]), make("Mul", ["inverted", "big"], ["mask"])]
    else:
        inits.append(numpy_helper.from_array(np.array(-3.4e38, np.float32), "big"))
        nodes = [make("Mul", ["keep", "big"], ["mask"])]
    nodes += [make("Add", ["scores", "mask"], ["masked"]),
              make("Softmax" if softmax else "Relu", ["masked"], ["out"], **({"axis": -1} if softmax else {}))]
    graph = helper.make_graph(
        nodes, "mask", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, SCORES),
                        helper.make_tensor_value_info("keep", keep_type, [1, 1, 1, LENGTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, SCORES)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _samples(form: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        keep = np.arange(LENGTH) < 3 + index % 5  # real tokens first, padding after
        if form == "where":
            feed = keep
        elif form == "scaled":
            feed = keep.astype(np.float32)
        else:
            feed = (~keep).astype(np.float32)
        samples.append({"scores": rng.normal(scale=0.5, size=SCORES).astype(np.float32),
                        "keep": feed.reshape(1, 1, 1, LENGTH)})
    return samples


@pytest.mark.parametrize(("form", "floor"), [("where", -10000.0), ("scaled", -5000.0), ("floatmin", -1.7e38)])
def test_mask_chains_are_found_with_their_floor_and_softmax(tmp_path, form, floor):
    targets = find_targets(onnx.load(_model(tmp_path / "m.onnx", form)))
    assert set(targets.masks) == {"mask", "masked"}
    for mask in targets.masks.values():
        assert mask.floor == pytest.approx(floor, rel=1e-6)
        assert [(s.tensor, s.length, s.softmax_output) for s in mask.sinks] == [("masked", LENGTH, "out")]


def test_statistics_leave_masked_values_out():
    stats = TensorStats(["minmax", "mse"], floor=-5000.0)
    stats.update(np.array([[-np.inf, -1.5, 2.0, -1e4 + 3]], np.float32))
    stats.update(np.array([[0.5, -9999.0]], np.float32))
    assert (stats.min, stats.max, stats.count) == (-1.5, 2.0, 3)
    assert stats.histogram.counts.sum() == 3
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.array([[np.nan, 1.0]], np.float32))
    plain = TensorStats(["minmax"])
    with pytest.raises(ValueError):
        plain.update(np.array([[-np.inf, 1.0]], np.float32))


@pytest.mark.parametrize("form", ["where", "scaled", "floatmin"])
def test_masked_ranges_sit_a_softmax_margin_below_the_real_scores(tmp_path, form):
    model = onnx.load(_model(tmp_path / "m.onnx", form))
    targets = find_targets(model)
    samples = _samples(form, 12)
    stats = collect_statistics(model, targets.activations, iter(samples), floors=targets.floors())
    real = np.concatenate([(s["scores"] + 0.0)[..., :3 + k % 5].reshape(-1) for k, s in enumerate(samples)])
    assert stats["masked"].min == pytest.approx(float(real.min()), abs=1e-6)
    assert stats["masked"].max == pytest.approx(float(real.max()), abs=1e-6)
    assert (stats["mask"].min, stats["mask"].max) == (0.0, 0.0)

    encodings = activation_encodings(stats, targets, "minmax", 8)
    margin = math.log(2 * LENGTH * 255)
    assert softmax_margin(LENGTH, 8) == pytest.approx(margin)
    width = float(real.max() - real.min()) + margin
    masked, mask = encodings["masked"], encodings["mask"]
    assert masked.min == pytest.approx(float(real.min()) - margin, abs=masked.scale)
    assert masked.max == pytest.approx(float(real.max()), abs=masked.scale)
    assert mask.min == pytest.approx(-width, abs=mask.scale) and mask.max == 0.0


def test_a_huge_constant_that_reaches_no_softmax_is_an_ordinary_operand(tmp_path):
    """(1 - keep) * -10000 feeding a Relu, or audio scaled by 32768: no mask, ranges as observed."""
    model = onnx.load(_model(tmp_path / "m.onnx", "scaled", softmax=False))
    targets = find_targets(model)
    assert targets.masks == {}
    stats = collect_statistics(model, targets.activations, iter(_samples("scaled", 4)), floors=targets.floors())
    encodings = activation_encodings(stats, targets, "minmax", 8)
    assert encodings["mask"].min == pytest.approx(-10000.0, rel=0.01)


def _variant(path: Path, middle: str) -> Path:
    """Where(keep, 0, -inf) added to scores, then ``middle`` before the Softmax(es)."""
    make = helper.make_node
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf"),
             numpy_helper.from_array(np.array(SCORES, np.int64), "shape"),
             numpy_helper.from_array(np.array(-3.4e38, np.float32), "lowest")]
    nodes = [make("Where", ["keep", "zero", "minus_inf"], ["mask"])]
    outputs = ["out"]
    if middle == "reshape":  # BART-like: the sum is viewed again before the Softmax
        nodes += [make("Add", ["scores", "mask"], ["masked"]), make("Reshape", ["masked", "shape"], ["viewed"]),
                  make("Softmax", ["viewed"], ["out"], axis=-1)]
    elif middle == "max":  # OPT-like clamp at the float minimum
        nodes += [make("Add", ["scores", "mask"], ["masked"]), make("Max", ["masked", "lowest"], ["clamped"]),
                  make("Softmax", ["clamped"], ["out"], axis=-1)]
    else:  # the mask split in halves, each added to a half of the heads
        inits.append(numpy_helper.from_array(np.array([1, 1], np.int64), "halves"))
        nodes += [make("Concat", ["mask", "mask"], ["both"], axis=1),
                  make("Split", ["both", "halves"], ["m0", "m1"], axis=1),
                  make("Split", ["scores", "halves"], ["s0", "s1"], axis=1),
                  make("Add", ["s0", "m0"], ["a0"]), make("Add", ["s1", "m1"], ["a1"]),
                  make("Softmax", ["a0"], ["out"], axis=-1), make("Softmax", ["a1"], ["out1"], axis=-1)]
        outputs.append("out1")
    shape = [1, 1, 4, LENGTH] if middle == "split" else SCORES
    graph = helper.make_graph(
        nodes, "mask", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, SCORES),
                        helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 1, LENGTH])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o in outputs], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("middle", ["reshape", "max", "split"])
def test_masks_through_views_clamps_and_splits(tmp_path, middle):
    model = _variant(tmp_path / "m.onnx", middle)
    for part, seed in (("calib", 0), ("eval", 1)):
        (tmp_path / part).mkdir()
        for index, sample in enumerate(_samples("where", 10, seed)):
            np.savez(tmp_path / part / f"{index:03d}.npz", **sample)
    result = quantize(model, tmp_path / "calib", tmp_path / "out", eval_data=tmp_path / "eval",
                      analysis_samples=0, progress=False)
    assert all(o.sqnr_db > 25 for o in result.outputs), [o.to_dict() for o in result.outputs]


def test_a_masked_tensor_that_is_also_an_output_is_compared_where_it_is_finite(tmp_path):
    model = onnx.load(_model(tmp_path / "m.onnx", "where"))
    model.graph.output.append(helper.make_tensor_value_info("masked", TensorProto.FLOAT, SCORES))
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for index, sample in enumerate(_samples("where", 6)):
        np.savez(tmp_path / "calib" / f"{index:03d}.npz", **sample)
    result = quantize(tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "out", analysis_samples=0, progress=False)
    masked = next(o for o in result.outputs if o.name == "masked")
    assert math.isfinite(masked.sqnr_db) and math.isfinite(masked.cosine) and masked.sqnr_db > 25


@pytest.mark.parametrize("form", ["where", "scaled"])
@pytest.mark.parametrize("arithmetic", ["htp", "exact"])
def test_quantized_attention_keeps_masked_positions_at_zero_weight(tmp_path, form, arithmetic):
    """End to end: the simulated W8A8 Softmax gives masked positions (nearly) no weight, and no NaN."""
    model = _model(tmp_path / "m.onnx", form)
    for part, seed in (("calib", 0), ("eval", 1)):
        (tmp_path / part).mkdir()
        for index, sample in enumerate(_samples(form, 10, seed)):
            np.savez(tmp_path / part / f"{index:03d}.npz", **sample)
    result = quantize(model, tmp_path / "calib", tmp_path / "out", eval_data=tmp_path / "eval",
                      arithmetic=arithmetic, analysis_samples=0, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["outputs"][0]["sqnr_db"] > 25, report["outputs"][0]
    overrides = json.loads((tmp_path / "out" / "snpe_clip_ranges.json").read_text())
    for entries in list(overrides["activation_encodings"].values()) + list(overrides["param_encodings"].values()):
        assert all(math.isfinite(e["min"]) and math.isfinite(e["max"]) and e["scale"] > 0 for e in entries)
    if form == "where":
        assert "keep" not in overrides["activation_encodings"]  # a bool input is never quantized
    assert result.outputs[0].sqnr_db > 25
    # the QDQ model SNPE's encodings describe gives masked positions under half an output step in all
    session = make_session(onnx.load(tmp_path / "out" / "snpe_qdq.onnx"))
    for k, sample in enumerate(_samples(form, 10, 1)):
        out = session.run(["out"], sample)[0]
        assert np.isfinite(out).all()
        assert out[..., 3 + k % 5:].sum(axis=-1).max() < 0.5 / 255


def test_nan_guards_after_softmax_are_dropped_from_the_deploy_model(tmp_path):
    """Where(IsNaN(softmax), 0, softmax), as PyTorch's attention exports it: gone from the deploy graph
    (SNPE has no IsNaN; a quantized softmax is never NaN), same outputs on finite data."""
    model = onnx.load(_model(tmp_path / "m.onnx", "where"))
    graph = model.graph
    graph.node[-1].output[0] = "probs"
    graph.node.extend([helper.make_node("IsNaN", ["probs"], ["is_nan"]),
                       helper.make_node("Where", ["is_nan", "zero", "probs"], ["guarded"]),
                       helper.make_node("Relu", ["guarded"], ["out"])])
    onnx.save(model, tmp_path / "guarded.onnx")
    (tmp_path / "calib").mkdir()
    samples = _samples("where", 4)
    for index, sample in enumerate(samples):
        np.savez(tmp_path / "calib" / f"{index}.npz", **sample)
    quantize(tmp_path / "guarded.onnx", tmp_path / "calib", tmp_path / "out", analysis_samples=0, progress=False)
    deploy = onnx.load(tmp_path / "out" / "snpe_deploy.onnx")
    assert not {"IsNaN", "Where"} & {n.op_type for n in deploy.graph.node if n.output[0] != "mask"}
    original, prepared = make_session(onnx.load(tmp_path / "guarded.onnx")), make_session(deploy)
    for sample in samples:
        np.testing.assert_array_equal(prepared.run(["out"], sample)[0], original.run(["out"], sample)[0])
