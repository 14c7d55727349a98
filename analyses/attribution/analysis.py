"""``trace-analyze --by/--top/--attribution``: the attribution driven by the replay, its options and
its report."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memtrace.analyses.attribution.attributor import (
    M_CROSS,
    M_LINUX,
    M_SAVED,
    M_SELF,
    M_SHAREABLE,
    M_ZERO,
    METRICS,
    Attribution,
    Attributor,
)
from memtrace.analyses.attribution.frozen import FrozenState, StateView, freeze
from memtrace.analyses.attribution.guestfiles import GuestFiles
from memtrace.analyses.attribution.tables import (
    file_pages,
    file_table,
    pct,
    round2,
    sorted_by_saving,
    top_tables,
    views_of,
    zero_self,
)
from memtrace.analyses.base import (
    Analysis,
    Context,
    Interval,
    Plot,
    Result,
    Table,
    UsageError,
    positive_int,
)
from memtrace.analyses.state import ReplayState
from memtrace.traces.format import Kind

VIEWS = ("task", "file", "section", "kind")


class _Select(argparse.Action):
    """Stores an attribution option: ``--by`` accumulates views, ``--average`` is a switch.
    Any of them asks for the analysis (``AttributionAnalysis.selected``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.dest == "attr_by":
            views = list(getattr(namespace, self.dest, None) or [])
            for v in str(values).split(","):
                v = v.strip()
                if v == "all":
                    views.extend(VIEWS)
                elif v in VIEWS:
                    views.append(v)
                else:
                    parser.error(f"--by: unknown view {v!r} (choose from {', '.join(VIEWS)}, "
                                 "all; several with commas)")
            values = list(dict.fromkeys(views))
        elif self.dest == "attr_average":
            values = True
        setattr(namespace, self.dest, values)


class AttributionAnalysis(Analysis):
    """Attribute frames and savings to tasks, executables, files, ELF sections and memory kinds.

    One instant is attributed from a copy of the state taken during the replay (the default
    instant, the peak, is known only at the end); ``--average`` attributes every sample as it
    passes and averages the tables.
    """

    name = "attribution"
    flag = "--attribution"
    help = ("who holds the shareable frames and saved pages: by task/executable (self vs cross "
            "sharing), file and ELF section, memory kind (heap, stack, cow, ...); same as "
            "--by all --top 10")
    default = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group(
            "attribution (--attribution; --by and --top select it too)")
        g.add_argument("--by", dest="attr_by", action=_Select, metavar="VIEW[,VIEW]",
                       default=None,
                       help="attribute frames and savings by task (address spaces and "
                            "executables, self vs cross sharing), file (and offset), section "
                            "(ELF section, needs --guest-root) or kind (heap, stack, file, cow, "
                            "bss, shmem, anon, zero, ...); all: every view")
        g.add_argument("--top", dest="attr_top", action=_Select, type=positive_int, metavar="K",
                       default=None,
                       help="the K most duplicated contents and their copies' owners")
        when = g.add_mutually_exclusive_group()
        when.add_argument("--at", dest="attr_at", action=_Select, type=Interval.parse,
                          metavar="T", default=None,
                          help="attribute the state at time T: trace time in clock units (e.g. "
                               "9.4G) or guest seconds after the trace's first instant (e.g. "
                               "2.5s); default: the sample with the most frames mapped")
        when.add_argument("--average", dest="attr_average", action=_Select, nargs=0,
                          default=False,
                          help="average the attribution over samples every --interval")
        g.add_argument("--guest-root", metavar="DIR", default=None,
                       help="the unpacked guest image (CACHE/guest/rootfs; trace-cache prints "
                            "CACHE): guest files are opened there for ELF sections and "
                            "by-content names")
        g.add_argument("--guest-path-map", metavar="GUEST=HOST", action="append", default=[],
                       help="rewrite guest paths before looking them up under --guest-root; "
                            "* matches one component (e.g. /zi/*/lib=/usr/lib); repeatable")

    @classmethod
    def selected(cls, args: argparse.Namespace) -> bool:
        """``--attribution``, or any of its own options: ``--by task`` alone runs it."""
        return super().selected(args) or any(
            getattr(args, k, None) not in (None, False)
            for k in ("attr_by", "attr_top", "attr_at", "attr_average"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AttributionAnalysis:
        views = getattr(args, "attr_by", None)
        top = getattr(args, "attr_top", None)
        if views is None and top is None:  # --attribution (or only --at/--average) alone
            views, top = list(VIEWS), 10
        root = getattr(args, "guest_root", None)
        if root is not None and not Path(root).is_dir():
            raise UsageError(f"--guest-root {root}: not a directory")
        try:
            guest = GuestFiles(root, getattr(args, "guest_path_map", []) or [])
        except ValueError as e:
            raise UsageError(f"--guest-path-map: {e}") from None
        return cls(views or [], top or 0, getattr(args, "attr_at", None),
                   bool(getattr(args, "attr_average", False)), None, guest)

    def __init__(self, views: Sequence[str] = VIEWS, top: int = 0,
                 at: Interval | int | None = None,
                 average: bool = False, interval: int | None = None,
                 guest: GuestFiles | None = None) -> None:
        self.views = list(views)
        self.top = top
        self.at = at
        self.average = average
        self.interval = interval
        self.attributor = Attributor(guest)
        self.snap: FrozenState | None = None
        self.best = -1
        self.sums: dict[str, dict[Any, Any]] = {}
        self.nsamples = 0
        self.att: Attribution | None = None
        self.at_note: str | None = None

    def begin(self, ctx: Context) -> None:
        super().begin(ctx)
        tr = ctx.trace
        self.grid = ctx.grid(100, self.interval)
        self.interval = self.grid.step
        self.attributor.guest.traced_with(tr.header.get("guest_image"))
        if isinstance(self.at, Interval):
            if self.at.seconds:
                if not ctx.time.seconds:
                    raise UsageError(f"--at {self.at}: {tr.path} has no guest clock; give the "
                                     f"time in {tr.clock_unit}")
                self.at = math.ceil(ctx.time.to_clock(self.at.value))
            else:
                self.at = int(self.at.value)

    def on_records(self, st: ReplayState, kind: int, records: np.ndarray, chunk: Any) -> None:
        if kind == Kind.VMA:
            self.attributor.learn_vmas(records, chunk)

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        samples = list(self.grid.instants_in(t0, t1))
        if samples and self.at is None and st.mapped_frames > self.best:
            self.best = st.mapped_frames
            self.snap = freeze(st, samples[0])
        if self.at is not None and self.snap is None and self.at < t1:
            if self.at < t0:
                self.at_note = f"--at {self.at} is before the trace's first state; using {t0}"
            self.snap = freeze(st, max(self.at, t0))
        if samples and self.average:
            self._accumulate(st, samples[0], len(samples))

    def _accumulate(self, st: StateView, t: int, weight: int) -> None:
        att = self.attributor.attribute(st, t)
        for view, groups in views_of(att, self.attributor, st).items():
            acc = self.sums.setdefault(view, {})
            for k, v in groups.items():
                acc[k] = acc.get(k, 0) + v * weight
        acc = self.sums.setdefault("_totals", {})
        for k, v in (("totals", att.totals), ("mapped", att.mapped_frames),
                     ("shared_contents", att.shared_contents)):
            acc[k] = acc.get(k, 0) + v * weight
        self.nsamples += weight

    def end(self, st: ReplayState) -> None:
        if self.at is None and st.mapped_frames > self.best:
            self.best = st.mapped_frames
            self.snap = freeze(st)
        if self.at is not None and self.snap is None:
            self.at_note = (f"--at {self.at} is past the trace's end ({st.t}); using the final "
                            "state")
            self.snap = freeze(st)
        if self.average and self.nsamples == 0:
            self._accumulate(st, st.t, 1)
        if self.snap is None:
            self.snap = freeze(st)
        self.att = self.attributor.attribute(self.snap)

    # -- report -------------------------------------------------------------------------------
    def result(self) -> Result:
        r = Result(self.name)
        att, snap = self.att, self.snap
        assert att is not None and snap is not None
        unit = self.replay.trace.clock_unit
        if self.average:
            n = self.nsamples
            views = {k: {g: v / n for g, v in d.items()} for k, d in self.sums.items()}
            tot = views.pop("_totals")
            totals = tot["totals"]
            step = self.grid.step
            r.summary["mode"] = (f"average of {n} samples every {step}"
                                 + ("" if step.seconds else f" {unit}"))
            r.summary["samples"] = n
            r.summary["interval"] = step.value if step.seconds else int(step.value)
            r.units["interval"] = "s" if step.seconds else unit
            r.summary["mapped_frames"] = round2(tot["mapped"])
            r.summary["shared_contents"] = round2(tot["shared_contents"])
        else:
            views = views_of(att, self.attributor, snap)
            totals = att.totals
            r.summary["mode"] = ("the state at --at T" if self.at is not None
                                 else "the sample with the most frames mapped")
            r.summary["t"] = att.t
            r.units["t"] = unit
            if self.ctx.time.seconds:
                r.summary["seconds"] = round(float(self.ctx.time.to_seconds(att.t)), 3)
                r.units["seconds"] = "guest seconds after the trace's first instant"
            r.summary["mapped_frames"] = att.mapped_frames
            r.summary["shared_contents"] = att.shared_contents
            r.summary["unknown_content_frames"] = att.unknown_frames
            r.summary["pairs_with_parent_vmas"] = att.vma_from_parent
            r.units["pairs_with_parent_vmas"] = "(space, frame) pairs"
            if att.vma_from_parent:
                r.notes.append(
                    f"{att.vma_from_parent} (space, frame) pairs lie in no VMA the trace reported "
                    "for their space and were classified by the parent's VMA at that address "
                    "(forked children inherit VMAs the trace does not list)")
        r.units["mapped_frames"] = "frames"
        saved = float(totals[M_SAVED])
        r.summary["linux_shared"] = round2(totals[M_LINUX])
        r.units["linux_shared"] = "pages already shared by mmap/fork"
        r.summary["shareable_frames"] = round2(totals[M_SHAREABLE])
        r.units["shareable_frames"] = "frames"
        for j, key in ((M_SAVED, "saved"), (M_SELF, "saved_self"), (M_CROSS, "saved_cross"),
                       (M_ZERO, "saved_zero")):
            r.summary[key] = round2(totals[j])
            r.units[key] = "pages"
        r.summary["self_pct"] = pct(totals[M_SELF], saved)
        r.units["self_pct"] = "% of saved"
        nonzero = saved - float(totals[M_ZERO])
        r.summary["self_pct_without_zero"] = pct(totals[M_SELF] - zero_self(views), nonzero)
        r.units["self_pct_without_zero"] = "% of saved, zero pages left out"
        g = self.attributor.guest
        r.summary["guest_root"] = str(g.root) if g.root else None
        if g.root is not None:
            r.summary["elf_files"] = g.elf_files
            r.summary["host_pages_checked"] = att.host_checked
            r.summary["host_pages_differ"] = att.host_differ
            left = sum(att.host_left_out.values())
            r.summary["host_pages_left_out"] = left
            r.units["host_pages_left_out"] = ("mapped file pages not compared: the root's "
                                              "manifest says the file differs from the traced")
            if left:
                r.summary["host_left_out_why"] = dict(sorted(att.host_left_out.items()))
                r.notes.append(
                    f"compared {att.host_checked} mapped file pages with the host copies under "
                    f"--guest-root; left out {left} whose files the root's manifest says differ "
                    "from the traced image's: " + "; ".join(
                        f"{why} ({n} pages)" for why, n in sorted(att.host_left_out.items())))
            if att.host_differ:
                r.notes.append(
                    f"{att.host_differ} of {att.host_checked} mapped file pages differ from the "
                    "host copies under --guest-root: the image is not the traced one (or a "
                    "--guest-path-map points to other files); their sections may be wrong")
        if self.at_note:
            r.notes.append(self.at_note)

        cols = list(METRICS)

        def rows(d: dict[Any, np.ndarray], with_pct: bool = True) -> list[tuple[Any, list[Any]]]:
            return [(k, [round2(x) for x in v] + ([pct(v[M_SAVED], saved)] if with_pct else []))
                    for k, v in sorted_by_saving(d)]

        if "task" in self.views:
            r.tables["by_task"] = Table(
                ["mm", "tasks", "exe", *cols, "saved_pct"],
                [[*k, *v] for k, v in rows(views["task"])],
                "by address space (one instance; frames mapped by k spaces count 1/k to each); "
                "saved_self: duplicates inside the space, saved_cross: between spaces")
            spaces = views["exe_spaces"]
            r.tables["by_exe"] = Table(
                ["exe", "spaces", *cols, "saved_pct"],
                [[k, round2(spaces.get(k, 0)), *v] for k, v in rows(views["exe"])],
                "by executable (the address spaces running it, summed)")
        if "kind" in self.views:
            r.tables["by_kind"] = Table(
                ["kind", *cols, "saved_pct"], [[k, *v] for k, v in rows(views["kind"])],
                "by memory kind (zero: the zero page's content, whatever maps it)")
        if "file" in self.views:
            r.tables["by_file"] = file_table(views["file"], saved)
            if not self.average:
                r.tables["file_pages"] = file_pages(att, self.attributor, snap)
        if "section" in self.views:
            r.tables["by_section"] = Table(
                ["section", *cols, "saved_pct"], [[k, *v] for k, v in rows(views["section"])],
                "by ELF section (all files; page-cache pages by file offset, private copies by "
                "address)" + ("" if g.root else ": give --guest-root to open the ELF files"))
            r.tables["by_file_section"] = Table(
                ["file", "segment", "section", *cols, "saved_pct"],
                [[*k, *v] for k, v in rows(views["file_section"])],
                "by file, PT_LOAD segment and section")
        if self.top:
            top, copies = top_tables(att, self.attributor, snap, self.top)
            r.tables["top"] = top
            r.tables["top_copies"] = copies
            if self.average:
                r.notes.append("--top lists the sample with the most frames mapped")
        r.notes.append(
            "a content held by n mapped frames saves n-1 (full CBPS); each copy gets (s-1)/s "
            "of self saving and (K-1)/(K*s) of cross saving (K groups of copies mapped by "
            "common address spaces, s copies in its group); a frame mapped by k spaces is "
            "split 1/k each")
        return r

    def plots(self, result: Result) -> list[Plot]:
        """Who holds the saved pages: stacked bars of self and cross sharing by memory kind,
        by executable and by file (the largest first)."""
        out: list[Plot] = []
        where = ("averaged over samples" if self.average else
                 "at --at T" if self.at is not None else "at the peak")
        for table, key, title in (("by_kind", "kind", "memory kind"),
                                  ("by_exe", "exe", "executable"),
                                  ("by_file", "file", "file")):
            t = result.tables.get(table)
            if t is None or not t.rows:
                continue
            rows = t.rows[:ATTRIBUTION_BARS]
            names = [_short(str(v)) for v in t.column(key)[:ATTRIBUTION_BARS]]
            self_, cross = (t.column("saved_self")[:len(rows)],
                            t.column("saved_cross")[:len(rows)])

            def draw(ax: Any, names: list[str] = names, self_: list[float] = self_,
                     cross: list[float] = cross) -> None:
                y = list(range(len(names)))[::-1]
                ax.barh(y, self_, color="tab:blue", label="saved within one address space")
                ax.barh(y, cross, left=self_, color="tab:orange",
                        label="saved between address spaces")
                ax.set_yticks(y, names, fontsize="small")
                ax.set_xlabel("pages saved")

            out.append(Plot(f"attribution-{key}", f"who holds the saved pages: by {title} "
                            f"({where})", draw, time_axis=False))
        return out


ATTRIBUTION_BARS = 12


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
