"""Folding one run's observed tensors into a worker's statistics, one compiled call per kind of
statistic.

Folding tensor by tensor calls a compiled kernel once per tensor (61 times a sample for
EfficientNet-Lite0), and every call gives Python's global lock back and then waits to take it
again: with two workers side by side, that waiting cost about 0.4 ms a sample. A fold here makes one
call per kind of statistic present (histograms, AIMET's PDFs, bare min and max) over pieces of
arrays that stay put from run to run, then settles each tensor in Python: the counts are in, what
remains is a grid that must grow, a NaN to report, the running min and max. The statistics come out
as TensorStats.update would make them (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba.typed import List

from ..errors import bad_values
from .histogram import FLUSH, count_pieces
from .kernels import value_ranges
from .pdf import bucket_counts_pieces

if TYPE_CHECKING:
    from .tensor_stats import TensorStats


class OutputFold:
    """Folds the tensors runs write into one set of arrays into one worker's statistics.

    ``pieces`` come from :meth:`ExposedSession.pieces` of those arrays: (tensor, flat piece, source
    to copy into the piece after each run or None).
    """

    def __init__(self, pieces: list[tuple[str, np.ndarray, np.ndarray | None]], stats: dict[str, TensorStats]) -> None:
        if not self.applies(stats, pieces):
            raise ValueError("these statistics cannot be folded in one call")
        self.names = [name for name, _, _ in pieces]
        self.entries = [(stats[name], piece) for name, piece, _ in pieces]
        self.copies = [(piece.reshape(source.shape), source) for _, piece, source in pieces if source is not None]
        self.histograms = [k for k, (observed, _) in enumerate(self.entries) if observed.histogram is not None]
        self.pdfs = [k for k, (observed, _) in enumerate(self.entries) if observed.tf_enhanced is not None]
        self.bare = [k for k, (observed, _) in enumerate(self.entries)
                     if observed.histogram is None and observed.tf_enhanced is None]
        self._counts = _typed([self.entries[k][0].histogram.counts for k in self.histograms], np.int64)
        self._grids = np.zeros((len(self.histograms), 2), dtype=np.float32)
        self._seen: list[np.ndarray | None] = [None] * len(self.histograms)  # counts arrays the grids belong to
        pdfs = [self.entries[k][0].tf_enhanced for k in self.pdfs]
        self._pdf_counts = _typed([pdf.counts for pdf in pdfs], np.int64)
        self._pdf_grids = np.array([pdf.grid for pdf in pdfs], dtype=np.float64).reshape(-1, 2)
        self._pieces = {kind: _typed([self.entries[k][1] for k in rows], np.float32)
                        for kind, rows in (("histograms", self.histograms), ("pdfs", self.pdfs), ("bare", self.bare))}
        # the kernels' results: (zeros, misses, min, max) per histogram piece, (min, max) per other piece
        self._counted = np.empty((len(self.histograms), 4))
        self._bucketed = np.empty((len(self.pdfs), 2))
        self._ranges = np.empty((len(self.bare), 2))

    @staticmethod
    def applies(stats: dict[str, TensorStats], pieces: list[tuple[str, np.ndarray, np.ndarray | None]]) -> bool:
        """Whether statistics can be folded this way: every PDF has its grid, no piece is too large
        for one counting call (FLUSH values)."""
        folded = [stats[name] for name, _, _ in pieces]  # not the tensors left out (masks: collect.py)
        return all(piece.size <= FLUSH for _, piece, _ in pieces) and all(
            observed.tf_enhanced is None or observed.tf_enhanced.x_left is not None for observed in folded
        )

    def fold(self) -> None:
        """Fold the arrays' current contents (one sample) into the statistics.

        Raises OnnxSnpeError naming the tensor if one takes NaN or Inf.
        """
        for piece, source in self.copies:
            np.copyto(piece, source)
        if self.histograms:
            self._count_histograms()
        if self.pdfs:
            bucket_counts_pieces(self._pieces["pdfs"], self._pdf_grids[:, 0], self._pdf_grids[:, 1], self._pdf_counts,
                                 self._bucketed)
        if self.bare:
            value_ranges(self._pieces["bare"], self._ranges)
        rows = (iter(self._counted), iter(self._bucketed), iter(self._ranges))
        for name, (observed, piece) in zip(self.names, self.entries, strict=True):
            try:
                batch_range = None
                if observed.histogram is not None:
                    batch_range = observed.histogram.settle(piece, next(rows[0]))
                if observed.tf_enhanced is not None:
                    pdf_range = observed.tf_enhanced.settle(piece.size, next(rows[1]))
                    batch_range = batch_range or pdf_range
                low, high = batch_range or (float(end) + 0.0 for end in next(rows[2]))
                observed.minmax.update_range(low, high, piece.size)
            except ValueError as exc:
                raise bad_values(name, exc) from exc

    def _count_histograms(self) -> None:
        """Count every histogram piece on its histogram's current grid."""
        for row, k in enumerate(self.histograms):  # a grid grows rarely: its counts array is then new
            histogram = self.entries[k][0].histogram
            if self._seen[row] is not histogram.counts:
                self._counts[row] = self._seen[row] = histogram.counts
                self._grids[row] = histogram.grid
        count_pieces(self._pieces["histograms"], self._grids[:, 0], self._grids[:, 1], self._counts, self._counted)


def _typed(arrays: list[np.ndarray], dtype: type) -> List:
    """A typed list of ``dtype`` arrays for the compiled loops (never empty: numba needs an item type)."""
    return List(arrays or [np.zeros(1, dtype=dtype)])
