"""The offline oracle: the least memory any page-granular deduplication could use, at every instant.

It is full CBPS (thesis eq. 4.8, |H| over the mapped frames) evaluated after every change the trace
records - every epoch of a recorded trace, every sample of a snapshot trace - from the engine's
incremental counters, not only at sample times. Savings are integrated over time against what Linux
already shares (mmap/fork) and against an ideal KSM (KSM hint all, eq. 4.6).

Time. Means and savings are weighted by guest seconds when the trace carries the guest's own
clock (COUNTER ``guest.clock_ns``, see ``analyses.guestclock``), since retired instructions run
an order of magnitude slower while the guest idles than while it computes; otherwise by the
trace's clock, converted to seconds with ``tracer.clock_hz``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memtrace.analyses.base import Analysis, Result, Table
from memtrace.analyses.guestclock import GUEST_CLOCK_COUNTER, GuestClock
from memtrace.analyses.state import ReplayState
from memtrace.analyses.timeline import pages_to_mib
from memtrace.traces.format import Kind

SERIES = ("full_cbps", "mmap_fork", "ksm_hint_all", "no_sharing")
#: a recorder's estimate of clock units per second of guest time, when the header has none
CLOCK_COUNTER = "tracer.clock_hz"


class OracleAnalysis(Analysis):
    name = "oracle"
    flag = "--oracle"
    help = ("oracle lower bound at every change: min, max, time-weighted mean, page-time "
            "savings against mmap/fork and KSM hint all")
    default = True

    def __init__(self) -> None:
        # change points: [t_start, t_end, oracle, mmap_fork, ksm_hint_all, no_sharing]
        self.points: list[list[int]] = []
        self.final: dict[str, int] = {}
        self.clock_hz: int | None = None
        self.clock_t: list[int] = []   # trace times of the guest.clock_ns counters
        self.clock_ns: list[int] = []

    def on_records(self, st: ReplayState, kind: int, records: Any, chunk: Any) -> None:
        if kind == Kind.COUNTER:
            for name_id, _pad, value in records.tolist():
                name = chunk.string(name_id)
                if name == CLOCK_COUNTER and value:
                    self.clock_hz = int(value)
                elif name == GUEST_CLOCK_COUNTER:
                    self.clock_t.append(st.t)
                    self.clock_ns.append(int(value))

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        f = st.figures()
        vals = [f[k] for k in SERIES]
        if self.points and self.points[-1][2:] == vals and self.points[-1][1] == t0:
            self.points[-1][1] = t1
        else:
            self.points.append([t0, t1, *vals])

    def end(self, st: ReplayState) -> None:
        self.final = st.figures()
        self.t_end = st.t

    def result(self) -> Result:
        tr = self.replay.trace
        unit = tr.clock_unit
        ps = tr.page_size
        r = Result("oracle")
        pts = [p for p in self.points if p[1] > p[0]]
        duration = sum(p[1] - p[0] for p in pts)
        active = [p for p in pts if p[3] > 0]  # something mapped
        if duration == 0:
            # a single instant (e.g. one snapshot): the final state is the whole story
            f = self.final
            vals = [f.get(k, 0) for k in SERIES]
            pts = active = [[self.t_end, self.t_end, *vals]]

        hz = tr.header.get("clock_hz") or self.clock_hz
        clock = GuestClock.from_counters(float(hz or 1), self.clock_t, self.clock_ns)
        if clock.knots and pts and duration:
            ends = clock.guest(np.array([[p[0], p[1]] for p in pts], dtype=np.float64))
            weight = list(np.maximum(ends[:, 1] - ends[:, 0], 0.0))
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
        if clock.knots:
            page_s = {"savings_vs_mmap_fork": sum(w * (p[3] - p[2]) for w, p in zip(
                          weight, pts, strict=True)),
                      "savings_vs_ksm_hint_all": sum(w * (p[4] - p[2]) for w, p in zip(
                          weight, pts, strict=True))}
        elif hz:
            page_s = {k: r.summary[k] / float(hz)
                      for k in ("savings_vs_mmap_fork", "savings_vs_ksm_hint_all")}
        else:
            page_s = {}
        for k, v in page_s.items():
            r.summary[k + "_mib_s"] = round(pages_to_mib(v, ps), 3)
            r.units[k + "_mib_s"] = "MiB*s"
        if clock.knots:
            r.summary["guest_seconds"] = round(total, 3)
            r.units["guest_seconds"] = "s"
        r.summary["time_base"] = (f"guest clock ({clock.knots} {GUEST_CLOCK_COUNTER} knots)"
                                  if clock.knots else
                                  f"trace clock ({unit})" + (", tracer.clock_hz for seconds"
                                                             if hz else ""))
        if duration and total:
            r.summary["savings_vs_mmap_fork_mean"] = round(tw(3) - tw(2), 2)
            r.summary["savings_vs_ksm_hint_all_mean"] = round(tw(4) - tw(2), 2)
            r.units["savings_vs_mmap_fork_mean"] = "pages"
            r.units["savings_vs_ksm_hint_all_mean"] = "pages"
        r.summary["duration"] = duration
        r.units["duration"] = unit
        r.summary["change_points"] = len(self.points)
        r.tables["series"] = Table(["t", "t_end", "oracle", *SERIES[1:]],
                                   [list(p) for p in self.points],
                                   "oracle lower bound at every change (pages)")
        r.notes.append("oracle = full CBPS at every change recorded in the trace (an epoch of a "
                       "recorded trace); min/max over the instants with anything mapped")
        return r

    def series(self) -> list[list[Any]]:
        return self.points
