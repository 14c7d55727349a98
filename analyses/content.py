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


_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing of the (already random) key


def one_of_each(keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Mask selecting one element per distinct value of ``keys`` (small non-negative ints that
    index ``scratch``), in O(n) without sorting: the last writer of each scratch cell wins."""
    pos = np.arange(len(keys))
    scratch[keys] = pos
    return scratch[keys] == pos


class ContentTable:
    """Maps content hashes to dense ids (0, 1, 2, ...), assigning new ids on first sight.

    An open-addressing hash table held in numpy arrays and probed for a whole batch at once
    (linear probing, load factor at most 1/4, or 1/2 for huge tables), so a batch of k lookups
    costs O(k) array work and no sorting, whatever the number of contents already known.
    """

    def __init__(self, capacity_bits: int = 12) -> None:
        self.lo = np.empty(1024, dtype=np.uint64)
        self.hi = np.empty(1024, dtype=np.uint64)
        self.n = 0
        self._alloc(capacity_bits)

    @property
    def _load(self) -> int:
        """Slots per content: 4 keeps probe chains short; 2 past 16 M slots to bound memory."""
        return 4 if self._bits < 24 else 2

    def _alloc(self, bits: int) -> None:
        self._bits = bits
        # one 16-byte slot per entry: (key, id + 1), id + 1 == 0 marking an empty slot, so that a
        # probe costs one random memory access. Slots are handled through a complex128 view:
        # numpy gathers and scatters 1-D arrays of 16-byte items much faster than 2-D rows.
        self._table = np.zeros(1 << bits, dtype=np.complex128)

    def __len__(self) -> int:
        return self.n

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _MULT) >> np.uint64(64 - self._bits)).astype(np.int64)

    @staticmethod
    def _pack(keys: np.ndarray, vals: np.ndarray) -> np.ndarray:
        out = np.empty((len(keys), 2), dtype=np.uint64)
        out[:, 0] = keys
        out[:, 1] = vals
        return out.view(np.complex128).reshape(-1)

    def _probe(self, keys: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Ids of ``keys``, inserting unknown ones (with their ``hi`` halves) as new ids."""
        n = len(keys)
        table = self._table
        res = np.empty(n, dtype=np.int64)
        slot = self._slots(keys)
        pending = np.arange(n)
        mask = (1 << self._bits) - 1
        claim = np.uint64(1 << 62)
        while len(pending) > 24:
            s = slot[pending]
            row = table[s].view(np.uint64).reshape(-1, 2)
            occupied = row[:, 1] != 0
            match = occupied & (row[:, 0] == keys[pending])
            res[pending[match]] = row[match, 1].astype(np.int64) - 1
            done = match
            if not occupied.all():
                # empty slots: each is claimed by one of the keys probing it (the last writer
                # wins); the others see the winner's key there on their next round
                e = np.flatnonzero(~occupied)
                se = s[e]
                mark = claim + e.astype(np.uint64)
                table[se] = self._pack(mark, mark)
                win = e[table[se].view(np.uint64).reshape(-1, 2)[:, 1] == mark]
                m = len(win)
                new = np.arange(self.n, self.n + m, dtype=np.int64)
                q = pending[win]
                table[s[win]] = self._pack(keys[q], (new + 1).astype(np.uint64))
                res[q] = new
                self._grow_ids(self.n + m)
                self.lo[self.n:self.n + m] = keys[q]
                self.hi[self.n:self.n + m] = hi[q]
                self.n += m
                done = done.copy()
                done[win] = True
            advance = occupied & ~match
            slot[pending[advance]] = (s[advance] + 1) & mask
            pending = pending[~done]
        if len(pending):
            # the tail of long probe chains: a few keys, cheaper one by one than another round
            words = table.view(np.uint64)
            for i in pending.tolist():
                key = int(keys[i])
                j = int(slot[i])
                while True:
                    tag = int(words[2 * j + 1])
                    if tag == 0:
                        new = self.n
                        words[2 * j] = key
                        words[2 * j + 1] = new + 1
                        self._grow_ids(new + 1)
                        self.lo[new] = key
                        self.hi[new] = hi[i]
                        self.n += 1
                        res[i] = new
                        break
                    if int(words[2 * j]) == key:
                        res[i] = tag - 1
                        break
                    j = (j + 1) & mask
        return res

    def ids(self, hash_lo: np.ndarray, hash_hi: np.ndarray) -> np.ndarray:
        """Content ids for the given hashes (int64 array, same length)."""
        lo = np.asarray(hash_lo, dtype=np.uint64)
        if len(lo) == 0:
            return np.empty(0, dtype=np.int64)
        if self._load * (self.n + len(lo)) > len(self._table):
            self._rehash(self.n + len(lo))
        return self._probe(lo, np.asarray(hash_hi, dtype=np.uint64))

    def _rehash(self, need: int) -> None:
        bits = self._bits
        while (1 << bits) < self._load * need:
            bits += 1
        n = self.n
        self._alloc(bits)
        self.n = 0
        self._probe(self.lo[:n].copy(), self.hi[:n].copy())
        assert self.n == n

    def id_of(self, hash_lo: int, hash_hi: int) -> int:
        return int(self.ids(np.array([hash_lo], dtype=np.uint64),
                            np.array([hash_hi], dtype=np.uint64))[0])

    def _grow_ids(self, n: int) -> None:
        if n > len(self.lo):
            size = max(n, 2 * len(self.lo))
            self.lo = np.resize(self.lo, size)
            self.hi = np.resize(self.hi, size)
