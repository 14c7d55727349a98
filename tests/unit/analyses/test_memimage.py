"""Raw writes applied to a memory image match a byte-by-byte reference, order included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memtrace.analyses.memimage import MemoryImage
from memtrace.traces.format import DTYPES, Kind
from memtrace.traces.pagehash import page_hash

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


def test_write_beyond_image_is_refused_after_the_stores_before_it():
    img = MemoryImage(1)
    rec = np.zeros(3, dtype=DTYPES[Kind.WRITE])
    rec[0] = (8 | (8 << 56), 0x1122334455667788)
    rec[1] = ((4096 - 4) | (8 << 56), 1)  # its last bytes fall past the image
    rec[2] = (16 | (8 << 56), 2)
    with pytest.raises(ValueError, match="8 bytes at 0xffc is beyond the memory image"):
        img.apply_writes(rec)
    assert img.mem[8:16].tobytes() == (0x1122334455667788).to_bytes(8, "little")
    assert not img.mem[16:24].any()
    rec = np.zeros(1, dtype=DTYPES[Kind.WRITE])
    rec[0] = (0 | (9 << 56), 0)
    with pytest.raises(ValueError, match="has size 9"):
        img.apply_writes(rec)


def test_touched_frames_follow_the_page_size():
    img = MemoryImage(4, page_size=1024)
    rec = np.zeros(2, dtype=DTYPES[Kind.WRITE])
    rec[0] = (1020 | (8 << 56), -1 & (2**64 - 1))  # straddles frames 0 and 1
    rec[1] = (3 * 1024 | (1 << 56), 7)
    img.apply_writes(rec)
    assert img.take_touched().tolist() == [0, 1, 3]
