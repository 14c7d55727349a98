"""FORMAT.md's replay rules, read independently: a plain-Python replay written from the section
"Replaying a trace" alone (dicts and sets, no engine code) must give the engine's four figures at
every instant of the shipped samples, and the doc's time rules the engine's guest seconds."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from memtrace.analyses.engine import Replay
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.traces.format import Kind, MarkOp, PageCacheOp, TaskOp
from memtrace.traces.reader import open_trace
from tests.paths import REPO, SAMPLES

DOC = (REPO / "traces" / "FORMAT.md").read_text()


class DocReplay:
    """The rules of FORMAT.md, "Replaying a trace", as they read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.content: dict[int, tuple[int, int]] = {}      # frame -> hash (absent: unknown)
        self.named: set[int] = set()
        self.task_mm: dict[int, int] = {}                   # pid -> mm
        self.members: dict[int, set[int]] = defaultdict(set)  # mm -> pids
        self.maps: dict[int, dict[int, int]] = {}           # mm -> vpn -> frame

    def leave(self, pid: int) -> None:
        mm = self.task_mm.pop(pid, 0)
        if mm:
            self.members[mm].discard(pid)
            if not self.members[mm]:
                self.maps.pop(mm, None)   # the last task left: the space ends
                del self.members[mm]

    def apply(self, chunk, kind: int, rec: np.ndarray) -> None:
        if kind == Kind.PAGE:
            for f, lo, hi in rec.tolist():
                self.content[f] = (lo, hi)
        elif kind == Kind.MAP:
            for mm, vpn, frame, flags in rec.tolist():
                space = self.maps.setdefault(mm, {})
                if flags & 1:
                    space[vpn] = frame
                else:
                    space.pop(vpn, None)
        elif kind == Kind.PAGECACHE:
            for op, _dev, _ino, _idx, frame in rec.tolist():
                (self.named.add if op == PageCacheOp.ADD else self.named.discard)(frame)
        elif kind == Kind.TASK:
            for op, pid, _tgid, _ppid, mm, _pgd, _name, _flags in rec.tolist():
                if op in (TaskOp.NEW, TaskOp.EXISTING):
                    self.leave(pid)
                    if mm:
                        self.task_mm[pid] = mm
                        self.members[mm].add(pid)
                        self.maps.setdefault(mm, {})
                elif op == TaskOp.EXEC and pid in self.task_mm and mm != self.task_mm[pid]:
                    self.leave(pid)
                    self.task_mm[pid] = mm
                    self.members[mm].add(pid)
                    self.maps.setdefault(mm, {})
                elif op == TaskOp.EXEC and pid not in self.task_mm and mm:
                    self.task_mm[pid] = mm
                    self.members[mm].add(pid)
                elif op == TaskOp.EXIT:
                    self.leave(pid)
        elif kind == Kind.MARK:
            for op, _name, arg in rec.tolist():
                if op == MarkOp.STATE_BEGIN and arg & 1:
                    self.reset()

    def figures(self) -> tuple[int, int, int, int]:
        pairs = 0
        mapped: set[int] = set()
        for space in self.maps.values():
            frames = set(space.values())
            pairs += len(frames)
            mapped |= frames

        def distinct(frames: set[int]) -> int:
            known = {self.content[f] for f in frames if f in self.content}
            return len(known) + sum(1 for f in frames if f not in self.content)

        named = mapped & self.named
        return pairs, len(mapped), len(named) + distinct(mapped - named), distinct(mapped)


def doc_instants(path) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(instant, figures after it) for every instant of the trace."""
    tr = open_trace(path)
    rp = DocReplay()
    out: list[tuple[int, tuple[int, int, int, int]]] = []
    t: int | None = None
    for chunk in tr.iter_chunks():
        for kind, rec in chunk.blocks:
            if kind == Kind.TIME:
                for nt in rec["t"].tolist():
                    if t is not None and nt != t:
                        out.append((t, rp.figures()))
                    t = nt
                continue
            rp.apply(chunk, kind, rec)
    if t is not None:
        out.append((t, rp.figures()))
    return out


def test_doc_states_the_rules_this_test_follows():
    section = DOC[DOC.index("## Replaying a trace"):DOC.index("### Content store payload")]
    for rule in ("**Instants.**", "**Address spaces.**", "when its last task leaves",
                 "0 in an\nEXIT does not mean a kernel thread", "**The four figures**",
                 "The zero\npage is a content like any other", "counts as\na content of its own",
                 "**Time.**", "the knots' own mean\nrate", "MARK STOP ends the traced"):
        assert rule in section, rule


@pytest.mark.parametrize("name", ["default.mtr", "synthetic-zero-install.mtr"])
def test_doc_replay_gives_the_engines_figures_at_every_instant(name):
    path = SAMPLES / name
    doc = doc_instants(path)
    oracle = OracleAnalysis()
    Replay(open_trace(path), [oracle], progress=False).run()
    # the oracle's series: [t0, t1, full_cbps, mmap_fork, ksm_hint_all, no_sharing], one row per
    # stretch of equal figures; every instant but the last starts or lies inside one
    rows = oracle.series()
    starts = np.array([r[0] for r in rows])
    checked = 0
    for t, (pairs, mapped, ksm, cbps) in doc[:-1]:
        i = int(np.searchsorted(starts, t, side="right")) - 1
        r = rows[i]
        assert r[0] <= t < r[1]
        assert (r[5], r[3], r[4], r[2]) == (pairs, mapped, ksm, cbps), (t, r)
        checked += 1
    assert checked > 10
    # and the last instant: the final state
    assert oracle.final["no_sharing"] == doc[-1][1][0]
    assert oracle.final["full_cbps"] == doc[-1][1][3]


def test_doc_time_rules_give_the_engines_guest_seconds():
    """Knots: one per trace time (the largest value), linear between, hz outside."""
    tr = open_trace(SAMPLES / "default.mtr")
    knots: dict[int, int] = {}
    hz = None
    t = 0
    for chunk in tr.iter_chunks():
        for kind, rec in chunk.blocks:
            if kind == Kind.TIME:
                t = int(rec["t"][-1])
            elif kind == Kind.COUNTER:
                for name, _pad, value in rec.tolist():
                    if chunk.string(name) == "guest.clock_ns":
                        knots[t] = max(knots.get(t, 0), value)
                    elif chunk.string(name) == "tracer.clock_hz":
                        hz = value
    ts = sorted(knots)
    gs = [(knots[k] - knots[ts[0]]) / 1e9 for k in ts]
    assert hz, "the recorded sample has tracer.clock_hz"
    tb = tr.time_base()
    end = tr.t_end
    expect = gs[-1] + (end - ts[-1]) / hz - (gs[0] - (ts[0] - tr.t_begin) / hz)
    assert tb.to_seconds(end) == pytest.approx(expect, rel=1e-9)
    mid = (ts[3] + ts[4]) // 2
    lin = gs[3] + (gs[4] - gs[3]) * (mid - ts[3]) / (ts[4] - ts[3])
    assert tb.to_seconds(mid) == pytest.approx(lin - gs[0] + (ts[0] - tr.t_begin) / hz,
                                               rel=1e-9)
