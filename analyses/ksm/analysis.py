"""``trace-analyze --ksm``: the KSM models driven by the replay, their options and their report."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.analyses.base import Analysis, Context, Plot, Result, Table, positive_int
from memtrace.analyses.ksm.hinted import HintedModel
from memtrace.analyses.ksm.items import ItemSpace
from memtrace.analyses.ksm.model import RMAP_ITEM_BYTES, SCAN_ROWS_MAX, KsmModel
from memtrace.analyses.ksm.params import (
    KNOBS,
    KsmParams,
    cycle_ms,
    max_sharing,
    parse_start,
    parse_sweep,
    positive_float,
)
from memtrace.analyses.ksm.plot import ksm_plots
from memtrace.analyses.ksm.series import Series
from memtrace.analyses.timeline import pages_to_mib
from memtrace.traces.format import COUNTER_CLOCK_HZ, COUNTER_GUEST_CLOCK_NS, Kind, MarkOp
from memtrace.traces.timebase import GuestClock

if TYPE_CHECKING:
    from memtrace.analyses.state import ReplayState
    from memtrace.traces.reader import Chunk

#: guest instructions per second assumed when the trace does not say (clock_unit instructions)
DEFAULT_CLOCK_HZ = 1_000_000_000
KERNEL_PREFIX = "ksm."
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "general_profit", "ksm_zero_pages")


def _pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


class KsmAnalysis(Analysis):
    """KSM replayed over the trace: counters over time, savings against the oracle, sweeps."""

    name = "ksm"
    flag = "--ksm"
    help = ("replay the trace through a model of Linux KSM (sysfs parameters --ksm-*): "
            "pages_sharing over time, savings against the oracle, merge latency, sweeps")
    default = False
    # its pages, trees and per-content counts keep content ids from one sync to the next
    holds_content_ids = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("KSM model (--ksm)")
        g.add_argument("--ksm-pages-to-scan", type=positive_int, default=100, metavar="N",
                       help="pages ksmd scans per batch (sysfs pages_to_scan; default 100)")
        g.add_argument("--ksm-sleep-ms", type=positive_float, default=20.0, metavar="MS",
                       help="guest milliseconds between batches (sleep_millisecs; default 20)")
        g.add_argument("--ksm-max-page-sharing", type=max_sharing, default=256, metavar="N",
                       help="rmap items per KSM page at most (max_page_sharing; default 256)")
        g.add_argument("--ksm-use-zero-pages", action="store_true",
                       help="merge empty pages with the kernel zero page (use_zero_pages=1)")
        g.add_argument("--ksm-scope", choices=("madvised", "anon"), default="madvised",
                       help="madvised: only VMAs with VM_MERGEABLE; anon: all anonymous memory "
                            "of every address space (default madvised)")
        g.add_argument("--ksm-sweep", type=parse_sweep, default=None, metavar="P:MS,...",
                       help="also run these pages_to_scan:sleep_ms sets in the same replay, "
                            "e.g. 100:20,1000:20,100:200")
        g.add_argument("--ksm-no-hints", action="store_true",
                       help="do not run the XLH-style hinted scanner next to each set")
        g.add_argument("--ksm-clock-hz", type=positive_float, default=None, metavar="HZ",
                       help="clock units per guest second (default: the trace header's "
                            "clock_hz, its tracer.clock_hz counter, or 1e9)")
        g.add_argument("--ksm-hz", type=int, default=None, metavar="HZ",
                       help="the guest kernel's tick rate: ksmd sleeps whole jiffies, one more "
                            "than sleep_millisecs rounded up (default: the trace's guest.hz "
                            "counter; 0: batches exactly sleep_ms apart)")
        g.add_argument("--ksm-no-guest-clock", action="store_true",
                       help="ignore the guest's own clock (COUNTER guest.clock_ns) and convert "
                            "trace time to guest time with clock_hz alone")
        g.add_argument("--ksm-start", type=parse_start, default=None, metavar="T|phase:NAME",
                       help="ksmd starts at this time (clock units) or at the first MARK PHASE "
                            "NAME (default: the start of the trace)")
        g.add_argument("--ksm-every-scan", action="store_true",
                       help="also tabulate the counters at the end of every full scan")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KsmAnalysis:
        return cls(pages_to_scan=args.ksm_pages_to_scan, sleep_ms=args.ksm_sleep_ms,
                   max_page_sharing=args.ksm_max_page_sharing,
                   use_zero_pages=args.ksm_use_zero_pages, scope=args.ksm_scope,
                   sweep=args.ksm_sweep, hints=not args.ksm_no_hints,
                   clock_hz=args.ksm_clock_hz, start=args.ksm_start,
                   guest_clock=not getattr(args, "ksm_no_guest_clock", False),
                   tick_hz=getattr(args, "ksm_hz", None),
                   every_scan=args.ksm_every_scan)

    def __init__(self, pages_to_scan: int = 100, sleep_ms: float = 20.0,
                 max_page_sharing: int = 256, use_zero_pages: bool = False,
                 scope: str = "madvised", sweep: list[tuple[int, float]] | None = None,
                 hints: bool = True, clock_hz: float | None = None, start: str | None = None,
                 interval: int | None = None, every_scan: bool = False,
                 guest_clock: bool = True,
                 tick_hz: int | None = None) -> None:
        if scope not in ("madvised", "anon"):
            raise ValueError(f"scope must be madvised or anon, not {scope!r}")
        base = KsmParams(pages_to_scan, float(sleep_ms), max_page_sharing, use_zero_pages)
        sets = [base] + [KsmParams(p, float(s), max_page_sharing, use_zero_pages)
                         for p, s in (sweep or [])]
        seen: list[KsmParams] = []
        for p in sets:
            if p not in seen:
                seen.append(p)
        self.params: list[KsmParams] = []
        for p in seen:
            self.params.append(p)
            if hints:
                self.params.append(KsmParams(p.pages_to_scan, p.sleep_ms, p.max_page_sharing,
                                             p.use_zero_pages, "hinted"))
        self.scope = scope
        self.clock_hz_arg = clock_hz
        self.guest_clock = guest_clock
        self.tick_hz_arg = tick_hz
        self.trace_tick_hz: int | None = None
        self.gclock = GuestClock(float(clock_hz or DEFAULT_CLOCK_HZ))
        self.start_arg = start
        self.interval = interval
        self.every_scan = every_scan
        self.space = ItemSpace(scope)
        self.models: list[KsmModel] = []
        self.samples: list[list[Any]] = []
        self.kernel: dict[str, list[tuple[int, int]]] = {}
        self.compare_rows: list[list[Any]] = []
        self.phase = ""  # the latest MARK PHASE
        self.start_phase: str | None = None  # the phase in force when ksmd started
        self.knobs: dict[str, int] = {}
        self.started = False
        self.t_first: float | None = None
        self.t_last = 0.0
        self.s_ceiling: Series | None = None
        self.s_global: Series | None = None
        self.clock_counter: int | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _clock(self, ctx: Context) -> tuple[float, str]:
        """Clock units per guest second (and where that came from), and the guest's own clock
        (``self.gclock``), from the trace's time base (``memtrace.traces.timebase``); ksmd
        sleeps in guest time, so its batches are placed through it."""
        tb = ctx.time
        if self.clock_hz_arg:
            hz, source = float(self.clock_hz_arg), "--ksm-clock-hz"
        elif tb.hz:
            hz, source = float(tb.hz), tb.hz_source
        else:
            hz, source = float(DEFAULT_CLOCK_HZ), "assumed default (no clock_hz in the trace)"
        self.trace_tick_hz = tb.guest_hz
        self.clock_counter = ctx.trace.clock_hz_counter()
        if self.guest_clock and tb.clock is not None and tb.clock.knots:
            self.gclock = GuestClock(hz, tb.clock.t, tb.clock.g)
        else:
            self.gclock = GuestClock(hz)
        return hz, source

    @property
    def tick_hz(self) -> int:
        """The guest's HZ the model's sleeps are rounded with (0: not rounded)."""
        if self.tick_hz_arg is not None:
            return max(0, self.tick_hz_arg)
        return self.trace_tick_hz or 0

    def begin(self, ctx: Context) -> None:
        super().begin(ctx)
        self.hz, self.hz_source = self._clock(ctx)
        self.page_size = ctx.page_size
        self.grid = ctx.grid(100, self.interval)  # samples on the same grid as --sharing
        self.interval = self.grid.step.value
        self.space.all_dirty = True

    def _make_models(self, t0: float, st: ReplayState) -> None:
        self.t_first = t0
        knots = self.gclock if self.gclock.knots else None
        self.s_ceiling = Series(t0, clock=knots)
        self.s_global = Series(t0, clock=knots)
        for p in self.params:
            cls = HintedModel if p.scanner == "hinted" else KsmModel
            m = cls(p, self.space, self.hz, t0, st.zero_cid, self.every_scan, self.gclock,
                    self.tick_hz)
            self.models.append(m)
            self.space.models.append(m)
        if self.start_arg is None:
            self._start(t0)
        elif not self.start_arg.startswith("phase:"):
            self._start(max(t0, float(self.start_arg)))

    def _start(self, t: float) -> None:
        self.started = True
        self.start_phase = self.phase
        for m in self.models:
            m.start(t)

    # -- hooks -----------------------------------------------------------------------------------
    def _sync(self, st: ReplayState, t: float) -> None:
        if not self.space.sync(st, t):
            return
        for m in self.models:
            m.sync(st, t)
        f = st.figures()
        assert self.s_ceiling is not None and self.s_global is not None
        self.s_ceiling.set(t, self.space.ceiling)
        self.s_global.set(t, f["mmap_fork"] - f["full_cbps"])

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        if self.t_first is None:
            self._make_models(float(t0), st)
        self._sync(st, float(t0))
        for s in self.grid.instants_in(t0, t1):
            for m in self.models:
                m.run_to(m.k_after(s))
            self._sample(st, s)
        for m in self.models:
            m.run_to(m.k_first(t1))
        self.t_last = float(t1)

    def on_records(self, st: ReplayState, kind: int, records: np.ndarray, chunk: Chunk) -> None:
        # called after the state applied the records: note the pages whose frames were written
        # or whose mappings changed, so that only those are looked at again
        if kind == Kind.PAGE:
            self.space.page_log.append(records["frame"].astype(np.int64))
        elif kind == Kind.MAP:
            if len(records):
                self.space.map_log.append((records["mm"].copy(), records["vpn"].copy()))
        elif kind == Kind.PAGECACHE:
            fr = records["frame"].astype(np.int64)
            fr = fr[fr < len(st.proc_count)]
            if len(fr) and (st.proc_count[fr] > 0).any():
                self.space.all_dirty = True  # a mapped frame became named or anonymous
        elif kind == Kind.VMA:
            self.space.dirty.update(np.unique(records["mm"]).tolist())
        elif kind == Kind.MARK:
            for op, name, arg in records.tolist():
                if op == MarkOp.PHASE:
                    self.phase = chunk.string(name) or ""
                if op == MarkOp.STATE_BEGIN and arg & 1:
                    self.space.all_dirty = True
                elif (op == MarkOp.PHASE and not self.started and self.start_arg
                      and self.start_arg == f"phase:{chunk.string(name)}"):
                    if self.t_first is None:
                        self._make_models(float(st.t), st)
                    self._start(float(st.t))
        elif kind == Kind.COUNTER:
            for name_id, _pad, value in records.tolist():
                name = chunk.string(name_id) or ""
                if not name.startswith(KERNEL_PREFIX):
                    continue
                key = name[len(KERNEL_PREFIX):]
                if key in KNOBS:
                    self.knobs[key] = int(value)
                    continue
                self.kernel.setdefault(key, []).append((st.t, int(value)))
                if key in COUNTERS and self.models:
                    model = self.models[0].counters(self.page_size)[key]
                    self.compare_rows.append([st.t, key, int(value), model, model - int(value),
                                              round(self.gclock.guest(st.t), 6), self.phase])

    def _sample(self, st: ReplayState, s: float) -> None:
        if not self.models:
            return
        m = self.models[0]
        row = [s, *m.row_values(self.page_size), self.space.ceiling]
        f = st.figures()
        row.append(f["mmap_fork"] - f["full_cbps"])
        if len(self.models) > 1 and self.models[1].p.scanner == "hinted":
            row += [self.models[1].pages_scanned, self.models[1].saved]
        self.samples.append(row)

    def end(self, st: ReplayState) -> None:
        if self.t_first is None:
            self._make_models(float(st.t), st)
        self._sync(st, float(st.t))
        self.t_last = max(self.t_last, float(st.t))
        if not self.samples or self.samples[-1][0] < st.t:
            self._sample(st, st.t)

    # -- results ---------------------------------------------------------------------------------
    def _dur(self, t0: float, t1: float) -> float:
        """The span the time-weighted means divide by: guest seconds when the trace has the
        guest's clock (the series integrate over guest time then), else clock units."""
        return self.gclock.span(t0, t1) if self.gclock.knots else t1 - t0

    def _model_summary(self, m: KsmModel) -> dict[str, Any]:
        t0 = self.t_first or 0.0
        t1 = self.t_last
        dur = self._dur(t0, t1)
        ceil_area = self.s_ceiling.integral(t1) if self.s_ceiling else 0.0
        glob_area = self.s_global.integral(t1) if self.s_global else 0.0
        saved_area = m.s_saved.integral(t1)
        lat = list(m.latencies)
        return {
            "pages_sharing_mean": m.s_sharing.integral(t1) / dur if dur > 0 else float(m.sharing),
            "saved_mean": saved_area / dur if dur > 0 else float(m.saved),
            "fraction_of_scope_oracle": saved_area / ceil_area if ceil_area > 0 else None,
            "fraction_of_guest_oracle": saved_area / glob_area if glob_area > 0 else None,
            "latency_median_s": _pct(lat, 50),
            "latency_p90_s": _pct(lat, 90),
            "merged_opportunities": len(lat),
        }

    def result(self) -> Result:
        r = Result("ksm")
        tr = self.replay.trace
        unit = tr.clock_unit
        ps = self.page_size
        if not self.models:
            r.notes.append("the trace has no records: nothing to model")
            return r
        m = self.models[0]
        p = m.p
        ms = self._model_summary(m)
        t0, t1 = self.t_first or 0.0, self.t_last
        dur = self._dur(t0, t1)
        summ, units = r.summary, r.units
        summ["scope"] = self.scope
        summ["pages_to_scan"] = p.pages_to_scan
        summ["sleep_millisecs"] = p.sleep_ms
        units["sleep_millisecs"] = "ms"
        summ["max_page_sharing"] = p.max_page_sharing
        summ["use_zero_pages"] = int(p.use_zero_pages)
        summ["clock_hz"] = self.hz
        units["clock_hz"] = f"{unit}/s"
        summ["clock_hz_source"] = self.hz_source
        summ["guest_clock_knots"] = self.gclock.knots
        summ["guest_hz"] = self.tick_hz or None
        summ["batch_cycle_ms"] = round(float(cycle_ms(p.sleep_ms, self.tick_hz)), 3)
        units["batch_cycle_ms"] = "ms"
        summ["guest_seconds"] = round(self.gclock.span(t0, t1), 6)
        units["guest_seconds"] = "s"
        if not self.started:
            r.notes.append(f"ksmd never started: {self.start_arg} was not found in the trace")
        for k, v in m.counters(ps).items():
            summ[f"final_{k}"] = v
        units["final_general_profit"] = "bytes"
        summ["pages_sharing_mean"] = round(ms["pages_sharing_mean"], 3)
        summ["saved_pages_final"] = m.saved
        summ["saved_pages_mean"] = round(ms["saved_mean"], 3)
        summ["saved_mean_mib"] = round(pages_to_mib(ms["saved_mean"], ps), 3)
        units["saved_mean_mib"] = "MiB"
        for k in ("pages_sharing_mean", "saved_pages_final", "saved_pages_mean"):
            units[k] = "pages"
        if self.s_ceiling and dur > 0:
            summ["scope_oracle_mean"] = round(self.s_ceiling.integral(t1) / dur, 3)
            summ["guest_oracle_mean"] = round(self.s_global.integral(t1) / dur, 3) \
                if self.s_global else None
            units["scope_oracle_mean"] = units["guest_oracle_mean"] = "pages"
        for k in ("fraction_of_scope_oracle", "fraction_of_guest_oracle"):
            v = ms[k]
            summ[k] = round(v, 4) if v is not None else None
        summ["pages_scanned"] = m.pages_scanned
        summ["scan_rate"] = round(p.scan_rate(), 1)
        units["scan_rate"] = "pages/s"
        summ["merges"] = m.merges
        summ["opportunities"] = self.space.opportunities
        summ["opportunities_merged"] = ms["merged_opportunities"]
        summ["opportunities_missed"] = m.missed
        summ["missed_page_seconds"] = round(m.missed_time, 6)
        units["missed_page_seconds"] = "content*s"
        for k, out in (("latency_median_s", "latency_median"), ("latency_p90_s", "latency_p90")):
            v = ms[k]
            summ[out] = round(v, 6) if v is not None else None
            units[out] = "s"
        hinted = [x for x in self.models if x.p.scanner == "hinted" and
                  (x.p.pages_to_scan, x.p.sleep_ms) == (p.pages_to_scan, p.sleep_ms)]
        if hinted:
            h = hinted[0]
            hs = self._model_summary(h)
            summ["hinted_saved_pages_mean"] = round(hs["saved_mean"], 3)
            units["hinted_saved_pages_mean"] = "pages"
            f0, f1 = ms["fraction_of_scope_oracle"], hs["fraction_of_scope_oracle"]
            summ["hinted_fraction_of_scope_oracle"] = round(f1, 4) if f1 is not None else None
            summ["hinted_gain"] = round(f1 - f0, 4) if f0 is not None and f1 is not None \
                else None
            summ["hinted_latency_median"] = round(hs["latency_median_s"], 6) \
                if hs["latency_median_s"] is not None else None
            units["hinted_latency_median"] = "s"
            summ["hinted_pages_scanned"] = h.pages_scanned
        cols = ["t", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "general_profit", "pages_scanned", "saved_pages", "scope_oracle",
                "guest_oracle"]
        if len(self.models) > 1 and self.models[1].p.scanner == "hinted":
            cols += ["hinted_pages_scanned", "hinted_saved_pages"]
        r.tables["series"] = self.ctx.series(cols, [list(x) for x in self.samples],
                                             f"KSM {p.label} over time ({self.scope}; pages, "
                                             "general_profit in bytes; savings in frames)")
        if self.every_scan:
            r.tables["full_scans"] = Table(
                ["t", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "full_scans", "general_profit", "pages_scanned", "saved_pages"],
                [[round(x[0], 3), *x[1:]] for x in m.scan_rows],
                "counters at the end of each full scan")
            if m.scan_rows_dropped:
                r.notes.append(f"{m.scan_rows_dropped} full scans beyond {SCAN_ROWS_MAX} not "
                               "tabulated")
        r.tables["sweep"] = self._sweep_table()
        self._kernel_comparison(r)
        self._notes(r)
        return r

    def _sweep_table(self) -> Table:
        rows = []
        t1 = self.t_last
        dur = self._dur(self.t_first or 0.0, t1)
        for x in self.models:
            s = self._model_summary(x)
            rows.append([x.p.label, x.p.pages_to_scan, x.p.sleep_ms, round(x.p.scan_rate(), 1),
                         x.p.scanner, x.pages_scanned, x.full_scans,
                         round(s["pages_sharing_mean"], 2), round(s["saved_mean"], 2),
                         round(s["fraction_of_scope_oracle"], 4)
                         if s["fraction_of_scope_oracle"] is not None else None,
                         round(s["fraction_of_guest_oracle"], 4)
                         if s["fraction_of_guest_oracle"] is not None else None,
                         round(s["latency_median_s"], 4)
                         if s["latency_median_s"] is not None else None,
                         x.missed])
        if self.s_ceiling is not None and dur > 0:
            mean = self.s_ceiling.integral(t1) / dur
            rows.append(["oracle (scope)", None, None, None, "ceiling", None, None, None,
                         round(mean, 2), 1.0, None, 0.0, 0])
        return Table(["set", "pages_to_scan", "sleep_ms", "scan_rate", "scanner",
                      "pages_scanned", "full_scans", "pages_sharing_mean", "saved_mean",
                      "fraction_of_scope_oracle", "fraction_of_guest_oracle",
                      "latency_median_s", "missed"], rows,
                     "savings against scan rate (pages/s of guest time), the oracle as ceiling")

    def _kernel_comparison(self, r: Result) -> None:
        if not self.kernel:
            return
        r.tables["kernel_vs_model"] = Table(
            ["t", "counter", "kernel", "model", "model_minus_kernel", "guest_s", "phase"],
            self.compare_rows,
            f"real kernel counters (COUNTER ksm.*) against the model {self.models[0].p.label} "
            "at the same instants (guest_s: guest seconds)")
        # "final" is the last sample while ksmd ran over the workload: the last one of the
        # phase ksmd was started in (--ksm-start phase:NAME), else the last one of the trace;
        # samples after it (the workload exiting) are in the table but not judged
        t0 = self.models[0].origin if self.models[0].origin is not None else -math.inf
        judged = [x for x in self.compare_rows if x[0] >= t0]
        if self.start_phase:
            judged = [x for x in judged if x[6] == self.start_phase]
            r.summary["final_sample_phase"] = self.start_phase
        last: dict[str, list[Any]] = {}
        for row in judged:
            last[row[1]] = row
        for key in ("pages_sharing", "pages_shared", "full_scans"):
            row = last.get(key)
            if row is None:
                continue
            r.summary[f"kernel_final_{key}"] = row[2]
            r.summary[f"model_at_kernel_final_{key}"] = row[3]
            r.summary[f"relative_error_final_{key}"] = round((row[3] - row[2]) / row[2], 4) \
                if row[2] else None
        ps_rows = [x for x in judged if x[1] == "pages_sharing"]
        if ps_rows:
            r.summary["pages_sharing_mean_abs_error"] = round(
                float(np.mean([abs(x[4]) for x in ps_rows])), 3)
            r.units["pages_sharing_mean_abs_error"] = "pages"
            r.summary["pages_sharing_samples"] = len(ps_rows)
            if self.start_phase:
                r.notes.append(f"kernel_final_* and the mean error: the {len(ps_rows)} counter "
                               f"samples of phase {self.start_phase!r} (ksmd started in it); "
                               "later samples are in the table only")
        p = self.models[0].p
        for knob, attr in KNOBS.items():
            if knob in self.knobs:
                mine = getattr(p, attr)
                if float(self.knobs[knob]) != float(mine):
                    r.notes.append(f"the guest ran KSM with {knob}={self.knobs[knob]}, the model "
                                   f"with {mine}: set --ksm-{attr.replace('_', '-')} to compare "
                                   "like with like")
        fs = [x for x in self.compare_rows if x[1] == "full_scans"]
        if fs and self.start_arg is None and fs[0][2] == 0 and fs[0][3] > 0:
            r.notes.append("the guest's ksmd may have started after the trace did (full_scans "
                           "was 0 at the first counter): use --ksm-start T or --ksm-start "
                           "phase:NAME to start the model with it")

    def plots(self, result: Result) -> list[Plot]:
        return ksm_plots(self, result)

    def _notes(self, r: Result) -> None:
        if self.gclock.knots:
            r.notes.append(f"guest time from the guest's own clock ({self.gclock.knots} "
                           f"{COUNTER_GUEST_CLOCK_NS} counters, interpolated; clock_hz = "
                           f"{self.hz:g} {self.replay.trace.clock_unit}/s outside them)")
        else:
            r.notes.append(f"guest time from clock_hz = {self.hz:g} "
                           f"{self.replay.trace.clock_unit}/s ({self.hz_source})")
        if self.tick_hz:
            sleep = self.models[0].p.sleep_ms if self.models else 0.0
            r.notes.append(f"ksmd's sleep in whole jiffies (HZ={self.tick_hz}): batches "
                           f"{float(cycle_ms(sleep, self.tick_hz)):g} ms apart for "
                           f"sleep_millisecs={sleep:g} (rounded up, plus the jiffy the timer "
                           "wheel adds)")
        if self.clock_counter and self.hz_source != f"counter {COUNTER_CLOCK_HZ}" and \
                abs(self.clock_counter - self.hz) > 0.01 * self.hz:
            r.notes.append(f"the trace's tracer.clock_hz counter says {self.clock_counter}; "
                           "pass --ksm-clock-hz to use it")
        if self.scope == "madvised" and not self.space.ever_mergeable:
            r.notes.append("no VMA in the trace has VM_MERGEABLE: nothing is in the madvised "
                           "scope (no madvise(MADV_MERGEABLE) in the workload, or a trace "
                           "recorded before the guest agent reported it); try --ksm-scope anon")
        r.notes.append("savings are frames freed within the scope; the scope oracle is in-scope "
                       "frames minus distinct contents among them, the guest oracle mmap/fork "
                       "minus full CBPS; fractions are ratios of time integrals")
        if self.kernel:
            r.notes.append("the guest ran its own KSM: the trace's mappings include its merges, "
                           "so the guest oracle is measured after them while the model works on "
                           "the un-merged workload (fraction_of_guest_oracle can exceed 1)")
        r.notes.append("pages_sharing lags a COW break until ksmd revisits the page (as in the "
                       "kernel); pages that are unmapped leave the counters at once (the kernel "
                       "frees their rmap items when its walk next passes them)")
        r.notes.append("an opportunity is a content held by two or more in-scope frames; latency "
                       "is from its start to the model's first merge of that content; missed = "
                       "ended before any merge")
        r.notes.append(f"general_profit = (pages_sharing + zero-page merges) * page size - "
                       f"rmap items * {RMAP_ITEM_BYTES} bytes (6.10+ definition)")
        if self.space.kzero >= 0:
            r.notes.append(f"frame {self.space.kzero:#x} taken for the kernel zero page "
                           "(zero content, mapped at several places; not scanned)")
        if any(x.p.scanner == "hinted" for x in self.models):
            r.notes.append("hinted = XLH-style scanner: pages written and unchanged for one sleep "
                           "period scanned first with up to half of each batch, same pages per "
                           "batch as the plain scan")
