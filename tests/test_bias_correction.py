"""Bias correction removes the mean shift weight quantization adds to each layer's output."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.encoding import fake_quantize
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.optimize.bias_correction import correct_biases


def _two_convs() -> onnx.ModelProto:
    """x [1,3,8,8] -> Conv(3->6, no bias) -> Relu -> Conv(6->4) = y, weights with per-tensor outliers."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w1[0] *= 40  # one wide channel: the others get coarse steps
    w2 = rng.normal(size=(4, 6, 3, 3)).astype(np.float32)
    w2[1] *= 30
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _channel_means(model, samples, weights=None) -> dict[str, np.ndarray]:
    """Per-channel means of c1 and y, float64, with the weights fake-quantized if ``weights`` is given."""
    if weights is not None:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        for init in model.graph.initializer:
            if init.name in weights:
                init.CopyFrom(numpy_helper.from_array(fake_quantize(numpy_helper.to_array(init), weights[init.name]),
                                                      init.name))
    session = make_session(model, ["c1"])
    runs = [session.run(["c1", "y"], s) for s in samples]
    return {name: np.mean([r[i].astype(np.float64).mean(axis=(0, 2, 3)) for r in runs], axis=0)
            for i, name in enumerate(["c1", "y"])}


def test_quantized_weights_keep_the_fp32_channel_means_after_correction():
    model = _two_convs()
    weights = weight_encodings(model, find_targets(model), 8)
    rng = np.random.default_rng(1)
    samples = [{"x": np.abs(rng.normal(size=(1, 3, 8, 8))).astype(np.float32)} for _ in range(8)]
    reference = _channel_means(model, samples)
    before = _channel_means(model, samples, weights)
    corrected, corrections = correct_biases(model, weights, samples)
    after = _channel_means(corrected, samples, weights)
    for name in ("c1", "y"):
        scale = np.abs(reference[name]).max()
        assert np.abs(before[name] - reference[name]).max() > 1e-3 * scale  # there was a shift to remove
        np.testing.assert_allclose(after[name], reference[name], rtol=0, atol=1e-5 * scale)
    assert [c.output for c in corrections] == ["c1", "y"]
    conv = corrected.graph.node[0]
    assert len(conv.input) == 3  # the bias-free Conv got a bias
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for init in corrected.graph.initializer:  # only biases changed
        if init.name in ("w1", "w2"):
            np.testing.assert_array_equal(numpy_helper.to_array(init), original[init.name])


def test_bias_correction_flag_changes_only_the_deploy_biases(tmp_path, tiny_model, npy_folder):
    from onnxsnpe import quantize

    plain = quantize(tiny_model, npy_folder, tmp_path / "plain", progress=False)
    fixed = quantize(tiny_model, npy_folder, tmp_path / "bc", bias_correction=True, correction_samples=4,
                     progress=False)
    record = fixed.report["optimizations"]["bias_correction"]
    assert record["samples"] == 4 and record["layers"] == 2
    assert fixed.report["settings"]["bias_correction"] and plain.report["optimizations"] == {}
    before, after = (
        {i.name: numpy_helper.to_array(i) for i in onnx.load(str(r.out_dir / "snpe_deploy.onnx")).graph.initializer}
        for r in (plain, fixed)
    )
    assert before.keys() == after.keys()
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed and all(before[name].ndim == 1 for name in changed)  # biases only


def test_a_model_without_correctable_layers_is_returned_unchanged():
    """MatMul-only models (transformers) have no Conv/Gemm bias to correct: nothing happens, no error."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    weights = weight_encodings(model, find_targets(model), 8)
    corrected, corrections = correct_biases(model, weights, [{"x": rng.normal(size=(1, 4)).astype(np.float32)}])
    assert corrections == []
    assert [numpy_helper.to_array(i).tobytes() for i in corrected.graph.initializer] == \
        [numpy_helper.to_array(i).tobytes() for i in model.graph.initializer]
