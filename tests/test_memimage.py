"""Raw writes applied to a memory image match a byte-by-byte reference, order included."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses.content import page_hash
from analyses.memimage import MemoryImage
from traces.format import DTYPES, Kind

writes = st.lists(st.tuples(st.integers(0, 3 * 4096 - 8), st.sampled_from([1, 2, 4, 8]),
                            st.integers(0, 2**64 - 1)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(writes)
def test_writes_match_reference(ws):
    img = MemoryImage(3)
    ref = bytearray(3 * 4096)
    rec = np.zeros(len(ws), dtype=DTYPES[Kind.WRITE])
    for i, (a, s, v) in enumerate(ws):
        rec[i] = (a | (s << 56), v)
        ref[a:a + s] = v.to_bytes(8, "little")[:s]
    img.apply_writes(rec)
    assert img.mem.tobytes() == bytes(ref)
    touched = set(img.take_touched().tolist())
    expect = {a >> 12 for a, _, _ in ws} | {(a + s - 1) >> 12 for a, s, _ in ws}
    assert touched == expect
    lo, hi = img.hashes(np.arange(3))
    for f in range(3):
        assert (int(lo[f]), int(hi[f])) == page_hash(bytes(ref[f * 4096:(f + 1) * 4096]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2 * 4096 - 8), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, 2**64 - 1), st.booleans()), max_size=400))
def test_mixed_aligned_and_conflicting_writes(ws):
    """Many stores to few words, aligned or not: order must survive the per-size fast path."""
    img = MemoryImage(2)
    ref = bytearray(2 * 4096)
    rec = np.zeros(len(ws), dtype=DTYPES[Kind.WRITE])
    for i, (a, s, v, align) in enumerate(ws):
        a = (a % 64) & ~(s - 1) if align else a % 64  # crowd them into 8 words
        rec[i] = (a | (s << 56), v)
        ref[a:a + s] = v.to_bytes(8, "little")[:s]
    img.apply_writes(rec)
    assert img.mem.tobytes() == bytes(ref)
