"""A guest memory image rebuilt from raw WRITE records (writes-mode traces).

Used to check a trace against the guest's real RAM (``trace-record --verify``) and to derive page
contents from stores alone. Writes are applied in trace order with whole-array numpy operations:
each write's bytes are spread over an (n, 8) matrix and selected with a mask, which keeps record
order (a later write to the same byte wins) without a Python loop.
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

    def apply_writes(self, rec: np.ndarray) -> None:
        """Apply WRITE records (FORMAT.md kind 4) in order; remember the frames they touched."""
        if len(rec) == 0:
            return
        raw = rec["addr"]
        addr = raw & np.uint64(ADDR_MASK)
        size = raw >> np.uint64(56)
        if int(addr.max()) + 8 > len(self.mem):
            raise ValueError(f"write at {int(addr.max()):#x} is beyond the memory image")
        # the value field's bytes, without copying: records are 16 bytes, value at offset 8
        vbytes = np.ascontiguousarray(rec).view(np.uint8).reshape(-1, 16)[:, 8:]
        mask = _LANES < size[:, None]
        self.mem[(addr[:, None] + _LANES)[mask]] = vbytes[mask]
        self._touched[addr >> np.uint64(12)] = True
        self._touched[(addr + size - np.uint64(1)) >> np.uint64(12)] = True

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
