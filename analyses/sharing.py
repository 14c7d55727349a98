"""Sharing over time: the thesis's four figures (eq. 4.6-4.9), zero pages, shareable pages by type
(Table 5.2), a per-address-space breakdown and the whole-guest view, sampled every T.

Each sample is computed from the full state, independently of the engine's incremental counters
(the oracle analysis uses those), so the two cross-check each other in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memtrace.analyses.base import Analysis, Context, Interval, Plot, Result, Table
from memtrace.analyses.kernels import MMID_SHIFT, PREFETCH_AHEAD, hot, prefetch
from memtrace.analyses.plot import steps
from memtrace.analyses.state import ReplayState
from memtrace.analyses.timeline import MIB_PAGES, pages_to_mib
from memtrace.traces.format import Kind, MarkOp


def parse_base(s: str) -> int:
    """A base in pages, or in MiB with the suffix MiB (4 KiB pages)."""
    import argparse

    try:
        if s.lower().endswith("mib"):
            return max(1, round(float(s[:-3]) * MIB_PAGES))
        return max(1, int(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a base: {s!r} (e.g. 120000 or 480MiB)") from None

FIGURES = ("no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps")
FIGURE_LABELS = {"no_sharing": "no sharing", "mmap_fork": "mmap/fork",
                 "ksm_hint_all": "KSM hint all", "full_cbps": "full CBPS (samples)"}


# what ``frame_census`` counts, by index into its output
_CENSUS = ("no_sharing", "mmap_fork", "named_frames", "anon_frames", "unknown_mapped",
           "unknown_anon", "zero_pages", "guest_frames", "guest_distinct", "distinct_mapped",
           "distinct_anon", "shareable_anonymous_contents", "shareable_anonymous_sharings",
           "shareable_named_contents", "shareable_named_sharings", "shareable_mixed_contents",
           "shareable_mixed_sharings")
(_NO_SHARING, _MMAP_FORK, _NAMED, _ANON, _UNKNOWN, _UNKNOWN_ANON, _ZERO, _GUEST,
 _GUEST_DISTINCT, _DISTINCT, _DISTINCT_ANON, _SH_ANON, _SH_ANON_N, _SH_NAMED, _SH_NAMED_N,
 _SH_MIXED, _SH_MIXED_N) = range(len(_CENSUS))


@hot
def frame_census(content: np.ndarray, proc_count: np.ndarray, named: np.ndarray, zero_cid: int,
                 scratch: np.ndarray, touched: np.ndarray, out: np.ndarray) -> None:
    """One pass over the frames: per content held, how many mapped frames and mapped named
    frames hold it and how many frames hold it at all (``scratch`` rows, all zero before and
    after), then the counts ``_CENSUS`` names into ``out``."""
    out[:] = 0
    nt = 0
    n = len(content)
    held = scratch[:, 2]
    for f in range(n):
        if f + PREFETCH_AHEAD < n and content[f + PREFETCH_AHEAD] >= 0:
            prefetch(held, content[f + PREFETCH_AHEAD])
        c = content[f]
        if c >= 0:
            out[_GUEST] += 1
            if scratch[c, 2] == 0:
                touched[nt] = c
                nt += 1
            scratch[c, 2] += 1
        p = proc_count[f]
        if p <= 0:
            continue
        out[_NO_SHARING] += p
        out[_MMAP_FORK] += 1
        if named[f]:
            out[_NAMED] += 1
        else:
            out[_ANON] += 1
        if c < 0:
            out[_UNKNOWN] += 1
            if not named[f]:
                out[_UNKNOWN_ANON] += 1
            continue
        if c == zero_cid:
            out[_ZERO] += 1
        scratch[c, 0] += 1
        if named[f]:
            scratch[c, 1] += 1
    out[_GUEST_DISTINCT] = nt
    for i in range(nt):
        c = touched[i]
        total, n_named = scratch[c, 0], scratch[c, 1]
        n_anon = total - n_named
        scratch[c, 0] = 0
        scratch[c, 1] = 0
        scratch[c, 2] = 0
        if total == 0:
            continue
        out[_DISTINCT] += 1
        if n_anon > 0:
            out[_DISTINCT_ANON] += 1
        if total < 2:
            continue
        k = _SH_ANON if n_named == 0 else _SH_NAMED if n_anon == 0 else _SH_MIXED
        out[k] += 1
        out[k + 1] += total - 1


class FrameCensus:
    """Figures and Table 5.2 breakdown recomputed from scratch over the frames, independently
    of the engine's incremental counters (the tests compare the two). Keeps its scratch rows
    from one sample to the next: fresh ones per sample cost more than the count itself."""

    def __init__(self) -> None:
        self._scratch = np.zeros((0, 3), dtype=np.int32)
        self._touched = np.zeros(0, dtype=np.int64)
        self._out = np.zeros(len(_CENSUS), dtype=np.int64)

    def __call__(self, st: ReplayState) -> dict[str, Any]:
        if len(self._scratch) < len(st.contents):
            self._scratch = np.zeros((max(len(st.contents), 2 * len(self._scratch)), 3),
                                     dtype=np.int32)
        if len(self._touched) < len(st.content):
            self._touched = np.zeros(len(st.content), dtype=np.int64)
        frame_census(st.content, st.proc_count, st.named, st.zero_cid, self._scratch,
                     self._touched, self._out)
        c = dict(zip(_CENSUS, self._out.tolist(), strict=True))
        # KSM hint all (eq. 4.6): named frames stay, anonymous ones merge by content; full CBPS
        # (eq. 4.8): one frame per distinct content (a frame of unknown content is its own)
        c["ksm_hint_all"] = c["named_frames"] + c.pop("distinct_anon") + c.pop("unknown_anon")
        c["full_cbps"] = c.pop("distinct_mapped") + c.pop("unknown_mapped")
        return c


def full_figures(st: ReplayState) -> dict[str, Any]:
    """Figures and Table 5.2 breakdown recomputed from scratch over the mapped frames."""
    return FrameCensus()(st)


@dataclass
class SpacesAtPeak:
    """What the per-address-space table needs, copied at a new peak and tabulated at the end:
    peaks come at most samples while a workload grows, so the copy takes only the mappings as
    they lie in the table (unsorted) and, per mapping, what its frame holds."""

    names: dict[int, list[str]]
    mm_of: dict[int, int]  # mmid -> mm
    keys: np.ndarray  # mapping-table keys (mmid << 40 | virtual page)
    frames: np.ndarray
    content: np.ndarray  # per mapping: its frame's content id, named bit, proc_count, and
    named: np.ndarray    # how many mapped frames hold that content (0: content unknown)
    proc_count: np.ndarray
    ref_mapped: np.ndarray

    @classmethod
    def of(cls, st: ReplayState) -> SpacesAtPeak:
        names: dict[int, list[str]] = {}
        for t in sorted(st.tasks.values(), key=lambda t: t.pid):
            if t.mm and t.pid == t.tgid:
                names.setdefault(t.mm, []).append(f"{t.comm}[{t.tgid}]")
        occupied = st.vmap.keys != 0
        keys, frames = st.vmap.keys[occupied], st.vmap.vals[occupied]
        c = st.content[frames]
        known = c >= 0
        return cls(names, {sp.mmid: mm for mm, sp in st.spaces.items()}, keys, frames, c,
                   st.named[frames], st.proc_count[frames],
                   np.where(known, st.ref_mapped[np.where(known, c, 0)], 0))


def per_space(at: SpacesAtPeak) -> list[dict[str, Any]]:
    """One row per address space: its pages and how much of them is shared or shareable."""
    rows: list[dict[str, Any]] = []
    if not len(at.keys):
        return rows
    mmid = (at.keys >> np.uint64(MMID_SHIFT)).astype(np.int64)
    order = np.argsort(mmid, kind="stable")
    starts = np.flatnonzero(np.r_[True, mmid[order][1:] != mmid[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        mm = at.mm_of.get(int(mmid[order[a]]))
        if mm is None:
            continue
        sel = order[a:b]
        frames, first = np.unique(at.frames[sel], return_index=True)
        one = sel[first]  # one mapping per frame
        c = at.content[one]
        named = at.named[one]
        known = c >= 0
        pc = at.proc_count[one]
        rows.append({
            "mm": f"{mm:#x}",
            "tasks": " ".join(at.names.get(mm, [])) or "?",
            "vpages": len(sel),
            "frames": len(frames),
            "anon": int((~named).sum()),
            "named": int(named.sum()),
            "exclusive": int((pc == 1).sum()),
            "pss_pages": round(float((1.0 / pc).sum()), 1),
            "self_sharings": int(known.sum()) - len(np.unique(c[known])),
            "shareable": int((known & (at.ref_mapped[one] >= 2)).sum()),
        })
    rows.sort(key=lambda r: -r["frames"])
    return rows


class SharingAnalysis(Analysis):
    """The four figures over time, sampled every ``interval`` clock units."""

    name = "sharing"
    flag = "--sharing"
    help = ("the four figures over time, zero pages, shareable pages by type (Table 5.2), "
            "per address space, whole guest")
    default = True

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument("--base", type=parse_base, default=None, metavar="PAGES|NMiB",
                            help="--sharing: also give the figures relative to this base, as "
                                 "the thesis's tables do (e.g. 480MiB)")

    @classmethod
    def from_args(cls, args: Any) -> SharingAnalysis:
        return cls(base=args.base)

    def __init__(self, interval: Interval | int | None = None, top_spaces: int = 20,
                 base: int | None = None) -> None:
        self.interval = interval
        self.base = base
        self.per_snapshot = False
        self.top_spaces = top_spaces
        self.samples: list[dict[str, Any]] = []
        self.peak: dict[str, Any] | None = None
        self.peak_spaces: SpacesAtPeak | None = None
        self.census = FrameCensus()

    def begin(self, ctx: Context) -> None:
        super().begin(ctx)
        tr = ctx.trace
        # a snapshot trace changes only at its snapshots: sample each one, once
        self.per_snapshot = (tr.header.get("source") == "snapshot" and not self.interval
                             and ctx.interval is None)
        self.grid = ctx.grid(100, self.interval)

    def _sample(self, st: ReplayState, s: int) -> None:
        fig = {"t": s, **self.census(st)}
        self.samples.append(fig)
        if self.peak is None or fig["mmap_fork"] > self.peak["mmap_fork"]:
            self.peak = fig
            self.peak_spaces = SpacesAtPeak.of(st)

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        if self.per_snapshot:
            return
        for s in self.grid.instants_in(t0, t1):
            self._sample(st, s)

    def on_records(self, st: ReplayState, kind: int, records: Any, chunk: Any) -> None:
        if self.per_snapshot and kind == Kind.MARK and \
                np.any(records["op"] == MarkOp.STATE_END):
            self._sample(st, st.t)

    def end(self, st: ReplayState) -> None:
        if not self.samples or (self.samples[-1]["t"] < st.t and not self.per_snapshot):
            self._sample(st, st.t)

    def result(self) -> Result:
        r = Result("sharing")
        ps = self.replay.trace.page_size
        cols = ["t", *FIGURES, "zero_pages", "anon_frames", "named_frames", "guest_frames",
                "guest_distinct"]
        r.tables["series"] = self.ctx.series(cols, [[s[c] for c in cols] for s in self.samples],
                                             "sharing over time (pages)")
        peak = self.peak or {k: 0 for k in cols}
        step = self.grid.step
        r.summary["interval"] = step.value if step.seconds else int(step.value)
        r.units["interval"] = "s" if step.seconds else self.ctx.trace.clock_unit
        r.summary["samples"] = len(self.samples)
        r.summary["peak_t"] = peak.get("t", 0)
        r.units["peak_t"] = self.replay.trace.clock_unit
        base = peak["mmap_fork"] or 1
        fig_rows = []
        for f in FIGURES:
            fig_rows.append([f, peak[f], round(pages_to_mib(peak[f], ps), 2),
                             round(peak[f] / base, 3)])
            if self.base:
                fig_rows[-1].append(round(peak[f] / self.base, 3))
            r.summary[f"peak_{f}"] = peak[f]
            r.units[f"peak_{f}"] = "pages"
        r.tables["figures_at_peak"] = Table(
            ["figure", "pages", "MiB", "relative_to_mmap_fork"]
            + ([f"relative_to_base_{self.base}_pages"] if self.base else []), fig_rows,
            "the four figures at the sample with the most frames mapped (thesis Table 5.1 form)")
        r.tables["shareable_by_type"] = Table(
            ["type", "contents", "sharings"],
            [[k, peak.get(f"shareable_{k}_contents", 0), peak.get(f"shareable_{k}_sharings", 0)]
             for k in ("anonymous", "named", "mixed")],
            "shareable pages by type at peak (thesis Table 5.2): duplicated contents and the "
            "frames they could free")
        r.summary["zero_pages_at_peak"] = peak.get("zero_pages", 0)
        r.units["zero_pages_at_peak"] = "frames"
        r.summary["guest_frames_at_peak"] = peak.get("guest_frames", 0)
        r.summary["guest_distinct_at_peak"] = peak.get("guest_distinct", 0)
        spaces = per_space(self.peak_spaces) if self.peak_spaces else []
        if spaces:
            cols2 = list(spaces[0].keys())
            r.tables["per_address_space"] = Table(
                cols2, [[row[c] for c in cols2] for row in spaces[:self.top_spaces]],
                "per address space at peak (largest first)")
        return r

    def plots(self, result: Result) -> list[Plot]:
        series = result.tables["series"]
        if not series.rows:
            return []
        ps = self.ctx.page_size
        x = self.ctx.time.x(np.array(series.column("t"), dtype=np.float64))

        def draw(ax: Any) -> None:
            for col, label in FIGURE_LABELS.items():
                steps(ax, x, [pages_to_mib(v, ps) for v in series.column(col)], label=label)

        return [Plot("memory", "memory over time: the four figures and the oracle", draw,
                     ylabel="memory (MiB)")]
