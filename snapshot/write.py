"""One snapshot as trace records: a complete state (FORMAT.md), with the kernel's own numbers as
counters."""

from __future__ import annotations

import contextlib

import numpy as np

from memtrace.snapshot import procfs
from memtrace.snapshot.frames import first_of_each, unique_counts
from memtrace.snapshot.procfs import KPF, PM_MMAP_EXCLUSIVE, kpf
from memtrace.snapshot.procfs import PAGE_SIZE as PAGE
from memtrace.snapshot.take import Snapshot
from memtrace.traces.format import (
    MAP_PRESENT,
    MAP_WRITABLE,
    VM_SHARED,
    VM_WRITE,
    MarkOp,
    PageCacheOp,
    TaskOp,
    VmaOp,
)
from memtrace.traces.writer import TraceWriter

#: records per array handed to the writer (keeps chunks near the writer's 4 MiB target)
WRITE_BATCH = 1 << 16


def write_snapshot(w: TraceWriter, snap: Snapshot, k: int) -> dict[str, int]:
    """Write one snapshot as a complete state (FORMAT.md: TIME, MARK SNAPSHOT, STATE_BEGIN
    with reset, the state, STATE_END). Returns the counters it wrote."""
    w.time(max(snap.t, w.now))
    w.mark(MarkOp.SNAPSHOT, None, k)
    w.mark(MarkOp.STATE_BEGIN, "snapshot", 1)
    for note in snap.notes:
        w.mark(MarkOp.PHASE, note)
    tab = snap.table
    zero_bit, anon_bit, ksm_bit = kpf(KPF.ZERO_PAGE), kpf(KPF.ANON), kpf(KPF.KSM)
    named_parts: list[np.ndarray] = []   # rows: frame, dev, ino, index
    used = []
    pairs = 0
    present = 0
    for d in snap.dumps:
        t = d.target
        if t.tgid not in t.threads:  # the leader exited, its threads live on: still the process
            w.task(TaskOp.EXISTING, t.tgid, t.tgid, t.ppid, t.tgid, 0, t.comm)
        for tid in sorted(t.threads, key=lambda x: (x != t.tgid, x)):
            w.task(TaskOp.EXISTING, tid, t.tgid, t.ppid, t.tgid, 0, t.threads[tid])
        for m in d.vmas:
            w.vma(VmaOp.EXISTING, t.tgid, t.tgid, m.start, m.end, m.vm_flags, m.pgoff, m.ino, m.dev,
                  m.path or None)
    for d in snap.dumps:
        pfn = d.pfn
        pos = tab.index(pfn)
        fl = tab.flags[pos]
        vf = np.array([m.vm_flags for m in d.vmas], dtype=np.uint64)[d.vma]
        filed = np.array([m.file_backed for m in d.vmas], dtype=bool)[d.vma]
        anon = (fl & anon_bit) != 0
        zero = (fl & zero_bit) != 0
        named = ~anon & ~zero & filed
        if named.any():
            vstart = np.array([m.vpn_start for m in d.vmas], dtype=np.uint64)[d.vma]
            pgoff = np.array([m.pgoff for m in d.vmas], dtype=np.uint64)[d.vma]
            dev = np.array([m.dev for m in d.vmas], dtype=np.uint64)[d.vma]
            ino = np.array([m.ino for m in d.vmas], dtype=np.uint64)[d.vma]
            index = pgoff + (d.vpn - vstart)
            named_parts.append(np.stack([pfn[named], dev[named], ino[named], index[named]],
                                        axis=1))
        # writable: a guess from the VMA (pagemap has no PTE write bit): shared writable
        # mappings, and anonymous pages mapped once (not KSM, not the zero page)
        excl = (d.entry & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
        wr = ((vf & np.uint64(VM_WRITE)) != 0) & (((vf & np.uint64(VM_SHARED)) != 0)
                                                   | (anon & excl & ((fl & ksm_bit) == 0)))
        flags = np.where(wr & ~zero, MAP_PRESENT | MAP_WRITABLE, MAP_PRESENT).astype(np.uint64)
        for s in range(0, len(pfn), WRITE_BATCH):
            e = s + WRITE_BATCH
            w.map(np.uint64(d.tgid), d.vpn[s:e], pfn[s:e], flags[s:e])
        used.append(pfn)
        present += len(pfn)
        pairs += len(unique_counts(pfn)[0])
    frames, mapcount = (unique_counts(np.concatenate(used)) if used
                        else (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)))
    nnamed = 0
    if named_parts:
        rows = np.concatenate(named_parts)
        rows = rows[first_of_each(rows[:, 0])]  # a frame has one file identity
        nnamed = len(rows)
        for s in range(0, nnamed, WRITE_BATCH):
            e = s + WRITE_BATCH
            w.pagecache(PageCacheOp.ADD, rows[s:e, 1], rows[s:e, 2], rows[s:e, 3],
                        rows[s:e, 0])
    pos = tab.index(frames) if len(frames) else np.zeros(0, dtype=np.int64)
    # Pss of the snapshot's frames that belongs to processes outside it: a frame mapped m times
    # here and kpagecount times in all has 1 - m / kpagecount of its Pss elsewhere
    outside = 0.0
    if len(frames):
        kpc = tab.counts[pos].astype(np.float64)
        normal = ((tab.flags[pos] & zero_bit) == 0) & (kpc > 0)
        outside = float(np.clip(1.0 - mapcount[normal] / kpc[normal], 0.0, 1.0).sum())
    known = tab.hashed[pos] if len(frames) else np.zeros(0, dtype=bool)
    kf, kp = frames[known], pos[known]
    for s in range(0, len(kf), WRITE_BATCH):
        e = s + WRITE_BATCH
        w.page(kf[s:e], tab.lo[kp[s:e]], tab.hi[kp[s:e]])
    counters = {
        "snapshot.processes": len(snap.dumps),
        "snapshot.threads": sum(len(d.target.threads) for d in snap.dumps),
        "snapshot.vmas": sum(len(d.vmas) for d in snap.dumps),
        "snapshot.present_pages": present,
        "snapshot.pairs": pairs,
        "snapshot.frames": len(frames),
        "snapshot.named_frames": nnamed,
        "snapshot.zero_page_mappings": int(sum(
            np.count_nonzero(tab.flags[tab.index(d.pfn)] & zero_bit) for d in snap.dumps)),
        "snapshot.unhashed_frames": int(len(frames) - np.count_nonzero(known)),
        "snapshot.dropped_pages": sum(d.dropped for d in snap.dumps),
        "snapshot.moved_pages": snap.stats.get("moved_pages", 0),
        "snapshot.stopped_ns": snap.stats.get("stopped_ns", 0),
        "snapshot.hash_ns": snap.stats.get("hash_ns", 0),
        "snapshot.stopping_ns": snap.stats.get("stopping_ns", 0),
        "snapshot.layout_ns": snap.stats.get("layout_ns", 0),
        "snapshot.resolve_ns": snap.stats.get("resolve_ns", 0),
        "snapshot.recheck_ns": snap.stats.get("recheck_ns", 0),
        "snapshot.bytes_read": snap.stats.get("bytes_read", 0),
        "kernel.kpagecount_sum": int(tab.counts[pos].sum()) if len(frames) else 0,
        "kernel.rss_kb": sum(d.rollup.get("Rss", 0) for d in snap.dumps),
        "kernel.pss_kb": sum(d.rollup.get("Pss", 0) for d in snap.dumps),
        "kernel.pss_outside_kb": round(outside * PAGE / 1024),
    }
    with contextlib.suppress(OSError, ValueError):
        counters["kernel.mem_total_kb"] = procfs.meminfo().get("MemTotal", 0)
    for k2, v in procfs.ksm_counters().items():
        counters[f"ksm.{k2}"] = v
    for name, value in counters.items():
        w.counter(name, max(0, int(value)))
    w.mark(MarkOp.STATE_END, "snapshot")
    for key, data in snap.contents.items():
        w.content(key[0], key[1], data)
    return counters
