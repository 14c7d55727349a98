"""Content identity: the 128-bit page hash of the trace format, and dense ids for the engine.

The engine counts references per content with numpy arrays indexed by a dense content id. Ids are
assigned on first sight of a hash. Contents are identified by the low 64 bits of xxh3_128: among
even ten million distinct pages the chance of any collision is below 3e-6, and the full 128-bit
value stays in the trace and in reports.
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


class ContentTable:
    """Maps content hashes to dense ids (0, 1, 2, ...), assigning new ids on first sight.

    Lookups are batched: a sorted main array plus a small sorted delta that is merged into the
    main array when it grows, so a batch costs O(k log n) and merges are amortized.
    """

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.uint64)
        self._ids = np.empty(0, dtype=np.int64)
        self._dkeys = np.empty(0, dtype=np.uint64)
        self._dids = np.empty(0, dtype=np.int64)
        self.lo = np.empty(1024, dtype=np.uint64)
        self.hi = np.empty(1024, dtype=np.uint64)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        out = np.full(len(q), -1, dtype=np.int64)
        if len(keys):
            pos = np.searchsorted(keys, q)
            pos[pos == len(keys)] = 0
            hit = keys[pos] == q
            out[hit] = ids[pos[hit]]
        return out

    def ids(self, hash_lo: np.ndarray, hash_hi: np.ndarray) -> np.ndarray:
        """Content ids for the given hashes (int64 array, same length)."""
        if len(hash_lo) == 0:
            return np.empty(0, dtype=np.int64)
        uq, first, inv = np.unique(hash_lo, return_index=True, return_inverse=True)
        res = self._find(self._keys, self._ids, uq)
        miss = res < 0
        if miss.any() and len(self._dkeys):
            res[miss] = self._find(self._dkeys, self._dids, uq[miss])
            miss = res < 0
        m = int(miss.sum())
        if m:
            new = np.arange(self.n, self.n + m, dtype=np.int64)
            res[miss] = new
            self._grow(self.n + m)
            self.lo[self.n:self.n + m] = uq[miss]
            self.hi[self.n:self.n + m] = np.asarray(hash_hi, dtype=np.uint64)[first[miss]]
            self.n += m
            keys = np.concatenate([self._dkeys, uq[miss]])
            order = np.argsort(keys, kind="stable")
            self._dkeys = keys[order]
            self._dids = np.concatenate([self._dids, new])[order]
            if len(self._dkeys) > max(4096, len(self._keys) // 8):
                keys = np.concatenate([self._keys, self._dkeys])
                order = np.argsort(keys, kind="stable")
                self._keys = keys[order]
                self._ids = np.concatenate([self._ids, self._dids])[order]
                self._dkeys = self._dkeys[:0]
                self._dids = self._dids[:0]
        return res[inv.reshape(-1)]

    def id_of(self, hash_lo: int, hash_hi: int) -> int:
        return int(self.ids(np.array([hash_lo], dtype=np.uint64),
                            np.array([hash_hi], dtype=np.uint64))[0])

    def _grow(self, n: int) -> None:
        if n > len(self.lo):
            size = max(n, 2 * len(self.lo))
            self.lo = np.resize(self.lo, size)
            self.hi = np.resize(self.hi, size)
