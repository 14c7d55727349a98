"""The content identity of the trace format: xxh3_128 (seed 0) of a whole page (FORMAT.md).

Producers (the tracer's Python side, trace-snapshot, the synthetic generator) and analyses
ask this module for it, so there is one definition of what "the same content" means. Analyses
identify contents by the low 64 bits (``hash_lo``): among even ten million distinct pages the
chance of any collision is below 3e-6, and the full 128-bit value stays in the trace and in
reports.
"""

from __future__ import annotations

import numpy as np
import xxhash

PAGE_SIZE = 4096


def page_hash(data: bytes | memoryview) -> tuple[int, int]:
    """(hash_lo, hash_hi) of one page: xxh3_128 with seed 0, as in FORMAT.md."""
    v = xxhash.xxh3_128_intdigest(data)
    return v & 0xFFFFFFFFFFFFFFFF, v >> 64


#: the hash of a page of zeros (the zero page, and every frame never written)
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
