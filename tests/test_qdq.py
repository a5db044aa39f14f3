"""The QDQ export carries exactly onnxsnpe's encodings and runs on onnxruntime's CPU."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.encode.constants import constant_encodings
from onnxsnpe.encode.encoding import Encoding, asymmetric_encoding, fake_quantize, per_channel_symmetric, quantize
from onnxsnpe.encode.ranges import bias_encodings, weight_encodings
from onnxsnpe.export import overrides_json
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.simulate.qdq import MS_DOMAIN, SUFFIX, build_qdq_model

from .conftest import minmax_encodings

QNN_REASON = qnn_unavailable_reason()


def _encodings(deploy, targets, bitwidth=8):
    """Min-max encodings from a few random samples, as the pipeline makes them."""
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    _, _, acts, params = minmax_encodings(deploy, samples, bitwidth)
    return acts, params


@pytest.fixture
def tiny(tiny_model):
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    acts, params = _encodings(deploy, targets)
    return deploy, targets, acts, params


def _qparams(model):
    """{quantized tensor: (scale, zero point)} read from the Q and DQ nodes of a QDQ model."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found.setdefault(node.name, (node.op_type, node.input[0], inits[node.input[1]], inits[node.input[2]]))
    return found, inits


def test_qdq_model_is_valid_and_keeps_input_and_output_names(tiny):
    deploy, targets, acts, params = tiny
    qdq = build_qdq_model(deploy, targets, acts, params)
    onnx.checker.check_model(qdq)
    assert [v.name for v in qdq.graph.input] == [v.name for v in deploy.graph.input]
    assert [v.name for v in qdq.graph.output] == [v.name for v in deploy.graph.output]
    assert qdq.opset_import[0].version == deploy.opset_import[0].version  # 8-bit needs no upgrade


def test_activation_qdq_pairs_carry_exactly_our_encodings(tiny):
    deploy, targets, acts, params = tiny
    qdq = build_qdq_model(deploy, targets, acts, params)
    found, _ = _qparams(qdq)
    tensors = [*targets.activations, *targets.aliases, *targets.squashed]
    for tensor in tensors:
        enc = acts[targets.squashed.get(tensor, tensor)]  # squashed tensors use the post-activation grid
        for kind in ("Q", "DQ"):
            _, _, scale, zero_point = found[f"{tensor}{SUFFIX}/{kind}"]
            assert scale.dtype == np.float32 and scale == np.float32(enc.scale)
            assert zero_point.dtype == np.uint8 and int(zero_point) == -enc.offset


def test_params_are_stored_quantized_with_their_encodings(tiny):
    deploy, targets, acts, params = tiny
    qdq = build_qdq_model(deploy, targets, acts, params)
    found, inits = _qparams(qdq)
    originals = {i.name: numpy_helper.to_array(i) for i in deploy.graph.initializer}
    for name, enc in params.items():
        op, stored, scale, zero_point = found[f"{name}{SUFFIX}/DQ"]
        assert op == "DequantizeLinear" and scale == np.float32(enc.scale)
        codes = inits[stored]
        if enc.bitwidth == 32:  # biases: signed, zero point 0
            assert codes.dtype == np.int32 and int(zero_point) == 0
            np.testing.assert_array_equal(codes, quantize(originals[name], enc) + enc.offset)
        else:
            assert codes.dtype == np.uint8 and int(zero_point) == -enc.offset
            np.testing.assert_array_equal(codes, quantize(originals[name], enc))
        assert name not in inits  # the float original is gone


def test_cpu_execution_follows_the_simulation(tiny):
    """Float ops between Q/DQ (basic optimizations) differ from the simulation only at exact ties."""
    deploy, targets, acts, params = tiny
    qdq = build_qdq_model(deploy, targets, acts, params)
    sim, output_map = build_simulation_model(deploy, targets, acts, params)
    qdq_session, sim_session = make_session(qdq), make_session(sim)
    rng = np.random.default_rng(5)
    for _ in range(5):
        x = fake_quantize(rng.normal(size=(1, 3, 8, 8)).astype(np.float32), acts["x"])
        got = qdq_session.run(["out"], {"x": x})[0]
        want = sim_session.run([output_map["out"]], {"x": x})[0]
        assert np.abs(got - want).max() <= acts["out"].scale * 1.001


def test_per_channel_weights_before_opset_13_use_the_contrib_domain_and_run(tiny):
    """DequantizeLinear's ``axis`` is opset 13: an opset-11 model (the PP-OCR classifier's) with
    per-channel weights would be refused as an invalid graph by onnxruntime and its QNN provider."""
    deploy, targets, acts, params = tiny
    old = onnx.ModelProto()
    old.CopyFrom(deploy)
    old.opset_import[0].version = 11
    weights = weight_encodings(old, targets, 8, per_channel=True)
    params = {**weights, **bias_encodings(old, targets, acts, weights, 32)}
    qdq = build_qdq_model(old, targets, acts, params)
    per_axis = [n for n in qdq.graph.node if any(a.name == "axis" for a in n.attribute)]
    assert per_axis and {n.domain for n in per_axis} == {MS_DOMAIN}
    x = fake_quantize(np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32), acts["x"])
    got = make_session(qdq).run(["out"], {"x": x})[0]
    sim, output_map = build_simulation_model(old, targets, acts, params)
    want = make_session(sim).run([output_map["out"]], {"x": x})[0]
    assert np.abs(got - want).max() <= acts["out"].scale * 1.001


def test_sixteen_bit_uses_the_contrib_domain_and_runs(tiny):
    deploy, targets, _, params = tiny
    acts, _ = _encodings(deploy, targets, bitwidth=16)
    qdq = build_qdq_model(deploy, targets, acts, params)
    q_nodes = [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {n.domain for n in q_nodes} == {MS_DOMAIN}
    assert any(op.domain == MS_DOMAIN for op in qdq.opset_import)
    found, _ = _qparams(qdq)
    assert found[f"x{SUFFIX}/Q"][3].dtype == np.uint16
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert make_session(qdq).run(["out"], {"x": x})[0].shape == (1, 5)


def _elementwise_model():
    """x -> Add(const vector) -> Clip(0, 6) -> Mul(scalar) = y."""
    inits = [
        numpy_helper.from_array(np.array([0.5, -1.0, 2.0], dtype=np.float32).reshape(1, 3, 1, 1), "shift"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "low"),
        numpy_helper.from_array(np.array(6.0, dtype=np.float32), "high"),
        numpy_helper.from_array(np.array(6.0, dtype=np.float32), "factor"),  # also a Clip bound below
    ]
    nodes = [
        helper.make_node("Add", ["x", "shift"], ["a"]),
        helper.make_node("Clip", ["a", "low", "factor"], ["c"]),
        helper.make_node("Mul", ["c", "factor"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "ew", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_constants_of_elementwise_ops_get_encodings_but_clip_bounds_stay_float():
    model = _elementwise_model()
    targets = find_targets(model)
    found = constant_encodings(model, targets, {}, 8)
    assert set(found) == {"shift", "factor"}
    assert found["shift"] == asymmetric_encoding(-1.0, 2.0, 8)
    acts = {name: asymmetric_encoding(-3.0, 40.0, 8) for name in targets.activations}
    qdq = build_qdq_model(model, targets, acts, found)
    clip = next(n for n in qdq.graph.node if n.op_type == "Clip")
    mul = next(n for n in qdq.graph.node if n.op_type == "Mul")
    inits = {i.name: i for i in qdq.graph.initializer}
    assert clip.input[2] in inits and inits[clip.input[2]].data_type == TensorProto.FLOAT  # float copy
    assert mul.input[1] == "factor" and "factor" not in inits  # read from its DequantizeLinear
    x = np.random.default_rng(2).normal(size=(1, 3, 4, 4)).astype(np.float32)
    sim, output_map = build_simulation_model(model, targets, acts, found)
    np.testing.assert_allclose(make_session(qdq).run(["y"], {"x": x})[0],
                               make_session(sim).run([output_map["y"]], {"x": x})[0], atol=acts["y"].scale)


def test_symmetric_weights_are_signed_with_zero_point_zero(tiny):
    deploy, targets, acts, params = tiny
    weight = targets.weights[0]
    values = next(numpy_helper.to_array(i) for i in deploy.graph.initializer if i.name == weight)
    params = {**params, weight: Encoding(8, float(np.abs(values).max()) / 127, -128, True)}
    found, inits = _qparams(build_qdq_model(deploy, targets, acts, params))
    _, stored, _, zero_point = found[f"{weight}{SUFFIX}/DQ"]
    assert inits[stored].dtype == np.int8 and zero_point.dtype == np.int8 and int(zero_point) == 0
    assert np.abs(inits[stored].astype(int)).max() == 127


def test_overrides_in_1_0_0_format_carry_the_same_encodings(tiny_model):
    """AIMET's 1.0.0 schema (SNPE.md section 2): named entries, one scale and offset per channel,
    offsets as in legacy; per-channel weights symmetric with offsets -2^(bw-1)."""
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    activations = {name: asymmetric_encoding(-1.0 - k, 2.0 + k, 8 if k % 2 else 16)
                   for k, name in enumerate(targets.activations)}
    weight = targets.weights[0]
    params = {weight: per_channel_symmetric(np.array([0.5, 1.0, 2.0, 4.0]), 0, 8),
              targets.weights[1]: asymmetric_encoding(-0.3, 0.7, 8)}
    legacy = overrides_json(deploy, activations, params)
    v1 = overrides_json(deploy, activations, params, "1.0.0")
    assert v1["version"] == "1.0.0" and set(v1) == {"version", "activation_encodings", "param_encodings",
                                                       "excluded_layers"}
    assert [e["name"] for e in v1["activation_encodings"]] == list(legacy["activation_encodings"])
    assert [e["name"] for e in v1["param_encodings"]] == list(legacy["param_encodings"])
    for entry in v1["activation_encodings"] + v1["param_encodings"]:
        assert set(entry) == {"name", "dtype", "enc_type", "is_sym", "bw", "scale", "offset"}
        assert entry["dtype"] == "INT" and isinstance(entry["is_sym"], bool)
        section = "activation_encodings" if entry in v1["activation_encodings"] else "param_encodings"
        old = legacy[section][entry["name"]]
        assert entry["bw"] == old[0]["bitwidth"]
        assert entry["scale"] == [e["scale"] for e in old]
        assert entry["offset"] == [float(e["offset"]) for e in old]
    channelled = next(e for e in v1["param_encodings"] if e["name"] == weight)
    assert channelled["enc_type"] == "PER_CHANNEL" and channelled["is_sym"] is True
    assert channelled["offset"] == [-128.0] * 4
    assert channelled["scale"] == pytest.approx([0.5 / 127, 1.0 / 127, 2.0 / 127, 4.0 / 127])
    assert all(e["enc_type"] == "PER_TENSOR" for e in v1["activation_encodings"])
    with pytest.raises(ValueError):
        overrides_json(deploy, activations, params, "2.0.0")


def test_constants_of_ops_with_16_bit_outputs_are_16_bit():
    """The HTP refuses some 16-bit graphs whose elementwise constants are 8-bit (tools/HTP.md)."""
    model = _elementwise_model()
    targets = find_targets(model)
    acts = {name: asymmetric_encoding(-3.0, 40.0, 8) for name in targets.activations}
    assert {enc.bitwidth for enc in constant_encodings(model, targets, {}, 8, acts).values()} == {8}
    acts["c"] = asymmetric_encoding(-3.0, 40.0, 16)  # the Add's output, squashed into the Clip's
    found = constant_encodings(model, targets, {}, 8, acts)
    # the Mul reads the 16-bit c: it runs at 16 bits, its 8-bit output converted after (encode/conversions.py)
    assert (found["shift"].bitwidth, found["factor"].bitwidth) == (16, 16)
    assert found["shift"] == asymmetric_encoding(-1.0, 2.0, 16)


def _max_pool_model(opset: int) -> onnx.ModelProto:
    """x -> Conv(3x3) -> MaxPool(2x2, stride 2) -> Conv(1x1) = y, at ``opset``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(("opset", "exported"), [(11, 13), (12, 12), (17, 17)])
def test_a_max_pool_before_opset_12_moves_the_qdq_model_to_opset_13(opset, exported):
    """onnxruntime and its QNN provider quantize DQ -> MaxPool -> Q only from MaxPool-12; before
    it the HTP ran the PP-OCR classifier's (opset 11) MaxPool in float (tools/HTP.md finding 40)."""
    deploy = _max_pool_model(opset)
    targets = find_targets(deploy)
    rng = np.random.default_rng(4)
    _, _, acts, params = minmax_encodings(deploy, [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)}
                                                   for _ in range(3)], 8)
    qdq = build_qdq_model(deploy, targets, acts, params)
    assert qdq.opset_import[0].version == exported and deploy.opset_import[0].version == opset
    x = fake_quantize(rng.normal(size=(1, 3, 16, 16)).astype(np.float32), acts["x"])
    sim, output_map = build_simulation_model(deploy, targets, acts, params)
    want = make_session(sim).run([output_map["y"]], {"x": x})[0]
    assert np.abs(make_session(qdq).run(["y"], {"x": x})[0] - want).max() <= acts["y"].scale * 1.001
    if QNN_REASON is None:
        htp = HtpSession(qdq, {"x": acts["x"]})
        assert htp.float_nodes == [] and not htp.cpu_nodes
