"""Hand-computed cases: each figure is worked out on paper in the comments."""

from __future__ import annotations

from memtrace.traces.format import PageCacheOp, TaskOp
from tests.helpers import Builder, replay


def test_fork_sharing(tmp_path):
    # Two address spaces map the same 3 frames (fork): no sharing 6, mmap/fork 3.
    b = Builder(tmp_path / "t.mtr").at(1)
    for f, tok in ((10, 1), (11, 2), (12, 3)):
        b.page(f, tok)
    for mm in (1, 2):
        for i, f in enumerate((10, 11, 12)):
            b.map(mm, 100 + i, f)
    b.at(2).close()
    fig = replay(tmp_path / "t.mtr")["figures"]
    assert (fig["no_sharing"], fig["mmap_fork"], fig["ksm_hint_all"], fig["full_cbps"]) == \
        (6, 3, 3, 3)


def test_zero_pages(tmp_path):
    # One mm maps the zero frame at 5 addresses and 2 private zeroed frames; another mm maps the
    # zero frame once. Frames: zero(0), 20, 21 (all zero content), 22 (content 7).
    b = Builder(tmp_path / "t.mtr").at(1)
    for f in (0, 20, 21):
        b.page(f, 0)
    b.page(22, 7)
    for v in range(5):
        b.map(1, v, 0)
    b.map(1, 10, 20).map(1, 11, 21).map(1, 12, 22).map(2, 0, 0)
    b.at(2).close()
    r = replay(tmp_path / "t.mtr")
    fig = r["figures"]
    # no sharing: mm1 maps frames {0,20,21,22} (4), mm2 maps {0} (1) -> 5
    assert fig["no_sharing"] == 5
    assert fig["mmap_fork"] == 4
    # all anonymous: distinct contents {zero, 7} -> 2
    assert fig["ksm_hint_all"] == 2 and fig["full_cbps"] == 2
    assert fig["zero_pages"] == 3
    assert r["full"]["zero_pages"] == 3


def test_identical_anonymous_pages_in_two_tasks(tmp_path):
    # mm1: frames 1,2 (contents A,B); mm2: frames 3,4 (contents A,C). Anonymous.
    b = Builder(tmp_path / "t.mtr").at(1)
    b.page(1, 0xA).page(2, 0xB).page(3, 0xA).page(4, 0xC)
    b.map(1, 0, 1).map(1, 1, 2).map(2, 0, 3).map(2, 1, 4)
    b.at(5).close()
    r = replay(tmp_path / "t.mtr")
    fig = r["figures"]
    assert (fig["no_sharing"], fig["mmap_fork"], fig["ksm_hint_all"], fig["full_cbps"]) == \
        (4, 4, 3, 3)
    types = {row[0]: row[1:] for row in r["results"]["sharing"].tables["shareable_by_type"].rows}
    assert types == {"anonymous": [1, 1], "named": [0, 0], "mixed": [0, 0]}


def test_identical_named_pages_from_two_files(tmp_path):
    # Two files (inodes 5 and 6) each with 2 pages of the same bytes, mapped by two mms:
    # KSM cannot merge named pages (4 frames stay), full CBPS keeps 2.
    b = Builder(tmp_path / "t.mtr").at(1)
    for f, (ino, idx, tok) in {1: (5, 0, 1), 2: (5, 1, 2), 3: (6, 0, 1), 4: (6, 1, 2)}.items():
        b.page(f, tok)
        b.w.pagecache(PageCacheOp.ADD, 8, ino, idx, f)
    b.map(1, 0, 1).map(1, 1, 2).map(2, 0, 3).map(2, 1, 4)
    b.at(2).close()
    r = replay(tmp_path / "t.mtr")
    fig = r["figures"]
    assert (fig["no_sharing"], fig["mmap_fork"], fig["ksm_hint_all"], fig["full_cbps"]) == \
        (4, 4, 4, 2)
    types = {row[0]: row[1:] for row in r["results"]["sharing"].tables["shareable_by_type"].rows}
    assert types["named"] == [2, 2] and types["anonymous"] == [0, 0]


def test_mixed_zero_page(tmp_path):
    # A zero page in a file's page cache and an anonymous zero page: the one mixed content.
    b = Builder(tmp_path / "t.mtr").at(1)
    b.page(1, 0).page(2, 0)
    b.w.pagecache(PageCacheOp.ADD, 8, 9, 0, 1)
    b.map(1, 0, 1).map(2, 0, 2)
    b.at(2).close()
    r = replay(tmp_path / "t.mtr")
    types = {row[0]: row[1:] for row in r["results"]["sharing"].tables["shareable_by_type"].rows}
    assert types == {"anonymous": [0, 0], "named": [0, 0], "mixed": [1, 1]}
    assert r["figures"]["ksm_hint_all"] == 2 and r["figures"]["full_cbps"] == 1


def test_write_breaks_sharing_and_oracle_series(tmp_path):
    # t=10: two anonymous frames with content A -> oracle 1. t=20: frame 2 rewritten -> oracle 2.
    # t=30: frame 2 gets A back -> 1. Trace ends at 40.
    b = Builder(tmp_path / "t.mtr").at(10)
    b.page(1, 0xA).page(2, 0xA).map(1, 0, 1).map(2, 0, 2)
    b.at(20).page(2, 0xB).at(30).page(2, 0xA).at(40).close()
    r = replay(tmp_path / "t.mtr", interval=10)
    o = r["results"]["oracle"]
    assert [row[:3] for row in o.tables["series"].rows] == [[10, 20, 1], [20, 30, 2], [30, 40, 1]]
    assert o.summary["oracle_min"] == 1 and o.summary["oracle_max"] == 2
    assert o.summary["oracle_mean"] == round((10 * 1 + 10 * 2 + 10 * 1) / 30, 2)
    # mmap/fork is 2 throughout: savings = (2-1)*10 + 0 + (2-1)*10 = 20 page*units
    assert o.summary["savings_vs_mmap_fork"] == 20
    s = r["results"]["snapshot_vs_continuous"]
    # opportunity 1: [10, 20), open at the first instant (left-censored); opportunity 2:
    # [30, 40), open at the last (right-censored)
    assert s.summary["opportunities"] == 2
    assert (s.summary["left_censored"], s.summary["right_censored"]) == (1, 1)
    assert s.summary["page_time"] == 20


def test_short_opportunity_missed_by_snapshots(tmp_path):
    # Snapshots every 100 at 0, 100, 200. Content A is duplicated only on [130, 160).
    b = Builder(tmp_path / "t.mtr").at(0)
    b.page(1, 1).page(2, 2).map(1, 0, 1).map(2, 0, 2)
    b.at(130).page(2, 1).at(160).page(2, 3).at(250).close()
    r = replay(tmp_path / "t.mtr", interval=100)
    s = r["results"]["snapshot_vs_continuous"].summary
    assert s["opportunities"] == 1
    assert s["share_shorter_than_interval"] == 1.0
    assert s["share_never_seen_by_snapshots"] == 1.0
    assert s["snapshot_mean_savings"] == 0
    assert s["continuous_mean_savings"] == round(30 / 250, 2)


def test_task_exit_releases_address_space(tmp_path):
    b = Builder(tmp_path / "t.mtr").at(1)
    b.w.task(TaskOp.NEW, 10, 10, 1, mm=7, name="a")
    b.w.task(TaskOp.NEW, 11, 10, 1, mm=7, name="a")  # a thread: same mm
    b.page(1, 1).map(7, 0, 1)
    b.at(2)
    b.w.task(TaskOp.EXIT, 11, 10, 1)
    b.at(3)
    b.w.flush()  # the trace is readable while it is being written
    st = replay(tmp_path / "t.mtr")["state"]
    assert st.figures()["mmap_fork"] == 1  # the thread group is still alive
    b.w.task(TaskOp.EXIT, 10, 10, 1)
    b.at(4).close()
    st = replay(tmp_path / "t.mtr")["state"]
    assert st.figures()["mmap_fork"] == 0 and 7 not in st.spaces


def test_last_update_of_a_frame_in_one_block_wins(tmp_path):
    import numpy as np

    from tests.helpers import content

    b = Builder(tmp_path / "t.mtr").at(1)
    frames = np.array([5, 6, 5, 5, 6], dtype=np.uint64)
    toks = [1, 2, 3, 4, 9]
    h = np.array([content(t) for t in toks], dtype=np.uint64)
    b.w.page(frames, h[:, 0], h[:, 1])  # one PAGE block
    b.map(1, 0, 5).map(1, 1, 6).at(2).close()
    st = replay(tmp_path / "t.mtr")["state"]
    assert int(st.contents.lo[st.content[5]]) == content(4)[0]
    assert int(st.contents.lo[st.content[6]]) == content(9)[0]
    assert st.figures()["full_cbps"] == 2


def test_fork_copies_the_parents_vmas(tmp_path):
    from memtrace.traces.format import VmaOp

    b = Builder(tmp_path / "t.mtr").at(1)
    b.w.task(TaskOp.NEW, 10, 10, 1, mm=7, name="parent")
    b.w.vma(VmaOp.MAP, 10, 7, 0x1000, 0x3000, 0x3, 0, 5, 8, "/lib/x.so")
    b.w.task(TaskOp.NEW, 11, 11, 10, mm=8, name="child")  # fork: no CLONE_VM
    b.w.task(TaskOp.NEW, 12, 10, 10, mm=7, name="thread", flags=0x100)
    b.w.vma(VmaOp.PROTECT, 11, 8, 0x2000, 0x3000, 0x1)  # the child's change is its own
    b.at(2).close()
    st = replay(tmp_path / "t.mtr")["state"]
    assert [(v.start, v.end, v.vm_flags, v.pgoff, v.path) for v in st.spaces[8].vmas.values()] \
        == [(0x1000, 0x2000, 0x3, 0, "/lib/x.so"), (0x2000, 0x3000, 0x1, 1, "/lib/x.so")]
    assert [(v.start, v.end, v.vm_flags) for v in st.spaces[7].vmas.values()] == \
        [(0x1000, 0x3000, 0x3)]
    assert st.spaces[8].vma_at(0x2fff).vm_flags == 0x1 and st.spaces[8].vma_at(0x3000) is None


def test_oracle_weighs_by_guest_seconds_when_the_trace_has_the_guest_clock(tmp_path):
    # Same as above, but the guest's clock says [10, 20) took 0.1 s, [20, 30) 0.8 s (the guest
    # idled: few instructions, much time) and [30, 40) 0.1 s.
    b = Builder(tmp_path / "t.mtr").at(10)
    b.w.counter("guest.clock_ns", 5_000_000_000)
    b.page(1, 0xA).page(2, 0xA).map(1, 0, 1).map(2, 0, 2)
    b.at(20)
    b.w.counter("guest.clock_ns", 5_100_000_000)
    b.page(2, 0xB).at(30)
    b.w.counter("guest.clock_ns", 5_900_000_000)
    b.page(2, 0xA).at(40)
    b.w.counter("guest.clock_ns", 6_000_000_000)
    b.close()
    o = replay(tmp_path / "t.mtr", interval=10)["results"]["oracle"]
    assert o.summary["time_base"].startswith("guest seconds (4 ")
    assert o.summary["guest_seconds"] == 1.0
    assert o.summary["oracle_mean"] == round(0.1 * 1 + 0.8 * 2 + 0.1 * 1, 2)  # 1.8, not 1.33
    assert o.summary["savings_vs_mmap_fork"] == 20  # still in page*instructions
    assert o.summary["savings_vs_mmap_fork_mean"] == 0.2  # saved 1 page for 0.2 of 1 s
    assert o.summary["savings_vs_mmap_fork_mib_s"] == round(1 * 0.2 / 256, 3)


def test_per_address_space_table_is_taken_at_the_peak(tmp_path):
    """The per-address-space table describes the sample with the most frames mapped, not the
    state at the end: after the peak, mm 2 unmaps everything and mm 1 writes over a page."""
    b = Builder(tmp_path / "t.mtr").at(10)
    for f, tok in ((10, 1), (11, 1), (12, 2), (13, 3)):
        b.page(f, tok)
    b.map(1, 100, 10).map(1, 101, 11).map(1, 102, 12)  # mm 1: contents 1, 1, 2
    b.map(2, 200, 12).map(2, 201, 13)                   # mm 2: frame 12 shared with mm 1
    b.at(20)
    b.map(2, 200, None).map(2, 201, None).page(11, 9)
    b.at(30).close()
    res = replay(tmp_path / "t.mtr", interval=5)["results"]["sharing"]
    assert res.summary["peak_mmap_fork"] == 4
    t = res.tables["per_address_space"]
    rows = {r[t.columns.index("mm")]: dict(zip(t.columns, r, strict=True)) for r in t.rows}
    assert set(rows) == {"0x1", "0x2"}
    one, two = rows["0x1"], rows["0x2"]
    assert (one["vpages"], one["frames"], one["exclusive"], one["self_sharings"]) == (3, 3, 2, 1)
    assert one["shareable"] == 2 and one["pss_pages"] == 2.5  # frames 10, 11 hold content 1
    assert (two["vpages"], two["frames"], two["exclusive"], two["shareable"]) == (2, 2, 1, 0)
