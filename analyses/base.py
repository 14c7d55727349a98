"""The interface every analysis implements, what it is given, and what it hands back.

Modelled on DynamoRIO's drmemtrace analysis tools: the engine replays the trace once and drives
any number of analyses; each sees the state change by change and builds its report at the end.
Adding an analysis means writing one such class and listing it in ``analyses/registry.py``;
neither the engine nor the command line changes.

The contract, in the order the engine keeps it:

- ``add_arguments(parser)`` / ``from_args(args)``: the analysis's own options. A wrong option
  raises ``UsageError`` (the command line alone prints it and exits with status 2);
  ``selected(args)`` says whether the arguments ask for the analysis.
- ``begin(ctx)``: a ``Context``: the trace, its time base (``memtrace.traces.timebase``: every
  figure of a report stands on it), the page size, the sampling interval the user gave (or
  None), and the replayed state (read-only).
- The state changes only at instants. All records of one time stamp are applied before any
  analysis measures: ``on_content(cids, before, after)`` reports, once per instant, the net
  change of how many mapped frames hold each content over that instant (a content whose count
  came back to where it was is not reported), and ``on_interval(state, t0, t1)`` says the state
  stayed as it is on [t0, t1). ``on_records(state, kind, records, chunk)`` passes event records
  (TASK, VMA, MARK, COUNTER, LOST) in trace order as they are applied, for bookkeeping (names,
  phases, counters): what they change is only complete at the instant's end.
- Content ids are recycled. A content id (``state.content``, ``contents.lo/hi[id]``,
  ``ref_*[id]``, the ``cids`` of ``on_content``) names one content only while a frame holds it:
  once none does (its reference counts are all zero) and ``on_content`` has reported the
  instant that emptied it, the state may forget the content and give the id to another one; a
  content that comes back later gets an id again, maybe another. ``on_content_forgotten(cids)``
  names forgotten ids before any is given again (between blocks of records, never inside one).
  An analysis that keeps anything under content ids from one hook to the next (per-id arrays,
  sets of ids, a copy of ``state.content``) drops or marks it there, or reads hashes from a copy
  (``state.contents.hashes()``), so that it never takes the new content for the old. One that
  cannot let go of ids sets ``holds_content_ids``: the state then forgets nothing, and replay
  memory grows with every distinct content of the trace (about 100 bytes each).
- ``end(state)``, then ``result()``: a ``Result`` of summaries and tables, all JSON-serializable.
- ``plots(result)``: optional pictures (``Plot``), drawn by ``trace-analyze --plot``; plots that
  name the same panel share one set of axes (the four figures and the oracle, for example).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from memtrace.analyses.state import ReplayState
    from memtrace.traces.reader import Chunk, Trace
    from memtrace.traces.timebase import TimeBase


class UsageError(Exception):
    """A wrong option or combination of options: the command line prints the message on one
    line and exits with status 2, as argparse does."""


def positive_int(s: str) -> int:
    """An argparse type for counts such as ``--top K``: an integer of at least 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {s!r}")
    return v


_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}


@dataclass(frozen=True)
class Interval:
    """A length of time as the user gave it: clock units (``10M``) or seconds (``2.5s``)."""

    value: float
    seconds: bool = False

    @classmethod
    def parse(cls, s: str) -> Interval:
        """``5000``, ``10M``, ``2G`` (clock units) or ``2.5s``, ``500ms``, ``2min``."""
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(min|ms|us|s|[kKMG]?)\s*", s)
        if not m:
            raise argparse.ArgumentTypeError(
                f"not a time: {s!r} (clock units such as 10M or 5000, or seconds such as 2.5s)")
        v, unit = float(m.group(1)), m.group(2)
        if unit in _SECONDS:
            return cls(v * _SECONDS[unit], True)
        return cls(v * _SUFFIX[unit], False)

    def __str__(self) -> str:
        return f"{self.value:g} s" if self.seconds else f"{self.value:,.0f}"


def parse_time(s: str) -> int:
    """An argparse type for a time in clock units: an integer with an optional k/M/G suffix."""
    iv = Interval.parse(s)
    if iv.seconds:
        raise argparse.ArgumentTypeError(f"give {s!r} in clock units here (e.g. 10M)")
    return int(iv.value)


class Grid:
    """Sample instants every ``step`` from the trace's first instant, as trace times.

    A grid in seconds steps through guest seconds (the trace's time base maps them to trace
    times; a sample falls at the first trace time at or after its instant); a grid in clock
    units steps through the trace's clock.
    """

    def __init__(self, ctx: Context, step: Interval) -> None:
        self.ctx = ctx
        self.step = step
        self.origin = ctx.trace.t_begin
        self._times: np.ndarray | None = None

    def _seconds_times(self) -> np.ndarray:
        if self._times is None:
            tb = self.ctx.time
            span = float(tb.to_seconds(tb.t_end))
            n = int(span // self.step.value) + 1 if self.step.value > 0 else 1
            s = np.arange(n, dtype=np.float64) * self.step.value
            self._times = np.ceil(tb.to_clock(s)).astype(np.int64)
        return self._times

    def instants_in(self, t0: int, t1: int) -> Iterator[int]:
        """Sample times that fall in [t0, t1)."""
        if self.step.seconds:
            times = self._seconds_times()
            lo, hi = np.searchsorted(times, [t0, t1], side="left")
            yield from times[lo:hi].tolist()
            return
        step = int(self.step.value)
        if step <= 0:
            return
        k = max(0, -(-(t0 - self.origin) // step))
        s = self.origin + k * step
        while s < t1:
            yield s
            s += step


@dataclass
class Context:
    """What an analysis is given at ``begin``: the trace and everything derived from it once."""

    trace: Trace
    state: ReplayState
    #: the user's ``--interval`` (None: each analysis's default)
    interval: Interval | None = None

    @property
    def time(self) -> TimeBase:
        """The trace's time base: every figure of the report stands on it."""
        return self.trace.time_base()

    @property
    def page_size(self) -> int:
        return self.trace.page_size

    def phase_at(self, times: list[int] | np.ndarray) -> list[str]:
        """The marked phase in force at each trace time ("" outside any)."""
        phases = self.trace.phases()
        starts = np.array([p.t_start for p in phases], dtype=np.int64)
        names = []
        for t in np.asarray(times).tolist():
            i = int(np.searchsorted(starts, t, side="right")) - 1
            names.append(phases[i].name if i >= 0 and t < phases[i].t_end else "")
        return names

    def series(self, columns: list[str], rows: list[list[Any]], title: str,
               times: int = 1) -> Table:
        """A series: ``rows`` whose first ``times`` columns are trace times get, after them,
        the same times in guest seconds from the trace's first instant (``seconds``,
        ``seconds_end``; when the trace has them), and, last, the phase in force at the first."""
        secs: list[list[float]] = []
        names = ["seconds", "seconds_end"][:times]
        if self.time.seconds and rows:
            arr = np.array([row[:times] for row in rows], dtype=np.float64)
            secs = np.round(np.asarray(self.time.to_seconds(arr), dtype=np.float64), 6).tolist()
        phase = self.phase_at([row[0] for row in rows])
        cols = [*columns[:times], *(names if self.time.seconds else []), *columns[times:],
                "phase"]
        out = [[*row[:times], *(secs[i] if secs else []), *row[times:], phase[i]]
               for i, row in enumerate(rows)]
        return Table(cols, out, title)

    def default_interval(self, samples: int = 100) -> Interval:
        """About ``samples`` samples over the trace, on the report's time base: guest seconds
        when the trace has them, else clock units (at least 1)."""
        tr = self.trace
        if not tr.chunks:
            return Interval(1)
        if self.time.seconds:
            span = float(self.time.to_seconds(tr.chunks[-1].t_last))
            if span > 0:
                return Interval(span / samples, True)
        return Interval(max(1, (tr.chunks[-1].t_last - tr.t_begin) // samples))

    def grid(self, samples: int = 100, interval: Interval | int | None = None) -> Grid:
        """The sampling grid: ``interval`` (or the user's ``--interval``) if given, else about
        ``samples`` samples over the trace on the report's time base."""
        iv = interval if interval is not None else self.interval
        if isinstance(iv, int):
            iv = Interval(iv)
        if iv is None:
            iv = self.default_interval(samples)
        if iv.seconds and not self.time.seconds:
            raise UsageError(f"--interval {iv}: {self.trace.path} has no guest clock; give the "
                             f"interval in {self.trace.clock_unit} (e.g. 10M)")
        return Grid(self, iv)


@dataclass
class Table:
    """Rows of values under named columns (a series when the first column is time)."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    title: str = ""

    def column(self, name: str) -> list[Any]:
        """The values of one column, by name."""
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


@dataclass
class Result:
    """What an analysis reports: scalar summaries and tables, all JSON-serializable."""

    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Plot:
    """One picture an analysis offers: ``draw(ax)`` draws onto matplotlib axes. Plots naming
    the same ``panel`` share one set of axes; ``time_axis`` plots run on the report's time
    axis (guest seconds when the trace has them)."""

    panel: str
    title: str
    draw: Callable[[Any], None]
    ylabel: str = ""
    time_axis: bool = True


class Analysis:
    """Base class: override the hooks you need (see the module's contract)."""

    name = "analysis"
    #: command-line switch that selects the analysis, and its one-line help
    flag = ""
    help = ""
    #: run when trace-analyze is given no analysis switch
    default = False
    wants_content_deltas = False
    #: True if the analysis keeps content ids it cannot drop in ``on_content_forgotten``:
    #: then no content is forgotten (memory grows with the trace)
    holds_content_ids = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the analysis's own options (e.g. model parameters) to trace-analyze."""

    @classmethod
    def flag_dest(cls) -> str:
        """The argparse destination of the analysis's switch."""
        return f"run_{cls.name}"

    @classmethod
    def selected(cls, args: argparse.Namespace) -> bool:
        """True if trace-analyze's arguments ask for this analysis (its switch; an analysis
        whose own options imply it says so by overriding this)."""
        return bool(getattr(args, cls.flag_dest(), False))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Analysis:
        """Build the analysis from trace-analyze's parsed arguments (``UsageError`` if they
        do not make sense)."""
        return cls()

    def begin(self, ctx: Context) -> None:
        self.ctx = ctx
        self.replay = ctx  # the name analyses used before the context had one

    def on_interval(self, state: ReplayState, t0: int, t1: int) -> None:
        pass

    def on_content(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
        pass

    def on_content_forgotten(self, cids: np.ndarray) -> None:
        """No frame holds the contents ``cids`` any more and their ids will be given to other
        contents: forget what is kept under them (see the module's contract)."""

    def on_records(self, state: ReplayState, kind: int, records: np.ndarray, chunk: Chunk) -> None:
        """A block of records of ``kind`` (any kind but WRITE), after the state applied it."""

    def end(self, state: ReplayState) -> None:
        pass

    def result(self) -> Result:
        raise NotImplementedError

    def plots(self, result: Result) -> list[Plot]:
        """Pictures of the result (none by default)."""
        return []
