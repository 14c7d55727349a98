"""Content identity: the 128-bit page hash of the trace format, and dense ids for the engine.

The engine counts references per content with numpy arrays indexed by a dense content id. Ids are
assigned on first sight of a hash (``analyses.kernels.ContentTable``; this module stays free of
the compiled code, for the tracer side that only hashes). Contents are identified by the low
64 bits of xxh3_128: among even ten million distinct pages the chance of any collision is below
3e-6, and the full 128-bit value stays in the trace and in reports.
"""

from __future__ import annotations

import numpy as np
import xxhash

PAGE_SIZE = 4096


def page_hash(data: bytes | memoryview) -> tuple[int, int]:
    """(hash_lo, hash_hi) of one page: xxh3_128 with seed 0, as in FORMAT.md."""
    v = xxhash.xxh3_128_intdigest(data)
    return v & 0xFFFFFFFFFFFFFFFF, v >> 64


ZERO_HASH = page_hash(bytes(PAGE_SIZE))


def hash_pages(image: np.ndarray, frames: np.ndarray, page_size: int = PAGE_SIZE
               ) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the given frames of a memory image (uint8 array of whole pages)."""
    lo = np.empty(len(frames), dtype=np.uint64)
    hi = np.empty(len(frames), dtype=np.uint64)
    mv = memoryview(image)
    digest = xxhash.xxh3_128_intdigest
    for i, f in enumerate(frames.tolist()):
        v = digest(mv[f * page_size:(f + 1) * page_size])
        lo[i] = v & 0xFFFFFFFFFFFFFFFF
        hi[i] = v >> 64
    return lo, hi


def one_of_each(keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Mask selecting one element per distinct value of ``keys`` (small non-negative ints that
    index ``scratch``), in O(n) without sorting: the last writer of each scratch cell wins."""
    pos = np.arange(len(keys))
    scratch[keys] = pos
    return scratch[keys] == pos
