"""The offline oracle: the least memory any page-granular deduplication could use, at every instant.

It is full CBPS (thesis eq. 4.8, |H| over the mapped frames) evaluated after every change the trace
records - every epoch of a recorded trace, every sample of a snapshot trace - from the engine's
incremental counters, not only at sample times. Savings are integrated over time against what Linux
already shares (mmap/fork) and against an ideal KSM (KSM hint all, eq. 4.6).

Time. Means and savings are weighted by the trace's time base (``memtrace.traces.timebase``):
guest seconds when the trace carries the guest's own clock, since retired instructions run an
order of magnitude slower while the guest idles than while it computes; otherwise the trace's
clock (and page*s through ``tracer.clock_hz`` when the recorder gave it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memtrace.analyses.base import Analysis, Plot, Result, Table
from memtrace.analyses.history import Rows
from memtrace.analyses.plot import steps
from memtrace.analyses.state import ReplayState
from memtrace.analyses.timeline import pages_to_mib

SERIES = ("full_cbps", "mmap_fork", "ksm_hint_all", "no_sharing")


class OracleAnalysis(Analysis):
    name = "oracle"
    flag = "--oracle"
    help = ("oracle lower bound at every change: min, max, time-weighted mean, page-time "
            "savings against mmap/fork and KSM hint all")
    default = True

    def __init__(self) -> None:
        # change points: [t_start, t_end, oracle, mmap_fork, ksm_hint_all, no_sharing]
        self.points = Rows(2 + len(SERIES))
        self.final: dict[str, int] = {}

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        f = st.figures()
        vals = [f[k] for k in SERIES]
        if len(self.points):
            last = self.points.last
            if last[1] == t0 and last[2:].tolist() == vals:
                last[1] = t1
                return
        self.points.append([t0, t1, *vals])

    def end(self, st: ReplayState) -> None:
        self.final = st.figures()
        self.t_end = st.t

    def result(self) -> Result:
        tr = self.ctx.trace
        tb = self.ctx.time
        unit = tr.clock_unit
        ps = tr.page_size
        r = Result("oracle")
        points = self.series()
        pts = [p for p in points if p[1] > p[0]]
        duration = sum(p[1] - p[0] for p in pts)
        active = [p for p in pts if p[3] > 0]  # something mapped
        if duration == 0:
            # a single instant (e.g. one snapshot): the final state is the whole story
            f = self.final
            vals = [f.get(k, 0) for k in SERIES]
            pts = active = [[self.t_end, self.t_end, *vals]]

        if tb.seconds and pts and duration:
            ends = np.array([[p[0], p[1]] for p in pts], dtype=np.float64)
            weight = list(np.maximum(tb.span(ends[:, 0], ends[:, 1]), 0.0))
        else:
            weight = [float(p[1] - p[0]) for p in pts]
        total = sum(weight)

        def tw(i: int) -> float:
            if duration == 0 or total == 0:
                return float(pts[0][i])
            return sum(w * p[i] for w, p in zip(weight, pts, strict=True)) / total

        oracle_vals = [p[2] for p in active] or [0]
        r.summary["oracle_min"] = min(oracle_vals)
        r.summary["oracle_max"] = max(oracle_vals)
        r.summary["oracle_mean"] = round(tw(2), 2)
        r.summary["mmap_fork_mean"] = round(tw(3), 2)
        r.summary["ksm_hint_all_mean"] = round(tw(4), 2)
        r.summary["no_sharing_mean"] = round(tw(5), 2)
        for k in ("oracle_min", "oracle_max", "oracle_mean", "mmap_fork_mean",
                  "ksm_hint_all_mean", "no_sharing_mean"):
            r.units[k] = "pages"
        r.summary["oracle_mean_mib"] = round(pages_to_mib(tw(2), ps), 3)
        r.units["oracle_mean_mib"] = "MiB"
        save_mf = sum((p[1] - p[0]) * (p[3] - p[2]) for p in pts)
        save_ksm = sum((p[1] - p[0]) * (p[4] - p[2]) for p in pts)
        r.summary["savings_vs_mmap_fork"] = save_mf
        r.summary["savings_vs_ksm_hint_all"] = save_ksm
        r.units["savings_vs_mmap_fork"] = r.units["savings_vs_ksm_hint_all"] = f"page*{unit}"
        if tb.seconds:
            page_s = {"savings_vs_mmap_fork": sum(w * (p[3] - p[2]) for w, p in zip(
                          weight, pts, strict=True)),
                      "savings_vs_ksm_hint_all": sum(w * (p[4] - p[2]) for w, p in zip(
                          weight, pts, strict=True))}
        elif tb.hz:
            page_s = {k: r.summary[k] / float(tb.hz)
                      for k in ("savings_vs_mmap_fork", "savings_vs_ksm_hint_all")}
        else:
            page_s = {}
        for k, v in page_s.items():
            r.summary[k + "_mib_s"] = round(pages_to_mib(v, ps), 3)
            r.units[k + "_mib_s"] = "MiB*s"
        if tb.seconds:
            r.summary["guest_seconds"] = round(total, 3)
            r.units["guest_seconds"] = "s"
        r.summary["time_base"] = tb.describe()
        if duration and total:
            r.summary["savings_vs_mmap_fork_mean"] = round(tw(3) - tw(2), 2)
            r.summary["savings_vs_ksm_hint_all_mean"] = round(tw(4) - tw(2), 2)
            r.units["savings_vs_mmap_fork_mean"] = "pages"
            r.units["savings_vs_ksm_hint_all_mean"] = "pages"
        r.summary["duration"] = duration
        r.units["duration"] = unit
        r.summary["change_points"] = len(points)
        r.tables["series"] = self.ctx.series(["t", "t_end", "oracle", *SERIES[1:]],
                                             points,
                                             "oracle lower bound at every change (pages)",
                                             times=2)
        by_phase = self._by_phase(pts, weight)
        if by_phase:
            r.tables["by_phase"] = Table(
                ["phase", "start", "end", "duration", "oracle_min", "oracle_max", "oracle_mean",
                 "mmap_fork_mean", "ksm_hint_all_mean", "no_sharing_mean"], by_phase,
                f"per marked phase (start, end, duration in {tb.axis}; means in pages, "
                "weighted as above)")
        r.notes.append("oracle = full CBPS at every change recorded in the trace (an epoch of a "
                       "recorded trace); min/max over the instants with anything mapped")
        return r

    def _by_phase(self, pts: list[list[int]], weight: list[float]) -> list[list[Any]]:
        """Per marked phase: min, max and time-weighted means over the change points that
        start within it (a point straddling a phase boundary counts where it starts)."""
        phases = self.ctx.trace.phases()
        if not phases or not pts:
            return []
        tb = self.ctx.time
        names = self.ctx.phase_at([p[0] for p in pts])
        out = []
        for ph in phases:
            sel = [i for i, n in enumerate(names) if n == ph.name
                   and ph.t_start <= pts[i][0] < max(ph.t_end, ph.t_start + 1)]
            w = [weight[i] for i in sel]
            tot = sum(w)

            def mean(j: int, sel: list[int] = sel, w: list[float] = w, tot: float = tot
                     ) -> float | None:
                if not sel:
                    return None
                if tot == 0:
                    return round(float(pts[sel[0]][j]), 2)
                return round(sum(wi * pts[i][j] for wi, i in zip(w, sel, strict=True)) / tot, 2)

            active = [pts[i][2] for i in sel if pts[i][3] > 0] or [pts[i][2] for i in sel]
            x0, x1 = float(tb.x(ph.t_start)), float(tb.x(ph.t_end))
            out.append([ph.name, round(x0, 6), round(x1, 6), round(x1 - x0, 6),
                        min(active) if active else None, max(active) if active else None,
                        mean(2), mean(3), mean(4), mean(5)])
        return out

    def plots(self, result: Result) -> list[Plot]:
        series = result.tables["series"]
        if not series.rows:
            return []
        ps = self.ctx.page_size
        t, t_end, oracle = series.column("t"), series.column("t_end"), series.column("oracle")
        x = self.ctx.time.x(np.array(t + [t_end[-1]], dtype=np.float64))
        y = [pages_to_mib(v, ps) for v in oracle] + [pages_to_mib(oracle[-1], ps)]

        def draw(ax: Any) -> None:
            steps(ax, x, y, color="black", linewidth=1, linestyle="--",
                  label="oracle lower bound (every change)")

        return [Plot("memory", "memory over time: the four figures and the oracle", draw,
                     ylabel="memory (MiB)")]

    def series(self) -> list[list[Any]]:
        """The change points as rows of Python ints."""
        return self.points.array().tolist()
