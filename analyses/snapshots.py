"""Snapshot versus continuous sharing.

A dump tool or a periodic scanner sees the guest every T; the trace sees every change. This
analysis samples the replay every T and compares: the savings snapshots report against the
time-weighted savings, the lifetimes of sharing opportunities (a content held by two or more mapped
frames, from the moment it is duplicated until it is not), the share of opportunities shorter than
T, the share snapshots never see at all, and how much of one snapshot's sharing survives to the
next.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memtrace.analyses.base import Analysis, Context, Interval, Result, Table
from memtrace.analyses.state import ReplayState


class SnapshotVsContinuous(Analysis):
    name = "snapshot_vs_continuous"
    flag = "--snapshot-vs-continuous"
    help = ("what snapshots every T see against the continuous trace: opportunity lifetimes, "
            "share never seen, survival between snapshots")
    default = True
    wants_content_deltas = True

    def __init__(self, interval: Interval | int | None = None) -> None:
        self.interval = interval
        self.start = np.full(1024, -1, dtype=np.int64)   # opportunity start time per content
        self.last_t = np.zeros(1024, dtype=np.int64)
        self.acc = np.zeros(1024, dtype=np.float64)       # page-time saved so far
        self.closed: list[np.ndarray] = []                # rows: start, end, page_time, censored
        self.snap_rows: list[list[Any]] = []
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.cont_area = 0.0
        self.cont_time = 0

    def begin(self, ctx: Context) -> None:
        super().begin(ctx)
        self.grid = ctx.grid(20, self.interval)
        self.origin = ctx.trace.t_begin
        self.interval = int(self.grid.step.value)

    def _grow(self, n: int) -> None:
        if n > len(self.start):
            size = max(n, 2 * len(self.start))
            self.start = np.concatenate([self.start, np.full(size - len(self.start), -1)])
            self.last_t = np.resize(self.last_t, size)
            self.acc = np.resize(self.acc, size)

    def on_content(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
        t = self.replay.state.t
        self._grow(int(cids.max()) + 1)
        was = before >= 2
        if was.any():
            c = cids[was]
            self.acc[c] += (before[was] - 1) * (t - self.last_t[c])
            self.last_t[c] = t
        opened = ~was & (after >= 2)
        if opened.any():
            c = cids[opened]
            self.start[c] = t
            self.last_t[c] = t
            self.acc[c] = 0.0
        ended = was & (after < 2)
        if ended.any():
            c = cids[ended]
            self.closed.append(np.stack([self.start[c].astype(np.float64), np.full(len(c), t),
                                         self.acc[c], np.zeros(len(c))], axis=1))
            self.start[c] = -1

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        saved = st.mapped_frames - st.distinct_mapped - st.unknown_mapped
        self.cont_area += saved * (t1 - t0)
        self.cont_time += t1 - t0
        for s in self.grid.instants_in(t0, t1):
            self._snapshot(st, s)

    def _snapshot(self, st: ReplayState, s: int) -> None:
        ref = st.ref_mapped[:len(st.contents)]
        dup = np.flatnonzero(ref >= 2)
        sav = ref[dup] - 1
        total = int(sav.sum())
        surv_c = surv_p = None
        if self.prev is not None:
            pdup, psav = self.prev
            common, pi, ci = np.intersect1d(pdup, dup, return_indices=True)
            surv_c = round(len(common) / len(pdup), 4) if len(pdup) else None
            surv_p = (round(float(np.minimum(psav[pi], sav[ci]).sum()) / float(psav.sum()), 4)
                      if psav.sum() else None)
        self.prev = (dup, sav)
        self.snap_rows.append([s, total, len(dup), surv_c, surv_p])

    def end(self, st: ReplayState) -> None:
        t = st.t
        n = min(len(self.start), len(st.contents))
        open_ = np.flatnonzero(self.start[:n] >= 0)
        if len(open_):
            ref = st.ref_mapped[open_]
            self.acc[open_] += (ref - 1) * (t - self.last_t[open_])
            self.closed.append(np.stack([self.start[open_].astype(np.float64),
                                         np.full(len(open_), t), self.acc[open_],
                                         np.ones(len(open_))], axis=1))
        if not self.snap_rows or self.snap_rows[-1][0] < t:
            self._snapshot(st, t)

    def result(self) -> Result:
        T = self.interval or 1
        unit = self.replay.trace.clock_unit
        r = Result("snapshot_vs_continuous")
        r.summary["interval"] = T
        r.units["interval"] = unit
        snaps = [row[1] for row in self.snap_rows]
        r.summary["snapshots"] = len(snaps)
        r.summary["snapshot_mean_savings"] = round(float(np.mean(snaps)), 2) if snaps else 0
        r.summary["continuous_mean_savings"] = (round(self.cont_area / self.cont_time, 2)
                                                if self.cont_time else
                                                r.summary["snapshot_mean_savings"])
        r.units["snapshot_mean_savings"] = r.units["continuous_mean_savings"] = "pages"
        opp = np.concatenate(self.closed) if self.closed else np.zeros((0, 4))
        life = opp[:, 1] - opp[:, 0]
        nonzero = life > 0
        r.summary["opportunities"] = int(nonzero.sum())
        r.summary["opportunities_instantaneous"] = int((~nonzero).sum())
        opp, life = opp[nonzero], life[nonzero]
        if len(life):
            k = np.ceil((opp[:, 0] - self.origin) / T)
            seen = self.origin + k * T < opp[:, 1]
            short = life < T
            r.summary["share_shorter_than_interval"] = round(float(short.mean()), 4)
            r.summary["share_never_seen_by_snapshots"] = round(float((~seen).mean()), 4)
            area = opp[:, 2].sum()
            r.summary["page_time_share_never_seen"] = (round(float(opp[~seen, 2].sum() / area), 4)
                                                       if area else 0.0)
            r.summary["censored_at_trace_end"] = int(opp[:, 3].sum())
            for p in (10, 50, 90):
                r.summary[f"lifetime_p{p}"] = float(np.percentile(life, p))
                r.units[f"lifetime_p{p}"] = unit
            r.summary["lifetime_max"] = float(life.max())
            r.units["lifetime_max"] = unit
            edges = 10.0 ** np.arange(0, int(np.ceil(np.log10(life.max() + 1))) + 1)
            hist, _ = np.histogram(life, bins=np.concatenate([[0], edges]))
            r.tables["lifetimes"] = Table(
                ["lifetime_below", "opportunities"],
                [[int(e), int(h)] for e, h in zip(edges, hist, strict=True) if h],
                f"sharing-opportunity lifetimes ({unit}, decades)")
        survs = [row[4] for row in self.snap_rows if row[4] is not None]
        if survs:
            r.summary["mean_survival_to_next_snapshot"] = round(float(np.mean(survs)), 4)
        r.tables["snapshots"] = Table(
            ["t", "savings", "duplicated_contents", "survived_contents", "survived_savings"],
            self.snap_rows, "what a snapshot every interval sees (pages)")
        r.notes.append("an opportunity is a content held by >= 2 mapped frames; "
                       "instantaneous ones begin and end within one recorded change")
        return r
