"""A guest memory image rebuilt from raw WRITE and UNSEEN records (writes-mode traces).

Used to derive page contents from stores alone and to check a writes-mode trace's PAGE records
against its WRITE and UNSEEN records. Writes are applied in trace order by one compiled loop.
"""

from __future__ import annotations

import numpy as np

from memtrace.analyses.kernels import PREFETCH_AHEAD, hot, prefetch
from memtrace.traces.format import ADDR_MASK
from memtrace.traces.pagehash import hash_pages

_ADDR_MASK = np.uint64(ADDR_MASK)


@hot
def apply_writes(addr: np.ndarray, value: np.ndarray, mem: np.ndarray, m16: np.ndarray,
                 m32: np.ndarray, m64: np.ndarray, touched: np.ndarray, page_shift: int) -> int:
    """Stores in order (``addr`` as in the WRITE record: size in bits 56-63). A naturally
    aligned store is one typed write; others go byte by byte. Marks the frames of each store's
    first and last byte. Returns the index of the first store beyond the image, or len(addr).

    Stores scattered over a large image miss the cache nearly every time; they do not stall
    the loop, but the line must still be fetched, so the store ``PREFETCH_AHEAD`` places on
    is prefetched. Scattered over 512 MiB, this loop applies 45-81 M stores per second where
    the numpy passes it replaced managed 5-8 M (README, Speed)."""
    n = len(addr)
    size_mem = np.uint64(len(mem))
    last_word = len(m64) - 1
    shift = np.uint64(page_shift)
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            w = np.int64((addr[i + PREFETCH_AHEAD] & _ADDR_MASK) >> np.uint64(3))
            prefetch(m64, min(w, last_word))
        a = addr[i] & _ADDR_MASK
        size = addr[i] >> np.uint64(56)
        if size == 0 or size > 8 or a + size > size_mem:
            return i
        v = value[i]
        if size == 8 and a & np.uint64(7) == 0:
            m64[a >> np.uint64(3)] = v
        elif size == 4 and a & np.uint64(3) == 0:
            m32[a >> np.uint64(2)] = np.uint32(v & np.uint64(0xFFFFFFFF))
        elif size == 2 and a & np.uint64(1) == 0:
            m16[a >> np.uint64(1)] = np.uint16(v & np.uint64(0xFFFF))
        else:
            for k in range(size):
                mem[a + np.uint64(k)] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(0xFF))
        touched[a >> shift] = True
        touched[(a + size - np.uint64(1)) >> shift] = True
    return n


class MemoryImage:
    def __init__(self, nframes: int, page_size: int = 4096) -> None:
        if page_size < 8 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self._page_shift = page_size.bit_length() - 1
        self.nframes = nframes
        self.mem = np.zeros(nframes * page_size, dtype=np.uint8)
        self._touched = np.zeros(nframes + 1, dtype=bool)
        self._m16 = self.mem.view(np.uint16)
        self._m32 = self.mem.view(np.uint32)
        self._m64 = self.mem.view(np.uint64)

    def apply_writes(self, rec: np.ndarray) -> None:
        """Apply WRITE or UNSEEN records (FORMAT.md kinds 4 and 12, same layout) in order;
        remember the frames they touched. Apply both kinds in trace order: UNSEEN records carry
        the stores the tracer's callbacks never saw."""
        if len(rec) == 0:
            return
        addr = np.ascontiguousarray(rec["addr"])
        i = apply_writes(addr, np.ascontiguousarray(rec["value"]), self.mem, self._m16,
                         self._m32, self._m64, self._touched, self._page_shift)
        if i < len(addr):
            a, size = int(addr[i]) & ADDR_MASK, int(addr[i]) >> 56
            raise ValueError(f"write of {size} bytes at {a:#x} is beyond the memory image"
                             if 1 <= size <= 8 else f"write at {a:#x} has size {size}")

    def take_touched(self) -> np.ndarray:
        """Frames written since the last call (sorted), and forget them."""
        frames = np.flatnonzero(self._touched[:self.nframes])
        self._touched[:] = False
        return frames

    def hashes(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return hash_pages(self.mem, frames, self.page_size)

    def load_page(self, frame: int, data: bytes) -> None:
        ps = self.page_size
        self.mem[frame * ps:(frame + 1) * ps] = np.frombuffer(data, np.uint8)
