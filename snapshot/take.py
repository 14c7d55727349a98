"""One snapshot: stop the selected processes, read what must be consistent with their memory,
resume them (always)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from memtrace.snapshot import procfs
from memtrace.snapshot.errors import SnapshotError, TargetGone, TargetSkipped
from memtrace.snapshot.frames import FrameTable, first_of_each, unique_counts
from memtrace.snapshot.layout import ProcDump, read_layout
from memtrace.snapshot.procfs import KPF, kpf
from memtrace.snapshot.procfs import PAGE_SIZE as PAGE
from memtrace.snapshot.read import Arena, Hasher
from memtrace.snapshot.stop import Stopper, Target
from memtrace.traces.pagehash import ZERO_HASH


@dataclass
class Snapshot:
    """One instant of the selected processes, everything needed to write it."""

    t: int                                   # ns since the tool started
    dumps: list[ProcDump]
    table: FrameTable
    contents: dict[tuple[int, int], memoryview | bytes]
    notes: list[str]
    stats: dict[str, int]

    def max_frame(self) -> int:
        """The highest frame the snapshot maps (-1 if none)."""
        return max((int(d.pfn.max()) for d in self.dumps if len(d.vpn)), default=-1)


@dataclass
class Options:
    contents: bool = True
    store: bool = False
    stop: bool = True
    stop_timeout: float = 10.0
    progress: bool = False
    use_scan: bool = True
    hold: float = 0.0                                     # test hook: seconds to stay stopped
    on_stopped: Callable[[list[Target]], None] | None = None  # test hook


def check_kpageflags() -> None:
    for path in (procfs.KPAGEFLAGS, procfs.KPAGECOUNT):
        if not os.path.exists(path):
            raise SnapshotError(f"{path} does not exist: this kernel lacks "
                                "CONFIG_PROC_PAGE_MONITOR, which trace-snapshot needs to tell "
                                "named from anonymous frames")
        try:
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            raise SnapshotError(f"cannot read {path}: permission denied (run trace-snapshot as "
                                "root: frame numbers and page flags need CAP_SYS_ADMIN)") from None
        except OSError as e:
            raise SnapshotError(f"cannot read {path}: {e.strerror}") from None


def take(targets: list[Target], opts: Options, t0_ns: int) -> Snapshot:
    """Stop the targets, read everything that must be consistent, resume them (always).

    Warnings (processes skipped) are returned in ``Snapshot.notes``, not printed: nothing is
    written to the terminal while processes are stopped, since one of them may be the one
    draining it (a terminal emulator, tmux, sshd).
    """
    check_kpageflags()
    notes: list[str] = []
    note = notes.append

    stats: dict[str, int] = {}
    stopper = Stopper(opts.stop_timeout) if opts.stop else None
    kfiles = procfs.KPageFiles()
    table = FrameTable()
    hasher = Hasher(opts.store, opts.progress,
                    Arena.for_targets(targets) if opts.store else None)
    dumps: list[ProcDump] = []
    t_begin = time.monotonic_ns()
    t_snap = t_begin
    try:
        if stopper is not None:
            stopper.stop(targets, note)
        else:
            for t in targets:
                t.threads = _threads_unstopped(t)
        t_snap = time.monotonic_ns()
        stats["stopping_ns"] = t_snap - t_begin
        live = [t for t in targets if t.gone is None]
        if opts.on_stopped is not None:
            opts.on_stopped(live)
        if opts.hold:
            time.sleep(opts.hold)
        moved = 0
        t1 = time.monotonic_ns()
        for t in live:
            try:
                d = read_layout(t, opts.use_scan)
                with contextlib.suppress(OSError, ValueError):
                    d.rollup = procfs.read_rollup(t.tgid) if not t.leader_dead else {}
                dumps.append(d)
            except TargetSkipped as e:
                t.gone = f"{e}"
                note(f"pid {t.tgid} ({t.comm}) skipped: {e}"
                     + (" during the snapshot" if isinstance(e, TargetGone) else ""))
        _check_pfns(dumps)
        stats["layout_ns"] = time.monotonic_ns() - t1
        stats["recheck_ns"] = 0
        for rnd in range(4):
            t1 = time.monotonic_ns()
            _resolve(dumps, table, kfiles, hasher if opts.contents else None, note)
            stats["resolve_ns"] = stats.get("resolve_ns", 0) + time.monotonic_ns() - t1
            if not opts.stop or rnd == 3:
                break
            t1 = time.monotonic_ns()
            changed = _recheck(dumps, table, opts.use_scan, note)
            stats["recheck_ns"] += time.monotonic_ns() - t1
            if changed == 0:
                break
            moved += changed
        if not opts.contents:
            _drop_pfnmap_vmas(dumps)
        stats["moved_pages"] = moved
    finally:
        if stopper is not None:
            # no signal may cut the release short
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM,
                                                            signal.SIGHUP})
            try:
                stopper.release()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        kfiles.close()
    t_end = time.monotonic_ns()
    dumps = [d for d in dumps if d.target.gone is None]
    stats["stopped_ns"] = (t_end - t_begin) if opts.stop else 0
    stats["hash_ns"] = int(hasher.seconds * 1e9)
    stats["bytes_read"] = hasher.bytes_read
    stats["pages_hashed"] = hasher.pages_hashed
    contents: dict[tuple[int, int], memoryview | bytes] = dict(hasher.contents())
    if opts.store and np.any((table.flags & kpf(KPF.ZERO_PAGE)) != 0):
        contents[ZERO_HASH] = bytes(PAGE)
    return Snapshot(t_snap - t0_ns, dumps, table, contents, notes, stats)


def _threads_unstopped(t: Target) -> dict[int, str]:
    out = {}
    try:
        for tid in procfs.thread_ids(t.tgid):
            with contextlib.suppress(OSError, ValueError):
                out[tid] = procfs.read_stat(t.tgid, tid).comm
    except OSError:
        t.gone = "exited"
    return out


def _check_pfns(dumps: list[ProcDump]) -> None:
    """Without CAP_SYS_ADMIN the kernel reports every frame number as 0: fail clearly."""
    present = sum(len(d.vpn) for d in dumps)
    if present and not any(np.any(d.pfn != 0) for d in dumps):
        raise SnapshotError("the kernel hides frame numbers in /proc/PID/pagemap (all zero): "
                            "trace-snapshot needs CAP_SYS_ADMIN (run it as root)")


def _resolve(dumps: list[ProcDump], table: FrameTable, kfiles: procfs.KPageFiles,
             hasher: Hasher | None, note: Callable[[str], None]) -> None:
    """Read flags and counts of frames not seen yet, hash every frame not hashed yet (each
    read from the first process and address mapping it), and leave out pages whose frames
    have no struct page or cannot be read.

    kpageflags and kpagecount cost about 100 ns of kernel time per entry each; they are read
    by two threads while this one hashes and the reader thread copies pages: hashing does not
    need the flags (the zero page, if not known yet, is simply read once: one frame).
    """
    live = [d for d in dumps if d.target.gone is None]
    if not live:
        return
    pfn = np.concatenate([d.pfn for d in live])
    new = table.missing(pfn)
    pick = np.zeros(0, dtype=np.int64)
    with ThreadPoolExecutor(2, thread_name_prefix="snapshot-kpage") as pool:
        counts = pool.submit(kfiles.counts, new)
        flags = pool.submit(kfiles.flags, new)
        if hasher is not None:
            vpn = np.concatenate([d.vpn for d in live])
            proc = np.concatenate([np.full(len(d.vpn), i, dtype=np.int32)
                                   for i, d in enumerate(live)])
            cand = np.flatnonzero(~table.is_hashed(pfn))
            pick = np.sort(cand[first_of_each(pfn[cand])])  # first page mapping each frame
            if len(pick):
                need = np.zeros(len(vpn), dtype=bool)
                need[pick] = True
                lo, hi, ok = hasher.run(live, vpn, proc, need)
        table.add(new, flags.result(), counts.result())
    if len(pick):
        p = table.index(pfn[pick])
        table.lo[p[ok]] = lo[ok]
        table.hi[p[ok]] = hi[ok]
        table.hashed[p[ok]] = True
        if not ok.all():
            # Pages that could not be read: the process died (its frames are read from another
            # process mapping them in the next round), or the VMA refuses (VM_IO/VM_PFNMAP:
            # [vvar], device memory), which holds for every mapping of such a frame: it is
            # left out everywhere.
            failed = unique_counts(proc[pick[~ok]])[0]
            dead = set()
            for i in failed.tolist():
                d = live[i]
                if not os.path.exists(f"/proc/{d.tgid}/task") or not _readable(d):
                    d.target.gone = "exited"
                    dead.add(i)
                    note(f"pid {d.tgid} ({d.target.comm}) skipped: exited during the snapshot")
            refused = ~ok & ~np.isin(proc[pick], list(dead))
            table.unreadable[p[refused]] = True
    for d in live:
        if d.target.gone is None:
            d.filter(table)


def _readable(d: ProcDump) -> bool:
    """Whether the process still has an address space (a killed process keeps its /proc
    directory as a zombie, but its maps are empty)."""
    try:
        return bool(procfs.read_text(f"{d.target.proc}/maps"))
    except OSError:
        return False


def _recheck(dumps: list[ProcDump], table: FrameTable, use_scan: bool,
             note: Callable[[str], None]) -> int:
    """Read pagemap again; pages whose frame changed while we read (the kernel kept working:
    KSM, compaction, reclaim) are updated and the next round reads their new frames. Returns
    how many pages changed."""
    changed = 0
    for d in dumps:
        if d.target.gone is not None:
            continue
        try:
            again = read_layout(d.target, use_scan)
        except TargetSkipped as e:
            d.target.gone = f"{e}"
            note(f"pid {d.tgid} ({d.target.comm}) skipped: {e} during the snapshot")
            continue
        again.filter(table)
        if np.array_equal(again.vpn, d.vpn) and np.array_equal(again.pfn, d.pfn):
            continue
        a = dict(zip(d.vpn.tolist(), d.pfn.tolist(), strict=True))
        b = dict(zip(again.vpn.tolist(), again.pfn.tolist(), strict=True))
        changed += sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        d.vmas, d.vpn, d.entry, d.vma = again.vmas, again.vpn, again.entry, again.vma
    return changed


def _drop_pfnmap_vmas(dumps: list[ProcDump]) -> None:
    """Without contents, find VM_IO/VM_PFNMAP mappings by their VmFlags in /proc/PID/smaps
    (with contents, /proc/PID/mem refusing them tells) and leave their pages out."""
    for d in dumps:
        if d.target.gone is not None or not len(d.vpn):
            continue
        try:
            special = procfs.pfnmap_starts(d.target.proc)
        except OSError:
            continue
        bad = [i for i, m in enumerate(d.vmas) if m.start in special]
        if bad:
            d.drop(~np.isin(d.vma, bad))
