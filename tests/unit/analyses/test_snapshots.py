"""Snapshot versus continuous: a known answer for each definition of analyses/SNAPSHOTS.md, on
hand-built traces (every number below is worked out in the comments)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from memtrace.analyses.base import Interval
from memtrace.analyses.engine import Replay
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.analyses.sharing import SharingAnalysis
from memtrace.analyses.snapshots import SnapshotVsContinuous, kaplan_meier, km_quantile
from memtrace.traces.reader import open_trace
from tests.helpers import Builder
from tests.paths import REPO


def run(path, interval=None, view="content"):
    an = SnapshotVsContinuous(interval, view=view)
    Replay(open_trace(path), [an], progress=False).run()
    return an.result()


def base(path):
    """Frames 1..4 mapped by spaces 1..4 at t=0, each with its own content (nothing shared)."""
    b = Builder(path).at(0)
    for f in range(1, 5):
        b.page(f, 100 + f).map(f, 0, f)
    return b


def test_block_order_within_an_instant_changes_nothing(tmp_path):
    """The recorder writes an epoch's PAGE block before its MAP block. At t=10 frame 2 takes
    content 101 (a duplicate of frame 1) while space 2 moves its page to frame 3, which takes
    content 102: the epoch's states are the same whichever block comes first. Half-applied, the
    PAGE-first order shows frames 1 and 2 both holding 101 and both mapped (an 'opportunity'
    that never existed in the guest)."""
    def write(path, page_first):
        b = base(path)
        b.at(10)
        pages = lambda: b.page(2, 101).page(3, 102)  # noqa: E731
        maps = lambda: b.map(2, 0, 3).map(3, 0, None)  # noqa: E731
        (pages() if page_first else maps())
        (maps() if page_first else pages())
        b.at(20).page(4, 101).at(30).page(4, 104).at(40).close()

    results = {}
    for order in (True, False):
        p = tmp_path / f"{order}.mtr"
        write(p, order)
        out = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", str(p), "-q",
                              "--format", "json", "--interval", "10"], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        results[order] = {k: v for k, v in doc["results"].items()}
    assert results[True] == results[False]
    s = results[True]["snapshot_vs_continuous"]["summary"]
    # at t=10 frame 2 (101) is no longer mapped: the only opportunity is frame 4 = 101 on
    # [20, 30) (frames 1 and 4)
    assert s["opportunities"] == 1 and s["left_censored"] == 0 and s["right_censored"] == 0
    assert s["lifetime_p50"] == 10


def test_censoring_and_percentiles(tmp_path):
    # content 101 shared from the first instant to t=30: left-censored, lifetime 30
    # content 7 on frames 3,4 over [10, 15): lifetime 5; again over [20, 40): lifetime 20
    # content 8 on frames 3,4 from 50 to the end (t=60): right-censored, lifetime 10
    b = Builder(tmp_path / "t.mtr").at(0)
    for f in range(1, 5):
        b.map(f, 0, f)
    b.page(1, 101).page(2, 101).page(3, 3).page(4, 4)
    b.at(10).page(3, 7).page(4, 7).at(15).page(4, 9)
    b.at(20).page(4, 7).at(30).page(2, 102).at(40).page(3, 5)
    b.at(50).page(3, 8).page(4, 8).at(60).close()
    r = run(tmp_path / "t.mtr", interval=100)
    s = r.summary
    assert s["opportunities"] == 4
    assert (s["left_censored"], s["right_censored"]) == (1, 1)
    # uncensored lifetimes 5 and 20: p10 = 5 + 0.1*15, p50 = 12.5, p90 = 5 + 0.9*15
    assert (s["lifetime_p10"], s["lifetime_p50"], s["lifetime_p90"]) == (6.5, 12.5, 18.5)
    assert s["share_shorter_than_interval"] == 1.0
    rows = {tuple(row[1:]) for row in r.tables["lifetimes"].rows}
    assert sum(row[1] for row in r.tables["lifetimes"].rows) == 2
    assert sum(row[2] for row in r.tables["lifetimes"].rows) == 1
    assert sum(row[3] for row in r.tables["lifetimes"].rows) == 1 and rows
    # Kaplan-Meier over 5, 20 and 10 (censored): S(5) = 2/3, S(20) = 0 -> median 20
    assert s["lifetime_km_p50"] == 20 and s["lifetime_km_p90"] == 20
    # page-time: each opportunity saves 1 page: 30 + 5 + 20 + 10
    assert s["page_time"] == 65


def test_kaplan_meier_by_hand():
    life = np.array([2.0, 3.0, 3.0, 5.0, 8.0, 9.0])
    cens = np.array([False, True, False, False, True, False])
    xs, surv = kaplan_meier(life, cens)
    # at 2: 6 at risk, 1 ends -> 5/6; at 3: 5 at risk, 1 ends -> 5/6*4/5 = 2/3;
    # at 5: 3 at risk -> 2/3*2/3 = 4/9; at 9: 1 at risk -> 0
    assert xs.tolist() == [2.0, 3.0, 5.0, 9.0]
    assert surv.tolist() == pytest.approx([5 / 6, 2 / 3, 4 / 9, 0.0])
    assert km_quantile(xs, surv, 0.5) == 5.0
    assert km_quantile(xs, np.array([0.9, 0.8, 0.7, 0.6]), 0.5) is None


def test_grid_only_no_end_snapshot_and_never_seen(tmp_path):
    # the trace spans [0, 250); snapshots every 100 at 0, 100, 200 only.
    # content 1 shared on [130, 160): never seen; content 2 shared on [90, 210): seen at 100, 200
    b = base(tmp_path / "t.mtr")
    b.at(90).page(3, 2).page(4, 2).at(130).page(2, 101).at(160).page(2, 5)
    b.at(210).page(4, 6).at(250).close()
    r = run(tmp_path / "t.mtr", interval=100)
    s = r.summary
    assert s["snapshots"] == 3 and [row[0] for row in r.tables["snapshots"].rows] == [0, 100, 200]
    assert s["snapshot_mean_savings"] == round((0 + 1 + 1) / 3, 2)
    assert s["share_never_seen_by_snapshots"] == 0.5
    # page-time: 30 (never seen) and 120 (seen)
    assert s["page_time_share_never_seen"] == round(30 / 150, 4)
    # over grid phases: miss probability 1 - 30/100 and 0: page-time weighted 30*0.7 / 150
    assert s["page_time_share_missed_over_phases"] == round(30 * 0.7 / 150, 4)
    # continuous mean: savings 1 on [90,210) plus 1 on [130,160) over 250 units
    assert s["continuous_mean_savings"] == round((120 + 30) / 250, 2)


def test_snapshot_mean_over_phases(tmp_path):
    # savings 1 on [0, 40), 0 on [40, 100): a grid every 50 sees 1 at 0 and 0 at 50 from phase
    # 0; started at offsets 50*j/16, the grid's first snapshot hits [0, 40) for j < 12.8
    b = Builder(tmp_path / "t.mtr").at(0)
    b.page(1, 1).page(2, 1).map(1, 0, 1).map(2, 0, 2)
    b.at(40).page(2, 2).at(100).close()
    r = run(tmp_path / "t.mtr", interval=50)
    s = r.summary
    assert s["snapshot_mean_savings"] == 0.5
    means = [row[1] for row in r.tables["phases"].rows]
    assert len(means) == 16
    assert means == [0.5] * 13 + [0.0] * 3
    assert s["snapshot_mean_over_phases"] == round(13 * 0.5 / 16, 2)
    assert s["continuous_mean_savings"] == 0.4


def test_guest_seconds_time_base(tmp_path):
    # 100 instructions = 1 s up to t=200, then 100 instructions = 4 s: a duplicate on
    # [150, 250) lasts 0.5 + 2 = 2.5 guest seconds
    b = base(tmp_path / "t.mtr")
    b.w.counter("guest.clock_ns", 10**9)
    b.at(100)
    b.w.counter("guest.clock_ns", 2 * 10**9)
    b.at(150).page(2, 101)
    b.at(200)
    b.w.counter("guest.clock_ns", 3 * 10**9)
    b.at(250).page(2, 7)
    b.at(300)
    b.w.counter("guest.clock_ns", 7 * 10**9)
    b.close()
    r = run(tmp_path / "t.mtr", interval=Interval(1.0, True))
    s = r.summary
    assert s["time_base"].startswith("guest seconds")
    assert s["interval"] == 1.0 and r.units["interval"] == "s"
    assert s["lifetime_p50"] == pytest.approx(2.5)
    assert s["page_time"] == pytest.approx(2.5)
    # snapshots at 0..5 s -> trace times 0, 100, 200, 225, 250, 275
    assert [row[0] for row in r.tables["snapshots"].rows] == [0, 100, 200, 225, 250, 275]
    assert [row[2] for row in r.tables["snapshots"].rows] == [0, 0, 1, 1, 0, 0]


def test_frame_view_splits_page_time_among_copies(tmp_path):
    # content 1 on frames 1, 2 over [10, 40); frame 3 joins at 20: content page-time
    # = 1*10 + 2*20 = 50; frame view: frames 1 and 2 [10, 40), frame 3 [20, 40), shares
    # 1/2 per frame on [10, 20) and 2/3 per frame on [20, 40): 2*(5 + 40/3) + 40/3 = 50
    b = base(tmp_path / "t.mtr")
    b.at(10).page(1, 1).page(2, 1).at(20).page(3, 1)
    b.at(40).page(1, 11).page(2, 12).page(3, 13).at(50).close()
    c = run(tmp_path / "t.mtr", interval=10).summary
    f = run(tmp_path / "t.mtr", interval=10, view="frame").summary
    assert c["opportunities"] == 1 and f["opportunities"] == 3
    assert c["page_time"] == pytest.approx(50) and f["page_time"] == pytest.approx(50)
    assert f["lifetime_p50"] == 30 and c["view"] == "content" and f["view"] == "frame"


def test_survival_between_snapshots(tmp_path):
    # t=0: content 1 on 3 frames (saves 2); t=100: one copy rewritten (saves 1), content 2
    # shared (saves 1): survived contents 1/1, survived savings min(2,1)/2
    b = base(tmp_path / "t.mtr")
    b.page(1, 1).page(2, 1).page(3, 1)
    b.at(100).page(3, 2).page(4, 2).at(150).close()
    r = run(tmp_path / "t.mtr", interval=100)
    rows = r.tables["snapshots"].rows
    assert [row[2] for row in rows] == [2, 2]
    assert rows[1][4:] == [1.0, 0.5]
    assert r.summary["mean_survival_to_next_snapshot"] == 0.5


def test_one_time_base_across_the_report(tmp_path):
    """The oracle's time-weighted mean of mmap/fork - full CBPS and this analysis's
    continuous mean are the same quantity on the same time base."""
    trace = REPO / "traces" / "samples" / "default.mtr"
    an, o, sh = SnapshotVsContinuous(), OracleAnalysis(), SharingAnalysis()
    Replay(open_trace(trace), [an, o, sh], progress=False).run()
    s, os_ = an.result().summary, o.result().summary
    assert s["continuous_mean_savings"] == pytest.approx(
        os_["savings_vs_mmap_fork_mean"], abs=0.02)
    assert s["time_base"] == os_["time_base"]
    assert sh.result().units["interval"] == "s" and s["interval"] > 0
