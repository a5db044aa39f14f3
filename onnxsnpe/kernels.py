"""Compiled loops the statistics share: a one-pass min/max and the counting of precomputed slots.

Calibration reads every observed value once per sample, tens of megabytes, so these loops are
written for the compiler to vectorize (numba, no Python per value) and release the GIL so that
several tensors are counted at once.

Min and max are taken over order-preserving integer keys of the float32 bit patterns: integer
min/max vectorizes where float min/max (with its NaN rules) does not, and the keys keep NaN and
Inf visible: a NaN's key lies beyond infinity's, so the range comes back non-finite.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 1024
"""Values per chunk: slots are computed for a chunk, then counted."""

KEY_LOWEST = np.int32(-(2**31))
KEY_HIGHEST = np.int32(2**31 - 1)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def float_key(bits):  # pragma: no cover - compiled
    """An int32 whose order is that of the float32 with these bits (-0.0 just below +0.0)."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def key_value(key: int) -> float:
    """The float32 value (as a Python float) whose key is ``key``."""
    key = np.int32(key)
    bits = np.int32(key ^ ((key >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def value_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float32 array in one pass; NaN or an infinity shows as a non-finite end."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    low, high = _key_range(flat.view(np.int32))
    return key_value(low), key_value(high)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _key_range(bits):  # pragma: no cover - compiled
    low, high = KEY_HIGHEST, KEY_LOWEST
    for k in range(bits.shape[0]):
        key = float_key(bits[k])
        low = min(low, key)
        high = max(high, key)
    return low, high


@numba.njit(nogil=True, cache=True, boundscheck=False)
def tally_slots(slots, size, parts):  # pragma: no cover - compiled
    """Count ``slots[:size]`` into four sub-histograms in turn (no dependency between neighbours)."""
    for k in range(0, size - size % 4, 4):
        parts[0, slots[k]] += 1
        parts[1, slots[k + 1]] += 1
        parts[2, slots[k + 2]] += 1
        parts[3, slots[k + 3]] += 1
    for k in range(size - size % 4, size):
        parts[0, slots[k]] += 1
