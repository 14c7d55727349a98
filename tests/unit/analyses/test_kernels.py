"""The compiled replay loops (analyses/kernels.py) against plain Python models.

The hash tables (linear probing with backward-shift deletion) against a dict, including tiny
tables where chains wrap around the end; the mapping updates of ReplayState against a dict per
address space; the content-change log against the reference counts it summarizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from memtrace.analyses.kernels import Table, table_delete, table_find
from memtrace.analyses.state import ReplayState
from memtrace.traces.format import DTYPES, MAP_PRESENT, Kind


def _delete(t: Table, key: int) -> None:
    s = table_find(t.keys, np.uint64(key), t.shift)
    assert s >= 0
    table_delete(t.keys, t.vals, s, t.shift)


@pytest.mark.parametrize("bits,nkeys,seed", [(4, 7, 1), (4, 8, 2), (6, 30, 3), (12, 1500, 4)])
def test_table_matches_dict(bits: int, nkeys: int, seed: int) -> None:
    """Random inserts, updates and deletes; a small table makes long chains that wrap."""
    rng = np.random.default_rng(seed)
    t = Table(bits)
    ref: dict[int, int] = {}
    universe = rng.integers(1, 2**63, size=3 * nkeys, dtype=np.uint64).tolist()
    for step in range(20 * nkeys):
        key = universe[int(rng.integers(len(universe)))]
        if key in ref and rng.random() < 0.5:
            _delete(t, key)
            del ref[key]
        elif key in ref or len(ref) < nkeys:
            ref[key] = step
            t.put(key, step)
        got = t.lookup(np.array(universe, dtype=np.uint64), missing=-1).tolist()
        assert got == [ref.get(k, -1) for k in universe]
    assert int(np.count_nonzero(t.keys)) == len(ref)


def test_table_grows_and_keeps_entries() -> None:
    t = Table(4)
    keys = np.arange(1, 200, dtype=np.uint64) << np.uint64(40)  # only high bits differ
    used = 0
    for k in keys.tolist():
        t.reserve(used, 1)
        t.put(k, k >> 40)
        used += 1
    assert len(t.keys) >= 2 * len(keys)
    assert t.lookup(keys).tolist() == (keys >> np.uint64(40)).astype(np.int64).tolist()
    assert t.select(0)[0].size == 0  # keys carry "mmid" 1..199, none is 0


def _maps(mm: list[int], vpn: list[int], frame: list[int], present: list[bool]) -> np.ndarray:
    rec = np.zeros(len(mm), dtype=DTYPES[Kind.MAP])
    rec["mm"], rec["vpn"], rec["frame"] = mm, vpn, frame
    rec["flags"] = [MAP_PRESENT if p else 0 for p in present]
    return rec


@pytest.mark.parametrize("seed", range(6))
def test_mappings_match_dicts(seed: int) -> None:
    """Blocks of random MAP records (repeats within a block included), then an address space
    released: the state's mappings, proc_count and counters against dicts."""
    rng = np.random.default_rng(seed)
    st = ReplayState(64)
    ref: dict[int, dict[int, int]] = {}
    mms = [0x1000, 0x2000, 0x3000]
    for _block in range(30):
        n = int(rng.integers(1, 40))
        mm = [mms[i] for i in rng.integers(0, 3, n)]
        vpn = rng.integers(0, 12, n).tolist()
        frame = rng.integers(0, 80, n).tolist()  # beyond the 64 frames allocated: grows
        present = (rng.random(n) < 0.7).tolist()
        st.apply_maps(_maps(mm, vpn, frame, present))
        for m, v, f, p in zip(mm, vpn, frame, present, strict=True):
            if p:
                ref.setdefault(m, {})[v] = f
            else:
                ref.get(m, {}).pop(v, None)
        if _block == 20:
            st.release_space(0x2000)
            ref.pop(0x2000, None)
            mms[1] = 0x4000
        if _block == 25:  # an mm value comes back after its space was released: a new space
            st.release_space(0x4000)
            ref.pop(0x4000, None)
            mms[1] = 0x2000
        _check(st, ref)


def _check(st: ReplayState, ref: dict[int, dict[int, int]]) -> None:
    every = st.mappings()  # all spaces in one pass: the same as each space's own
    assert {mm: dict(zip(v.tolist(), f.tolist(), strict=True)) for mm, (v, f) in every.items()} \
        == {mm: pages for mm, pages in ref.items() if pages}
    for mm, pages in ref.items():
        sp = st.spaces[mm]
        assert sp.pages == pages
        assert sp.npages == len(pages)
        vpn, frame = sp.mapping()
        assert vpn.tolist() == sorted(pages)
        q = np.array(sorted(pages) + [99], dtype=np.int64)
        assert sp.lookup(q).tolist() == [pages[v] for v in sorted(pages)] + [-1]
        f, refs = sp.frames()
        assert dict(zip(f.tolist(), refs.tolist(), strict=True)) == \
            {x: list(pages.values()).count(x) for x in set(pages.values())}
        frozen = sp.freeze()
        assert frozen.pages == pages and frozen.lookup(q).tolist() == sp.lookup(q).tolist()
    count = np.zeros(st.nframes, dtype=np.int64)
    for pages in ref.values():
        for f in set(pages.values()):
            count[f] += 1
    assert st.proc_count.tolist() == count.tolist()
    assert st.pairs == int(count.sum())
    assert st.mapped_frames == int(np.count_nonzero(count))
    assert st.vpages == sum(len(p) for p in ref.values())


def test_content_log_reports_mapped_reference_changes() -> None:
    """The listeners get, per content, its mapped reference count before and after an instant:
    once, when the instant ends, however many blocks changed it."""
    st = ReplayState(16)
    seen: list[tuple[list[int], list[int], list[int]]] = []
    st.listeners.append(lambda c, b, a: seen.append((c.tolist(), b.tolist(), a.tolist())))
    lo = np.array([11, 11, 12, 13], dtype=np.uint64)
    st.apply_pages(np.arange(4), lo, lo)
    st.end_instant()
    assert seen == []  # nothing mapped yet
    st.apply_maps(_maps([1, 1, 2], [0, 1, 0], [0, 1, 2], [True, True, True]))
    assert seen == []  # the instant is not over
    st.end_instant()
    ids = st.contents.ids(lo, lo).tolist()
    got = {c: (b, a) for c, b, a in zip(*seen[-1], strict=True)}
    assert got == {ids[0]: (0, 2), ids[2]: (0, 1)}
    # frame 1 changes to 12 then back to 11 within one block: no net change, no report
    n = len(seen)
    st.apply_pages(np.array([1, 1]), np.array([12, 11], dtype=np.uint64),
                   np.array([12, 11], dtype=np.uint64))
    st.end_instant()
    assert len(seen) == n
    # the same across blocks of one instant: 12 in one block, 11 again in the next
    st.apply_pages(np.array([1]), np.array([12], dtype=np.uint64), np.array([12], dtype=np.uint64))
    st.apply_pages(np.array([1]), np.array([11], dtype=np.uint64), np.array([11], dtype=np.uint64))
    st.end_instant()
    assert len(seen) == n
    before = st.ref_mapped.copy()
    st.release_space(1)
    st.end_instant()
    got = {c: (b, a) for c, b, a in zip(*seen[-1], strict=True)}
    assert got == {ids[0]: (2, 0)}
    assert int(before[ids[0]]) == 2 and int(st.ref_mapped[ids[0]]) == 0


def test_content_log_keeps_its_entries_when_it_grows() -> None:
    """An instant whose blocks change more contents than the log has room for: the log grows in
    the middle of the instant, and the contents logged before that are still reported (1,200
    contents, each mapped once, reported 0 -> 1)."""
    n = 1200
    st = ReplayState(n)
    seen: list[dict[int, tuple[int, int]]] = []
    st.listeners.append(lambda c, b, a: seen.append(
        dict(zip(c.tolist(), zip(b.tolist(), a.tolist(), strict=True), strict=True))))
    lo = np.arange(100, 100 + n, dtype=np.uint64)
    for i in range(0, n, 100):  # small blocks: a small log
        st.apply_pages(np.arange(i, i + 100), lo[i:i + 100], lo[i:i + 100])
    st.end_instant()
    size = len(st._ilog[0])
    for i in range(0, n, 300):
        st.apply_maps(_maps([1] * 300, list(range(i, i + 300)), list(range(i, i + 300)),
                            [True] * 300))
    assert len(st._ilog[0]) > size  # the log grew inside this instant
    st.end_instant()
    ids = st.contents.ids(lo, lo).tolist()
    assert seen == [{c: (0, 1) for c in ids}]
