"""The KSM model in the guest's own time, madvise in the trace, and the model-vs-kernel report.

Synthetic traces as in ``test_ksm.py`` (``clock_hz = 1000``: without a guest clock one clock
unit is one guest millisecond), plus the guest agent's ``guest.clock_ns`` / ``guest.hz``
counters and VMA PROTECT records carrying VM_MERGEABLE, as a recorded ``ksm`` scenario has them.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from memtrace.analyses.ksm.params import cycle_ms
from memtrace.traces.format import VM_MERGEABLE, MarkOp, VmaOp
from memtrace.traces.timebase import GuestClock
from tests.helpers import Builder
from tests.unit.analyses.test_ksm import run, series

RW = 0x3
PAGE = 4096


def two_identical(b: Builder, flags: int = RW | VM_MERGEABLE) -> None:
    b.w.vma(VmaOp.MAP, 0, 1, 0x10 * PAGE, 0x14 * PAGE, flags)
    b.page(1, 7).page(2, 7)
    b.map(1, 0x10, 1).map(1, 0x11, 2)


# -- the map between trace time and guest time ------------------------------------------------

def test_guest_clock_interpolates_and_extrapolates():
    # knots drained together (same trace time) keep the latest guest time; a guest time that
    # did not move keeps its first trace time
    c = GuestClock(1000.0, np.array([0, 10, 10, 100, 120]), np.array([0.0, 0.05, 0.1, 0.19, 0.19]))
    assert c.knots == 3
    assert c.guest(5) == pytest.approx(0.05)      # 10 ms of guest time per clock unit
    assert c.guest(55) == pytest.approx(0.145)    # then 1 ms per unit
    assert c.guest(200) == pytest.approx(0.29)    # beyond the last knot: 1 / clock_hz
    assert c.guest(-10) == pytest.approx(-0.01)
    t = np.array([-10.0, 0.0, 3.0, 10.0, 42.0, 100.0, 150.0])
    assert np.allclose(c.trace(c.guest(t)), t)
    assert c.span(0, 100) == pytest.approx(0.19)
    linear = GuestClock(1000.0)
    assert linear.knots == 0 and linear.guest(250) == 0.25 and linear.trace(0.25) == 250


@pytest.mark.parametrize(("sleep", "hz", "want"), [
    (50, 250, Fraction(56)),     # msecs_to_jiffies(50) = 13, + 1: 14 jiffies of 4 ms
    (20, 250, Fraction(24)),     # 5 + 1 jiffies
    (20, 1000, Fraction(21)),
    (20, 300, Fraction(70, 3)),  # ceil(6) + 1 = 7 jiffies of 10/3 ms
    (20, 0, Fraction(20)),       # no rounding
    (12.5, 0, Fraction(25, 2)),
])
def test_cycle_in_jiffies(sleep, hz, want):
    assert cycle_ms(sleep, hz) == want


def clocked_trace(path: Path, hz_counter: int | None = None) -> None:
    """Two identical mergeable pages at t=0; the guest's clock says the first 10 clock units
    took 100 ms (the guest idled) and the next 90 took 90 ms."""
    b = Builder(path, clock_hz=1000).at(0)
    if hz_counter:
        b.w.counter("guest.hz", hz_counter)
    b.w.counter("guest.clock_ns", 5_000_000_000)
    two_identical(b)
    b.at(10)
    b.w.counter("guest.clock_ns", 5_100_000_000)
    b.at(100)
    b.w.counter("guest.clock_ns", 5_190_000_000)
    b.at(120).close()


def test_batches_placed_in_guest_time(tmp_path):
    p = tmp_path / "t.mtr"
    clocked_trace(p)
    a, r = run(p)
    # batch 0 at guest 0 (t=0) records the checksums, batch 1 at guest 20 ms = t 2 merges
    sharing = series(r, "pages_sharing")
    assert sharing[1] == 0 and sharing[2] == 1
    s = r.summary
    assert s["guest_clock_knots"] == 3 and s["guest_seconds"] == pytest.approx(0.21)
    # batches every 20 ms of guest time: t = 0, 2, 4, 6, 8, 10, then 30, 50, 70, 90, 110
    assert s["final_full_scans"] == 11
    assert s["latency_median"] == pytest.approx(0.020)  # guest seconds, not clock units
    # time-weighted means over guest time: merged from guest 20 ms to 210 ms (in clock units
    # it would be 118 of 120)
    assert s["pages_sharing_mean"] == pytest.approx(0.19 / 0.21, abs=1e-3)
    assert s["fraction_of_scope_oracle"] == pytest.approx(0.19 / 0.21, abs=1e-3)
    assert any("guest.clock_ns" in n for n in r.notes)
    # the same trace read with clock_hz alone: batches every 20 units, the merge at t=20
    _, r = run(p, guest_clock=False)
    sharing = series(r, "pages_sharing")
    assert sharing[19] == 0 and sharing[20] == 1
    assert r.summary["guest_clock_knots"] == 0 and r.summary["final_full_scans"] == 6


def test_jiffies_from_the_trace(tmp_path):
    p = tmp_path / "t.mtr"
    clocked_trace(p, hz_counter=250)
    _, r = run(p)
    # sleep 20 ms at HZ=250: batches 24 ms apart; batch 1 at guest 24 ms = t 2.4
    sharing = series(r, "pages_sharing")
    assert sharing[2] == 0 and sharing[3] == 1
    assert r.summary["guest_hz"] == 250 and r.summary["batch_cycle_ms"] == 24
    assert any("HZ=250" in n for n in r.notes)
    _, r = run(p, tick_hz=0)  # --ksm-hz 0: exactly sleep_ms
    assert series(r, "pages_sharing")[2] == 1 and r.summary["batch_cycle_ms"] == 20
    _, r = run(p, tick_hz=1000)  # --ksm-hz wins over the trace: 21 ms
    assert r.summary["guest_hz"] == 1000 and r.summary["batch_cycle_ms"] == 21


def test_hinted_scanner_settles_in_guest_time(tmp_path):
    p = tmp_path / "t.mtr"
    clocked_trace(p)
    _, r = run(p, hints=True)
    s = r.summary
    assert s["final_pages_sharing"] == 1 and s["hinted_saved_pages_mean"] > 0


# -- madvise(MADV_MERGEABLE) as VMA PROTECT -------------------------------------------------

def test_madvise_protect_brings_pages_into_scope(tmp_path):
    p = tmp_path / "t.mtr"
    b = Builder(p, clock_hz=1000).at(0)
    two_identical(b, flags=RW)  # mapped, not mergeable yet
    b.at(50)
    # what the agent reports for madvise(MADV_MERGEABLE) over the VMA
    b.w.vma(VmaOp.PROTECT, 0, 1, 0x10 * PAGE, 0x14 * PAGE, RW | VM_MERGEABLE)
    b.at(200).close()
    _, r = run(p)
    sharing, scans = series(r, "pages_sharing"), series(r, "full_scans")
    # no mm on ksmd's list before t=50: nothing scanned; then checksums at 60, merge at 80
    assert scans[49] == 0 and sharing[79] == 0 and sharing[80] == 1
    assert not any("no VMA in the trace has VM_MERGEABLE" in n for n in r.notes)
    # MADV_UNMERGEABLE: the flag goes away, the pages leave the scope
    b2 = Builder(tmp_path / "u.mtr", clock_hz=1000).at(0)
    two_identical(b2)
    b2.at(100)
    b2.w.vma(VmaOp.PROTECT, 0, 1, 0x10 * PAGE, 0x14 * PAGE, RW)
    b2.at(200).close()
    _, r = run(tmp_path / "u.mtr")
    assert series(r, "pages_sharing")[99] == 1 and series(r, "pages_sharing")[100] == 0


# -- the comparison with the kernel's counters ------------------------------------------------

def test_final_is_the_last_sample_of_the_start_phase(tmp_path):
    p = tmp_path / "t.mtr"
    b = Builder(p, clock_hz=1000).at(0)
    two_identical(b)
    b.at(10)
    b.w.mark(MarkOp.PHASE, "merge")
    for t, v in ((15, 0), (35, 1), (90, 1)):
        b.at(t)
        b.w.counter("ksm.pages_sharing", v)
    b.at(95)
    b.w.mark(MarkOp.PHASE, "exit")
    b.w.map(1, 0x10, 0, 0)
    b.w.map(1, 0x11, 0, 0)
    b.at(99)
    b.w.counter("ksm.pages_sharing", 0)  # the workload is gone: not the one to judge
    b.w.counter("ksm.pages_sharing", 3)
    b.at(100).close()
    _, r = run(p, start="phase:merge")
    s = r.summary
    # model: first batch at 10, merge at 30
    assert s["final_sample_phase"] == "merge"
    assert (s["kernel_final_pages_sharing"], s["model_at_kernel_final_pages_sharing"]) == (1, 1)
    assert s["relative_error_final_pages_sharing"] == 0
    assert s["pages_sharing_mean_abs_error"] == 0 and s["pages_sharing_samples"] == 3
    t = r.tables["kernel_vs_model"]
    assert t.columns[-2:] == ["guest_s", "phase"]
    rows = [x for x in t.rows if x[1] == "pages_sharing"]
    assert [x[6] for x in rows] == ["merge", "merge", "merge", "exit", "exit"]
    assert [x[5] for x in rows] == pytest.approx([0.015, 0.035, 0.09, 0.099, 0.099])
    assert any("phase 'merge'" in n for n in r.notes)
    # without a start phase every sample from the start of the trace counts
    _, r = run(p)
    assert r.summary["kernel_final_pages_sharing"] == 3
    assert r.summary["pages_sharing_samples"] == 5
