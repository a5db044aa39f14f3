"""The 8-bit Div of two activations (simulate/htp/div.py): its arithmetic, and how close it is to the HTP."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxsnpe.encode.encoding import Encoding
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.simulate.emulator import HtpSession, qnn_unavailable_reason, simulation_runner
from onnxsnpe.simulate.htp.div import RECIPROCAL_ERROR
from onnxsnpe.simulate.htp.model import htp_simulation_model
from onnxsnpe.simulate.qdq import build_qdq_model

QNN_REASON = qnn_unavailable_reason()
needs_qnn = pytest.mark.skipif(QNN_REASON is not None, reason=f"HTP emulator unavailable: {QNN_REASON}")

PROBES = {  # s_a, z_a, s_b, z_b, s_y, z_y: neither was among the encodings the table was fitted on
    "the recogniser's p2o.Div.28": (0.036046533023609835, 52, 0.005930034787047143, 0, 0.03282846703248866, 51),
    "random, divisor zero point 237": (0.00558374, 102, 0.00263434, 237, 0.0166143, 177),
}


def _every_pair(probe):
    """A Div model, its encodings, and inputs holding every pair of codes (numerator code i, divisor code j)."""
    s_a, z_a, s_b, z_b, s_y, z_y = probe
    encodings = {"a": Encoding(8, s_a, -z_a), "b": Encoding(8, s_b, -z_b), "y": Encoding(8, s_y, -z_y)}
    graph = helper.make_graph([helper.make_node("Div", ["a", "b"], ["y"])], "div",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 65536]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 65536])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    a_codes, b_codes = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    feed = {name: ((codes.reshape(1, -1) - zero) * np.float32(scale)).astype(np.float32)
            for name, codes, scale, zero in (("a", a_codes, s_a, z_a), ("b", b_codes, s_b, z_b))}
    return model, encodings, feed


def _codes(output, probe):
    return np.round(output.reshape(256, 256) / np.float32(probe[4]) + probe[5]).astype(np.int64)


def test_htp_model_divides_by_the_tabled_reciprocal_of_the_divisor_code_and_keeps_13_bits():
    """Against a float64 reference written with frexp (the lowering rounds by splitting the float)."""
    probe = PROBES["random, divisor zero point 237"]
    model, encodings, feed = _every_pair(probe)
    runner = simulation_runner(*htp_simulation_model(model, find_targets(model), encodings, {}), ["y"])
    modeled = _codes(runner(feed)[0], probe)
    s_a, z_a, s_b, z_b, s_y, z_y = probe
    numerator, divisor = np.meshgrid(np.arange(256) - z_a, np.arange(256) - z_b, indexing="ij")
    magnitude = np.maximum(np.abs(divisor), 1)
    reciprocal = (1 + np.array((0, *RECIPROCAL_ERROR), dtype=np.float64)[magnitude] * 1e-7) / magnitude
    ratio = float(np.float32(s_a)) / (float(np.float32(s_b)) * float(np.float32(s_y)))
    mantissa, exponent = np.frexp(numerator * np.sign(divisor) * reciprocal * ratio)
    value = np.ldexp(np.round(np.ldexp(mantissa, 13)), exponent - 13)
    expected = np.where(divisor == 0, np.where(numerator >= 0, 255, 0), np.clip(np.floor(value + z_y + 0.5), 0, 255))
    np.testing.assert_array_equal(modeled, expected)


@needs_qnn
@pytest.mark.parametrize("case", list(PROBES))
def test_htp_model_misses_few_of_the_htp_div_codes(case):
    """Not bit-exact (tools/HTP.md finding 59), but at least four times closer than float division."""
    probe = PROBES[case]
    model, encodings, feed = _every_pair(probe)
    targets = find_targets(model)
    session = HtpSession(build_qdq_model(model, targets, encodings, {}), {n: encodings[n] for n in "ab"})
    htp = _codes(session.run(feed)[0], probe)
    modeled = _codes(simulation_runner(*htp_simulation_model(model, targets, encodings, {}), ["y"])(feed)[0], probe)
    s_a, z_a, s_b, z_b, s_y, z_y = probe
    numerator, divisor = np.meshgrid(np.arange(256) - z_a, np.arange(256) - z_b, indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        float_division = np.clip(np.floor(numerator * s_a / (divisor * s_b * s_y) + z_y + 0.5), 0, 255)
    nonzero = divisor != 0
    assert np.array_equal(modeled[~nonzero], htp[~nonzero])  # a zero divisor saturates as the numerator's sign
    missed, float_missed = int((modeled != htp)[nonzero].sum()), int((float_division != htp)[nonzero].sum())
    assert missed * 4 <= float_missed and missed < 0.003 * nonzero.sum(), (missed, float_missed)
