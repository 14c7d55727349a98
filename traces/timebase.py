"""The time of a trace: its clock, and the guest's own seconds when the trace carries them.

Every record's time stamp is in the trace's clock (``clock_unit`` in the header): retired guest
instructions for a recorded trace, ns for a snapshot series, abstract units for a synthetic one.
Instructions are a poor time axis for memory: under TCG the guest retires 15 to 180 M
instructions per second of its own time (idle vs busy), so busy periods are stretched and idle
ones squeezed. The guest agent therefore writes the guest's CLOCK_MONOTONIC into the trace as
COUNTER ``guest.clock_ns`` every 100 ms (``guest.hz``, the kernel's HZ, with the first one), and a
recorder may write ``tracer.clock_hz`` (its estimate of clock units per guest second) when it
closes the trace.

``TimeBase`` turns that into one map, computed once per trace (``time_base(trace)``) and asked
by every analysis, so that all figures of one report stand on the same time base:

- With two or more ``guest.clock_ns`` values (knots) the map trace time -> guest seconds is
  piecewise linear through them: one knot per distinct trace time, at the latest guest time seen
  at it (the agent's events reach the trace when the tracer drains the mailbox: at once while
  the guest idles, at the next epoch end while it computes); a guest time that does not move
  keeps its first trace time. Seconds count from the first knot.
- Outside the knots (before the first, after the last) time runs at ``hz`` clock units per
  second: the header's ``clock_hz``, else the ``tracer.clock_hz`` counter, else, when the trace
  has knots, their mean rate (the span of the knots in clock units over their span in guest
  seconds). So a trace cut short, which lacks ``tracer.clock_hz`` (written at close), still
  extrapolates at the rate its own knots show, never at one second per clock unit.
- With fewer than two knots a trace in ns has seconds (1e9 units per second); any other has no
  guest seconds, and every analysis reports in its clock unit and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.traces.format import (
    COUNTER_CLOCK_HZ,
    COUNTER_GUEST_CLOCK_NS,
    COUNTER_GUEST_HZ,
    Kind,
    MarkOp,
)

if TYPE_CHECKING:
    from memtrace.traces.reader import Trace


class GuestClock:
    """Trace time <-> guest seconds through the ``guest.clock_ns`` knots (see the module)."""

    def __init__(self, hz: float, t: np.ndarray | None = None, g: np.ndarray | None = None
                 ) -> None:
        self.hz = float(hz)
        self.t = np.zeros(0) if t is None else np.asarray(t, dtype=np.float64)
        self.g = np.zeros(0) if g is None else np.asarray(g, dtype=np.float64)
        if len(self.t):
            order = np.argsort(self.t, kind="stable")
            t, g = self.t[order], np.maximum.accumulate(self.g[order])
            last = np.r_[t[1:] != t[:-1], True]  # one knot per trace time: the latest
            t, g = t[last], g[last]
            keep = np.r_[True, g[1:] > g[:-1]]   # a guest time that did not move: first one
            self.t, self.g = t[keep], g[keep]

    @property
    def knots(self) -> int:
        return len(self.t)

    def guest(self, t: Any) -> Any:
        """Guest seconds at trace time ``t`` (scalar or array)."""
        if not len(self.t):
            return np.asarray(t, dtype=np.float64) / self.hz if isinstance(t, np.ndarray) \
                else float(t) / self.hz
        x = np.asarray(t, dtype=np.float64)
        y = np.interp(x, self.t, self.g)
        y = np.where(x < self.t[0], self.g[0] - (self.t[0] - x) / self.hz, y)
        y = np.where(x > self.t[-1], self.g[-1] + (x - self.t[-1]) / self.hz, y)
        return y if isinstance(t, np.ndarray) else float(y)

    def trace(self, g: Any) -> Any:
        """Trace time at guest seconds ``g`` (scalar or array): the inverse of ``guest``."""
        if not len(self.t):
            return np.asarray(g, dtype=np.float64) * self.hz if isinstance(g, np.ndarray) \
                else float(g) * self.hz
        x = np.asarray(g, dtype=np.float64)
        y = np.interp(x, self.g, self.t)
        y = np.where(x < self.g[0], self.t[0] - (self.g[0] - x) * self.hz, y)
        y = np.where(x > self.g[-1], self.t[-1] + (x - self.g[-1]) * self.hz, y)
        return y if isinstance(g, np.ndarray) else float(y)

    def span(self, a: Any, b: Any) -> Any:
        """Guest seconds from trace time ``a`` to ``b``."""
        return self.guest(b) - self.guest(a)

    @classmethod
    def from_counters(cls, hz: float | None, t: list[int], ns: list[int]) -> GuestClock:
        """From ``guest.clock_ns`` values ``ns`` seen at trace times ``t`` (seconds counted
        from the first). ``hz`` None: the knots' mean rate outside them (1 with no knots)."""
        if len(t) < 2:
            return cls(hz or 1.0)
        g = (np.array(ns, dtype=np.float64) - ns[0]) / 1e9
        clock = cls(1.0, np.array(t, dtype=np.float64), g)
        if hz:
            clock.hz = float(hz)
        elif clock.knots >= 2 and clock.g[-1] > clock.g[0]:
            clock.hz = float((clock.t[-1] - clock.t[0]) / (clock.g[-1] - clock.g[0]))
        return clock


@dataclass
class TimeBase:
    """One trace's time base (see the module): computed once, shared by every analysis."""

    unit: str                 #: the trace's clock unit (header ``clock_unit``)
    t_begin: int              #: the trace's first time stamp
    t_end: int                #: its last
    clock: GuestClock | None  #: trace time <-> guest seconds; None: no guest seconds
    hz: float | None          #: clock units per guest second outside the knots, if known
    hz_source: str            #: where ``hz`` came from
    guest_hz: int | None      #: the guest kernel's HZ (``guest.hz``), if the trace has it

    @property
    def seconds(self) -> bool:
        """True if the trace's times convert to guest seconds."""
        return self.clock is not None

    @property
    def axis(self) -> str:
        """What a time axis shows: "guest seconds" or the clock unit."""
        return "guest seconds" if self.seconds else self.unit

    def describe(self) -> str:
        """One line for reports: which time every figure of the report stands on."""
        if self.clock is not None and self.clock.knots:
            return (f"guest seconds ({self.clock.knots} {COUNTER_GUEST_CLOCK_NS} knots; outside "
                    f"them {self.hz:,.0f} {self.unit}/s from {self.hz_source})")
        if self.clock is not None:
            return f"guest seconds ({self.unit} at {self.hz:,.0f}/s, {self.hz_source})"
        return f"{self.unit} (the trace has no guest clock)"

    def to_seconds(self, t: Any) -> Any:
        """Guest seconds since the trace's first instant at trace time ``t`` (scalar/array)."""
        if self.clock is None:
            raise ValueError("this trace has no guest seconds")
        return self.clock.guest(t) - self.clock.guest(self.t_begin)

    def to_clock(self, s: Any) -> Any:
        """Trace time at ``s`` guest seconds after the trace's first instant."""
        if self.clock is None:
            raise ValueError("this trace has no guest seconds")
        return self.clock.trace(np.asarray(s, dtype=np.float64) + self.clock.guest(self.t_begin)
                                ) if isinstance(s, np.ndarray) else \
            float(self.clock.trace(float(s) + self.clock.guest(self.t_begin)))

    def x(self, t: Any) -> Any:
        """Trace time ``t`` on the report's time axis: guest seconds from the start if the
        trace has them, else clock units from the start."""
        if self.clock is None:
            return np.asarray(t) - self.t_begin if isinstance(t, np.ndarray) else t - self.t_begin
        return self.to_seconds(t)

    def span(self, a: Any, b: Any) -> Any:
        """The length of [a, b) on the report's time base (guest seconds or clock units)."""
        if self.clock is None:
            return np.asarray(b) - np.asarray(a) if isinstance(a, np.ndarray) else b - a
        return self.clock.span(a, b)


@dataclass(frozen=True)
class Phase:
    """A phase the workload marked (MARK PHASE): from its mark to the next PHASE or STOP, or the
    trace's end. Time before the first PHASE mark belongs to no phase (name "")."""

    name: str
    t_start: int
    t_end: int


@dataclass
class TraceMeta:
    """What one pass over a trace's chunks collects for the time base and the phases."""

    knot_t: list[int]
    knot_ns: list[int]
    counter_hz: int | None
    guest_hz: int | None
    marks: list[tuple[int, int, str]]  # (t, op, name) of PHASE, START and STOP marks


def scan_meta(trace: Trace) -> TraceMeta:
    """One pass over the chunks: clock counters (decoded only in chunks whose string table
    names one) and phase marks."""
    meta = TraceMeta([], [], None, None, [])
    names = (COUNTER_GUEST_CLOCK_NS, COUNTER_GUEST_HZ, COUNTER_CLOCK_HZ)
    t = trace.t_begin
    for info in trace.chunks:
        try:
            ch = trace.read_chunk(info)
        except Exception:  # noqa: BLE001 - the replay reports a damaged chunk; time stops here
            break
        for kind, rec in ch.blocks:
            if kind == Kind.TIME and len(rec):
                t = int(rec["t"][-1])
            elif kind == Kind.MARK:
                for op, name_id, _arg in rec.tolist():
                    if op in (MarkOp.PHASE, MarkOp.START, MarkOp.STOP):
                        meta.marks.append((t, op, ch.string(name_id) or ""))
            elif kind == Kind.COUNTER and any(n in ch.strings for n in names):
                for name_id, _pad, value in rec.tolist():
                    name = ch.string(name_id)
                    if name == COUNTER_GUEST_CLOCK_NS:
                        meta.knot_t.append(t)
                        meta.knot_ns.append(int(value))
                    elif name == COUNTER_GUEST_HZ and int(value) > 0:
                        meta.guest_hz = int(value)
                    elif name == COUNTER_CLOCK_HZ and int(value) > 0:
                        meta.counter_hz = int(value)
        t = max(t, info.t_last)
    return meta


def phases_of(meta: TraceMeta, t_end: int) -> list[Phase]:
    """The marked phases, in order (see ``Phase``)."""
    out: list[Phase] = []
    cur: tuple[str, int] | None = None
    for t, op, name in meta.marks:
        if cur is not None:
            out.append(Phase(cur[0], cur[1], t))
            cur = None
        if op == MarkOp.PHASE:
            cur = (name, t)
    if cur is not None:
        out.append(Phase(cur[0], cur[1], t_end))
    return [p for p in out if p.t_end > p.t_start or p.t_end == t_end]


def read_time_base(trace: Trace, meta: TraceMeta | None = None) -> TimeBase:
    """A trace's time base from its clock counters (``scan_meta``)."""
    meta = meta or scan_meta(trace)
    ts, ns = meta.knot_t, meta.knot_ns
    t_end = trace.chunks[-1].t_last if trace.chunks else trace.t_begin
    header_hz = trace.header.get("clock_hz")
    if header_hz:
        hz: float | None = float(header_hz)
        source = "header clock_hz"
    elif meta.counter_hz:
        hz, source = float(meta.counter_hz), f"counter {COUNTER_CLOCK_HZ}"
    elif trace.clock_unit == "ns":
        hz, source = 1e9, "clock unit ns"
    else:
        hz, source = None, ""
    clock: GuestClock | None = None
    if len(ts) >= 2:
        clock = GuestClock.from_counters(hz, ts, ns)
        if clock.knots < 2:
            clock = None
        elif hz is None:
            hz, source = clock.hz, "the knots' mean rate"
    if clock is None and trace.clock_unit == "ns":
        clock = GuestClock(1e9)
    return TimeBase(trace.clock_unit, trace.t_begin, t_end, clock, hz, source, meta.guest_hz)
