"""Report figures worked out by hand on small models, and the isolated ranking."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import asymmetric_encoding, fake_quantize
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import QuantTargets
from onnxsnpe.report.evaluation import HISTOGRAM_BINS, evaluate, worst_isolated
from onnxsnpe.report.weight_analysis import analyze_weights
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.stages import Settings

from .conftest import minmax_encodings


def _affine_model():
    """y = 2 * x + 1, with the intermediate a = 2 * x."""
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Add", ["a", "one"], ["y"])]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 50])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _sqnr(ref, got):
    ref = ref.astype(np.float64)
    err = got.astype(np.float64) - ref
    return 10 * np.log10(np.sum(ref**2) / np.sum(err**2))


def test_one_quantized_tensor_figures_by_hand():
    model = _affine_model()
    enc = asymmetric_encoding(-1.0, 3.0, 8)  # a ranges over [-4, 4]: values beyond 3 are clipped
    samples = [{"x": np.random.default_rng(i).uniform(-2, 2, (1, 50)).astype(np.float32)} for i in range(3)]
    targets = QuantTargets(activations=["a"])
    result = evaluate(model, targets, {"a": enc}, {}, {"a": (-4.0, 4.0)}, samples, isolated_samples=2)

    a = np.concatenate([2 * s["x"] for s in samples]).astype(np.float32)
    fq = fake_quantize(a, enc)
    (fig,) = result.tensors
    assert fig.cumulative.sqnr_db == pytest.approx(_sqnr(a, fq), rel=1e-9)
    half = enc.scale / 2
    assert fig.clipped_share == pytest.approx(np.mean((a < enc.min - half) | (a > enc.max + half)))
    assert fig.histogram.sum() == a.size and fig.histogram.shape == (HISTOGRAM_BINS,)
    y, yq = a[:2] + 1, fq[:2] + 1  # isolated: the first two samples only
    assert fig.isolated_sqnr_db == pytest.approx(_sqnr(y, yq), rel=1e-6)
    assert result.isolated_samples == 2
    (out,) = result.outputs
    assert out.sqnr_db == pytest.approx(_sqnr(a + 1, fq + 1), rel=1e-6)
    assert out.max_abs_error == pytest.approx(np.abs((fq + 1).astype(np.float64) - (a + 1)).max(), rel=1e-6)


def test_badly_ranged_tensor_ranks_first(tiny_model):
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    targets, observed, encodings, _ = minmax_encodings(deploy, samples)
    bad = "relu_out"
    lo, hi = observed[bad]
    encodings[bad] = asymmetric_encoding(lo, hi * 0.05, 8)  # clips 95% of the range away
    encodings["flat"] = encodings[bad]
    result = evaluate(deploy, targets, encodings, {}, observed, samples, isolated_samples=3)
    ranking = worst_isolated(result.tensors)
    assert ranking[0].name == bad
    by_name = {f.name: f for f in result.tensors}
    assert by_name[bad].clipped_share > 0.2 and by_name["x"].clipped_share == 0.0


def test_weight_figures():
    model = load_model_from_weights(np.array([[[[1.0]]], [[[100.0]]]], np.float32))
    enc = asymmetric_encoding(1.0, 100.0, 8)
    (fig,) = analyze_weights(model, {"w": enc}, {"w": 0})
    assert fig.op == "Conv" and fig.shape == (2, 1, 1, 1)
    assert fig.per_channel_sqnr_db is not None and fig.per_channel_gain_db > 0
    assert fig.sixteen_bit_gain_db > 40


def load_model_from_weights(weight):
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("arithmetic", ["htp", "exact"])
def test_output_figures_come_from_the_chosen_arithmetic(arithmetic):
    from .test_htp import _conv_model, _quantized, _samples

    weight = np.random.default_rng(1).uniform(0.0, 1.0, size=(6, 4, 3, 3))  # re-expressed on the HTP
    model = _conv_model(weight)
    samples = _samples(4, count=3)
    targets, acts, params = _quantized(model, samples)
    observed = {name: (acts[name].min, acts[name].max) for name in targets.activations}
    result = evaluate(model, targets, acts, params, observed, samples, isolated_samples=0, arithmetic=arithmetic)
    builders = {"htp": htp_simulation_model, "exact": build_simulation_model}
    sim, output_map = builders[arithmetic](model, targets, acts, params)
    other, other_map = builders[{"htp": "exact", "exact": "htp"}[arithmetic]](model, targets, acts, params)
    reference = make_session(model)
    ref = np.concatenate([reference.run(["y"], s)[0] for s in samples])
    got = np.concatenate([make_session(sim).run([output_map["y"]], s)[0] for s in samples])
    not_chosen = np.concatenate([make_session(other).run([other_map["y"]], s)[0] for s in samples])
    assert not np.array_equal(got, not_chosen)  # the two arithmetics differ on this model
    assert result.outputs[0].to_dict()["sqnr_db"] == pytest.approx(_sqnr(ref, got), abs=1e-4)  # 4 decimals
    assert abs(_sqnr(ref, got) - _sqnr(ref, not_chosen)) > 0.1


def test_unknown_arithmetic_is_refused():
    with pytest.raises(OnnxSnpeError, match="--arithmetic"):
        Settings(arithmetic="fast").check()


def test_evaluation_measures_against_the_reference_model(tmp_path, tiny_model):
    """A deploy model whose weights were rounded is measured against the FP32 reference, not itself."""
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(3)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    targets, observed, acts, params = minmax_encodings(deploy, samples)
    weights = {name: enc for name, enc in params.items() if name in targets.weights}
    rounded = onnx.ModelProto.FromString(deploy.SerializeToString())
    for init in rounded.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(fake_quantize(numpy_helper.to_array(init), weights[init.name]),
                                                  init.name))
    against_itself = evaluate(rounded, targets, acts, params, observed, samples, 0, arithmetic="exact")
    against_fp32 = evaluate(rounded, targets, acts, params, observed, samples, 0, arithmetic="exact",
                            reference=deploy)
    plain = evaluate(deploy, targets, acts, params, observed, samples, 0, arithmetic="exact")
    assert against_fp32.outputs[0].sqnr_db == pytest.approx(plain.outputs[0].sqnr_db, abs=1e-6)
    assert against_itself.outputs[0].sqnr_db > against_fp32.outputs[0].sqnr_db


@pytest.mark.parametrize("limit", [0, 1 << 20])
def test_outputs_only_evaluator_reuses_fp32_outputs_within_its_limit(monkeypatch, tiny_model, limit):
    """compare's evaluator keeps FP32 outputs for the next configuration (up to KEPT_OUTPUT_BYTES);
    the figures equal those of a fresh evaluator whether or not they were kept."""
    from onnxsnpe.report import evaluation

    monkeypatch.setattr(evaluation, "KEPT_OUTPUT_BYTES", limit)
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(2)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(7)]
    targets, observed, acts8, params = minmax_encodings(deploy, samples)
    _, _, acts16, _ = minmax_encodings(deploy, samples, 16)
    shared = evaluation.Evaluator(deploy, targets, workers=2, tensors=False)
    runs = [shared.evaluate(deploy, acts, params, observed, samples, 1) for acts in (acts8, acts16)]
    assert len(shared.kept_outputs) == (len(samples) if limit else 0)
    for acts, run in zip((acts8, acts16), runs, strict=True):
        fresh = evaluation.Evaluator(deploy, targets, workers=2, tensors=False)
        alone = fresh.evaluate(deploy, acts, params, observed, samples, 1)
        assert [o.to_dict() for o in run.outputs] == [o.to_dict() for o in alone.outputs]
        assert [f.isolated_sqnr_db for f in run.tensors] == [f.isolated_sqnr_db for f in alone.tensors]


def test_the_switchable_model_takes_its_encodings_as_inputs_from_opset_11(tiny_model):
    """One isolated-analysis model serves every set of encodings (compare's configurations), with the
    runs of a model that holds them, bit for bit; before opset 11 (Clip's bounds are attributes) the
    model holds them and says so."""
    from onnxsnpe.report.sensitivity import IsolatedModel
    from onnxsnpe.simulate.fake_quant import SWITCH_INPUT

    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(5)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    targets, _, acts8, _ = minmax_encodings(deploy, samples)
    _, _, acts16, _ = minmax_encodings(deploy, samples, 16)
    generic = IsolatedModel.build(deploy, targets, acts8, {})
    assert generic.takes_encodings
    for acts in (acts8, acts16):
        model = generic.with_encodings(acts)
        held, output_map = build_simulation_model(deploy, targets, acts, {}, switchable=True)
        session = make_session(held)
        for position in range(len(targets.activations)):
            switch = np.eye(len(targets.activations), dtype=bool)[position]
            want = session.run([output_map[o] for o in model.outputs], {**samples[0], SWITCH_INPUT: switch})
            got = model.session().run(model.mapped, {**samples[0], **model.feed, SWITCH_INPUT: switch})
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w)
    old = onnx.ModelProto.FromString(deploy.SerializeToString())
    old.opset_import[0].version = 10
    holding = IsolatedModel.build(old, targets, acts8, {})
    assert not holding.takes_encodings
    with pytest.raises(ValueError):
        holding.with_encodings(acts16)
