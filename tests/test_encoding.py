"""SNPE encoding math against the worked example in SNPE.md, a float64 reference and properties."""

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxsnpe.encode.encoding import (
    _round_half_away_scalar,
    asymmetric_encoding,
    bias_encoding,
    dequantize,
    fake_quantize,
    quantize,
    round_half_away,
    symmetric_encoding,
)

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
ranges = st.tuples(finite, finite).map(sorted)
bitwidths = st.sampled_from([8, 16])


def test_worked_example_from_snpe_docs():
    enc = asymmetric_encoding(-1.8, 0.5, 8)
    assert enc.offset == -200
    assert enc.min == pytest.approx(-1.803922, abs=1e-6)
    assert enc.max == pytest.approx(0.496078, abs=1e-6)
    assert enc.scale == pytest.approx(2.3 / 255)
    entry = enc.to_snpe()
    assert entry["is_symmetric"] == "False" and entry["dtype"] == "int" and entry["bitwidth"] == 8
    assert entry["min"] == entry["offset"] * entry["scale"]
    assert entry["max"] == entry["min"] + 255 * entry["scale"]


def test_range_is_widened_to_include_zero_and_minimum_width():
    positive = asymmetric_encoding(2.0, 3.0, 8)
    assert positive.offset == 0 and positive.min == 0.0 and positive.max == pytest.approx(3.0)
    negative = asymmetric_encoding(-3.0, -2.0, 8)
    assert negative.offset == -255 and negative.max == pytest.approx(0.0, abs=1e-12)
    tiny = asymmetric_encoding(0.0, 0.0, 8)
    assert tiny.max - tiny.min == pytest.approx(0.01)


def test_symmetric_and_bias_encodings():
    sym = symmetric_encoding(1.27, 8)
    assert sym.offset == -128 and sym.scale == pytest.approx(0.01) and sym.is_symmetric
    assert sym.min == pytest.approx(-1.28) and sym.max == pytest.approx(1.27)
    bias = bias_encoding(0.02 * 0.003)
    assert bias.bitwidth == 32 and bias.offset == -(2**31)
    assert quantize(np.array([0.0]), bias)[0] == 2**31  # signed zero


@pytest.mark.parametrize("value", [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 2.4999998, -3.5000002])
def test_round_half_away_matches_cpp_std_round(value):
    x = np.float32(value)
    expected = float(Decimal(float(x)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert round_half_away(np.array([x]))[0] == expected


@pytest.mark.parametrize("value", [0.5, 2.5, -2.5, 0.49999999999999994, -0.49999999999999994, 4503599627370497.0, -0.0])
def test_scalar_round_half_away_matches_cpp_std_round(value):
    """The float64 rounding of the encoding's offset (floor(|x| + 0.5) would round 0.49999999999999994 up)."""
    assert _round_half_away_scalar(value) == int(Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e6, 1e6, width=32)))
def test_round_half_away_against_decimal_reference(x):
    expected = [float(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for v in x]
    np.testing.assert_array_equal(round_half_away(x), np.array(expected, dtype=np.float32))


@settings(max_examples=200)
@given(ranges, bitwidths)
def test_zero_is_exactly_representable(bounds, bitwidth):
    enc = asymmetric_encoding(bounds[0], bounds[1], bitwidth)
    assert enc.offset <= 0
    assert fake_quantize(np.array([0.0], dtype=np.float32), enc)[0] == 0.0
    assert enc.min == enc.offset * enc.scale
    assert enc.min <= 0.0 <= enc.max


@settings(max_examples=200)
@given(ranges, bitwidths, arrays(np.float32, 32, elements=st.floats(-2e4, 2e4, width=32)))
def test_codes_in_range_and_fake_quant_idempotent(bounds, bitwidth, x):
    enc = asymmetric_encoding(bounds[0], bounds[1], bitwidth)
    q = quantize(x, enc)
    assert q.min() >= 0 and q.max() <= 2**bitwidth - 1
    once = fake_quantize(x, enc)
    np.testing.assert_array_equal(fake_quantize(once, enc), once)
    np.testing.assert_array_equal(once, dequantize(q, enc))


@settings(max_examples=200)
@given(ranges, bitwidths, arrays(np.float32, 32, elements=st.floats(-2e4, 2e4, width=32)))
def test_fake_quant_against_float64_reference(bounds, bitwidth, x):
    """Inside the range the error is at most half a step; outside, values clamp to the ends."""
    enc = asymmetric_encoding(bounds[0], bounds[1], bitwidth)
    y = fake_quantize(x, enc).astype(np.float64)
    x64 = x.astype(np.float64)
    clamped = np.clip(x64, enc.min, enc.max)
    assert np.all(np.abs(y - clamped) <= enc.scale * 0.5 * (1 + 1e-5) + 1e-6 * np.abs(clamped))
    assert np.all(y >= enc.min - 1e-6 * abs(enc.min)) and np.all(y <= enc.max + 1e-6 * abs(enc.max))


def test_encoding_reference_float64():
    """Scale and offset follow SNPE.md section 1 step by step, computed independently."""
    for lo, hi, bw in [(-1.8, 0.5, 8), (-0.3, 6.0, 8), (-12.5, 3.25, 16), (0.1, 0.2, 8)]:
        lo64, hi64 = min(lo, 0.0), max(hi, 0.0)
        hi64 = max(hi64, lo64 + 0.01)
        scale = (hi64 - lo64) / (2**bw - 1)
        offset = -min(max(int(Decimal(-lo64 / scale).quantize(Decimal(1), rounding=ROUND_HALF_UP)), 0), 2**bw - 1)
        enc = asymmetric_encoding(lo, hi, bw)
        assert enc.scale == pytest.approx(scale, rel=1e-12)
        assert enc.offset == offset


@settings(max_examples=300)
@given(ranges, st.sampled_from([4, 8, 16, 32]))
def test_offset_rounds_half_away_exactly(bounds, bitwidth):
    """The offset is std::round(-min / scale) clamped, with float64's just-below-one-half cases
    rounded down (decimal reference on the exact float64 quotient)."""
    lo, hi = bounds
    enc = asymmetric_encoding(lo, hi, bitwidth)
    lo64 = min(lo, 0.0)
    scale = (max(max(hi, 0.0), lo64 + 0.01) - lo64) / (2**bitwidth - 1)
    exact = int(Decimal(-lo64 / scale).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert enc.scale == scale and enc.offset == -min(max(exact, 0), 2**bitwidth - 1)
    assert isinstance(enc.offset, int)


def test_invalid_ranges_are_rejected():
    with pytest.raises(ValueError):
        asymmetric_encoding(1.0, -1.0, 8)
    with pytest.raises(ValueError):
        asymmetric_encoding(float("nan"), 1.0, 8)
    with pytest.raises(ValueError):
        asymmetric_encoding(0.0, 1.0, 7)
