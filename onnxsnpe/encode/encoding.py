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

    def entries(self) -> list[dict]:
        """The overrides file's list for this tensor: one entry (per tensor)."""
        return [self.to_snpe()]


@dataclass(frozen=True)
class ChannelEncodings:
    """Per-channel encodings of a constant: one Encoding for each index along ``axis``.

    SNPE's per-channel mode (``--use_per_channel_quantization``): the overrides file lists one entry
    per output channel, in channel order; per-channel encodings must be symmetric (SNPE.md section 2).
    """

    axis: int
    channels: tuple[Encoding, ...]

    @property
    def bitwidth(self) -> int:
        return self.channels[0].bitwidth

    @property
    def is_symmetric(self) -> bool:
        return all(enc.is_symmetric for enc in self.channels)

    @property
    def levels(self) -> int:
        return self.channels[0].levels

    def scales(self) -> np.ndarray:
        """The channels' scales, float64."""
        return np.array([enc.scale for enc in self.channels])

    def offsets(self) -> np.ndarray:
        """The channels' offsets, int64."""
        return np.array([enc.offset for enc in self.channels], dtype=np.int64)

    def along(self, values: np.ndarray, ndim: int) -> np.ndarray:
        """``values`` (one per channel) shaped to broadcast over an array of rank ``ndim`` along ``axis``."""
        shape = [1] * ndim
        shape[self.axis] = len(self.channels)
        return np.asarray(values).reshape(shape)

    def entries(self) -> list[dict]:
        """The overrides file's list for this tensor: one entry per channel, in channel order."""
        return [enc.to_snpe() for enc in self.channels]


ParamEncoding = Encoding | ChannelEncodings
"""How a constant (weight, bias) is quantized: per tensor, or per channel."""


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


def per_channel_symmetric(absmax: np.ndarray, axis: int, bitwidth: int) -> ChannelEncodings:
    """Symmetric per-channel encodings from each channel's largest magnitude (symmetric_encoding each).

    A channel of zeros takes the largest channel's range: any scale holds it exactly, and the floor
    scale it would otherwise get sets the HTP's register reference for its group of channels, where a
    16-bit doubly strided depthwise Conv then wraps (tools/HTP.md finding 33)."""
    absmax = np.abs(np.asarray(absmax, dtype=np.float64)).reshape(-1)
    absmax = np.where(absmax == 0, absmax.max(initial=0.0), absmax)
    return ChannelEncodings(axis, tuple(symmetric_encoding(float(a), bitwidth) for a in absmax))


def same_grid_wider(enc: Encoding, bitwidth: int) -> Encoding:
    """The asymmetric encoding at ``bitwidth`` whose grid contains every value of ``enc``'s: 8 to 16
    bits multiplies each code by 257 (65535 / 255), so converting a tensor to it loses nothing."""
    _check_bitwidth(bitwidth)
    factor, rest = divmod((1 << bitwidth) - 1, enc.levels)
    if enc.is_symmetric or rest or factor < 1:
        raise ValueError(f"no {bitwidth}-bit grid holds the {enc.bitwidth}-bit encoding {enc} exactly")
    return Encoding(bitwidth=bitwidth, scale=enc.scale / factor, offset=enc.offset * factor)


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


def _grid(enc: ParamEncoding, ndim: int, dtype: type) -> tuple:
    """``enc``'s scale, offset and largest code in ``dtype``: scalars per tensor, arrays along the axis per channel."""
    if isinstance(enc, Encoding):
        return dtype(enc.scale), dtype(enc.offset), dtype(enc.levels)
    return (enc.along(enc.scales().astype(dtype), ndim), enc.along(enc.offsets().astype(dtype), ndim),
            dtype(enc.levels))


def _dtype(enc: ParamEncoding) -> type:
    return np.float32 if enc.bitwidth <= 16 else np.float64  # 32-bit codes need float64


def quantize(x: np.ndarray, enc: ParamEncoding) -> np.ndarray:
    """Integer codes ``clamp(round(x / scale) - offset, 0, 2^bw - 1)``, as int64 (per channel along its axis).

    The clamp comes first (its bounds are integers, so the codes are the same): infinities clamp too.
    """
    dtype = _dtype(enc)
    x = np.asarray(x, dtype=dtype)
    scale, offset, levels = _grid(enc, x.ndim, dtype)
    with np.errstate(over="ignore"):  # a huge value over a small scale: inf, clamped next
        q = round_half_away(np.clip(x / scale, offset, offset + levels)) - offset  # bounds are integers
    return q.astype(np.int64)


def dequantize(q: np.ndarray, enc: ParamEncoding) -> np.ndarray:
    """Floats ``(q + offset) * scale`` in float32."""
    q = np.asarray(q, dtype=np.float64)
    scale, offset, _ = _grid(enc, q.ndim, np.float64)
    return (q + offset).astype(np.float32) * np.asarray(scale, dtype=np.float32)


def fake_quantize(x: np.ndarray, enc: ParamEncoding) -> np.ndarray:
    """Quantize then dequantize, as SNPE's fixed-point kernels would see x; float32 result.

    Up to 16 bits the arithmetic is float32 (what the simulation graph does); 32-bit bias codes
    exceed float32's integer precision and are computed in float64. Per channel, each slice along
    the axis uses its own encoding with exactly the per-tensor arithmetic.
    """
    dtype = _dtype(enc)
    x = np.asarray(x, dtype=dtype)
    scale, offset, levels = _grid(enc, x.ndim, dtype)
    with np.errstate(over="ignore"):  # a huge value over a small scale: inf, clamped next
        rounded = round_half_away(np.clip(x / scale, offset, offset + levels))  # clamping first: -inf is safe
    return (rounded * scale).astype(np.float32)
