"""A guest memory image rebuilt from raw WRITE records (writes-mode traces).

Used to derive page contents from stores alone and to check a writes-mode trace's PAGE records
against its WRITE records. Writes are applied in trace order with whole-array numpy operations.
"""

from __future__ import annotations

import numpy as np

from analyses.content import hash_pages
from traces.format import ADDR_MASK

_LANES = np.arange(8, dtype=np.uint64)


class MemoryImage:
    def __init__(self, nframes: int, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.nframes = nframes
        self.mem = np.zeros(nframes * page_size, dtype=np.uint8)
        self._touched = np.zeros(nframes + 1, dtype=bool)
        self._m16 = self.mem.view(np.uint16)
        self._m32 = self.mem.view(np.uint32)
        self._m64 = self.mem.view(np.uint64)
        # per 8-byte word: the size class that last wrote it in the current batch
        self._stamp = np.zeros(len(self.mem) // 8 + 1, dtype=np.uint8)

    def apply_writes(self, rec: np.ndarray) -> None:
        """Apply WRITE records (FORMAT.md kind 4) in order; remember the frames they touched."""
        if len(rec) == 0:
            return
        raw = rec["addr"]
        addr = raw & np.uint64(ADDR_MASK)
        size = raw >> np.uint64(56)
        if int(addr.max()) + 8 > len(self.mem):
            raise ValueError(f"write at {int(addr.max()):#x} is beyond the memory image")
        self._apply(addr, size, rec["value"])
        self._touched[addr >> np.uint64(12)] = True
        self._touched[(addr + size - np.uint64(1)) >> np.uint64(12)] = True

    def _apply(self, addr: np.ndarray, size: np.ndarray, value: np.ndarray) -> None:
        """Naturally aligned 1/2/4/8-byte stores go straight into typed views of the image, one
        fancy assignment per size (numpy assigns in index order, so a later store to the same
        place wins). That is only correct if no 8-byte word is written by two size classes in
        this batch; otherwise the batch is halved until it is, and the rest of the stores
        (unaligned ones) are spread into bytes."""
        cls = np.where((addr & (size - np.uint64(1))) == 0, size, np.uint64(0))
        cls = cls.astype(np.uint8)
        word = (addr >> np.uint64(3)).astype(np.int64)
        stamp = self._stamp
        stamp[word] = cls
        unaligned = cls == 0
        if unaligned.any():
            stamp[(addr[unaligned] + size[unaligned] - np.uint64(1)) >> np.uint64(3)] = 0
        if np.any(stamp[word] != cls) or (unaligned.any() and np.any(
                stamp[(addr[unaligned] + size[unaligned] - np.uint64(1)) >> np.uint64(3)] != 0)):
            if len(addr) <= 64:
                self._spread(addr, size, value)
                return
            half = len(addr) // 2
            self._apply(addr[:half], size[:half], value[:half])
            self._apply(addr[half:], size[half:], value[half:])
            return
        for width, view in ((1, self.mem), (2, self._m16), (4, self._m32), (8, self._m64)):
            sel = cls == width
            if sel.any():
                view[addr[sel] >> np.uint64(width.bit_length() - 1)] = value[sel].astype(
                    view.dtype)
        if unaligned.any():
            self._spread(addr[unaligned], size[unaligned], value[unaligned])

    def _spread(self, addr: np.ndarray, size: np.ndarray, value: np.ndarray) -> None:
        """Any stores, in order: each store's bytes laid out in an (n, 8) matrix, masked."""
        vbytes = np.ascontiguousarray(value, dtype=np.uint64).view(np.uint8).reshape(-1, 8)
        mask = _LANES < size[:, None]
        self.mem[(addr[:, None] + _LANES)[mask]] = vbytes[mask]

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
