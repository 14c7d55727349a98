"""ReplayState's Python-side rules (analyses/state.py) with known answers: the heap a BRK
moves, and the table of all mappings kept until the next change."""

from __future__ import annotations

import numpy as np

from memtrace.analyses.state import ReplayState, Vma
from memtrace.traces.format import DTYPES, MAP_PRESENT, Kind, VmaOp


def brk(st: ReplayState, start: int, end: int) -> None:
    st.apply_vma(VmaOp.BRK, 7, start, end, 0, 0, 0, 0, None)


def test_brk_moves_the_heap_and_an_empty_one_is_gone():
    """BRK gives the heap [start, end) (read-write when the record has no flags); a later BRK
    replaces it, and one with end == start (the break back at the heap's start) leaves none."""
    st = ReplayState(16)
    st.apply_vma(VmaOp.MAP, 7, 0x400000, 0x401000, 0x5, 0, 9, 1, "/bin/x")
    brk(st, 0x1000000, 0x1004000)
    heap = Vma(0x1000000, 0x1004000, 0x3, 0, 0, 0, "[heap]", heap=True)
    assert list(st.spaces[7].vmas.values())[1:] == [heap]
    brk(st, 0x1000000, 0x1002000)
    assert st.spaces[7].vmas[0x1000000].end == 0x1002000
    brk(st, 0x1000000, 0x1000000)
    assert list(st.spaces[7].vmas) == [0x400000]
    assert st.spaces[7].vma_at(0x1000000) is None


def test_all_mappings_are_kept_until_the_next_change():
    st = ReplayState(16)
    rec = np.zeros(2, dtype=DTYPES[Kind.MAP])
    rec["mm"], rec["vpn"], rec["frame"], rec["flags"] = 7, [3, 4], [1, 2], MAP_PRESENT
    st.apply_maps(rec)
    first = st.mappings()
    assert st.mappings() is first  # no change: the same table, not computed again
    assert {mm: (v.tolist(), f.tolist()) for mm, (v, f) in first.items()} == {7: ([3, 4], [1, 2])}
    rec["vpn"], rec["frame"] = [5, 3], [1, 0]
    rec["flags"] = [MAP_PRESENT, 0]  # vpn 3 unmapped
    st.apply_maps(rec)
    assert {mm: (v.tolist(), f.tolist()) for mm, (v, f) in st.mappings().items()} == \
        {7: ([4, 5], [2, 1])}
