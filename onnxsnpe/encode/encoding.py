"""SNPE's encoding math: the only place where ranges become scale/offset and values are quantized.

Everything follows ../shared/SNPE.md section 1. An encoding maps integers q in [0, 2^bw - 1] to
floats (q + offset) * scale, with offset <= 0 an integer so that zero is exactly representable.
Encodings are computed in float64; fake quantization runs in the tensor's own float32, as on the
device, with C++ ``std::round`` (half away from zero) rather than numpy's half-to-even.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_RANGE = 0.01
"""SNPE widens any range narrower than this (``max = max(max, min + 0.01)``)."""


@dataclass(frozen=True)
class Encoding:
    """One SNPE encoding: ``x = (q + offset) * scale`` for integer q in [0, 2^bitwidth - 1]."""

    bitwidth: int
    scale: float
    offset: int
    is_symmetric: bool = False

    @property
    def levels(self) -> int:
        """The largest integer code, 2^bitwidth - 1."""
        return (1 << self.bitwidth) - 1

    @property
    def min(self) -> float:
        """The smallest representable value, ``offset * scale``."""
        return self.offset * self.scale

    @property
    def max(self) -> float:
        """The largest representable value, ``min + (2^bw - 1) * scale``."""
        return self.min + self.levels * self.scale

    def to_snpe(self) -> dict:
        """The entry for SNPE's legacy ``--quantization_overrides`` JSON (SNPE.md section 2)."""
        return {
            "bitwidth": self.bitwidth,
            "dtype": "int",
            "is_symmetric": str(self.is_symmetric),
            "min": self.min,
            "max": self.max,
            "scale": self.scale,
            "offset": self.offset,
        }


def _check_bitwidth(bitwidth: int) -> None:
    if bitwidth not in (4, 8, 16, 32):
        raise ValueError(f"unsupported bitwidth {bitwidth}: use 4, 8, 16 or 32")


def asymmetric_encoding(rmin: float, rmax: float, bitwidth: int) -> Encoding:
    """SNPE's asymmetric encoding of the range [rmin, rmax] (SNPE.md section 1, steps 1-4)."""
    _check_bitwidth(bitwidth)
    rmin, rmax = float(rmin), float(rmax)
    if not (math.isfinite(rmin) and math.isfinite(rmax)) or rmin > rmax:
        raise ValueError(f"invalid range [{rmin}, {rmax}]")
    levels = (1 << bitwidth) - 1
    rmin = min(rmin, 0.0)
    rmax = max(rmax, 0.0)
    rmax = max(rmax, rmin + MIN_RANGE)
    scale = (rmax - rmin) / levels
    # Python floats, not numpy scalars: the MSE search encodes thousands of candidate ranges
    offset = -min(max(_round_half_away_scalar(-rmin / scale), 0), levels)
    return Encoding(bitwidth=bitwidth, scale=scale, offset=offset)


def symmetric_encoding(absmax: float, bitwidth: int) -> Encoding:
    """Signed symmetric encoding: ``scale = absmax / (2^(bw-1) - 1)``, ``offset = -2^(bw-1)``."""
    _check_bitwidth(bitwidth)
    absmax = max(abs(float(absmax)), MIN_RANGE / 2)
    half = 1 << (bitwidth - 1)
    return Encoding(bitwidth=bitwidth, scale=absmax / (half - 1), offset=-half, is_symmetric=True)


def bias_encoding(scale: float, bitwidth: int = 32) -> Encoding:
    """Signed bias encoding with a given scale (for 32 bits: input scale x weight scale), offset 0.

    In SNPE's unsigned terms a signed zero point of 0 is ``offset = -2^(bw-1)``.
    """
    _check_bitwidth(bitwidth)
    return Encoding(bitwidth=bitwidth, scale=float(scale), offset=-(1 << (bitwidth - 1)), is_symmetric=True)


def _round_half_away_scalar(x: float) -> int:
    """``std::round`` of a finite float, as an int: the fractional part compared with one half, as
    :func:`round_half_away` does (``floor(|x| + 0.5)`` rounds the float just below one half up)."""
    magnitude = abs(x)
    whole = math.floor(magnitude)
    whole += magnitude - whole >= 0.5
    return -whole if x < 0 else whole


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (C++ ``std::round``), exactly, in x's own float dtype.

    ``floor(|x| + 0.5)`` is wrong in float32 just below one half (0.49999997 + 0.5 rounds up to 1),
    so the fractional part is compared with one half instead; ``|x| - floor(|x|)`` is exact.
    """
    a = np.abs(x)
    whole = np.floor(a)
    rounded = whole + (a - whole >= 0.5).astype(x.dtype)
    return np.copysign(rounded, x)


def quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """Integer codes ``clamp(round(x / scale) - offset, 0, 2^bw - 1)``, as int64."""
    dtype = np.float32 if enc.bitwidth <= 16 else np.float64
    x = np.asarray(x, dtype=dtype)
    q = round_half_away(x / dtype(enc.scale)) - dtype(enc.offset)
    return np.clip(q, 0, enc.levels).astype(np.int64)


def dequantize(q: np.ndarray, enc: Encoding) -> np.ndarray:
    """Floats ``(q + offset) * scale`` in float32."""
    return ((np.asarray(q, dtype=np.float64) + enc.offset).astype(np.float32)) * np.float32(enc.scale)


def fake_quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """Quantize then dequantize, as SNPE's fixed-point kernels would see x; float32 result.

    Up to 16 bits the arithmetic is float32 (what the simulation graph does); 32-bit bias codes
    exceed float32's integer precision and are computed in float64.
    """
    dtype = np.float32 if enc.bitwidth <= 16 else np.float64  # 32-bit codes need float64
    x = np.asarray(x, dtype=dtype)
    scale = dtype(enc.scale)
    offset = dtype(enc.offset)
    q = np.clip(round_half_away(x / scale) - offset, dtype(0), dtype(enc.levels))
    return ((q + offset) * scale).astype(np.float32)
