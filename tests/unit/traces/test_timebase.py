"""The trace's time base (memtrace.traces.timebase): known answers on hand-made traces, and the
shipped sample cut short (no tracer.clock_hz: the knots' own rate, not one second per unit)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from memtrace.analyses.base import Context, Interval
from memtrace.traces.format import MarkOp
from memtrace.traces.reader import open_trace
from memtrace.traces.timebase import GuestClock, Phase, TraceMeta, phases_of
from tests.helpers import Builder
from tests.paths import SAMPLES


def clocked(path, knots, clock_hz=None, end=None):
    """A trace with ``guest.clock_ns`` knots [(t, ns)] and one mapped page."""
    b = Builder(path, **({"clock_hz": clock_hz} if clock_hz else {}))
    for i, (t, ns) in enumerate(knots):
        b.at(t)
        b.w.counter("guest.clock_ns", ns)
        if i == 0:
            b.page(1, 0xA).map(1, 0, 1)
    if end is not None:
        b.at(end)
    b.close()
    return open_trace(path)


def test_knots_interpolate_and_extrapolate_at_their_mean_rate(tmp_path):
    # 100 units = 1 s, then 100 units = 3 s: mean rate 200 units / 4 s = 50 units/s
    tr = clocked(tmp_path / "t.mtr", [(100, 10**9), (200, 2 * 10**9), (300, 5 * 10**9)],
                 end=400)
    tb = tr.time_base()
    assert tb.seconds and tb.hz == pytest.approx(50.0)
    assert tb.to_seconds(100) == 0.0
    assert tb.to_seconds(150) == pytest.approx(0.5)
    assert tb.to_seconds(250) == pytest.approx(2.5)
    assert tb.to_seconds(400) == pytest.approx(4.0 + 100 / 50)   # past the last knot
    assert tb.to_clock(2.5) == pytest.approx(250)
    assert "mean rate" in tb.describe()


def test_header_clock_hz_extrapolates(tmp_path):
    tr = clocked(tmp_path / "t.mtr", [(100, 10**9), (200, 2 * 10**9)], clock_hz=1000, end=300)
    tb = tr.time_base()
    assert tb.hz == 1000 and tb.to_seconds(300) == pytest.approx(1.0 + 0.1)


def test_without_knots_there_are_no_seconds(tmp_path):
    tr = clocked(tmp_path / "t.mtr", [(100, 10**9)], end=300)
    tb = tr.time_base()
    assert not tb.seconds and tb.axis == "instructions"
    assert "no guest clock" in tb.describe()
    with pytest.raises(ValueError):
        tb.to_seconds(200)


def test_seconds_grid_samples_at_guest_seconds(tmp_path):
    tr = clocked(tmp_path / "t.mtr", [(100, 10**9), (200, 2 * 10**9), (300, 5 * 10**9)],
                 end=400)
    ctx = Context(tr, None)  # type: ignore[arg-type]
    grid = ctx.grid(interval=Interval.parse("1s"))
    # seconds 0..6 -> trace times 100, 200, 233.3, 266.7, 300, 350, 400 (rounded up)
    assert list(grid.instants_in(0, 10**6)) == [100, 200, 234, 267, 300, 350, 400]
    clock = ctx.grid(interval=Interval.parse("100"))
    assert list(clock.instants_in(0, 401)) == [100, 200, 300, 400]


def test_interval_parsing():
    assert Interval.parse("10M") == Interval(10_000_000)
    assert Interval.parse("2.5s") == Interval(2.5, True)
    assert Interval.parse("500ms") == Interval(0.5, True)
    with pytest.raises(Exception, match="not a time"):
        Interval.parse("soon")


def test_cut_sample_reports_guest_seconds_not_millions(tmp_path):
    """The shipped sample cut at byte 3,500,000 (no tracer.clock_hz, written at close): an
    independent replay gets 7.9 guest seconds and an oracle mean of 6,189 pages; before the
    time base, the oracle extrapolated at one second per instruction (10,000,022.9 s)."""
    cut = tmp_path / "cut.mtr"
    cut.write_bytes((SAMPLES / "default.mtr").read_bytes()[:3_500_000])
    p = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", str(cut), "--oracle",
                        "--format", "json", "-q"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    import json

    s = json.loads(p.stdout)["results"]["oracle"]["summary"]
    assert 7.8 < s["guest_seconds"] < 8.0
    assert s["oracle_mean"] == pytest.approx(6_189, rel=0.002)
    assert "mean rate" in s["time_base"]


def test_x_is_guest_seconds_or_clock_units_from_the_start(tmp_path):
    """The report's time axis: seconds from the first instant when the trace has them, clock
    units from the first instant when it does not (scalars and arrays alike)."""
    tb = clocked(tmp_path / "s.mtr", [(100, 10**9), (200, 2 * 10**9), (300, 5 * 10**9)],
                 end=400).time_base()
    assert tb.t_begin == 100 and tb.x(250) == pytest.approx(2.5)
    assert tb.x(np.array([100, 200, 300])) == pytest.approx([0.0, 1.0, 4.0])
    tb = clocked(tmp_path / "c.mtr", [(100, 10**9)], end=300).time_base()
    assert tb.x(300) == 200 and tb.x(np.array([100, 250])).tolist() == [0, 150]


def test_clock_without_knots_converts_both_ways():
    """A ns trace without knots runs at 1e9 units per second, for arrays as for scalars."""
    c = GuestClock(1e9)
    assert c.guest(np.array([5e8, 2e9])) == pytest.approx([0.5, 2.0])
    assert c.trace(np.array([0.5, 2.0])) == pytest.approx([5e8, 2e9])
    assert c.trace(1.5) == 1.5e9 and c.guest(3e9) == 3.0


def test_last_phase_keeps_its_name_to_the_end():
    """A phase still open at the end of the trace runs to its end, under its own name; STOP
    closes a phase and time after it belongs to none."""
    marks = [(10, MarkOp.PHASE, "load"), (50, MarkOp.PHASE, "run")]
    assert phases_of(TraceMeta([], [], None, None, marks), 90) == [
        Phase("load", 10, 50), Phase("run", 50, 90)]
    marks.append((70, MarkOp.STOP, ""))
    assert phases_of(TraceMeta([], [], None, None, marks), 90) == [
        Phase("load", 10, 50), Phase("run", 50, 70)]
