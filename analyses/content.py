"""Dense content ids for the engine.

The engine counts references per content with numpy arrays indexed by a dense content id,
assigned on first sight of a hash (``analyses.kernels.ContentTable``). What a content is, the
page hash, belongs to the trace format: ``memtrace.traces.pagehash``.
"""

from __future__ import annotations

import numpy as np


def one_of_each(keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Mask selecting one element per distinct value of ``keys`` (small non-negative ints that
    index ``scratch``), in O(n) without sorting: the last writer of each scratch cell wins."""
    pos = np.arange(len(keys))
    scratch[keys] = pos
    return scratch[keys] == pos
