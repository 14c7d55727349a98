"""The KSM model against hand-computed answers and against a plain reference implementation.

Traces set ``clock_hz = 1000`` so that one clock unit is one guest millisecond: with
``sleep_millisecs = 20`` ksmd runs a batch at t = 0, 20, 40, ... exactly.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from memtrace.analyses.base import Analysis
from memtrace.analyses.engine import Replay
from memtrace.analyses.ksm.analysis import KsmAnalysis
from memtrace.analyses.ksm.items import ItemSpace
from memtrace.analyses.ksm.params import parse_sweep
from memtrace.analyses.state import ReplayState
from memtrace.traces.format import VM_MERGEABLE, MarkOp, TaskOp, VmaOp
from memtrace.traces.reader import open_trace
from tests.helpers import Builder

RW = 0x3
PAGE = 4096


def builder(path: Path, hz: int = 1000, **kw: Any) -> Builder:
    return Builder(path, clock_hz=hz, **kw)


def vma(b: Builder, mm: int, vpn: int, npages: int, flags: int = RW | VM_MERGEABLE) -> None:
    b.w.vma(VmaOp.MAP, 0, mm, vpn * PAGE, (vpn + npages) * PAGE, flags)


def run(path: Path, interval: int = 1, **kw: Any) -> tuple[KsmAnalysis, Any]:
    kw.setdefault("hints", False)
    a = KsmAnalysis(interval=interval, **kw)
    Replay(open_trace(path), [a], progress=False).run()
    return a, a.result()


def series(res: Any, col: str) -> dict[int, Any]:
    t = res.tables["series"]
    i = t.columns.index(col)
    return {row[0]: row[i] for row in t.rows}


def two_identical(path: Path, end: int = 100) -> Builder:
    """mm 1: a mergeable VMA with two pages holding the same content."""
    b = builder(path).at(0)
    vma(b, 1, 0x10, 4)
    b.page(1, 7).page(2, 7)
    b.map(1, 0x10, 1).map(1, 0x11, 2)
    return b


def test_two_identical_pages_merge_after_two_full_scans(tmp_path):
    p = tmp_path / "t.mtr"
    two_identical(p).at(100).close()
    a, r = run(p)
    s = r.summary
    assert (s["final_pages_shared"], s["final_pages_sharing"], s["final_pages_unshared"]) == \
        (1, 1, 0)
    # batch at t=0: full scan 1 records both checksums; t=20: full scan 2 merges them
    sharing, scans = series(r, "pages_sharing"), series(r, "full_scans")
    assert sharing[19] == 0 and sharing[20] == 1
    assert scans[0] == 1 and scans[19] == 1 and scans[20] == 2
    assert s["final_full_scans"] == 5  # batches at 0, 20, 40, 60, 80 (100 is the end)
    assert s["saved_pages_final"] == 1 and s["scope_oracle_mean"] == 1
    assert s["latency_median"] == pytest.approx(0.020)  # opportunity at t=0, merge at t=20
    assert s["opportunities"] == 1 and s["opportunities_merged"] == 1
    # pages_sharing is 1 on [20, 100): time-weighted mean 0.8; savings 80 % of the oracle
    assert s["pages_sharing_mean"] == pytest.approx(0.8)
    assert s["fraction_of_scope_oracle"] == pytest.approx(0.8)
    assert s["pages_scanned"] == 10
    # rmap items: 2, both in the stable tree: volatile 0; profit 4096 - 2*64
    assert s["final_pages_volatile"] == 0 and s["final_general_profit"] == 4096 - 128


def test_round_of_exactly_pages_to_scan_pages_takes_an_extra_batch(tmp_path):
    # With pages_to_scan=2 and 2 pages, batch 0 scans both; the call that finds the end of the
    # list (full_scans++) is the first of batch 1, which then returns: ksm_do_scan's early exit.
    p = tmp_path / "t.mtr"
    two_identical(p).at(100).close()
    _, r = run(p, pages_to_scan=2)
    scans, sharing = series(r, "full_scans"), series(r, "pages_sharing")
    assert scans[0] == 0 and scans[20] == 1 and scans[40] == 1
    assert sharing[39] == 0 and sharing[40] == 1  # merged in full scan 2, at batch 2
    assert scans[60] == 2


def test_clock_conversion(tmp_path):
    # 2000 clock units per second: 20 ms is 40 units
    p = tmp_path / "t.mtr"
    b = builder(p, hz=2000).at(0)
    vma(b, 1, 0x10, 2)
    b.page(1, 7).page(2, 7).map(1, 0x10, 1).map(1, 0x11, 2)
    b.at(200).close()
    _, r = run(p)
    sharing = series(r, "pages_sharing")
    assert sharing[39] == 0 and sharing[40] == 1
    assert r.summary["clock_hz_source"] == "header clock_hz"


def test_default_clock_is_said(tmp_path):
    p = tmp_path / "t.mtr"
    b = Builder(p).at(0)
    vma(b, 1, 0x10, 2)
    b.page(1, 7).page(2, 7).map(1, 0x10, 1).map(1, 0x11, 2)
    b.at(40_000_000).close()  # 1e9 instructions/s assumed: 20 ms = 20 M instructions
    _, r = run(p, interval=1_000_000)
    assert r.summary["clock_hz"] == 1e9 and "assumed" in r.summary["clock_hz_source"]
    sharing = series(r, "pages_sharing")
    assert sharing[19_000_000] == 0 and sharing[20_000_000] == 1
    assert any("assumed" in n for n in r.notes)


def test_volatile_pages_never_merge(tmp_path):
    # Both pages always hold the same content, but a new one before every batch: the checksum
    # never matches the previous visit's, so neither enters the unstable tree.
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    vma(b, 1, 0x10, 2)
    b.map(1, 0x10, 1).map(1, 0x11, 2)
    for k in range(10):
        b.at(k * 20 - 5 if k else 0)
        b.page(1, 100 + k).page(2, 100 + k)
    b.at(200).close()
    _, r = run(p)
    s = r.summary
    assert s["final_pages_sharing"] == 0 and s["final_pages_shared"] == 0
    assert s["final_pages_unshared"] == 0 and s["final_pages_volatile"] == 2
    assert s["merges"] == 0 and s["opportunities_missed"] >= 9


def test_write_to_merged_page_breaks_sharing(tmp_path):
    p = tmp_path / "t.mtr"
    b = two_identical(p)
    b.at(50).page(2, 9)  # COW break: the page now holds other content
    b.at(100).close()
    _, r = run(p)
    saved, sharing, shared = (series(r, c) for c in ("saved_pages", "pages_sharing",
                                                     "pages_shared"))
    # savings end at the write; the kernel's pages_sharing only when ksmd next visits the page
    # (full scan 4, batch at t=60); the KSM page keeps its one remaining mapper
    assert saved[49] == 1 and saved[50] == 0
    assert sharing[59] == 1 and sharing[60] == 0
    assert shared[99] == 1
    assert r.summary["final_pages_sharing"] == 0


def test_all_sharers_gone_prunes_the_stable_node(tmp_path):
    p = tmp_path / "t.mtr"
    b = two_identical(p)
    b.at(50).page(1, 8).page(2, 9)  # both break COW: the KSM page is freed
    b.at(100).close()
    _, r = run(p)
    shared, sharing = series(r, "pages_shared"), series(r, "pages_sharing")
    assert (shared[59], sharing[59]) == (1, 1)  # counters lag...
    assert (shared[60], sharing[60]) == (0, 0)  # ...until ksmd finds the stale node


def test_max_page_sharing_two(tmp_path):
    for npages, expect in ((3, (1, 1, 1)), (4, (2, 2, 0))):
        p = tmp_path / f"t{npages}.mtr"
        b = builder(p).at(0)
        vma(b, 1, 0x10, npages)
        for i in range(npages):
            b.page(1 + i, 7).map(1, 0x10 + i, 1 + i)
        b.at(200).close()
        _, r = run(p, max_page_sharing=2)
        s = r.summary
        # a node full at 2 sharers is skipped; a 3rd page finds no partner in the unstable
        # tree and stays unshared, a 4th pairs with it into a second node (a stable-node dup)
        assert (s["final_pages_shared"], s["final_pages_sharing"],
                s["final_pages_unshared"]) == expect, npages
        _, r = run(p)  # default 256: one node holds all
        assert (r.summary["final_pages_shared"], r.summary["final_pages_sharing"]) == \
            (1, npages - 1)


def test_use_zero_pages(tmp_path):
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    vma(b, 1, 0x10, 8)
    b.page(1, 0).page(2, 0).page(3, 5).page(9, 0)
    b.map(1, 0x10, 1).map(1, 0x11, 2).map(1, 0x12, 3)
    b.map(1, 0x14, 9).map(1, 0x15, 9)  # the kernel zero page, read at two addresses
    b.at(100).close()
    a, r = run(p, use_zero_pages=True)
    s = r.summary
    assert s["final_ksm_zero_pages"] == 2
    assert (s["final_pages_shared"], s["final_pages_sharing"]) == (0, 0)
    assert s["saved_pages_final"] == 2  # both zeroed frames freed
    assert a.space.kzero == 9
    assert s["pages_scanned"] == 3 + 3 + 1 * 3  # the zero-page ptes are never scanned
    _, r = run(p)  # without: the two empty pages merge with each other
    s = r.summary
    assert (s["final_pages_shared"], s["final_pages_sharing"], s["final_ksm_zero_pages"]) == \
        (1, 1, 0)
    assert s["saved_pages_final"] == 1


def test_zero_frame_written_was_not_the_zero_page(tmp_path):
    # frame 9 (zero content, mapped twice) is taken for the kernel zero page and not scanned;
    # once written it is an ordinary page shared by its two mappings (fork), scanned again
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    vma(b, 1, 0x10, 4)
    b.page(9, 0).map(1, 0x10, 9).map(1, 0x11, 9).page(1, 5).map(1, 0x12, 1)
    b.at(50).page(9, 5)
    b.at(120).close()
    a, r = run(p)
    scanned, sharing, saved = (series(r, c) for c in ("pages_scanned", "pages_sharing",
                                                      "saved_pages"))
    assert scanned[40] == 3  # batches at 0, 20, 40: one page each
    assert scanned[60] - scanned[40] == 3  # three pages from t=60
    assert a.space.kzero == -1
    # t=60: first visit of the pages on frame 9; t=80: the first of them enters the unstable
    # tree, the second meets its own frame there (no merge), frame 1's page merges with it;
    # t=100: the second joins the stable node, and only then is frame 9 free
    assert (sharing[80], saved[80]) == (1, 0)
    assert (sharing[100], saved[100]) == (2, 1)


def scoped(path: Path) -> None:
    b = builder(path).at(0)
    vma(b, 1, 0x10, 1)                # mm 1: MADV_MERGEABLE
    vma(b, 2, 0x10, 1, RW)            # mm 2: plain anonymous memory
    vma(b, 4, 0x10, 1, RW | 0x8 | VM_MERGEABLE)  # VM_SHARED: never KSM's
    for mm, f in ((1, 1), (2, 2), (3, 3), (4, 4)):  # mm 3 has no VMA records at all
        b.page(f, 7).map(mm, 0x10, f)
    b.at(200).close()


def test_scope_madvised_and_anon(tmp_path):
    p = tmp_path / "t.mtr"
    scoped(p)
    _, r = run(p)
    s = r.summary
    assert (s["final_pages_shared"], s["final_pages_sharing"]) == (0, 0)
    assert s["pages_scanned"] > 0 and s["scope_oracle_mean"] == 0
    _, r = run(p, scope="anon")
    s = r.summary
    assert (s["final_pages_shared"], s["final_pages_sharing"]) == (1, 2)
    assert s["saved_pages_final"] == 2 and s["scope_oracle_mean"] == 2


def test_no_mergeable_vma_says_so(tmp_path):
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    b.page(1, 7).page(2, 7).map(1, 0x10, 1).map(2, 0x10, 2)
    b.at(100).close()
    _, r = run(p)
    assert r.summary["final_full_scans"] == 0  # no mm on KSM's list: ksmd does not run
    assert any("VM_MERGEABLE" in n for n in r.notes)


def test_fork_shared_page_is_not_merged_with_itself(tmp_path):
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    for mm in (1, 2, 3):
        vma(b, mm, 0x10, 1)
    b.page(1, 7).map(1, 0x10, 1).map(2, 0x10, 1)  # fork: one frame, two mms
    b.at(100).close()
    _, r = run(p)
    assert r.summary["final_pages_shared"] == 0 and r.summary["final_pages_unshared"] == 1
    # a third copy in its own frame: all three end up on one KSM page, one frame freed
    p2 = tmp_path / "t2.mtr"
    b = builder(p2).at(0)
    for mm in (1, 2, 3):
        vma(b, mm, 0x10, 1)
    b.page(1, 7).map(1, 0x10, 1).map(2, 0x10, 1)
    b.page(2, 7).map(3, 0x10, 2)
    b.at(200).close()
    _, r = run(p2)
    s = r.summary
    assert (s["final_pages_shared"], s["final_pages_sharing"]) == (1, 2)
    assert s["saved_pages_final"] == 1 and s["scope_oracle_mean"] == 1


def test_new_mm_goes_behind_the_cursor(tmp_path):
    # pages_to_scan 1, sleep 10 ms. mm 1 has pages X, Y; mm 2 (page X) appears at t=5 while
    # the cursor is inside mm 1, so __ksm_enter puts it just behind the cursor: first scanned in
    # full scan 2 (t=30), and the merge comes at t=80 (it would be t=60 at the list's tail).
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    vma(b, 1, 0x10, 2)
    b.page(1, 1).page(2, 2).map(1, 0x10, 1).map(1, 0x11, 2)
    b.at(5)
    vma(b, 2, 0x10, 1)
    b.page(3, 1).map(2, 0x10, 3)
    b.at(120).close()
    _, r = run(p, pages_to_scan=1, sleep_ms=10)
    sharing = series(r, "pages_sharing")
    assert sharing[79] == 0 and sharing[80] == 1


def test_page_moved_by_guest_ksm_keeps_its_identity(tmp_path):
    # mm 2's page is remapped to mm 1's frame with the same content (what the guest's own KSM
    # does); its old frame is reused for something else. The model still sees two pages.
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    vma(b, 1, 0x10, 1)
    vma(b, 2, 0x10, 1)
    b.page(1, 7).page(2, 7).map(1, 0x10, 1).map(2, 0x10, 2)
    b.at(50).map(2, 0x10, 1).page(2, 9)
    b.at(100).close()
    _, r = run(p)
    saved, sharing = series(r, "saved_pages"), series(r, "pages_sharing")
    assert saved[49] == 1 and saved[99] == 1 and sharing[99] == 1
    assert series(r, "scope_oracle")[99] == 1


def test_unmap_and_exit_leave_at_once(tmp_path):
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    b.w.task(TaskOp.NEW, 10, 10, 1, mm=1)
    b.w.task(TaskOp.NEW, 20, 20, 1, mm=2)
    vma(b, 1, 0x10, 1)
    vma(b, 2, 0x10, 1)
    b.page(1, 7).page(2, 7).map(1, 0x10, 1).map(2, 0x10, 2)
    b.at(50)
    b.w.task(TaskOp.EXIT, 20, 20, 1)
    b.at(100).close()
    _, r = run(p)
    sharing, saved = series(r, "pages_sharing"), series(r, "saved_pages")
    assert sharing[49] == 1 and saved[49] == 1
    assert sharing[50] == 0 and saved[50] == 0 and series(r, "pages_shared")[50] == 1


def test_start_at_phase(tmp_path):
    p = tmp_path / "t.mtr"
    b = two_identical(p)
    b.at(30)
    b.w.mark(MarkOp.PHASE, "merge")
    b.at(100).close()
    _, r = run(p, start="phase:merge")
    sharing = series(r, "pages_sharing")
    # ksmd's first batch at t=30, the merge in its second full scan at t=50
    assert series(r, "full_scans")[29] == 0 and sharing[49] == 0 and sharing[50] == 1
    _, r = run(p, start="60")
    assert series(r, "pages_sharing")[79] == 0 and series(r, "pages_sharing")[80] == 1


def test_kernel_counters_compared(tmp_path):
    p = tmp_path / "t.mtr"
    b = two_identical(p)
    for t, v in ((10, 0), (30, 1), (90, 1)):
        b.at(t)
        b.w.counter("ksm.pages_sharing", v)
        b.w.counter("ksm.pages_shared", v)
        b.w.counter("ksm.full_scans", t // 20 + 1)
    b.w.counter("ksm.pages_to_scan", 100)
    b.at(100).close()
    _, r = run(p)
    t = r.tables["kernel_vs_model"]
    rows = [row for row in t.rows if row[1] == "pages_sharing"]
    assert [(row[0], row[2], row[3]) for row in rows] == [(10, 0, 0), (30, 1, 1), (90, 1, 1)]
    assert r.summary["relative_error_final_pages_sharing"] == 0
    assert r.summary["relative_error_final_full_scans"] == 0
    assert r.summary["pages_sharing_mean_abs_error"] == 0
    assert not any("pages_to_scan" in n for n in r.notes)
    # a kernel that shared more than the model: the error says by how much
    p2 = tmp_path / "t2.mtr"
    b = two_identical(p2)
    b.at(90)
    b.w.counter("ksm.pages_sharing", 2)
    b.w.counter("ksm.sleep_millisecs", 200)
    b.at(100).close()
    _, r = run(p2)
    assert r.summary["kernel_final_pages_sharing"] == 2
    assert r.summary["model_at_kernel_final_pages_sharing"] == 1
    assert r.summary["relative_error_final_pages_sharing"] == -0.5
    assert any("sleep_millisecs=200" in n for n in r.notes)


def test_guest_ksm_scenario_counters(tmp_path):
    # Shaped like the guest scenario `ksm`: 2 processes x 512 identical anonymous pages, no
    # VM_MERGEABLE in the trace (madvise is not reported), KSM switched on at phase "merge"
    # (pages_to_scan 4000, sleep 20 ms). The guest's KSM then remaps every page onto 4 KSM
    # pages (max_page_sharing 256); its counters come as COUNTER records.
    p = tmp_path / "t.mtr"
    b = builder(p).at(0)
    for mm in (1, 2):
        vma(b, mm, 0x100, 512, RW)
        for i in range(512):
            f = 100 + (mm - 1) * 512 + i
            b.page(f, 7).map(mm, 0x100 + i, f)
    b.at(1000)
    b.w.mark(MarkOp.PHASE, "merge")
    for k, v in (("pages_shared", 0), ("pages_sharing", 0), ("full_scans", 0)):
        b.w.counter("ksm." + k, v)
    b.at(1060)  # the guest's KSM has merged: every mapping now points at one of 4 KSM pages
    kpages = (100, 356, 612, 868)
    for mm in (1, 2):
        for i in range(512):
            b.map(mm, 0x100 + i, kpages[((mm - 1) * 512 + i) // 256])
    for t in (1100, 2000):
        b.at(t)
        for k, v in (("pages_shared", 4), ("pages_sharing", 1020), ("full_scans", t // 20)):
            b.w.counter("ksm." + k, v)
    b.at(2001).close()
    _, r = run(p, interval=100, scope="anon", start="phase:merge", pages_to_scan=4000)
    s = r.summary
    # the model sees through the guest's merges: the same four nodes, the same counters
    assert (s["final_pages_shared"], s["final_pages_sharing"]) == (4, 1020)
    assert s["relative_error_final_pages_sharing"] == 0
    assert s["relative_error_final_pages_shared"] == 0
    rows = [x for x in r.tables["kernel_vs_model"].rows if x[1] == "pages_sharing"]
    assert [(x[0], x[2], x[3]) for x in rows] == [(1000, 0, 0), (1100, 1020, 1020),
                                                  (2000, 1020, 1020)]
    assert s["saved_pages_final"] == 1020 and s["scope_oracle_mean"] == pytest.approx(1023)
    # in the default madvised scope nothing qualifies (no VM_MERGEABLE in the trace): the
    # report says so and points at --ksm-scope anon
    _, r0 = run(p, interval=100, start="phase:merge", pages_to_scan=4000)
    assert r0.summary["final_full_scans"] == 0 and any("anon" in n for n in r0.notes)


def many_unique_then_duplicates(path: Path) -> None:
    """1000 stable unique pages; at t=1000 ms ten pairs of duplicates appear (written once)."""
    b = builder(path).at(0)
    vma(b, 1, 0x1000, 2000)
    for i in range(1000):
        b.page(10 + i, 1000 + i).map(1, 0x1000 + i, 10 + i)
    b.at(1000)
    for i in range(20):
        b.page(2000 + i, 5000 + i // 2).map(1, 0x1000 + 1000 + i, 2000 + i)
    b.at(4000).close()


def test_hinted_scanner_merges_sooner_for_the_same_pages(tmp_path):
    p = tmp_path / "t.mtr"
    many_unique_then_duplicates(p)
    a, r = run(p, interval=50, hints=True)
    s = r.summary
    lin, hint = a.models
    assert hint.p.scanner == "hinted"
    # a full scan of ~1000 pages takes 11 batches (220 ms): the plain scan needs up to two; the
    # hinted one scans the new pages one sleep period after they were written
    assert s["latency_median"] > 0.2
    assert s["hinted_latency_median"] <= 0.06
    assert s["hinted_gain"] > 0
    assert abs(hint.pages_scanned - lin.pages_scanned) <= 0.05 * lin.pages_scanned
    assert hint.saved == lin.saved == 10


def test_sweep_and_plot(tmp_path):
    p = tmp_path / "t.mtr"
    many_unique_then_duplicates(p)
    a, r = run(p, interval=50, hints=True, sweep=parse_sweep("100:20,1000:20,100:200"))
    sw = r.tables["sweep"]
    labels = [row[0] for row in sw.rows]
    assert labels == ["100:20", "100:20+hints", "1000:20", "1000:20+hints", "100:200",
                      "100:200+hints", "oracle (scope)"]
    frac = {row[0]: row[sw.columns.index("fraction_of_scope_oracle")] for row in sw.rows}
    assert frac["1000:20"] > frac["100:20"] > frac["100:200"]
    assert all(0 <= v <= 1 for v in frac.values())
    panels = {p.panel: p for p in a.plots(r)}
    assert set(panels) == {"ksm-savings", "ksm-rate"}  # no guest KSM counters here
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    panels["ksm-rate"].draw(ax)
    drawn = {line.get_label() for line in ax.get_lines()}
    assert {"linear", "hinted", "oracle (scope)"} <= drawn
    assert len(ax.get_lines()[0].get_xdata()) == 3  # the three scan rates of the sweep
    plt.close(fig)


def test_parse_sweep_errors():
    import argparse

    assert parse_sweep("100:20, 1000:2.5") == [(100, 20.0), (1000, 2.5)]
    for bad in ("100", "x:20", "100:0", "0:20", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sweep(bad)


def test_cli(tmp_path):
    p = tmp_path / "t.mtr"
    many_unique_then_duplicates(p)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", str(p), "-q", *args],
                              capture_output=True, text=True, timeout=300)

    out = cli("--ksm", "--ksm-sweep", "100:20,50:20", "--format", "json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["results"]["ksm"]
    assert res["summary"]["final_pages_sharing"] == 10
    out = cli("--ksm", "--format", "csv", "--table", "ksm.series")
    assert out.returncode == 0 and out.stdout.startswith("t,pages_shared,pages_sharing")
    for bad in (["--ksm-sweep", "100"], ["--ksm-max-page-sharing", "1"],
                ["--ksm-sleep-ms", "0"], ["--ksm-start", "soon"]):
        out = cli("--ksm", *bad)
        assert out.returncode == 2 and "Traceback" not in out.stderr, bad
    out = cli("--ksm-scope", "anon", "--ksm-use-zero-pages", "--ksm-every-scan", "--ksm")
    assert out.returncode == 0 and "ksm.full_scans" in out.stdout


def test_synthetic_sample_terminal_server(tmp_path):
    # the generator's heap copies of a data file are anonymous duplicates across instances
    from memtrace.traces.synthetic import generate

    p = tmp_path / "s.mtr"
    generate(p, instances=3, epochs=120)
    a, r = run(p, interval=None, scope="anon", hints=True)
    s = r.summary
    assert s["final_pages_sharing"] > 0 or s["saved_pages_mean"] > 0
    assert 0 < s["fraction_of_scope_oracle"] <= 1
    assert a.space.kzero == 0  # frame 0 is the generator's zero page
    assert s["fraction_of_guest_oracle"] <= 1


# ------------------------------------------------------------------------------------------------
# A plain reference: the same kernel logic, one page at a time, with dictionaries
# ------------------------------------------------------------------------------------------------

class Reference(Analysis):
    """ksmd as a direct transcription of the semantics documented in analyses/ksm/, page by
    page (anon scope, no VMAs, no kernel zero page, no page moves): checks the vectorized
    model."""

    name = "reference"

    def __init__(self, pages_to_scan: int, period: int, max_sharing: int,
                 use_zero: bool = False, zero_cid: int = -1) -> None:
        self.P, self.period, self.max = pages_to_scan, period, max_sharing
        self.use_zero, self.zero = use_zero, zero_cid
        self.order: list[int] = []
        self.seen: list[int] = []
        self.pos = 0
        self.addr = 0
        self.at_head = True
        self.items: dict[tuple[int, int], dict[str, Any]] = {}
        self.kp_latest: dict[int, int] = {}
        self.content: np.ndarray = np.zeros(0, dtype=np.int64)
        self.nodes: list[dict[str, Any]] = []
        self.tree: dict[int, tuple[int, int]] = {}
        self.full_scans = 0
        self.scanned = 0
        self.unshared = 0
        self.k = 0
        self.t0: int | None = None
        self.log: list[dict[str, int]] = []

    def _pages(self, st: ReplayState) -> dict[int, list[tuple[int, int]]]:
        out = {}
        for mm, sp in st.spaces.items():
            pg = sorted((v, f) for v, f in sp.pages.items() if not st.named[f])
            if pg:
                out[mm] = pg
        return out

    def _sync(self, st: ReplayState) -> None:
        self.content = st.content
        pages = self._pages(st)
        live = {(mm, v): f for mm, pg in pages.items() for v, f in pg}
        for key in list(self.items):
            it = self.items[key]
            if key not in live:
                if it["st"] == "unstable":
                    self.unshared -= 1
                elif it["st"] in ("stable", "broken"):
                    n = self.nodes[it["node"]]
                    n["len"] -= 1
                    if it["st"] == "stable":
                        n["live"] -= 1
                del self.items[key]
        for key, f in live.items():
            it = self.items.setdefault(key, {"chk": None, "st": "none", "node": -1})
            if it.get("frame") not in (None, f):
                it["changed"] = True
            it["frame"] = f
            it["c"] = int(st.content[f])
            if it["st"] == "stable" and it["c"] != self.nodes[it["node"]]["c"]:
                it["st"] = "broken"
                self.nodes[it["node"]]["live"] -= 1
            if it["st"] == "zero" and it["c"] != self.zero:
                it["st"] = "none"
        for mm in sorted(pages):
            if mm not in self.seen:
                self.seen.append(mm)
        elig = [mm for mm in self.seen if mm in pages]
        keep = []
        for i, mm in enumerate(self.order):
            if mm in pages:
                keep.append(mm)
            elif not self.at_head:
                if i < self.pos:
                    self.pos -= 1
                elif i == self.pos:
                    self.addr = 0
        self.order = keep
        for mm in elig:
            if mm not in self.order:
                if self.at_head or self.pos >= len(self.order):
                    self.order.append(mm)
                else:
                    self.order.insert(self.pos, mm)
                    self.pos += 1
        self.pages = pages

    def _next(self) -> tuple[int, int] | None:
        while self.pos < len(self.order):
            mm = self.order[self.pos]
            for v, _f in self.pages.get(mm, []):
                if v >= self.addr and self.items[(mm, v)]["st"] != "zero":
                    self.addr = v + 1
                    return (mm, v)
            self.pos += 1
            self.addr = 0
        return None

    def _visit(self, key: tuple[int, int]) -> None:
        it = self.items[key]
        c = it["c"]
        if it["st"] == "stable":
            return
        if it["st"] == "unstable":
            self.unshared -= 1
            if self.tree.get(it["chk"]) == key:
                del self.tree[it["chk"]]
        elif it["st"] == "broken":
            n = self.nodes[it["node"]]
            if not n["pruned"]:
                if n["live"] <= 0:
                    n["pruned"] = True
                else:
                    n["len"] -= 1
        it["st"], it["node"] = "none", -1
        k = self.kp_latest.get(it["frame"])
        if k is not None:
            n = self.nodes[k]
            if n["c"] == c and n["live"] > 0 and not n["pruned"]:
                # a fork of a KSM page joins its node, over max_page_sharing if need be
                it["st"], it["node"] = "stable", k
                n["len"] += 1
                n["live"] += 1
                return
        best = None
        for i, n in enumerate(self.nodes):
            if n["c"] != c or n["pruned"]:
                continue
            if n["live"] <= 0:
                n["pruned"] = True
            elif n["len"] < self.max and (best is None or n["len"] > self.nodes[best]["len"]):
                best = i
        if best is not None:
            it["st"], it["node"] = "stable", best
            self.nodes[best]["len"] += 1
            self.nodes[best]["live"] += 1
            return
        if it["chk"] != c:
            it["chk"] = c
            return
        if self.use_zero and c == self.zero:
            it["st"] = "zero"
            return
        other = self.tree.get(c)
        if other is not None:
            o = self.items.get(other)
            if o is not None and o["st"] == "unstable" and o["c"] == c:
                if o["frame"] == it["frame"]:
                    return
                # the KSM page is the scanned page's frame (try_to_merge_two_pages)
                self.nodes.append({"c": c, "len": 2, "live": 2, "pruned": False,
                                   "kp": it["frame"]})
                self.kp_latest[it["frame"]] = len(self.nodes) - 1
                for x in (it, o):
                    x["st"], x["node"] = "stable", len(self.nodes) - 1
                self.unshared -= 1
                del self.tree[c]
                return
        self.tree[c] = key
        it["st"] = "unstable"
        self.unshared += 1

    def _batch(self) -> None:
        if not self.order:
            return
        if self.at_head:
            self.at_head, self.pos, self.addr, self.tree = False, 0, 0, {}
        for _ in range(self.P):
            key = self._next()
            if key is None:
                self.full_scans += 1
                self.at_head = True
                return
            self.scanned += 1
            self._visit(key)

    def counters(self) -> dict[str, int]:
        alive = [n for n in self.nodes if not n["pruned"]]
        shared = sum(1 for n in alive if n["len"] >= 1)
        frames_needed = {it["frame"] for it in self.items.values()
                         if it["st"] not in ("stable", "zero")}
        live_nodes = sum(1 for n in alive if n["live"] > 0)
        # a live node's KSM page that unmerged pages still map (and that still holds the
        # node's content) is one frame, not two
        overlap = sum(1 for i, n in enumerate(self.nodes)
                      if not n["pruned"] and n["live"] > 0 and n["kp"] in frames_needed
                      and self.kp_latest.get(n["kp"]) == i and self.content[n["kp"]] == n["c"])
        frames = {it["frame"] for it in self.items.values()}
        return {"pages_shared": shared, "pages_sharing": sum(n["len"] for n in alive) - shared,
                "pages_unshared": self.unshared, "full_scans": self.full_scans,
                "pages_scanned": self.scanned,
                "zero": sum(1 for it in self.items.values() if it["st"] == "zero"),
                "saved": len(frames) - len(frames_needed) - live_nodes + overlap}

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        if self.t0 is None:
            self.t0 = t0
        self._sync(st)
        while self.t0 + self.k * self.period < t1:
            self._batch()
            self.k += 1
        self.log.append({"t": t1, **self.counters()})

    def end(self, st: ReplayState) -> None:
        self._sync(st)

    def result(self) -> Any:
        return None


class Probe(Analysis):
    """Logs the model's counters after every interval, like Reference does."""

    name = "probe"

    def __init__(self, ksm: KsmAnalysis) -> None:
        self.ksm = ksm
        self.log: list[dict[str, int]] = []

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        m = self.ksm.models[0]
        c = m.counters(4096)
        self.log.append({"t": t1, **{k: c[k] for k in ("pages_shared", "pages_sharing",
                                                         "pages_unshared", "full_scans")},
                         "pages_scanned": m.pages_scanned, "saved": m.saved,
                         "zero": c["ksm_zero_pages"]})

    def result(self) -> Any:
        return None


def random_trace(path: Path, seed: int, steps: int, zero: bool = False, moves: bool = False
                 ) -> None:
    """Pages come, change and go in 5 address spaces; contents from a pool of 5 (and the zero
    page with ``zero``, only in frames mapped once); some frames shared by fork. With ``moves``
    pages also move to other frames keeping their content (a guest's KSM, migration)."""
    rng = np.random.default_rng(seed)
    b = builder(path).at(0)
    nframe = 1
    live: dict[tuple[int, int], int] = {}
    forked: set[int] = set()
    lo = 0 if zero else 1

    tokens: dict[int, int] = {}

    def token(f: int) -> int:
        tokens[f] = int(rng.integers(1 if f in forked else lo, 6))
        return tokens[f]

    next_vpn = {mm: 0x100 for mm in range(1, 6)}
    t = 0
    for _ in range(steps):
        for _ in range(int(rng.integers(0, 6))):
            op = rng.random()
            if op < 0.45 or not live:  # a new page, sometimes fork-shared
                mm = int(rng.integers(1, 6))
                v = next_vpn[mm]
                next_vpn[mm] += int(rng.integers(1, 3))
                if live and rng.random() < 0.15:
                    f = live[list(live)[int(rng.integers(len(live)))]]
                    if f not in forked:
                        forked.add(f)
                        b.page(f, token(f))  # no zero frame mapped twice: not the zero page
                else:
                    f = nframe
                    nframe += 1
                    b.page(f, token(f))
                b.map(mm, v, f)
                live[(mm, v)] = f
            elif moves and op < 0.6:  # the page moves to a new frame, same content
                key = list(live)[int(rng.integers(len(live)))]
                f = nframe
                nframe += 1
                b.page(f, int(tokens.get(live[key], 1)))
                b.map(key[0], key[1], f)
                live[key] = f
            elif op < 0.85:  # rewrite a page's frame (equal contents are likely)
                key = list(live)[int(rng.integers(len(live)))]
                b.page(live[key], token(live[key]))
            else:  # unmap
                key = list(live)[int(rng.integers(len(live)))]
                b.map(key[0], key[1], None)
                del live[key]
        t += int(rng.integers(1, 45))
        b.at(t)
    b.close()


# Every combination of the model's parameters is run on a random trace of its own (seeds fixed,
# so CI runs the same cases every time), and Hypothesis adds random seeds and combinations on
# top: 40 examples over 180 combinations alone left most combinations untried in any one run.
PAGES, SLEEPS, MAXS = [1, 2, 3, 7, 100], [5, 10, 20], [2, 3, 256]
COMBINATIONS = list(itertools.product(PAGES, SLEEPS, MAXS, [False, True], [False, True]))


def model_matches_reference(path: Path, monkeypatch, seed: int, pages: int, sleep: int,
                            maxs: int, zero: bool, tiny: bool) -> None:
    # tiny: start the item arrays at 4 cells, so that segments move, arrays grow and repack
    monkeypatch.setattr(ItemSpace, "initial_cells", 4 if tiny else ItemSpace.initial_cells)
    random_trace(path, seed, 40, zero)
    ksm = KsmAnalysis(pages_to_scan=pages, sleep_ms=sleep, max_page_sharing=maxs, scope="anon",
                      hints=False, interval=10**9, use_zero_pages=zero)
    zero_cid = ReplayState().zero_cid
    ref = Reference(pages, sleep, maxs, zero, zero_cid)
    probe = Probe(ksm)
    Replay(open_trace(path), [ksm, ref, probe], progress=False).run()
    assert len(probe.log) == len(ref.log)
    for a, b in zip(probe.log, ref.log, strict=True):
        assert a == b, (a, b)


@pytest.mark.parametrize("pages, sleep, maxs, zero, tiny", COMBINATIONS,
                         ids=[f"p{p}-s{s}-m{m}{'-zero' if z else ''}{'-tiny' if t else ''}"
                              for p, s, m, z, t in COMBINATIONS])
def test_model_matches_reference_every_combination(tmp_path, monkeypatch, pages, sleep, maxs,
                                                   zero, tiny):
    seed = 1000 + COMBINATIONS.index((pages, sleep, maxs, zero, tiny))
    model_matches_reference(tmp_path / "r.mtr", monkeypatch, seed, pages, sleep, maxs, zero,
                            tiny)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hs.integers(0, 10**6), pages=hs.sampled_from(PAGES), sleep=hs.sampled_from(SLEEPS),
       maxs=hs.sampled_from(MAXS), zero=hs.booleans(), tiny=hs.booleans())
def test_model_matches_reference(tmp_path, monkeypatch, seed, pages, sleep, maxs, zero, tiny):
    model_matches_reference(tmp_path / f"r{seed}.mtr", monkeypatch, seed, pages, sleep, maxs,
                            zero, tiny)


def recount(ksm: KsmAnalysis, st: ReplayState) -> list[str]:
    """What the incremental bookkeeping disagrees with when recounted from scratch."""
    S = ksm.space
    v = np.flatnonzero(S.valid)
    errs = []
    npfi = np.bincount(S.dpfi[v], minlength=S.ndense)[:S.ndense]
    if not np.array_equal(npfi, S.npfi[:S.ndense]):
        errs.append("npfi")
    if int(np.count_nonzero(npfi)) != S.frames_in_scope:
        errs.append("frames_in_scope")
    if not np.array_equal(S._contents(st)[v], S.pc[v]):
        errs.append("pc")
    if not np.array_equal(np.bincount(S.frame[v], minlength=len(S.nreal))[:len(S.nreal)],
                          S.nreal):
        errs.append("nreal")
    first = np.unique(S.dpfi[v], return_index=True)[1]
    cont = S.pc[v][first]
    m = np.bincount(cont[cont >= 0], minlength=len(S.m))
    if not np.array_equal(m, S.m) or S.unknown != int(np.count_nonzero(cont == -1)):
        errs.append("scope oracle")
    for mdl in ksm.models:
        st_ = mdl.st[v]
        n = mdl.nnodes
        nun = np.bincount(S.dpfi[v[(st_ != 2) & (st_ != 4)]], minlength=S.ndense)[:S.ndense]
        if not np.array_equal(nun, mdl.nun[:S.ndense]) or \
                mdl.nz != int(np.count_nonzero(nun)):
            errs.append("nun")
        live = np.bincount(mdl.node[v[st_ == 2]], minlength=n)[:n]
        if not np.array_equal(live, mdl.node_live[:n]):
            errs.append("node_live")
        alive = ~mdl.node_pruned[:n]
        ln = np.bincount(mdl.node[v[(st_ == 2) | (st_ == 3)]], minlength=n)[:n]
        if not np.array_equal(ln[alive], mdl.node_len[:n][alive]):
            errs.append("node_len")
        shared = int(np.count_nonzero(ln[alive] >= 1))
        if (mdl.shared, mdl.sharing) != (shared, int(ln[alive].sum()) - shared):
            errs.append("pages_shared/sharing")
        if mdl.live_nodes != int(np.count_nonzero((mdl.node_live[:n] > 0) & alive)):
            errs.append("live_nodes")
        if mdl.unshared != int(np.count_nonzero(st_ == 1)):
            errs.append("pages_unshared")
        if mdl.overlap != mdl.count_overlap():
            errs.append("overlap")
        # the ceiling keeps one frame for the zero content; merging with the zero page frees it.
        # Below zero: a KSM page can cost a frame while the fork sibling of a merged page still
        # maps the old one (at most one per live node)
        top = S.ceiling + (1 if mdl.zero_merged else 0)
        if mdl.saved != S.frames_in_scope - mdl.nz - mdl.live_nodes + mdl.overlap or \
                not -mdl.live_nodes <= mdl.saved <= top:
            errs.append(f"saved {mdl.saved} (ceiling {S.ceiling})")
    return errs


class Recount(Analysis):
    """Recounts the KSM analysis's bookkeeping from scratch after every interval."""

    name = "recount"

    def __init__(self, ksm: KsmAnalysis) -> None:
        self.ksm = ksm
        self.errors: list[tuple[int, list[str]]] = []
        self.checks = 0

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        errs = recount(self.ksm, st)
        self.checks += 1
        if errs and len(self.errors) < 5:
            self.errors.append((t1, errs))

    def result(self) -> Any:
        return None


def check_trace(path: Path, **kw: Any) -> Recount:
    ksm = KsmAnalysis(interval=10**12, **kw)
    rc = Recount(ksm)
    Replay(open_trace(path), [ksm, rc], progress=False).run()
    assert rc.checks and not rc.errors, rc.errors
    return rc


def test_bookkeeping_on_recorded_sample():
    # the shipped sample was recorded by our tracer (forks, exits, VMAs, the zero page)
    from memtrace.analyses.cli import DEFAULT_TRACE

    check_trace(DEFAULT_TRACE, scope="anon", pages_to_scan=1000, hints=True)


def test_bookkeeping_on_synthetic_generator(tmp_path):
    from memtrace.traces.synthetic import generate

    p = tmp_path / "s.mtr"
    generate(p, instances=3, epochs=150)
    check_trace(p, scope="anon", use_zero_pages=True, max_page_sharing=2)


MOVE_COMBINATIONS = list(itertools.product([1, 3, 100], [2, 256], [False, True]))


def bookkeeping_with_page_moves(path: Path, monkeypatch, seed: int, pages: int, maxs: int,
                                tiny: bool) -> None:
    monkeypatch.setattr(ItemSpace, "initial_cells", 4 if tiny else ItemSpace.initial_cells)
    random_trace(path, seed, 60, moves=True)
    check_trace(path, scope="anon", pages_to_scan=pages, sleep_ms=10, max_page_sharing=maxs)


@pytest.mark.parametrize("pages, maxs, tiny", MOVE_COMBINATIONS,
                         ids=[f"p{p}-m{m}{'-tiny' if t else ''}"
                              for p, m, t in MOVE_COMBINATIONS])
@pytest.mark.parametrize("run", [0, 1, 2])
def test_bookkeeping_with_page_moves_every_combination(tmp_path, monkeypatch, pages, maxs,
                                                       tiny, run):
    seed = 5000 + 10 * MOVE_COMBINATIONS.index((pages, maxs, tiny)) + run
    bookkeeping_with_page_moves(tmp_path / "m.mtr", monkeypatch, seed, pages, maxs, tiny)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hs.integers(0, 10**6), pages=hs.sampled_from([1, 3, 100]),
       maxs=hs.sampled_from([2, 256]), tiny=hs.booleans())
def test_bookkeeping_with_page_moves(tmp_path, monkeypatch, seed, pages, maxs, tiny):
    bookkeeping_with_page_moves(tmp_path / f"m{seed}.mtr", monkeypatch, seed, pages, maxs, tiny)
