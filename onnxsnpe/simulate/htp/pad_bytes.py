"""Padding that a 16-bit 5x5 depthwise Conv strided by 2 reads as its zero point's high byte, twice.

The HTP's precise doubly strided depthwise kernel (wide.py) at 16 bits, kernel 5x5, strides 2, pads 2
on every side, reads two of its padded inputs not as the zero point ``z`` but as ``257 (z >> 8)``, the
value a buffer filled byte by byte with ``z``'s high byte holds: those at kernel row 3, columns 0 and 1
(the two left padding columns) of every odd output row's first window. Measured with one-hot filters
(every kernel position a channel of its own, so each output is one input): exactly there the output
moved by ``257 (z >> 8) - z`` input steps, and nowhere else, for input sizes 16 to 24; 3x3 and 7x7
kernels, strides 1 and 8-bit inputs read ``z`` everywhere, and a ``z`` whose two bytes are equal
(0x5555, 0x6666) changes nothing (tools/HTP.md finding 53; PP-OCRv4 det's ``conv2d_414`` at A16,
190 of 192 channels off by up to 157 steps in its first column).
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph.ops import node_attributes

KERNEL, STRIDE, PAD = 5, 2, 2
"""The one shape measured to read the byte-filled padding."""
ROW, COLUMNS = 3, 2
"""The kernel row whose first COLUMNS positions (the left padding) read it, in odd output rows."""


def padding_correction(node: onnx.NodeProto, codes: np.ndarray, zero_point: int,
                       input_shape: list[int | None] | None) -> np.ndarray | None:
    """What the byte-filled padding adds to a depthwise Conv's accumulator, per output position
    ([1, C, H_out, W_out], in accumulator steps of the weight ``codes`` [C, 1, 5, 5]), or None where it
    adds nothing: other shapes, a zero point whose bytes are equal, an unknown input size."""
    attrs = node_attributes(node)
    if (list(attrs.get("kernel_shape", codes.shape[2:])) != [KERNEL, KERNEL]
            or list(attrs.get("strides", [1, 1])) != [STRIDE, STRIDE]
            or list(attrs.get("pads", [0] * 4)) != [PAD] * 4 or codes.shape[1] != 1):
        return None
    fill = 257 * (int(zero_point) >> 8)
    if fill == zero_point or not input_shape or len(input_shape) != 4 or input_shape[2] is None \
            or input_shape[3] is None:
        return None
    rows, columns = ((size + 2 * PAD - KERNEL) // STRIDE + 1 for size in input_shape[2:])
    correction = np.zeros((1, codes.shape[0], rows, columns))
    correction[0, :, 1::2, 0] = ((fill - zero_point) * codes[:, 0, ROW, :COLUMNS].sum(axis=1))[:, None]
    return correction
