"""Report figures worked out by hand on small models, and the isolated ranking."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encoding import asymmetric_encoding, fake_quantize
from onnxsnpe.evaluation import HISTOGRAM_BINS, evaluate, worst_isolated
from onnxsnpe.graph import load_model, prepare_deploy_model
from onnxsnpe.targets import QuantTargets
from onnxsnpe.weight_analysis import analyze_weights

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
    (fig,) = analyze_weights(model, {"w": enc})
    assert fig.op == "Conv" and fig.shape == (2, 1, 1, 1)
    assert fig.per_channel_sqnr_db is not None and fig.per_channel_gain_db > 0
    assert fig.sixteen_bit_gain_db > 40


def load_model_from_weights(weight):
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
