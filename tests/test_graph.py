"""Graph preparation: BatchNorm and elementwise folding keep the outputs, shapes become static, names survive."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model, model_inputs
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets


def _bn_after(op, weight, x_shape, attrs, channels, *, bias=True, gemm_c=None):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if op == "Gemm" and gemm_c is not None:
        inits.append(numpy_helper.from_array(gemm_c.astype(np.float32), "b"))
        inputs.append("b")
    elif bias:
        inits.append(numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "b"))
        inputs.append("b")
    for name, values in [("s", rng.uniform(0.5, 2, channels)), ("o", rng.normal(size=channels)),
                         ("m", rng.normal(size=channels)), ("v", rng.uniform(0.2, 3, channels))]:
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    nodes = [helper.make_node(op, inputs, ["y0"], **attrs),
             helper.make_node("BatchNormalization", ["y0", "s", "o", "m", "v"], ["y"], epsilon=1e-3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


CASES = {
    "conv": ("Conv", (6, 3, 3, 3), (1, 3, 9, 9), {"pads": [1, 1, 1, 1]}, 6, {}),
    "conv_no_bias": ("Conv", (6, 3, 3, 3), (1, 3, 9, 9), {}, 6, {"bias": False}),
    "depthwise": ("Conv", (4, 1, 3, 3), (1, 4, 7, 7), {"group": 4}, 4, {}),
    "conv_transpose_grouped": ("ConvTranspose", (4, 3, 2, 2), (1, 4, 5, 5), {"group": 2, "strides": [2, 2]}, 6, {}),
    "gemm": ("Gemm", (10, 7), (2, 10), {"alpha": 0.5, "beta": 2.0}, 7, {"gemm_c": np.arange(7.0)}),
    "gemm_trans_b": ("Gemm", (7, 10), (2, 10), {"transB": 1}, 7, {"gemm_c": np.array([0.3])}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batchnorm_folding_keeps_outputs(case):
    op, w_shape, x_shape, attrs, channels, extra = CASES[case]
    weight = np.random.default_rng(1).normal(size=w_shape)
    model = _bn_after(op, weight, x_shape, attrs, channels, **extra)
    deploy, folded = prepare_deploy_model(model, {"x": x_shape})
    assert folded == 1
    assert [n.op_type for n in deploy.graph.node] == [op]
    assert deploy.graph.node[0].output[0] == "y"  # the fused tensor takes the BatchNorm output's name
    x = np.random.default_rng(2).normal(size=x_shape).astype(np.float32)
    want = make_session(model).run(None, {"x": x})[0]
    got = make_session(deploy).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _add_after(op: str, constant: np.ndarray, *, add_op: str = "Add", constant_first: bool = False,
               also_read: bool = False, batchnorm: bool = False, then_add: float | None = None) -> onnx.ModelProto:
    """x [1, 4, 5, 5] -> op (4 -> 6 channels, no bias) -> add_op with ``constant`` -> [+ then_add]
    -> [BatchNorm] -> y."""
    rng = np.random.default_rng(3)
    shape = (6, 4, 3, 3) if op == "Conv" else (4, 6, 2, 2)
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {"strides": [2, 2]}
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), "w"),
             numpy_helper.from_array(constant.astype(np.float32), "c")]
    nodes = [helper.make_node(op, ["x", "w"], ["a"], **attrs),
             helper.make_node(add_op, ["c", "a"] if constant_first else ["a", "c"], ["s"])]
    outputs = ["s"]
    if then_add is not None:
        inits.append(numpy_helper.from_array(np.array([then_add], dtype=np.float32), "t"))
        nodes.append(helper.make_node("Add", ["s", "t"], ["u"]))
        outputs = ["u"]
    if batchnorm:
        inits += [numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), n) for n in "omv"]
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "g"))
        nodes.append(helper.make_node("BatchNormalization", ["s", "g", "o", "m", "v"], ["y"]))
        outputs = ["y"]
    if also_read:
        nodes.append(helper.make_node("Relu", ["a"], ["r"]))
        outputs.append("r")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


PER_CHANNEL = np.linspace(-1, 1, 6)
BIAS_ADDS = {
    "conv + per-channel [6, 1, 1]": ("Conv", PER_CHANNEL.reshape(6, 1, 1), {}),
    "conv + [1, 6, 1, 1], constant first": ("Conv", PER_CHANNEL.reshape(1, 6, 1, 1), {"constant_first": True}),
    "conv - scalar": ("Conv", np.array([0.3]), {"add_op": "Sub"}),
    "conv transpose + per-channel, then a BatchNorm": ("ConvTranspose", PER_CHANNEL.reshape(6, 1, 1),
                                                       {"batchnorm": True}),
    "conv * scalar + scalar (PP-OCRv4's affine block)": ("Conv", np.array([1.7]), {"add_op": "Mul", "then_add": -0.2}),
    "conv / per-channel": ("Conv", PER_CHANNEL.reshape(6, 1, 1) + 2, {"add_op": "Div"}),
}


@pytest.mark.parametrize("case", sorted(BIAS_ADDS))
def test_an_elementwise_op_by_a_per_channel_constant_folds_into_the_convolution(case):
    """As SNPE's converter squashes it (SQUASH_SUM/SUB/PROD/DIV): one node left, the last folded
    op's output name kept, the same outputs."""
    op, constant, extra = BIAS_ADDS[case]
    model = _add_after(op, constant, **extra)
    deploy, _ = prepare_deploy_model(model, {"x": (1, 4, 5, 5)})
    assert [n.op_type for n in deploy.graph.node] == [op]
    assert deploy.graph.node[0].output[0] == model.graph.output[0].name
    x = np.random.default_rng(2).normal(size=(1, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(make_session(deploy).run(None, {"x": x})[0], make_session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("constant, extra", [
    (np.linspace(-1, 1, 5).reshape(1, 1, 1, 5), {}),  # varies along the width, not per channel
    (np.linspace(-1, 1, 6).reshape(6, 1, 1), {"add_op": "Sub", "constant_first": True}),  # c - conv
    (np.linspace(-1, 1, 6).reshape(6, 1, 1), {"also_read": True}),  # the convolution's output read elsewhere
    (np.linspace(-1, 1, 6).reshape(6, 1, 1), {"add_op": "Div", "constant_first": True}),  # c / conv
    (np.linspace(0, 1, 6).reshape(6, 1, 1), {"add_op": "Div"}),  # a division by zero stays as written
])
def test_other_adds_after_a_convolution_stay(constant, extra):
    model = _add_after("Conv", constant, **extra)
    deploy, _ = prepare_deploy_model(model, {"x": (1, 4, 5, 5)})
    assert [n.op_type for n in deploy.graph.node if n.op_type != "Relu"] == ["Conv", extra.get("add_op", "Add")]


def test_shared_weight_is_copied_not_changed():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(rng.uniform(1, 2, 4).astype(np.float32), n) for n in "somv"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "s", "o", "m", "v"], ["b"]),
             helper.make_node("Conv", ["b", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    deploy, folded = prepare_deploy_model(model, {"x": (1, 4, 3, 3)})
    assert folded == 1
    x = rng.normal(size=(1, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(make_session(deploy).run(None, {"x": x})[0], make_session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    second = [n for n in deploy.graph.node][1]
    assert second.input[1] == "w"


def test_dynamic_shapes_are_fixed_and_shape_arithmetic_folded(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["y0"]),
             helper.make_node("Relu", ["y0"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    deploy, _ = prepare_deploy_model(model, {"x": (1, 3, 4, 5)})
    assert "Shape" not in [n.op_type for n in deploy.graph.node]
    assert model_inputs(deploy)[0].dims == (1, 3, 4, 5)
    targets = find_targets(deploy)
    assert targets.activations == ["x", "y"] and targets.aliases == {"y0": "x"}


def test_load_model_errors(tmp_path):
    with pytest.raises(OnnxSnpeError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(OnnxSnpeError, match=r"corrupt\.onnx"):
        load_model(corrupt)
    with pytest.raises(OnnxSnpeError, match="not a file"):
        load_model(tmp_path)


def test_tiny_model_targets(tiny_model):
    deploy, folded = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    assert folded == 1
    targets = find_targets(deploy)
    assert targets.activations == ["x", "relu_out", "out"]
    assert targets.squashed == {"bn_out": "relu_out"}
    assert targets.aliases == {"flat": "relu_out"}
    assert targets.weights == ["conv.w", "fc.w"]
    biases = [(b.bias, b.weight, b.input) for b in targets.biases]
    assert biases == [("conv.b", "conv.w", "x"), ("fc.b", "fc.w", "flat")]
    onnx.checker.check_model(deploy)


def test_sessions_leave_out_nodes_no_output_depends_on():
    """A node that leads to no output is dropped; one read only inside an If's branch, or exposed as an
    extra output, stays, and the session's values do not change."""
    from onnxsnpe.graph.runtime import without_unused_nodes

    value = helper.make_tensor_value_info
    then_branch = helper.make_graph([helper.make_node("Mul", ["inner", "inner"], ["then_out"])], "then", [],
                                    [value("then_out", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [],
                                    [value("else_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["inner"]),  # read only by the If's then branch
             helper.make_node("Exp", ["x"], ["dead"]),
             helper.make_node("Sigmoid", ["dead"], ["dead_too"]),
             helper.make_node("Abs", ["x"], ["exposed"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [3]), value("flag", TensorProto.BOOL, [])],
                              [value("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    without_unused_nodes(pruned.graph)
    assert [n.op_type for n in pruned.graph.node] == ["Relu", "If"]
    x = np.array([-1.0, 0.5, 2.0], dtype=np.float32)
    session = make_session(model, ["exposed"])
    assert len(model.graph.node) == 5  # the caller's model is not changed
    y, exposed = session.run(None, {"x": x, "flag": np.array(True)})
    np.testing.assert_array_equal(y, np.maximum(x, 0) ** 2)
    np.testing.assert_array_equal(exposed, np.abs(x))
