"""Compiled loops the statistics share (histogram.py, pdf.py): a one-pass min and max over
order keys of the float bits, and the counting of precomputed slots into sub-histograms while the
next chunk of values is prefetched.

Calibration reads every observed value once per sample, tens of megabytes, so these loops are
written for the compiler to vectorize (numba, no Python per value) and release the GIL so that
several samples are folded at once.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CHUNK = 1024
"""Values per chunk: slots are computed for a chunk, then counted."""
LANES = 4
"""Interleaved sub-histograms: consecutive values land in different ones, so repeated increments of
one bin (zeros, saturated values) do not wait for each other (4 measured faster than 2 or 8)."""
LOWEST_KEY = np.int32(-(2**31))
HIGHEST_KEY = np.int32(2**31 - 1)


@numba.njit(nogil=True, cache=True, inline="always")
def order_key(bits):  # pragma: no cover - compiled
    """The order key of the float32 whose bits are ``bits`` (int32), or the reverse.

    The key is an int32 whose order is the float32 order (-0.0 just below 0.0, NaNs beyond the
    infinities): the bits, with the magnitude bits flipped for negative values. Integer keys make
    min and max a plain integer reduction the compiler vectorizes (float min and max do not, even
    with fastmath), and a NaN or Inf shows as a key beyond the finite ones. The ufuncs keep the
    arithmetic in int32, eight keys per instruction (operators would widen it to int64).
    """
    return np.bitwise_xor(bits, np.bitwise_and(np.right_shift(bits, np.int32(31)), np.int32(0x7FFFFFFF)))


@numba.njit(nogil=True, cache=True)
def key_values(low, high):  # pragma: no cover - compiled
    """The float32 values whose order keys are ``low`` and ``high``."""
    bits = np.empty(2, dtype=np.int32)
    bits[0], bits[1] = order_key(low), order_key(high)  # the transform is its own inverse
    values = bits.view(np.float32)
    return values[0], values[1]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def key_range(keys, low, high):  # pragma: no cover - compiled
    """Fold the float32 values whose bits are ``keys`` (int32) into the order-key range (low, high)."""
    for k in range(keys.shape[0]):
        key = order_key(keys[k])
        low = min(low, key)
        high = max(high, key)
    return low, high


@numba.njit(nogil=True, cache=True)
def value_range(values):  # pragma: no cover - compiled
    """(min, max) of float32 ``values`` in one vectorized pass (numpy's min and max take two); a
    NaN or Inf shows in them."""
    low, high = key_range(values.view(np.int32), HIGHEST_KEY, LOWEST_KEY)
    return key_values(low, high)


@numba.njit(nogil=True, cache=True)
def value_ranges(pieces, results):  # pragma: no cover - compiled
    """:func:`value_range` of every piece in one call: ``results[k]`` gets piece k's (min, max)."""
    for k in range(len(pieces)):
        results[k, 0], results[k, 1] = value_range(pieces[k])


LINE = 16
"""float32 values in a 64-byte cache line."""


@intrinsic
def prefetch(typingctx, array, index):  # pragma: no cover - compiled
    """A hint to bring ``array[index]``'s cache line into every cache level (``llvm.prefetch``:
    read, high locality). It never faults, so an index past the end is harmless."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        declaration = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, declaration, "llvm.prefetch")  # LLVM mangles it
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def tally_slots(slots, size, parts, values, ahead):  # pragma: no cover - compiled
    """Count ``slots[:size]`` into the LANES sub-histograms ``parts`` in turn.

    Meanwhile ``values[ahead : ahead + size]`` (the next chunk) is prefetched, a cache line every
    few slots: the memory streams in while the increments run instead of after them, which took a
    quarter off the counting of EfficientNet-Lite0's activations read back from memory (prefetching
    the whole chunk at once gained 7%, probably because a core tracks only a few outstanding misses).
    """
    whole = size - size % LANES
    for k in range(0, whole, LANES):
        if k % LINE == 0 and ahead + k < values.shape[0]:
            prefetch(values, ahead + k)
        for lane in range(LANES):  # unrolled: LANES is a compile-time constant
            parts[lane, slots[k + lane]] += 1
    for k in range(whole, size):
        parts[0, slots[k]] += 1
