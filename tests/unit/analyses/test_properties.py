"""Property tests: invariants of the figures, incremental counters against recomputation, and
seeking through checkpoints against replay from the start."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtrace.analyses.checkpoints import add_checkpoints
from memtrace.analyses.engine import Replay, state_digest
from memtrace.analyses.sharing import FrameCensus, full_figures
from memtrace.analyses.state import ReplayState
from memtrace.traces.format import PageCacheOp, TaskOp, VmaOp
from memtrace.traces.reader import open_trace
from tests.helpers import Builder, replay

FRAMES = 24
NO_FIXTURE_CHECK = [HealthCheck.function_scoped_fixture]
op = st.one_of(
    st.tuples(st.just("page"), st.integers(0, FRAMES - 1), st.integers(0, 5)),
    st.tuples(st.just("map"), st.integers(1, 3), st.integers(0, 6), st.integers(0, FRAMES - 1)),
    st.tuples(st.just("unmap"), st.integers(1, 3), st.integers(0, 6)),
    st.tuples(st.just("pcadd"), st.integers(0, FRAMES - 1), st.integers(1, 3)),
    st.tuples(st.just("pcdel"), st.integers(0, FRAMES - 1)),
    st.tuples(st.just("tick"), st.integers(1, 50)),
    st.tuples(st.just("exit"), st.integers(1, 3)),
)


def build(path, ops, chunk_bytes=1 << 20):
    b = Builder(path, nframes=FRAMES, chunk_bytes=chunk_bytes)
    t = 0
    b.at(t)
    for mm in (1, 2, 3):
        b.w.task(TaskOp.NEW, mm * 10, mm * 10, 1, mm=mm, name=f"p{mm}")
    for o in ops:
        if o[0] == "page":
            b.page(o[1], o[2])
        elif o[0] == "map":
            b.map(o[1], o[2], o[3])
        elif o[0] == "unmap":
            b.map(o[1], o[2], None)
        elif o[0] == "pcadd":
            b.w.pagecache(PageCacheOp.ADD, 1, o[2], o[1], o[1])
        elif o[0] == "pcdel":
            b.w.pagecache(PageCacheOp.DEL, 0, 0, 0, o[1])
        elif o[0] == "tick":
            t += o[1]
            b.at(t)
        elif o[0] == "exit":
            b.w.task(TaskOp.EXIT, o[1] * 10, o[1] * 10, 1)
    b.at(t + 1)
    b.close()


@settings(max_examples=150, deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(st.lists(op, max_size=80))
def test_figure_invariants_and_oracle(tmp_path, ops):
    path = tmp_path / "p.mtr"
    build(path, ops)
    r = replay(path, interval=7)
    fig = r["figures"]
    full = r["full"]
    for k in ("no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps", "zero_pages"):
        assert fig[k] == full[k], k
    sharing = r["results"]["sharing"].tables["series"]
    cols = sharing.columns
    oracle_pts = r["results"]["oracle"].tables["series"].rows
    for row in sharing.rows:
        s = dict(zip(cols, row, strict=True))
        assert s["no_sharing"] >= s["mmap_fork"] >= s["ksm_hint_all"] >= s["full_cbps"]
        if s["mmap_fork"]:
            assert s["full_cbps"] >= 1
        # the oracle (incremental counters) at a sample time equals full CBPS (recomputed)
        for p in oracle_pts:
            if p[0] <= s["t"] < p[1]:
                assert p[2] == s["full_cbps"]
                assert p[3] == s["mmap_fork"] and p[4] == s["ksm_hint_all"]


@settings(max_examples=60, deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(st.lists(op, min_size=10, max_size=120), st.integers(0, 400))
def test_seek_equals_replay_from_start(tmp_path, ops, t):
    path = tmp_path / "s.mtr"
    build(path, ops, chunk_bytes=64)  # many small chunks
    add_checkpoints(str(path), every=2)
    tr = open_trace(path)
    seq = Replay(tr, progress=False)
    seq._replay(tr.chunks, t)
    sought = Replay(open_trace(path), progress=False).seek(t)
    a, b = state_digest(seq.state), state_digest(sought)
    assert a == b


def test_checkpoints_are_used(tmp_path):
    ops = [("page", i % FRAMES, i % 4) for i in range(60)] + [("tick", 5)] * 30
    ops = [x for pair in zip(ops[:60], ops[60:] * 2, strict=False) for x in pair]
    path = tmp_path / "c.mtr"
    build(path, ops, chunk_bytes=64)
    n = add_checkpoints(str(path), every=3)
    tr = open_trace(path)
    assert n > 0 and len(tr.checkpoints) == n and tr.complete_index
    # sequential replay skips checkpoints and still gives the same final state
    assert full_figures(Replay(tr, progress=False).run()) == \
        full_figures(Replay(open_trace(path), progress=False).seek(10**9))


vma_op = st.tuples(st.sampled_from(["map", "unmap", "protect"]), st.integers(0, 15),
                   st.integers(1, 6), st.integers(0, 7), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(vma_op, max_size=30))
def test_vma_events_match_a_page_by_page_reference(ops):
    """MAP, UNMAP and PROTECT over a few pages give the same VMAs, page by page (flags, file
    and file offset), as a reference that keeps one entry per page."""
    state = ReplayState(4)
    ref: dict[int, tuple[int, int, int]] = {}
    for kind, first, npages, flags, named in ops:
        start, end = first << 12, (first + npages) << 12
        pages = range(first, first + npages)
        if kind == "map":
            ino = 9 if named else 0
            state.apply_vma(VmaOp.MAP, 1, start, end, flags, 3, ino, 1 if named else 0, None)
            ref.update({p: (flags, ino, 3 + (p - first) if ino else 3) for p in pages})
        elif kind == "unmap":
            state.apply_vma(VmaOp.UNMAP, 1, start, end, 0, 0, 0, 0, None)
            for p in pages:
                ref.pop(p, None)
        else:
            state.apply_vma(VmaOp.PROTECT, 1, start, end, flags, 0, 0, 0, None)
            ref.update({p: (flags, *ref[p][1:]) for p in pages if p in ref})
        sp = state.spaces[1]
        got: dict[int, tuple[int, int, int]] = {}
        for v in sp.vmas.values():
            assert v.start < v.end
            for p in range(v.start >> 12, v.end >> 12):
                assert p not in got, "VMAs overlap"
                got[p] = (v.vm_flags, v.ino, v.pgoff + (p - (v.start >> 12)) if v.ino else v.pgoff)
                assert sp.vma_at(p << 12) is v
        assert got == ref
        assert sp.vma_at(32 << 12) is None


def census_reference(content, proc_count, named, zero_cid):
    """The Table 5.2 census by whole-array numpy operations, for comparison."""
    mapped = proc_count > 0
    c, nm = content[mapped], named[mapped]
    known = c >= 0
    held, total = np.unique(c[known], return_counts=True)
    n_named = np.array([int(((c == h) & nm).sum()) for h in held], dtype=np.int64)
    n_anon = total - n_named
    out = {"no_sharing": int(proc_count[mapped].sum()), "mmap_fork": int(mapped.sum()),
           "ksm_hint_all": int(nm.sum()) + int((n_anon > 0).sum()) + int((~nm & ~known).sum()),
           "full_cbps": len(held) + int((~known).sum()), "zero_pages": int((c == zero_cid).sum()),
           "anon_frames": int((~nm).sum()), "named_frames": int(nm.sum()),
           "guest_frames": int((content >= 0).sum()),
           "guest_distinct": len(np.unique(content[content >= 0]))}
    dup = total >= 2
    for kind, sel in (("anonymous", dup & (n_named == 0)), ("named", dup & (n_anon == 0)),
                      ("mixed", dup & (n_anon > 0) & (n_named > 0))):
        out[f"shareable_{kind}_contents"] = int(sel.sum())
        out[f"shareable_{kind}_sharings"] = int((total[sel] - 1).sum())
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-1, 6), st.integers(0, 3), st.booleans()),
                         min_size=1, max_size=40), min_size=1, max_size=4))
def test_frame_census_matches_a_numpy_reference(states):
    """One census, reused over several states (its scratch rows must come back clean)."""
    census = FrameCensus()
    for frames in states:
        state = SimpleNamespace(content=np.array([f[0] for f in frames], dtype=np.int64),
                                proc_count=np.array([f[1] for f in frames], dtype=np.int64),
                                named=np.array([f[2] for f in frames], dtype=bool),
                                zero_cid=2, contents=range(7))
        assert census(state) == census_reference(state.content, state.proc_count, state.named, 2)
