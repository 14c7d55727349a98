"""The replay engine's own promises (analyses/engine.py), on hand-made traces with known answers:
instants, MARK, COUNTER and RAM bounds as FORMAT.md states them."""

from __future__ import annotations

import pytest

from memtrace.analyses.base import Analysis
from memtrace.analyses.engine import Replay
from memtrace.traces.format import MarkOp
from memtrace.traces.reader import TraceError, open_trace
from tests.helpers import Builder


class Intervals(Analysis):
    """Records every interval the engine hands out, with the no-sharing figure over it."""

    name = "intervals"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_interval(self, state, t0: int, t1: int) -> None:
        self.seen.append((t0, t1, state.figures()["no_sharing"]))


def test_repeated_time_is_one_instant(tmp_path):
    """Records between two TIME records of the same t are one instant (FORMAT.md, Instants):
    the half-applied state between them is never an interval, however large t is."""
    p = tmp_path / "i.mtr"
    b = Builder(p)
    b.at(1_000_000).page(1, 0xA).map(7, 0, 1)
    b.at(1_000_000).map(7, 1, 1)
    b.at(1_000_000).map(7, 0, None)
    b.at(3_000_000).map(7, 2, 1)
    b.at(4_000_000)
    b.close()
    an = Intervals()
    Replay(open_trace(p), [an], progress=False).run()
    # mm 7 maps frame 1 once (vpn 1) over [1e6, 3e6), at vpns 1 and 2 after
    assert an.seen == [(1_000_000, 3_000_000, 1), (3_000_000, 4_000_000, 1)]


def test_state_begin_with_reset_forgets_everything(tmp_path):
    p = tmp_path / "r.mtr"
    b = Builder(p)
    b.at(10).page(1, 0xA).map(7, 0, 1)
    b.w.counter("ksm.pages_sharing", 5)
    b.at(20)
    b.w.mark(MarkOp.STATE_BEGIN, arg=1)
    b.page(2, 0xB).map(8, 0, 2)
    b.w.mark(MarkOp.STATE_END)
    b.at(30)
    b.close()
    st = Replay(open_trace(p), progress=False).run()
    assert st.content[1] < 0 and st.content[2] >= 0       # frame 1 unknown again
    assert {mm for mm, sp in st.spaces.items() if sp.npages} == {8}
    assert st.counters == {} and st.figures()["no_sharing"] == 1
    assert st.marks == [(20, MarkOp.STATE_BEGIN, None), (20, MarkOp.STATE_END, None)]
    assert st.incomplete is None


def test_incomplete_mark_gives_its_reason(tmp_path):
    for reason, expected in (("disk full", "disk full"), (None, "unknown reason")):
        p = tmp_path / "x.mtr"
        b = Builder(p)
        b.at(10).page(1, 0xA)
        b.w.mark(MarkOp.INCOMPLETE, reason)
        b.close()
        st = Replay(open_trace(p), progress=False).run()
        assert st.incomplete == expected
        assert st.marks == [(10, MarkOp.INCOMPLETE, reason)]


def test_counters_keep_their_names_and_latest_values(tmp_path):
    p = tmp_path / "c.mtr"
    b = Builder(p)
    b.at(10)
    b.w.counter("ksm.pages_sharing", 42)
    b.w.counter("guest.clock_ns", 7)
    b.at(20)
    b.w.counter("ksm.pages_sharing", 43)
    b.close()
    st = Replay(open_trace(p), progress=False).run()
    assert st.counters == {"ksm.pages_sharing": 43, "guest.clock_ns": 7}


def test_frame_far_beyond_ram_names_the_declared_size(tmp_path):
    """A PAGE record for frame 2^24 in a trace that declares 1 MiB of RAM: one error naming the
    chunk, the frame and the RAM size the header gave, so the user can tell which is wrong."""
    p = tmp_path / "b.mtr"
    b = Builder(p, nframes=256)
    b.at(10).page(1 << 24, 0xA)
    b.close()
    tr = open_trace(p)
    with pytest.raises(TraceError, match=r"at byte \d+: frame 0x1000000 is beyond guest RAM "
                                         r"\(1048576 bytes\)"):
        Replay(tr, progress=False).run()
