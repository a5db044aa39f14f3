"""The session that returns observed tensors in onnxruntime's blocked layout, checked against NCHW."""

from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnpe.graph.runtime import make_session
from onnxsnpe.stats import exposure
from onnxsnpe.stats.exposure import ExposedSession

OBSERVED = ["stem", "stem_relu", "mid", "sum"]


def two_conv_model(stem_channels: int) -> onnx.ModelProto:
    """x [1,3,12,12] -> Conv(stem_channels) -> Relu -> Conv(stem_channels) -> Add(with Relu) -> Conv(5) = out."""
    rng = np.random.default_rng(1)
    c = stem_channels
    inits = [
        numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(5, c, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "w1", "b1"], ["mid"]),
        helper.make_node("Add", ["mid", "stem_relu"], ["sum"]),
        helper.make_node("Conv", ["sum", "w2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "two_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, 12, 12])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [*OBSERVED, "out"]
    return dict(zip(names, make_session(model, names).run(names, {"x": x}), strict=True))


@pytest.mark.parametrize("channels", [16, 24, 5])
def test_observed_values_are_exactly_those_of_the_nchw_tensors(channels: int) -> None:
    model = two_conv_model(channels)
    session = ExposedSession(model, [*OBSERVED, "out"])
    rng = np.random.default_rng(channels)
    for _ in range(2):  # the first run is checked against an ordinary session; the second is not
        x = rng.normal(size=(1, 3, 12, 12)).astype(np.float32)
        values = session.values(session.run({"x": x}))
        for name, want in _reference(model, x).items():
            assert values[name].shape[0] == 1
            np.testing.assert_array_equal(np.sort(values[name], axis=None), np.sort(want, axis=None))
    if platform.machine() in ("x86_64", "AMD64"):  # onnxruntime's NCHWc kernels exist here
        assert session.blocked, "the blocked layout was not used"
        assert session.names != [*OBSERVED, "out"]


def test_outputs_written_into_given_arrays_match() -> None:
    model = two_conv_model(24)
    session = ExposedSession(model, OBSERVED)
    x = np.random.default_rng(0).normal(size=(1, 3, 12, 12)).astype(np.float32)
    first = session.run({"x": x})
    arrays = [np.full_like(raw, np.nan) for raw in first]
    session.run_into({"x": x}, arrays)
    for raw, want in zip(arrays, first, strict=True):
        np.testing.assert_array_equal(raw, want)
    # the outputs stay bound to each list of arrays: new feeds, two lists in turn
    others = [np.full_like(raw, np.nan) for raw in first]
    rng = np.random.default_rng(1)
    for target in (arrays, others, arrays, others):
        feed = {"x": rng.normal(size=(1, 3, 12, 12)).astype(np.float32)}
        session.run_into(feed, target)
        for raw, want in zip(target, session.run(feed), strict=True):
            np.testing.assert_array_equal(raw, want)


def test_a_layout_that_does_not_check_out_falls_back_to_nchw(monkeypatch) -> None:
    monkeypatch.setattr(exposure, "BLOCK_SIZES", (3,))  # no real block size: the check of the first run fails
    model = two_conv_model(24)
    session = ExposedSession(model, OBSERVED)
    x = np.random.default_rng(2).normal(size=(1, 3, 12, 12)).astype(np.float32)
    raws = session.run({"x": x})
    want = _reference(model, x)
    for name, raw in zip(OBSERVED, raws, strict=True):
        np.testing.assert_array_equal(raw, want[name])  # this very run already returns the NCHW tensors
    assert session.blocked == {} and session.names == OBSERVED
    x = np.random.default_rng(3).normal(size=(1, 3, 12, 12)).astype(np.float32)
    for name, values in session.values(session.run({"x": x})).items():
        np.testing.assert_array_equal(values, _reference(model, x)[name])


def test_unblocked_session_returns_the_nchw_tensors() -> None:
    model = two_conv_model(24)
    session = ExposedSession(model, OBSERVED, blocked=False)
    x = np.random.default_rng(4).normal(size=(1, 3, 12, 12)).astype(np.float32)
    assert session.blocked == {} and session.names == OBSERVED
    for name, raw in zip(OBSERVED, session.run({"x": x}), strict=True):
        np.testing.assert_array_equal(raw, _reference(model, x)[name])


def test_writing_into_arrays_first_still_checks_the_layout() -> None:
    model = two_conv_model(24)
    x = np.random.default_rng(5).normal(size=(1, 3, 12, 12)).astype(np.float32)
    want = ExposedSession(model, OBSERVED).run({"x": x})
    session = ExposedSession(model, OBSERVED)
    arrays = [np.full_like(raw, np.nan) for raw in want]
    session.run_into({"x": x}, arrays)
    assert session.reference is None  # checked
    for array, raw in zip(arrays, want, strict=True):
        np.testing.assert_array_equal(array, raw)


def _blocked(nchw: np.ndarray, block: int, padded: int) -> np.ndarray:
    """``nchw`` in onnxruntime's NCHWc layout with ``padded`` channels (padding filled with 7s)."""
    batch, channels, height, width = nchw.shape
    full = np.full((batch, padded, height, width), 7.0, dtype=nchw.dtype)
    full[:, :channels] = nchw
    return np.ascontiguousarray(
        full.reshape(batch, padded // block, block, height, width).transpose(0, 1, 3, 4, 2)
    ).reshape(batch, padded, height, width)


def test_the_layout_check_rejects_misread_blocks_and_padding() -> None:
    want = np.random.default_rng(6).normal(size=(1, 40, 5, 7)).astype(np.float32)
    raw = _blocked(want, 16, 48)
    assert exposure._unblocked_equal(raw, want, 16)
    assert not exposure._unblocked_equal(_blocked(np.pad(want, ((0, 0), (0, 8), (0, 0), (0, 0))), 8, 48), want, 16)
    last = raw.copy()
    last.reshape(1, 3, 35, 16)[0, 2, 34, 7] += 1  # the last real channel of the padded block
    assert not exposure._unblocked_equal(last, want, 16)
    first = raw.copy()
    first.reshape(1, 3, 35, 16)[0, 0, 17, 3] = np.nan
    assert not exposure._unblocked_equal(first, want, 16)
    assert exposure.probe_blocks(1) == [0] and exposure.probe_blocks(6) == [0, 3, 5]
