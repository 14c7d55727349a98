"""Rows an analysis keeps for its report, one per instant or event of the trace.

The oracle keeps a row per change point and the snapshot analysis one per instant and one per
sharing opportunity: the only parts of a replay that grow with the trace's length (issue 18).
As Python lists of ints such a row costs about 40 bytes a value; here it costs 8, in numpy
blocks of ``BLOCK`` rows that are never copied as they fill.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 4096


class Rows:
    """A growing table of ``ncols`` columns of one numpy dtype."""

    def __init__(self, ncols: int, dtype: type = np.int64) -> None:
        self.ncols = ncols
        self.dtype = np.dtype(dtype)
        self._full: list[np.ndarray] = []
        self._cur = np.empty((BLOCK, ncols), dtype=self.dtype)
        self._n = 0  # rows in _cur

    def __len__(self) -> int:
        return len(self._full) * BLOCK + self._n

    def _room(self) -> None:
        if self._n == BLOCK:
            self._full.append(self._cur)
            self._cur = np.empty((BLOCK, self.ncols), dtype=self.dtype)
            self._n = 0

    def append(self, row: Sequence[int | float]) -> None:
        self._room()
        self._cur[self._n] = row
        self._n += 1

    def extend(self, rows: np.ndarray) -> None:
        """Append the rows of a (k, ncols) array."""
        i = 0
        while i < len(rows):
            self._room()
            k = min(BLOCK - self._n, len(rows) - i)
            self._cur[self._n:self._n + k] = rows[i:i + k]
            self._n += k
            i += k

    @property
    def last(self) -> np.ndarray:
        """The last row (a view: writing to it changes the table)."""
        if self._n:
            return self._cur[self._n - 1]
        return self._full[-1][BLOCK - 1]

    def array(self) -> np.ndarray:
        """All rows as one (n, ncols) array (a copy)."""
        return np.concatenate([*self._full, self._cur[:self._n]])
