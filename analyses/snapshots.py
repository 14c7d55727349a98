"""Snapshot versus continuous sharing: what a dump tool or a periodic scanner sees every T,
against every change the trace records. The definitions, with units and edge rules, are in
``analyses/SNAPSHOTS.md``; this module follows it section by section.

Time is the report's time base (``Context.time``): guest seconds when the trace carries the
guest clock, its clock units otherwise. The state is looked at only between instants (the
engine's contract), so an opportunity never opens and closes inside one instant.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from memtrace.analyses.base import Analysis, Context, Interval, Plot, Result, Table, UsageError
from memtrace.analyses.history import Rows
from memtrace.analyses.kernels import content_keys
from memtrace.analyses.state import ReplayState

VIEWS = ("content", "frame")
#: grid phases the snapshot mean is averaged over (SNAPSHOTS.md, "Snapshot mean")
PHASES = 16
#: intervals of the missed-page-time curve, as fractions of the trace's span
CURVE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def kaplan_meier(life: np.ndarray, censored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of P(lifetime > x) from right-censored lifetimes: the distinct
    ended lifetimes x and the survival just after each."""
    order = np.argsort(life, kind="stable")
    life, censored = life[order], censored[order]
    ended = ~censored
    xs = np.unique(life[ended])
    if not len(xs):
        return xs, xs.astype(np.float64)
    at_risk = len(life) - np.searchsorted(life, xs, side="left")
    deaths = np.searchsorted(life[ended], xs, side="right") - np.searchsorted(
        life[ended], xs, side="left")
    return xs, np.cumprod(1.0 - deaths / at_risk)


def km_quantile(xs: np.ndarray, surv: np.ndarray, q: float) -> float | None:
    """The smallest lifetime x with P(lifetime <= x) >= q, or None if the estimate never
    gets there (too much censoring)."""
    hit = np.flatnonzero(1.0 - surv >= q - 1e-12)
    return float(xs[hit[0]]) if len(hit) else None


class SnapshotVsContinuous(Analysis):
    name = "snapshot_vs_continuous"
    flag = "--snapshot-vs-continuous"
    help = ("what snapshots every T see against the continuous trace: opportunity lifetimes "
            "(censoring flagged), page-time snapshots miss as T grows, survival between "
            "snapshots")
    default = True
    wants_content_deltas = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("snapshot vs continuous (--snapshot-vs-continuous)")
        g.add_argument("--snapshot-view", choices=VIEWS, default="content",
                       help="an opportunity is a content held by >= 2 mapped frames (content, "
                            "the default) or a mapped frame holding such a content (frame)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SnapshotVsContinuous:
        return cls(view=getattr(args, "snapshot_view", "content"))

    def __init__(self, interval: Interval | int | None = None, view: str = "content") -> None:
        if view not in VIEWS:
            raise UsageError(f"--snapshot-view {view}: choose content or frame")
        self.interval = interval
        self.view = view
        # per-content opportunity state (view content), indexed by content id
        self.start = np.full(1024, -1, dtype=np.int64)
        self.last_t = np.zeros(1024, dtype=np.int64)
        self.acc = np.zeros(1024, dtype=np.float64)   # page-time saved so far
        # per-frame opportunity state (view frame): the content a frame shares, or -1
        self.f_cid = np.zeros(0, dtype=np.int64)
        self.f_start = np.zeros(0, dtype=np.int64)
        self.f_acc = np.zeros(0, dtype=np.float64)
        self.closed = Rows(5, np.float64)  # rows: start t, end t, page-time, left, right
        self.snap_rows: list[list[Any]] = []
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.timeline = Rows(3)  # (t0, t1, saved) per instant
        self.first_t: int | None = None

    def begin(self, ctx: Context) -> None:
        super().begin(ctx)
        self.tb = ctx.time
        self.grid = ctx.grid(20, self.interval)
        self.T = float(self.grid.step.value)

    # -- opportunities, per content ---------------------------------------------------------------
    def _grow(self, n: int) -> None:
        if n > len(self.start):
            size = max(n, 2 * len(self.start))
            self.start = np.concatenate([self.start, np.full(size - len(self.start), -1)])
            self.last_t = np.resize(self.last_t, size)
            self.acc = np.resize(self.acc, size)

    def on_content(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
        t = self.ctx.state.t
        if self.first_t is None:
            self.first_t = t
        if self.view != "content":
            return
        self._grow(int(cids.max()) + 1)
        was = before >= 2
        if was.any():
            c = cids[was]
            self.acc[c] += (before[was] - 1) * self.tb.span(self.last_t[c], t)
            self.last_t[c] = t
        opened = ~was & (after >= 2)
        if opened.any():
            c = cids[opened]
            self.start[c] = t
            self.last_t[c] = t
            self.acc[c] = 0.0
        ended = was & (after < 2)
        if ended.any():
            self._close(cids[ended], t, right=False)

    def _close(self, c: np.ndarray, t: int, right: bool) -> None:
        starts = self.start[c]
        self.closed.extend(np.stack([starts.astype(np.float64), np.full(len(c), float(t)),
                                     self.acc[c], (starts == self.first_t).astype(np.float64),
                                     np.full(len(c), float(right))], axis=1))
        self.start[c] = -1

    # Content ids are recycled (see analyses/base.py): an id is forgotten only once no frame
    # holds its content and the instant that emptied it was reported, so no opportunity is open
    # under it (start is -1) and no frame's f_cid names it (a frame loses its content, or stops
    # being mapped, only in an instant that reports it, and _frames has seen that instant
    # since). Snapshots compare contents by key, not by id (_snapshot).

    # -- opportunities, per frame -----------------------------------------------------------------
    def _frames(self, st: ReplayState, t0: int, t1: int) -> None:
        n = st.nframes
        if len(self.f_cid) < n:
            grow = n - len(self.f_cid)
            self.f_cid = np.concatenate([self.f_cid, np.full(grow, -1, dtype=np.int64)])
            self.f_start = np.concatenate([self.f_start, np.zeros(grow, dtype=np.int64)])
            self.f_acc = np.concatenate([self.f_acc, np.zeros(grow)])
        content = st.content[:n]
        k = np.where(content >= 0, st.ref_mapped[np.maximum(content, 0)], 0)
        cur = np.where((st.proc_count[:n] > 0) & (k >= 2), content, -1)
        prev = self.f_cid[:n]
        changed = cur != prev
        ending = np.flatnonzero(changed & (prev >= 0))
        if len(ending):
            starts = self.f_start[ending]
            self.closed.extend(np.stack([
                starts.astype(np.float64), np.full(len(ending), float(t0)), self.f_acc[ending],
                (starts == self.first_t).astype(np.float64), np.zeros(len(ending))], axis=1))
        opening = np.flatnonzero(changed & (cur >= 0))
        self.f_start[opening] = t0
        self.f_acc[opening] = 0.0
        self.f_cid[:n] = cur
        live = cur >= 0
        if live.any():
            share = (k[live] - 1) / k[live]  # each copy's share of what its content saves
            self.f_acc[:n][live] += share * float(self.tb.span(t0, t1))

    # -- instants ---------------------------------------------------------------------------------
    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        if self.first_t is None:
            self.first_t = t0
        saved = st.mapped_frames - st.distinct_mapped - st.unknown_mapped
        self.timeline.append((t0, t1, saved))
        if self.view == "frame":
            self._frames(st, t0, t1)
        for s in self.grid.instants_in(t0, t1):
            self._snapshot(st, s)

    def _snapshot(self, st: ReplayState, s: int) -> None:
        ref = st.ref_mapped[:len(st.contents)]
        dup = np.flatnonzero(ref >= 2)
        sav = ref[dup] - 1
        total = int(sav.sum())
        # a content survives if it is duplicated at both snapshots, also if it went away and
        # came back in between: matched by key, since it may then have another id, and its
        # old id another content
        keys = content_keys(st.contents.lo[dup])
        surv_c = surv_p = None
        if self.prev is not None:
            pkeys, psav = self.prev
            common, pi, ci = np.intersect1d(pkeys, keys, return_indices=True)
            surv_c = round(len(common) / len(pkeys), 4) if len(pkeys) else None
            surv_p = (round(float(np.minimum(psav[pi], sav[ci]).sum()) / float(psav.sum()), 4)
                      if psav.sum() else None)
        self.prev = (keys, sav)
        x = float(self.tb.x(s))
        self.snap_rows.append([s, round(x, 6), total, len(dup), surv_c, surv_p])

    def end(self, st: ReplayState) -> None:
        t = st.t
        self.t_end = t
        if self.view == "content":
            n = min(len(self.start), len(st.contents))
            open_ = np.flatnonzero(self.start[:n] >= 0)
            if len(open_):
                ref = st.ref_mapped[open_]
                self.acc[open_] += (ref - 1) * self.tb.span(self.last_t[open_], t)
                self._close(open_, t, right=True)
        else:
            live = np.flatnonzero(self.f_cid >= 0)
            if len(live):
                starts = self.f_start[live]
                self.closed.extend(np.stack([
                    starts.astype(np.float64), np.full(len(live), float(t)), self.f_acc[live],
                    (starts == self.first_t).astype(np.float64), np.ones(len(live))], axis=1))

    # -- report -----------------------------------------------------------------------------------
    def _x(self, t: np.ndarray) -> np.ndarray:
        return np.asarray(self.tb.x(np.asarray(t, dtype=np.float64)), dtype=np.float64)

    def _phase_means(self, span: float) -> list[float]:
        """The snapshot mean savings of a grid every T started at each of PHASES offsets."""
        if not len(self.timeline) or span <= 0:
            return []
        tl = self.timeline.array().astype(np.float64)
        x0 = self._x(tl[:, 0])
        saved = tl[:, 2]
        means = []
        for j in range(PHASES):
            pts = np.arange(j * self.T / PHASES, span, self.T)
            if not len(pts):
                continue
            i = np.clip(np.searchsorted(x0, pts, side="right") - 1, 0, len(saved) - 1)
            means.append(float(saved[i].mean()))
        return means

    def result(self) -> Result:
        tb = self.tb
        unit = "s" if tb.seconds else tb.unit
        T = self.T
        r = Result("snapshot_vs_continuous")
        r.summary["view"] = self.view
        r.summary["time_base"] = tb.describe()
        r.summary["interval"] = T if tb.seconds else int(T)
        r.units["interval"] = unit
        snaps = [row[2] for row in self.snap_rows]
        r.summary["snapshots"] = len(snaps)
        r.summary["snapshot_mean_savings"] = round(float(np.mean(snaps)), 2) if snaps else 0
        r.units["snapshot_mean_savings"] = "pages, the grid from the trace's first instant"
        tl = self.timeline.array().astype(np.float64)
        weights = (np.asarray(tb.span(tl[:, 0], tl[:, 1]), dtype=np.float64)
                   if len(tl) else np.zeros(0))
        total_time = float(weights.sum())
        cont = float((weights * tl[:, 2]).sum() / total_time) if total_time else (
            float(snaps[0]) if snaps else 0.0)
        r.summary["continuous_mean_savings"] = round(cont, 2)
        r.units["continuous_mean_savings"] = f"pages, weighted by {tb.axis}"
        span = float(tb.x(self.t_end)) if hasattr(self, "t_end") else 0.0
        means = self._phase_means(span)
        if means:
            r.summary["snapshot_mean_over_phases"] = round(float(np.mean(means)), 2)
            r.summary["snapshot_mean_phase_min"] = round(min(means), 2)
            r.summary["snapshot_mean_phase_max"] = round(max(means), 2)
            for k in ("snapshot_mean_over_phases", "snapshot_mean_phase_min",
                      "snapshot_mean_phase_max"):
                r.units[k] = f"pages, {PHASES} grid phases"
        steps = np.diff(self._x(tl[:, 0])) if len(tl) > 1 else np.zeros(0)
        if len(steps):
            r.summary["resolution"] = round(float(np.median(steps)), 6)
            r.units["resolution"] = (f"{unit}: median spacing of the trace's instants; a "
                                     "lifetime is known to within it")
        self._lifetimes(r, unit, span)
        survs = [row[5] for row in self.snap_rows if row[5] is not None]
        if survs:
            r.summary["mean_survival_to_next_snapshot"] = round(float(np.mean(survs)), 4)
            r.units["mean_survival_to_next_snapshot"] = "of a snapshot's savings (survived_savings)"
        r.tables["snapshots"] = Table(
            ["t", unit if tb.seconds else "x", "savings", "duplicated_contents",
             "survived_contents", "survived_savings"],
            self.snap_rows, "what a snapshot every interval sees (pages)")
        if means:
            r.tables["phases"] = Table(
                ["phase", "snapshot_mean_savings"],
                [[round(j * T / PHASES, 6), round(m, 2)] for j, m in enumerate(means)],
                f"the snapshot mean with the grid started at each offset ({unit})")
        return r

    def _lifetimes(self, r: Result, unit: str, span: float) -> None:
        opp = self.closed.array()
        T = self.T
        x0, x1 = self._x(opp[:, 0]), self._x(opp[:, 1])
        life = x1 - x0
        area = opp[:, 2]
        left, right = opp[:, 3] > 0, opp[:, 4] > 0
        whole = ~left & ~right
        r.summary["opportunities"] = len(opp)
        r.summary["left_censored"] = int(left.sum())
        r.summary["right_censored"] = int(right.sum())
        r.units["left_censored"] = "already open at the trace's first instant"
        r.units["right_censored"] = "still open at the trace's last instant"
        r.summary["page_time"] = round(float(area.sum()), 3)
        r.units["page_time"] = f"page*{unit}"
        if not len(opp):
            return
        if whole.any():
            for p in (10, 50, 90):
                r.summary[f"lifetime_p{p}"] = round(float(np.percentile(life[whole], p)), 6)
                r.units[f"lifetime_p{p}"] = f"{unit}, uncensored only (linear interpolation)"
            r.summary["share_shorter_than_interval"] = round(float((life[whole] < T).mean()), 4)
        # right-censored lifetimes are lower bounds: Kaplan-Meier takes them as such
        ok = ~left
        xs, surv = kaplan_meier(life[ok], right[ok])
        for p in (50, 90):
            q = km_quantile(xs, surv, p / 100)
            r.summary[f"lifetime_km_p{p}"] = None if q is None else round(q, 6)
            r.units[f"lifetime_km_p{p}"] = f"{unit}, Kaplan-Meier (right-censored counted)"
        seen = np.ceil(x0 / T) * T < x1
        r.summary["share_never_seen_by_snapshots"] = round(float((~seen).mean()), 4)
        tot = float(area.sum())
        r.summary["page_time_share_never_seen"] = (round(float(area[~seen].sum()) / tot, 4)
                                                   if tot else 0.0)
        r.summary["page_time_share_missed_over_phases"] = (
            round(float((area * np.clip(1 - life / T, 0, 1)).sum()) / tot, 4) if tot else 0.0)
        curve = []
        for frac in CURVE_FRACTIONS:
            Ti = frac * span
            if Ti <= 0:
                continue
            missed = np.clip(1 - life / Ti, 0, 1)
            curve.append([round(Ti, 6), round(float(missed.mean()), 4),
                          round(float((area * missed).sum()) / tot, 4) if tot else 0.0])
        r.tables["missed_by_interval"] = Table(
            ["interval", "share_never_seen", "page_time_share_missed"], curve,
            f"what a snapshot every interval ({unit}) misses, averaged over grid phases")
        edges = np.unique(np.r_[0.0, np.geomspace(max(life[life > 0].min(), 1e-9)
                                                  if (life > 0).any() else 1.0,
                                                  max(life.max(), 1e-9) * 1.0001, 12)])
        rows = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            sel = (life >= a) & (life < b)
            if sel.any():
                rows.append([round(float(b), 6), int((sel & whole).sum()),
                             int((sel & right & ~left).sum()), int((sel & left).sum())])
        r.tables["lifetimes"] = Table(
            ["lifetime_below", "uncensored", "right_censored", "left_censored"], rows,
            f"opportunity lifetimes ({unit})")
        if len(xs):
            keep = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 200)).astype(int))
            r.tables["survival_km"] = Table(
                ["lifetime", "still_open"],
                [[round(float(xs[i]), 6), round(float(surv[i]), 4)] for i in keep],
                f"Kaplan-Meier: share of opportunities open longer than lifetime ({unit})")

    def plots(self, result: Result) -> list[Plot]:
        out: list[Plot] = []
        curve = result.tables.get("missed_by_interval")
        unit = result.units.get("interval", "")
        if curve and curve.rows:
            def draw_missed(ax: Any) -> None:
                xs = [row[0] for row in curve.rows]
                ax.plot(xs, [100 * row[2] for row in curve.rows], "o-",
                        label="page-time missed")
                ax.plot(xs, [100 * row[1] for row in curve.rows], "s--",
                        label="opportunities never seen")
                ax.axvline(result.summary["interval"], color="grey", linestyle=":",
                           label="--interval")
                ax.set_xscale("log")
                ax.set_xlabel(f"snapshot interval ({unit})")

            out.append(Plot("snapshots-missed", "what snapshots miss as the interval grows "
                            "(averaged over grid phases)", draw_missed, ylabel="%",
                            time_axis=False))
        km = result.tables.get("survival_km")
        if km and km.rows:
            def draw_km(ax: Any) -> None:
                ax.step([row[0] for row in km.rows], [row[1] for row in km.rows],
                        where="post", label="Kaplan-Meier")
                ax.axvline(result.summary["interval"], color="grey", linestyle=":",
                           label="--interval")
                ax.set_xscale("log")
                ax.set_xlabel(f"lifetime ({unit})")

            out.append(Plot("snapshots-lifetimes", "how long sharing opportunities last",
                            draw_km, ylabel="share still open", time_axis=False))
        return out
