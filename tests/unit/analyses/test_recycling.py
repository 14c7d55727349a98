"""Recycled content ids (issue 18): the content table against a plain model, and every analysis
(every one in the registry: a new one is tested here too) with ids recycled through tiny tables
against the same replay that never forgets a content."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memtrace.analyses.attribution import AttributionAnalysis
from memtrace.analyses.attribution.showpage import hash_hex
from memtrace.analyses.base import Analysis, Interval
from memtrace.analyses.cli import build_parser
from memtrace.analyses.engine import Replay
from memtrace.analyses.kernels import ContentTable
from memtrace.analyses.ksm import KsmAnalysis
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.analyses.registry import ANALYSES
from memtrace.analyses.snapshots import SnapshotVsContinuous
from memtrace.analyses.state import ReplayState
from memtrace.traces.reader import open_trace
from memtrace.traces.synthetic import page_updates
from tests.helpers import Builder, content
from tests.paths import SAMPLES
from tests.unit.analyses.test_properties import FRAMES, NO_FIXTURE_CHECK, build


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_content_table_forgets_and_gives_ids_again(seed: int) -> None:
    """Random hashes coming and going: a hash in the table keeps its id (also after no frame
    holds it, until it is forgotten), a forgotten one is not found and its id goes to the next
    new hash (lowest first), ids stay below the capacity."""
    rng = np.random.default_rng(seed)
    ct = ContentTable(5)  # 16 ids
    universe = rng.integers(1, 2**63, size=(60, 2), dtype=np.uint64)
    universe[0, 0] = 0  # a hash whose low half is 0 is stored under another key
    held: dict[int, int] = {}  # hash index -> id of the contents frames hold: the model
    table: dict[int, int] = {}  # ... and of those not forgotten yet
    refs = np.zeros(ct.capacity, dtype=np.int32)
    mark = np.zeros(ct.capacity, dtype=np.int32)
    for _ in range(400):
        if held and rng.random() < 0.4:  # drop a content
            del held[int(rng.choice(list(held)))]
        else:
            h = int(rng.integers(len(universe)))
            if h not in held and ct.room() < 1:
                refs[:] = 0
                refs[list(held.values())] = 1
                kept = set(held.values())
                was = {c for c in range(ct.n) if ct.lo[c] != 0 or ct.hi[c] != 0}
                heard: list[np.ndarray] = []
                k = ct.collect(refs, mark, -1, [heard.append])
                assert k == len(heard[0]) if k else not heard
                forgotten = set(heard[0].tolist()) if heard else set()
                assert not forgotten & kept
                assert forgotten <= was
                free = ct.free[:int(ct.counts[3])].tolist()
                assert free == sorted(free, reverse=True), "lowest id is given first"
                assert set(free) == set(range(ct.n)) - kept
                assert ct.live == len(held)
                table = dict(held)
                if ct.room() < 1:
                    ct.grow(2 * ct.capacity)
                    refs = np.resize(refs, ct.capacity)
                    mark = np.resize(mark, ct.capacity)
            lowest = int(ct.free[int(ct.counts[3]) - 1]) if ct.counts[3] else ct.n
            c = ct.id_of(int(universe[h, 0]), int(universe[h, 1]))
            if h in table:  # held, or dropped but not forgotten yet: the same id
                assert c == table[h]
            else:
                assert c == lowest and c not in table.values()
                table[h] = c
            held[h] = c
            assert 0 <= c < ct.capacity
            assert (int(ct.lo[c]), int(ct.hi[c])) == (int(universe[h, 0]), int(universe[h, 1]))
        # every held hash is found under its id
        for h, c in held.items():
            found = ct.ids(universe[h:h + 1, 0], universe[h:h + 1, 1])[0]
            assert found == c


def results_json(analyses: list) -> str:
    return json.dumps([dataclasses.asdict(a.result()) for a in analyses], default=str,
                      sort_keys=True)


def every_analysis() -> list[Analysis]:
    """Every registered analysis that lets ids be recycled (all but KSM's), as trace-analyze
    builds it without options (the attribution lists its top 10 contents: hashes of the
    peak's ids), and the snapshot analysis's frame view."""
    args = build_parser().parse_args([])
    return [c.from_args(args) for c in ANALYSES if not c.holds_content_ids] + \
        [SnapshotVsContinuous(view="frame")]


def replay(path, recycle: bool = True, interval: int | None = None,
           analyses: list[Analysis] | None = None) -> tuple[str, ReplayState]:
    """Results (as JSON) and state of a replay with ``analyses`` (default: every one)."""
    an = every_analysis() if analyses is None else analyses
    rp = Replay(open_trace(path), an, progress=False,
                interval=Interval(interval) if interval else None)
    rp.state.recycle = recycle
    st_ = rp.run()
    return results_json(an), st_


page_op = st.tuples(st.just("page"), st.integers(0, FRAMES - 1), st.integers(0, 400))
ops = st.lists(st.one_of(*[page_op] * 6, *[
    st.tuples(st.just("map"), st.integers(1, 3), st.integers(0, 6), st.integers(0, FRAMES - 1)),
    st.tuples(st.just("unmap"), st.integers(1, 3), st.integers(0, 6)),
    st.tuples(st.just("pcadd"), st.integers(0, FRAMES - 1), st.integers(1, 3)),
    st.tuples(st.just("tick"), st.integers(1, 9)),
    st.tuples(st.just("exit"), st.integers(1, 3)),
]), min_size=150, max_size=500)


@settings(max_examples=80, deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(ops)
def test_recycled_ids_change_no_result(tmp_path, monkeypatch, ops_):
    """Contents come and go through 24 frames (hundreds of them, some coming back); with a
    content table of 8 ids to start with, ids are given again all the time. Every analysis's
    result is what it is when no content is forgotten."""
    path = tmp_path / "r.mtr"
    build(path, ops_, chunk_bytes=256)
    monkeypatch.setattr(ReplayState, "content_bits", 4)
    recycled, st_on = replay(path, recycle=True, interval=5)
    kept, st_off = replay(path, recycle=False, interval=5)
    assert st_off.forgotten == 0
    assert recycled == kept


def test_tiny_tables_forget_on_the_sample_and_stay_bounded(monkeypatch, say):
    """The recorded sample through a content table that starts at 2,048 ids: contents are
    forgotten and the ids in use stay within a small multiple of what the frames hold."""
    monkeypatch.setattr(ReplayState, "content_bits", 12)
    _, st_ = replay(SAMPLES / "default.mtr")
    assert st_.forgotten > 100_000
    held = len(np.unique(st_.content[st_.content >= 0]))
    assert st_.contents.n <= 4 * st_.nframes
    say(f"default.mtr: {st_.forgotten:,} contents forgotten, {st_.contents.n:,} ids for "
        f"{held:,} contents held at the end")


def test_ksm_turns_recycling_off(tmp_path, monkeypatch):
    """KSM keeps content ids of its own: with it in the replay no content is forgotten, even
    through a table that must grow for every new content."""
    path = tmp_path / "u.mtr"
    page_updates(path, 20_000, per_epoch=500, nframes=1024, seed=3)
    monkeypatch.setattr(ReplayState, "content_bits", 6)
    rp = Replay(open_trace(path), [KsmAnalysis(), OracleAnalysis()], progress=False)
    st_ = rp.run()
    assert not st_.recycle and st_.forgotten == 0
    distinct = len({(int(a), int(b)) for a, b in zip(st_.contents.lo[:st_.contents.n],
                                                       st_.contents.hi[:st_.contents.n],
                                                       strict=True)})
    assert distinct == st_.contents.n > 20_000 // 4  # one id per content ever seen


def _forget_and_reuse(b, t: int, token: int = 50, first: int | None = None) -> None:
    """At ``t``: content ``token`` into frames 3 and 4, mapped at virtual pages 2 and 3 of mm
    1, then 150 new contents into unmapped frames: the content table (8 ids to start with, a
    few dozen by then) must forget what no frame holds, and content ``token`` gets the lowest
    id it frees (unless content ``first``, written into frame 5 before, takes it)."""
    b.at(t)
    if first is not None:
        b.page(5, first)
    b.page(3, token).page(4, token)
    for f in range(100, 250):
        b.page(f, 100 + f)
    b.map(1, 2, 3).map(1, 3, 4)


@pytest.mark.parametrize("token,first,survived", [(50, None, 0.0), (1, None, 1.0), (1, 60, 1.0)])
def test_snapshot_survival_follows_contents_not_ids(tmp_path, monkeypatch, token, first,
                                                    survived):
    """Content 1 is duplicated at the snapshot of t=0 and gone at t=5; at t=6 content
    ``token`` is duplicated, under the id content 1 had unless content ``first`` took it.
    Content 50 is not content 1 (nothing survived to the snapshot of t=10); content 1 itself,
    back under its old id or another one, did survive."""
    b = Builder(tmp_path / "s.mtr").at(0)
    b.page(1, 1).page(2, 1).map(1, 0, 1).map(1, 1, 2)
    b.at(5).page(1, 2).page(2, 3)
    _forget_and_reuse(b, 6, token, first)
    b.at(20).close()
    monkeypatch.setattr(ReplayState, "content_bits", 4)
    for recycle in (True, False):
        snap = SnapshotVsContinuous(interval=10)
        rp = Replay(open_trace(tmp_path / "s.mtr"), [snap], progress=False)
        rp.state.recycle = recycle
        st_ = rp.run()
        rows = {row[0]: row for row in snap.result().tables["snapshots"].rows}
        assert rows[0][3] == 1 and rows[10][3] == 1  # one duplicated content each
        assert rows[10][4] == survived
        if recycle:  # the case this test is about did happen: content 1's id was given again
            assert st_.forgotten
            assert st_.contents.id_of(*content(first if first else token)) == 1
            assert first is None or st_.contents.id_of(*content(token)) != 1


def test_the_peak_keeps_the_hashes_of_its_ids(tmp_path, monkeypatch):
    """The attribution's peak (t=0: content 1 twice, five others) is reported at the end,
    after the id of content 1 went to content 50: --top names content 1."""
    b = Builder(tmp_path / "a.mtr").at(0)
    b.page(1, 1).page(2, 1).map(1, 0, 1).map(1, 1, 2)
    for i, f in enumerate(range(40, 45)):
        b.page(f, 200 + i).map(1, 10 + i, f)
    b.at(10)
    for v in (0, 1, *range(10, 15)):
        b.map(1, v, None)
    b.page(1, 2).page(2, 3)
    _forget_and_reuse(b, 11)
    b.at(30).close()
    monkeypatch.setattr(ReplayState, "content_bits", 4)
    att = AttributionAnalysis(top=1, interval=10)
    st_ = Replay(open_trace(tmp_path / "a.mtr"), [att], progress=False).run()
    assert st_.forgotten and st_.contents.id_of(*content(50)) == 1
    top = att.result().tables["top"].rows
    lo, hi = content(1)
    assert [row[1:3] for row in top] == [[hash_hex(lo, hi), 2]]


def test_a_content_emptied_in_this_instant_is_not_forgotten_in_it(tmp_path, monkeypatch):
    """Content 1 (duplicated since t=1) leaves its frames at t=5, and later in the same
    instant the content table runs out of ids. Its change is not reported yet (that happens at
    the instant's end), so its id must not go to content 50, duplicated in that instant too:
    the two opportunities stay apart, as without recycling."""
    b = Builder(tmp_path / "i.mtr").at(0).page(60, 7).map(2, 0, 60)
    b.at(1).page(1, 1).page(2, 1).map(1, 0, 1).map(1, 1, 2)
    b.at(5).page(1, 2).page(2, 3)
    b.map(2, 1, 61)  # another block in the same instant
    b.page(3, 50).page(4, 50)
    for f in range(100, 250):
        b.page(f, 100 + f)
    b.map(1, 2, 3).map(1, 3, 4)
    b.at(20).close()
    monkeypatch.setattr(ReplayState, "content_bits", 4)
    got = {}
    for recycle in (True, False):
        got[recycle], st_ = replay(tmp_path / "i.mtr", recycle, interval=10)
        if recycle:  # the table did run out in that instant, and nothing was forgotten
            assert st_.contents.capacity >= 150 and not st_.forgotten
    assert got[True] == got[False]
    opp = SnapshotVsContinuous(interval=10)
    Replay(open_trace(tmp_path / "i.mtr"), [opp], progress=False).run()
    assert opp.result().summary["opportunities"] == 2
