"""Content identity: the 128-bit page hash of the trace format, and dense ids for the engine.

The engine counts references per content with numpy arrays indexed by a dense content id. Ids are
assigned on first sight of a hash. Contents are identified by the low 64 bits of xxh3_128: among
even ten million distinct pages the chance of any collision is below 3e-6, and the full 128-bit
value stays in the trace and in reports.
"""

from __future__ import annotations

import numpy as np
import xxhash

from analyses.kernels import Table, content_ids

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


class ContentTable:
    """Maps content hashes to dense ids (0, 1, 2, ...), assigning new ids on first sight.

    A hash table keyed by the hash's low 64 bits (``analyses.kernels.Table``), probed by a compiled
    loop; ``lo``/``hi`` give the full hash of each id.
    """

    def __init__(self, capacity_bits: int = 12) -> None:
        self.lo = np.empty(1024, dtype=np.uint64)
        self.hi = np.empty(1024, dtype=np.uint64)
        self.n = 0
        self._table = Table(capacity_bits)

    def __len__(self) -> int:
        return self.n

    def ids(self, hash_lo: np.ndarray, hash_hi: np.ndarray) -> np.ndarray:
        """Content ids for the given hashes (int64 array, same length)."""
        lo = np.ascontiguousarray(hash_lo, dtype=np.uint64)
        k = len(lo)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        self._table.reserve(self.n, k)
        if self.n + k > len(self.lo):
            size = max(self.n + k, 2 * len(self.lo))
            self.lo = np.resize(self.lo, size)
            self.hi = np.resize(self.hi, size)
        t = self._table
        out = np.empty(k, dtype=np.int64)
        self.n = content_ids(t.keys, t.vals, t.shift, self.lo, self.hi, self.n, lo,
                             np.ascontiguousarray(hash_hi, dtype=np.uint64), out)
        return out

    def id_of(self, hash_lo: int, hash_hi: int) -> int:
        return int(self.ids(np.array([hash_lo], dtype=np.uint64),
                            np.array([hash_hi], dtype=np.uint64))[0])
