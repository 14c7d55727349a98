"""trace-snapshot: dump the memory of live Linux processes into a trace (thesis ch. 4.3).

The thesis's memory dumper, for a live Linux system or a minimal guest, writing trace format v1
(``traces/FORMAT.md``) so that ``trace-analyze`` prints the same figures (eq. 4.6-4.9, Tables 5.1
and 5.2) as for recorded traces. Per selected process it records the thread group (TASK EXISTING,
one per thread, ``mm`` = the tgid since /proc does not show mm addresses), its VMAs from
/proc/PID/maps (VMA EXISTING), the frame behind every present page from /proc/PID/pagemap (MAP),
which frames are named (PAGECACHE ADD, see below), and the xxh3-128 hash of every frame's content
read through /proc/PID/mem (PAGE; each frame is read once however many processes map it; the kernel
zero page, KPF_ZERO_PAGE, is the zero hash, analyses.content.ZERO_HASH). Kernel numbers that
validate the figures go into COUNTER records: the sums of Rss and Pss of /proc/PID/smaps_rollup,
the share of the frames' Pss held by processes outside the snapshot (from /proc/kpagecount), the
KSM counters; and the tool's own timings (snapshot.stopped_ns and the phases).

Named or anonymous (thesis eq. 4.1, 4.2). A frame is named when it is in the page cache: its
kpageflags lack KPF_ANON, it is not the zero page, and the VMA mapping it has an inode. Its file
identity is the VMA's (dev, ino) and its index the VMA's pgoff plus the page's offset in the VMA.
This covers regular files, private file mappings not yet written (after a write the copy has
KPF_ANON and is anonymous) and shmem: tmpfs files, SysV shm, memfd and MAP_SHARED|MAP_ANONYMOUS
memory (``/dev/zero (deleted)``) all show an inode in maps and lack KPF_ANON, so they are named, as
FORMAT.md says they are (tests/test_snapshot.py checks a tmpfs file). KSM pages keep KPF_ANON and
are anonymous. A private mapping of /dev/zero has an inode but its frames are anonymous or the zero
page, so the rule still holds. Pages of VM_PFNMAP/VM_IO mappings (``[vvar]``, device memory) are
not RAM the process owns: /proc/PID/mem refuses to read them (with --no-contents, smaps VmFlags
"pf"/"io" tell), and they are left out, as Rss leaves them out; so are frames without a struct page
(KPF_NOPAGE).

Stopping: ptrace, not SIGSTOP.
  SIGSTOP is visible to and undoable by others: the parent's waitpid(WUNTRACED) reports it, a
  shell prints "Stopped", and any SIGCONT (the shell, a supervisor, the user) restarts a process in
  the middle of the dump. If the dumper dies (SIGKILL, OOM killer) the processes stay stopped for
  good, and a final SIGCONT would also wake processes that a user had stopped on purpose.
  PTRACE_SEIZE + PTRACE_INTERRUPT put each thread into a ptrace stop that only the tracer ends: a
  SIGCONT from others waits until we detach, the parent sees nothing, a job-control stop the
  process was already in is kept (the kernel re-enters it at detach), signals that arrive while
  stopped are handed back at detach, and if trace-snapshot dies for any reason the kernel detaches
  and the processes run on. The costs: one tracer per process, so a process under gdb or strace
  cannot be stopped (it is skipped with a warning); ptrace works per thread, so every thread is
  seized and interrupted, and /proc/PID/task is listed again until no new thread has appeared (a
  stopped thread cannot create one); Yama ptrace_scope 3 forbids ptrace altogether (one error
  line). Every thread counts as stopped only when waitpid has reported its stop and
  /proc/PID/task/TID/stat shows 't'. A thread in uninterruptible sleep (D) stops only when it
  leaves it: after --stop-timeout its process is let go and skipped. All selected processes are
  stopped together, read, and resumed together: the snapshot is one instant for all of them.
  trace-snapshot never stops itself or its ancestors (that could deadlock the terminal or the
  shell waiting for it).

What happens while the processes are stopped: only what must be consistent with their memory.
Maps, pagemap (PAGEMAP_SCAN finds the present ranges first on Linux 6.7+, so a runtime that
reserves a TiB costs nothing), smaps_rollup, and the page contents: a reader thread copies the
next 8 MiB from /proc/PID/mem (runs of present pages, one read each) while the main thread hashes
the last 8 MiB, and two more threads read kpageflags and kpagecount for the new frames meanwhile.
Then pagemap is read again: pages whose frame changed (the kernel keeps working: KSM, compaction,
reclaim) are read again. Before stopping: selection, buffers (with --store-contents, memory for
all the pages, populated in advance: a page fault per page while stopped cost more than the
read). After resuming: sorting out distinct contents, building and compressing records, writing;
nothing is written to the trace or the terminal while processes are stopped (a stopped process
may be what drains our terminal or pipe). About 0.8 s stopped per GiB on a 2-CPU VM
(bench/bench_snapshot.py). The kernel can still change frames that unselected processes share
with selected ones (a file written with write(2), shmem written by another process); no dump tool
can prevent that. --no-stop reads running processes (a fuzzy snapshot, for looking at a machine
without touching it).

``--every S --count K`` records a series: each snapshot is a TIME record, MARK SNAPSHOT(k) and
MARK STATE_BEGIN(reset) ... MARK STATE_END, so a replay forgets the previous snapshot's state.
Time is nanoseconds since the tool started (header ``clock_unit`` "ns").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import mmap
import os
import platform
import pwd
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from memtrace.snapshot import procfs
from memtrace.snapshot.procfs import KPF, PM_MMAP_EXCLUSIVE, PM_PFN_MASK, Mapping, kpf
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
from memtrace.traces.pagehash import ZERO_HASH
from memtrace.traces.writer import TraceWriter

try:
    from tqdm import tqdm
except ImportError:  # a minimal guest has numpy, zstandard and xxhash only: no progress bar
    tqdm = None

VERSION = "0.1.0"
PROG = "trace-snapshot"
PAGE = procfs.PAGE_SIZE
#: pages per read job: the reader thread fills one 8 MiB buffer while the main thread hashes
#: the previous one
JOB_PAGES = 2048
#: records per array handed to the writer (keeps chunks near the writer's 4 MiB target)
WRITE_BATCH = 1 << 16

# ptrace requests and wait flags (include/uapi/linux/ptrace.h, wait.h): the same on all arches
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for threads (clone children) too

# PAGEMAP_SCAN (Linux 6.7): the present ranges of an address space in one ioctl
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), sizeof = 96
PAGE_IS_PRESENT = 1 << 3


class SnapshotError(Exception):
    """A failure reported as one line: ``trace-snapshot: error: <message>``."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class TargetSkipped(Exception):
    """A process cannot be dumped (the reason is the message); the others can."""


class TargetGone(TargetSkipped):
    """The process exited during the snapshot."""


# -- stopping ------------------------------------------------------------------------------------
class _Ptrace:
    """ptrace(2) through ctypes; errors come back as errno values, not exceptions."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._ptrace = libc.ptrace
        self._ptrace.restype = ctypes.c_long
        self._ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def call(self, req: int, tid: int, data: int = 0) -> int:
        """0 on success, else the errno."""
        ctypes.set_errno(0)
        r = self._ptrace(req, tid, None, ctypes.c_void_p(data) if data else None)
        return ctypes.get_errno() if r == -1 else 0


@dataclass
class Target:
    """One selected thread group."""

    tgid: int
    comm: str
    ppid: int
    threads: dict[int, str] = field(default_factory=dict)   # tid -> comm
    gone: str | None = None                                  # why it was dropped
    leader_dead: bool = False

    @property
    def proc(self) -> str:
        """Where /proc shows its memory: /proc/TGID, or, once the thread group leader has
        exited while other threads live on (its maps are empty then), a live thread's
        /proc/TGID/task/TID."""
        if self.leader_dead:
            for tid in self.threads:
                if tid != self.tgid:
                    return f"/proc/{self.tgid}/task/{tid}"
        return f"/proc/{self.tgid}"


_LINGERING: set[int] = set()


class Stopper:
    """Stops thread groups with PTRACE_SEIZE + PTRACE_INTERRUPT and always lets them go.

    ``stop()`` returns when every thread of every target is in a ptrace stop (waitpid said so
    and /proc/PID/task/TID/stat shows 't'), or has dropped the targets it could not stop.
    ``release()`` detaches every thread, handing back signals that arrived meanwhile.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.pt = _Ptrace()
        self.timeout = timeout
        self.seized: dict[int, int] = {}      # tid -> tgid
        self.stopped: set[int] = set()         # tids reported stopped by waitpid
        self.resignal: dict[int, int] = {}     # tid -> signal to deliver at detach
        self.lingering = _LINGERING             # seized but never stopped: detach when they do
        self._warn: Callable[[str], None] = lambda _msg: None

    def _seize(self, tid: int, tgid: int) -> int:
        # recorded first, so that a signal arriving between the two cannot leave a thread
        # seized but unknown to release()
        self.seized[tid] = tgid
        e = self.pt.call(PTRACE_SEIZE, tid)
        if e == 0:
            self.pt.call(PTRACE_INTERRUPT, tid)
        else:
            del self.seized[tid]
        return e

    def _reap(self, tid: int, block: bool = False) -> str | None:
        """Collect one wait status of ``tid``: 'stopped', 'gone' or None (nothing yet)."""
        try:
            pid, status = os.waitpid(tid, WALL | (0 if block else os.WNOHANG))
        except ChildProcessError:
            return "gone"
        if pid == 0:
            return None
        if os.WIFSTOPPED(status):
            if (status >> 16) == 0:
                # not our PTRACE_INTERRUPT (nor a group stop: both report PTRACE_EVENT_STOP)
                # but a signal-delivery stop: the signal is lost unless handed back at detach
                self.resignal[tid] = os.WSTOPSIG(status)
            self.stopped.add(tid)
            return "stopped"
        return "gone"  # exited or killed

    def _forget(self, tid: int) -> None:
        self.seized.pop(tid, None)
        self.stopped.discard(tid)
        self.resignal.pop(tid, None)

    def stop(self, targets: list[Target], warn: Callable[[str], None]) -> None:
        self._warn = warn
        deadline = time.monotonic() + self.timeout
        live = {t.tgid: t for t in targets if t.gone is None}
        dead: set[int] = set()
        while True:
            # seize every thread not seized yet (new threads appear until all are stopped)
            fresh = 0
            for t in list(live.values()):
                try:
                    tids = procfs.thread_ids(t.tgid)
                except OSError:
                    tids = []
                if not tids:
                    self._drop(t, "exited before it could be stopped", live)
                    continue
                for tid in tids:
                    if tid in self.seized or tid in dead:
                        continue
                    if _state(t.tgid, tid) in ("Z", "X", "?"):
                        dead.add(tid)  # an exited thread (a zombie leader): nothing to stop
                        continue
                    e = self._seize(tid, t.tgid)
                    if e == errno.ESRCH:
                        continue  # the thread just exited
                    if e:
                        why = (f"cannot ptrace it ({os.strerror(e)}"
                               + ("; already traced by a debugger or strace?" if e == errno.EPERM
                                  else "") + ")")
                        self._drop(t, why, live)
                        break
                    fresh += 1
            if not live:
                return
            # wait until every seized thread of the live targets reports its stop
            while True:
                pending = [tid for tid, g in self.seized.items()
                           if g in live and tid not in self.stopped]
                if not pending:
                    break
                progressed = False
                for tid in pending:
                    r = self._reap(tid)
                    if r == "gone":
                        self._forget(tid)
                    if r is not None:
                        progressed = True
                if time.monotonic() > deadline:
                    for tgid in {self.seized[tid] for tid in pending if tid in self.seized}:
                        slow = [tid for tid in pending if self.seized.get(tid) == tgid]
                        states = ",".join(f"{tid}:{_state(tgid, tid)}" for tid in slow[:4])
                        self._drop(live[tgid], f"did not stop within {self.timeout:g} s "
                                   f"(threads {states})", live)
                    break
                if not progressed:
                    time.sleep(0.0005)
            if fresh == 0:
                break
        # confirm with /proc that every thread is in a stop, and record the threads
        for t in list(live.values()):
            tids = [tid for tid, g in self.seized.items() if g == t.tgid]
            t.threads = {}
            for tid in tids:
                try:
                    st = procfs.read_stat(t.tgid, tid)
                except (OSError, ValueError):
                    self._forget(tid)
                    continue
                if st.state not in ("t", "T"):
                    if st.state in ("Z", "X"):
                        continue
                    self._drop(t, f"thread {tid} is in state {st.state!r} after its stop "
                               "was reported", live)
                    break
                t.threads[tid] = st.comm
            if t.tgid in live and not t.threads:
                self._drop(t, "exited while being stopped", live)
            t.leader_dead = t.tgid not in t.threads

    def _drop(self, t: Target, why: str, live: dict[int, Target]) -> None:
        if t.gone is None:
            t.gone = why
            self._warn(f"pid {t.tgid} ({t.comm}) skipped: {why}")
        live.pop(t.tgid, None)
        self.release(t.tgid)

    def release(self, tgid: int | None = None) -> None:
        """Detach the threads of ``tgid`` (all threads when None). Never raises."""
        for tid in [tid for tid, g in self.seized.items() if tgid is None or g == tgid]:
            sig = self.resignal.get(tid, 0)
            if tid not in self.stopped:
                # seized but not stopped yet: its stop is imminent unless it sleeps in D
                for _ in range(200):
                    r = self._reap(tid)
                    if r is not None:
                        break
                    time.sleep(0.0005)
                sig = self.resignal.get(tid, 0)
            e = self.pt.call(PTRACE_DETACH, tid, sig)
            if e == errno.ESRCH and tid in self.stopped:
                # it died while stopped (SIGKILL): collect the tracer's notification, which
                # hands the zombie back to its real parent
                self._reap(tid)
            elif e == errno.ESRCH and os.path.exists(f"/proc/{tid}"):
                # still running towards its stop (e.g. in D state): the kernel detaches it when
                # we exit; try again at the next release
                self.lingering.add(tid)
            else:
                self.lingering.discard(tid)
            self._forget(tid)
        if tgid is None:
            self.release_lingering()

    def release_lingering(self) -> None:
        """Detach threads that were seized but had not stopped when their process was let go
        (they sleep uninterruptibly and stop when they wake). Called again between snapshots;
        when trace-snapshot exits the kernel detaches whatever is left."""
        for tid in list(self.lingering):
            if not os.path.exists(f"/proc/{tid}"):
                self.lingering.discard(tid)
            elif self._reap(tid) is not None:
                self.pt.call(PTRACE_DETACH, tid, self.resignal.pop(tid, 0))
                self.lingering.discard(tid)


def _state(tgid: int, tid: int) -> str:
    try:
        return procfs.read_stat(tgid, tid).state
    except (OSError, ValueError):
        return "?"


# -- selection -----------------------------------------------------------------------------------
def _proc_stat(pid: int) -> procfs.Stat | None:
    try:
        return procfs.read_stat(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int, st: procfs.Stat) -> bool:
    """Not a zombie. A thread group whose leader has exited shows the leader as a zombie
    while its other threads run on; it is alive."""
    if st.state not in ("Z", "X"):
        return True
    try:
        return any(_state(pid, tid) not in ("Z", "X", "?") for tid in procfs.thread_ids(pid))
    except OSError:
        return False


def select(pids: list[int], name: str | None, user: str | None, everything: bool,
           stop: bool, strict: bool = True, warn: Callable[[str], None] | None = None
           ) -> list[Target]:
    """The thread groups to dump: the given pids, plus every process matching all of
    ``name`` (regex on comm or cmdline) and ``user`` (or every process, with ``everything``).

    trace-snapshot itself is never selected, nor its ancestors when processes are stopped.
    Kernel threads and zombies have no memory and are left out. A given pid that does not
    exist is an error when ``strict`` (the first snapshot), a warning later in a series.
    """
    me = os.getpid()
    excluded = set(procfs.ancestors(me)) if stop else {me}
    chosen: dict[int, Target] = {}
    for pid in pids:
        st = _proc_stat(pid)
        if st is None or (not strict and not _alive(pid, st)):
            if strict:
                raise SnapshotError(f"no process with pid {pid}")
            if warn is not None:
                warn(f"pid {pid} has exited; the series goes on without it")
            continue
        if pid == me or pid in excluded:
            raise SnapshotError(f"pid {pid} is trace-snapshot itself or one of its ancestors; "
                                "stopping it would deadlock (use --no-stop to read it anyway)"
                                if pid != me else f"pid {pid} is trace-snapshot itself")
        if st.flags & procfs.PF_KTHREAD:
            raise SnapshotError(f"pid {pid} ({st.comm}) is a kernel thread: it has no user memory")
        if not _alive(pid, st):
            raise SnapshotError(f"pid {pid} ({st.comm}) is a zombie: it has no memory left")
        with contextlib.suppress(OSError, KeyError, ValueError):
            tgid = int(procfs.read_status(pid)["Tgid"])
            if tgid != pid:
                raise SnapshotError(f"pid {pid} is a thread of process {tgid}; give the "
                                    "process id")
        chosen[pid] = Target(pid, st.comm, st.ppid)
    if name is None and user is None and not everything:
        return list(chosen.values())
    try:
        pattern = re.compile(name) if name is not None else None
    except re.error as e:
        raise SnapshotError(f"--name {name!r} is not a regular expression: {e}") from None
    uid = None
    if user is not None:
        try:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        except KeyError:
            raise SnapshotError(f"no user named {user!r}") from None
    for pid in procfs.all_pids():
        if pid in chosen or pid in excluded:
            continue
        st = _proc_stat(pid)
        if st is None or st.flags & procfs.PF_KTHREAD or not _alive(pid, st):
            continue
        try:
            if uid is not None and procfs.effective_uid(pid) != uid:
                continue
            if pattern is not None and not (pattern.search(st.comm)
                                            or pattern.search(procfs.read_cmdline(pid))):
                continue
        except (OSError, KeyError, ValueError, IndexError):
            continue
        chosen[pid] = Target(pid, st.comm, st.ppid)
    return sorted(chosen.values(), key=lambda t: t.tgid)


# -- the frame table -----------------------------------------------------------------------------
class FrameTable:
    """Everything known about the frames seen so far, in arrays sorted by frame number:
    kpageflags, kpagecount and (once read) the content hash."""

    def __init__(self) -> None:
        self.frames = np.zeros(0, dtype=np.uint64)
        self.flags = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.uint64)
        self.lo = np.zeros(0, dtype=np.uint64)
        self.hi = np.zeros(0, dtype=np.uint64)
        self.hashed = np.zeros(0, dtype=bool)
        self.unreadable = np.zeros(0, dtype=bool)   # /proc/PID/mem refused it (VM_PFNMAP)

    def index(self, frames: np.ndarray) -> np.ndarray:
        """Positions of known ``frames`` (all must be known)."""
        return np.searchsorted(self.frames, frames)

    def missing(self, frames: np.ndarray) -> np.ndarray:
        """The sorted unique frames among ``frames`` that the table does not hold yet."""
        u = unique_counts(frames)[0]
        if len(self.frames) == 0:
            return u
        i = np.minimum(np.searchsorted(self.frames, u), len(self.frames) - 1)
        return u[self.frames[i] != u]

    def lookup(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, found) of ``frames``, some of which may be unknown."""
        if len(self.frames) == 0:
            return np.zeros(len(frames), dtype=np.int64), np.zeros(len(frames), dtype=bool)
        i = np.minimum(np.searchsorted(self.frames, frames), len(self.frames) - 1)
        return i, self.frames[i] == frames

    def is_hashed(self, frames: np.ndarray) -> np.ndarray:
        i, found = self.lookup(frames)
        return found & self.hashed[i] if len(self.frames) else found

    def dropped(self, frames: np.ndarray) -> np.ndarray:
        """Mask of ``frames`` that are left out of the trace: no struct page (KPF_NOPAGE), or
        unreadable through /proc/PID/mem (VM_IO/VM_PFNMAP mappings)."""
        i, found = self.lookup(frames)
        if len(self.frames) == 0:
            return found
        bad = ((self.flags[i] & kpf(KPF.NOPAGE)) != 0) | self.unreadable[i]
        return found & bad

    def add(self, frames: np.ndarray, flags: np.ndarray, counts: np.ndarray) -> None:
        if len(frames) == 0:
            return
        order = np.argsort(np.concatenate([self.frames, frames]), kind="stable")
        n = len(frames)
        self.frames = np.concatenate([self.frames, frames])[order]
        self.flags = np.concatenate([self.flags, flags])[order]
        self.counts = np.concatenate([self.counts, counts])[order]
        self.lo = np.concatenate([self.lo, np.zeros(n, np.uint64)])[order]
        self.hi = np.concatenate([self.hi, np.zeros(n, np.uint64)])[order]
        self.hashed = np.concatenate([self.hashed, np.zeros(n, bool)])[order]
        self.unreadable = np.concatenate([self.unreadable, np.zeros(n, bool)])[order]
        zero = (self.flags & kpf(KPF.ZERO_PAGE)) != 0
        self.lo[zero], self.hi[zero] = ZERO_HASH
        self.hashed |= zero


# -- per process ---------------------------------------------------------------------------------
@dataclass
class ProcDump:
    """What one stopped process maps: VMAs and its present pages (vpn -> frame)."""

    target: Target
    vmas: list[Mapping]
    vpn: np.ndarray                 # uint64, sorted
    entry: np.ndarray               # uint64 pagemap entries
    vma: np.ndarray                 # int32 index into vmas, per page
    rollup: dict[str, int] = field(default_factory=dict)
    dropped: int = 0                # pages left out: frames without struct page or unreadable

    @property
    def tgid(self) -> int:
        return self.target.tgid

    @property
    def pfn(self) -> np.ndarray:
        return self.entry & np.uint64(PM_PFN_MASK)

    def drop(self, keep: np.ndarray) -> None:
        self.dropped += int(len(keep) - np.count_nonzero(keep))
        self.vpn, self.entry, self.vma = self.vpn[keep], self.entry[keep], self.vma[keep]

    def filter(self, table: FrameTable) -> None:
        """Leave out the pages whose frames the table says are not RAM we can read."""
        bad = table.dropped(self.pfn)
        if bad.any():
            self.drop(~bad)


class _PmScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_scan_supported: bool | None = None
_libc: Any = None


def _present_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]] | None:
    """Address ranges [a, b) of present pages between ``start`` and ``end`` via PAGEMAP_SCAN,
    or None where the kernel lacks it (before 6.7). One ioctl skips unpopulated regions that a
    plain pagemap read would have to fill entry by entry (think of a runtime reserving 1 TiB)."""
    global _scan_supported, _libc
    if _scan_supported is False:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    nvec = 4096
    vec = (ctypes.c_uint64 * (3 * nvec))()
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        arg = _PmScanArg(ctypes.sizeof(_PmScanArg), 0, pos, end, 0, ctypes.addressof(vec), nvec,
                         0, 0, PAGE_IS_PRESENT, 0, PAGE_IS_PRESENT)
        r = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
        if r < 0:
            e = ctypes.get_errno()
            if e in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) and _scan_supported is None:
                _scan_supported = False
                return None
            raise OSError(e, os.strerror(e))
        _scan_supported = True
        v = vec[:3 * r]
        out.extend((v[3 * i], v[3 * i + 1]) for i in range(r))
        if arg.walk_end <= pos:
            break
        pos = arg.walk_end
    return out


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def read_layout(t: Target, use_scan: bool = True) -> ProcDump:
    """Maps and present pages of a (stopped) process. Raises TargetGone if it has exited."""
    try:
        vmas = procfs.parse_maps(procfs.read_text(f"{t.proc}/maps"))
        fd = os.open(f"{t.proc}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("exited") from None
    except PermissionError as e:
        raise TargetSkipped(f"cannot read its memory map ({e.strerror})") from None
    if not vmas:
        os.close(fd)
        raise TargetGone("exited (no memory map left)")
    try:
        vpns, ents, idx = [], [], []
        user = [m for m in vmas if m.user]
        ranges = (_present_ranges(fd, user[0].start, user[-1].end)
                  if use_scan and user else None)
        starts = np.array([m.start for m in vmas], dtype=np.uint64)
        if ranges is not None:
            for a, b in ranges:
                # a present range can span adjacent VMAs: split it at their boundaries
                i = int(np.searchsorted(starts, a, side="right")) - 1
                while a < b and 0 <= i < len(vmas):
                    m = vmas[i]
                    hi = min(b, m.end)
                    if hi > a:
                        e = procfs.read_pagemap(fd, a >> 12, (hi - a) >> 12)
                        keep = np.flatnonzero(e & np.uint64(procfs.PM_PRESENT))
                        vpns.append(np.uint64(a >> 12) + keep.astype(np.uint64))
                        ents.append(e[keep])
                        idx.append(np.full(len(keep), i, dtype=np.int32))
                    a = hi
                    i += 1
        else:
            for i, m in enumerate(vmas):
                if not m.user:
                    continue
                v, e = procfs.present_pages(fd, m)
                vpns.append(v)
                ents.append(e)
                idx.append(np.full(len(v), i, dtype=np.int32))
    except ProcessLookupError:
        raise TargetGone("exited") from None
    finally:
        os.close(fd)
    d = ProcDump(t, vmas, _cat(vpns, np.uint64), _cat(ents, np.uint64), _cat(idx, np.int32))
    if len(d.vpn) == 0 and not os.path.exists(f"/proc/{t.tgid}/task"):
        raise TargetGone("exited")
    return d


# -- reading and hashing -------------------------------------------------------------------------
def first_of_each(a: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of each distinct value of ``a``, in order of value.

    Sort-based on purpose: numpy 2's hash-based ``np.unique`` took 0.3 s for 260k frames, all
    of it while the processes were stopped.
    """
    order = np.argsort(a, kind="stable")
    sa = a[order]
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = sa[1:] != sa[:-1]
    return order[keep]


def unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of ``a`` and how often each occurs."""
    sa = np.sort(a)
    if len(sa) == 0:
        return sa, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sa[1:] != sa[:-1]]))
    return sa[starts], np.diff(np.concatenate([starts, [len(sa)]]))


#: a run of pages to read may include up to this many present pages that need no hashing
#: (already hashed, the zero page): copying 64 KiB costs less than another system call
MAX_GAP = 16


@dataclass
class _Job:
    """Reads for one buffer: ``runs`` of consecutive virtual pages of one process, and which
    buffer pages (``offs``) hold frames to hash, for output ``slots``."""

    proc: int
    runs: list[tuple[int, int]] = field(default_factory=list)   # (vpn, npages)
    npages: int = 0
    offs: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)


def _plan(vpn: np.ndarray, proc: np.ndarray, need: np.ndarray) -> list[_Job]:
    """Plan the reads of the ``need``ed pages among all present pages (``vpn``, ``proc``,
    sorted by process then address). Needed pages of one process whose only gaps are at most
    MAX_GAP present pages are read with one call, which never touches a page that is not
    present (reading one through /proc/PID/mem would fault it in). Output slot q belongs to
    the q-th needed page in this order."""
    nb = np.flatnonzero(need)
    if len(nb) == 0:
        return []
    v = vpn.astype(np.int64)
    brk = np.concatenate([[0], np.cumsum((np.diff(v) != 1) | (np.diff(proc) != 0))])
    join = (brk[nb[1:]] == brk[nb[:-1]]) & (np.diff(nb) - 1 <= MAX_GAP)
    first = np.flatnonzero(np.concatenate([[True], ~join]))
    last = np.concatenate([first[1:], [len(nb)]]) - 1
    jobs: list[_Job] = []
    job = _Job(-1)
    for a, b in zip(first.tolist(), last.tolist(), strict=True):
        rs, re_ = int(nb[a]), int(nb[b]) + 1    # positions of the run in vpn/proc
        p = int(proc[rs])
        while rs < re_:
            if job.proc != p or job.npages == JOB_PAGES:
                if job.npages:
                    jobs.append(job)
                job = _Job(p)
            k = min(re_ - rs, JOB_PAGES - job.npages)
            qa, qb = np.searchsorted(nb, [rs, rs + k])
            job.offs.append(nb[qa:qb] - rs + job.npages)
            job.slots.append(np.arange(qa, qb))
            job.runs.append((int(v[rs]), k))
            job.npages += k
            rs += k
    if job.npages:
        jobs.append(job)
    return jobs


def _read_job(fd: int, job: _Job, buf: memoryview) -> set[int]:
    """Read a job's runs into ``buf``; return the buffer pages that could not be read
    (VM_IO/VM_PFNMAP mappings refuse; a process that died yields nothing)."""
    bad: set[int] = set()
    at = 0
    for vpn, k in job.runs:
        want = k * PAGE
        try:
            got = os.preadv(fd, [buf[at * PAGE:at * PAGE + want]], vpn * PAGE)
        except OSError:
            got = 0
        if got < want:
            # find the pages that fail, one by one
            for j in range(got // PAGE, k):
                try:
                    r = os.preadv(fd, [buf[(at + j) * PAGE:(at + j + 1) * PAGE]],
                                  (vpn + j) * PAGE)
                except OSError:
                    r = 0
                if r != PAGE:
                    bad.add(at + j)
        at += k
    return bad


class Arena:
    """Memory for --store-contents, mapped and populated before the processes are stopped.

    Every page read while stopped stays where it was read until the trace is written (copying
    pages out one by one cost 3 s per GiB, and fresh memory costs a page fault per page while
    the processes wait). Sized from the processes' resident pages; when it runs out, buffers
    are mapped as needed.
    """

    def __init__(self, nbytes: int) -> None:
        self.mv: memoryview | None = None
        self.used = 0
        if nbytes > 0:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            with contextlib.suppress(OSError, ValueError):
                self.mv = memoryview(mmap.mmap(-1, nbytes, flags=flags))

    def take(self, nbytes: int) -> memoryview:
        if self.mv is not None and self.used + nbytes <= len(self.mv):
            self.used += nbytes
            return self.mv[self.used - nbytes:self.used]
        return memoryview(mmap.mmap(-1, nbytes))

    @staticmethod
    def for_targets(targets: list[Target]) -> Arena:
        """An arena as large as the targets' resident memory (/proc/PID/statm), at most half
        of the memory available."""
        pages = 0
        for t in targets:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pages += int(procfs.read_text(f"/proc/{t.tgid}/statm").split()[1])
        with contextlib.suppress(OSError, ValueError):
            pages = min(pages, procfs.meminfo().get("MemAvailable", 0) * 1024 // PAGE // 2)
        return Arena(pages * PAGE)


def _read_job_own_buffer(fd: int, job: _Job, bufs: dict[int, memoryview], i: int,
                         arena: Arena) -> set[int]:
    """_read_job into a buffer of its own (for --store-contents), taken in the reader thread."""
    bufs[i] = arena.take(job.npages * PAGE)
    return _read_job(fd, job, bufs[i])


def _digests(buf: memoryview, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xxh3-128 of the pages at ``offs`` of ``buf`` as (lo, hi) uint64 arrays."""
    d = xxhash.xxh3_128_digest
    raw = b"".join([d(buf[o * PAGE:(o + 1) * PAGE]) for o in offs.tolist()])
    be = np.frombuffer(raw, dtype=">u8").reshape(len(offs), 2)  # canonical: hi, lo big-endian
    return be[:, 1].astype(np.uint64), be[:, 0].astype(np.uint64)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr when asked for and tqdm is installed. It refreshes at most twice a
    second: while processes are stopped, one of them may be what drains our terminal, and a
    terminal's buffer holds minutes of such output."""
    if not enabled or tqdm is None:
        return _NoBar()
    return tqdm(total=total, unit="page", unit_scale=True, desc="hashing (processes stopped)",
                file=sys.stderr, leave=False, mininterval=0.5)


_BUFFERS: list[memoryview] = []


class Hasher:
    """Reads pages through /proc/PID/mem and hashes them, the copy of the next batch (in a
    reader thread: the kernel copies without the GIL) overlapping the hashing of the last."""

    def __init__(self, store: bool, progress: bool, arena: Arena | None = None) -> None:
        self.store = store
        self.progress = progress
        self.arena = arena or Arena(0)
        # allocated (and touched) once, before anything is stopped
        while len(_BUFFERS) < 3:
            b = bytearray(JOB_PAGES * PAGE)
            b[::PAGE] = b"\1" * JOB_PAGES
            _BUFFERS.append(memoryview(b))
        self.bufs = _BUFFERS
        # with --store-contents each job reads into a buffer of its own, kept with the hashes
        # of its pages until the trace is written: sorting out distinct contents is work for
        # after the processes are resumed
        self.kept: list[tuple[memoryview, np.ndarray, np.ndarray, np.ndarray]] = []
        self.bytes_read = 0
        self.pages_hashed = 0
        self.seconds = 0.0

    def run(self, dumps: list[ProcDump], vpn: np.ndarray, proc: np.ndarray, need: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hash the ``need``ed pages among the present pages (vpn, proc) of ``dumps``, sorted by
        process and address. Returns (lo, hi, ok) for the needed pages in that order; ok is
        False for pages that could not be read."""
        t0 = time.perf_counter()
        n = int(np.count_nonzero(need))
        lo = np.zeros(n, dtype=np.uint64)
        hi = np.zeros(n, dtype=np.uint64)
        ok = np.ones(n, dtype=bool)
        jobs = _plan(vpn, proc, need)
        fds: dict[int, int] = {}

        def fd_of(p: int) -> int:
            if p not in fds:
                try:
                    fds[p] = os.open(f"{dumps[p].target.proc}/mem",
                                     os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    fds[p] = -1
            return fds[p]

        bar = _progress(n, self.progress)
        # The reader thread needs the GIL for a moment after each read; with the default 5 ms
        # switch interval it would wait for the hashing loop most of that time.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        try:
            bufs: dict[int, memoryview] | list[memoryview] = {} if self.store else \
                [self.bufs[i % 3] for i in range(len(jobs))]
            with ThreadPoolExecutor(1, thread_name_prefix="snapshot-reader") as pool:
                def submit(i: int) -> Future[set[int]] | None:
                    if i >= len(jobs):
                        return None
                    fd = fd_of(jobs[i].proc)
                    if fd < 0:  # the process is gone: every page fails
                        if isinstance(bufs, dict):
                            bufs[i] = memoryview(bytearray(jobs[i].npages * PAGE))
                        f: Future[set[int]] = Future()
                        f.set_result(set(range(jobs[i].npages)))
                        return f
                    if self.store:
                        return pool.submit(_read_job_own_buffer, fd, jobs[i], bufs, i,
                                           self.arena)
                    return pool.submit(_read_job, fd, jobs[i], bufs[i])

                ahead = [submit(0), submit(1)]
                for i, job in enumerate(jobs):
                    fut = ahead.pop(0)
                    assert fut is not None
                    bad = fut.result()
                    ahead.append(submit(i + 2))
                    buf = bufs[i] if self.store else self.bufs[i % 3]
                    offs = np.concatenate(job.offs)
                    slots = np.concatenate(job.slots)
                    jl, jh = _digests(buf, offs)
                    lo[slots], hi[slots] = jl, jh
                    if bad:
                        okj = np.array([o not in bad for o in offs.tolist()], dtype=bool)
                        ok[slots] = okj
                    if self.store and isinstance(bufs, dict):
                        good = (np.array([o not in bad for o in offs.tolist()], dtype=bool)
                                if bad else np.ones(len(offs), dtype=bool))
                        self.kept.append((bufs.pop(i), offs[good], jl[good], jh[good]))
                    self.bytes_read += job.npages * PAGE
                    bar.update(len(offs))
        finally:
            sys.setswitchinterval(interval)
            bar.close()
            for fd in fds.values():
                if fd >= 0:
                    os.close(fd)
        self.pages_hashed += int(ok.sum())
        self.seconds += time.perf_counter() - t0
        return lo, hi, ok

    def contents(self) -> dict[tuple[int, int], memoryview]:
        """Each distinct content read (with --store-contents) -> its page, in the buffer it
        was read into."""
        out: dict[tuple[int, int], memoryview] = {}
        for buf, offs, jl, jh in self.kept:
            keys = zip(jl.tolist(), jh.tolist(), strict=True)
            for o, key in zip(offs.tolist(), keys, strict=True):
                if key not in out:
                    out[key] = buf[o * PAGE:(o + 1) * PAGE]
        return out


# -- one snapshot --------------------------------------------------------------------------------
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


def _check_kpageflags() -> None:
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
    _check_kpageflags()
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


# -- writing -------------------------------------------------------------------------------------
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


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dump the memory of live processes (page contents, frames, page cache\n"
                    "membership) into a memory trace that trace-analyze reads.",
        epilog="Needs root (frame numbers, page flags, ptrace). Processes are stopped with\n"
               "ptrace while their memory is read, and always resumed: also on errors, Ctrl-C\n"
               "and if trace-snapshot is killed.\n\n"
               "example: trace-snapshot --name python3 -o py.mtr && trace-analyze py.mtr")
    sel = ap.add_argument_group("which processes (at least one; --name and --user combine)")
    sel.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                     help="this process (repeatable)")
    sel.add_argument("--name", metavar="REGEX", help="processes whose comm or command line "
                     "matches REGEX (re.search)")
    sel.add_argument("--user", metavar="USER", help="processes of this user (name or uid)")
    sel.add_argument("--all", action="store_true", dest="everything",
                     help="every process (not trace-snapshot and its ancestors)")
    ap.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write")
    ap.add_argument("--every", type=float, metavar="SECONDS",
                    help="take a snapshot every SECONDS (a series in one trace)")
    ap.add_argument("--count", type=int, metavar="K",
                    help="number of snapshots (default 1; with --every: until Ctrl-C)")
    ap.add_argument("--store-contents", action="store_true",
                    help="also store the bytes of every distinct page in the trace's content "
                         "store")
    ap.add_argument("--no-contents", action="store_true",
                    help="do not read page contents (frames and page cache only; the figures "
                         "then count every frame as a distinct content)")
    ap.add_argument("--no-stop", action="store_true",
                    help="do not stop the processes: a fuzzy snapshot of running processes")
    ap.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="skip a process whose threads do not all stop within this time "
                         "(default 10)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    ap.add_argument("--debug-hold", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap


class _Signals:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread; restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> _Signals:
        self.old = {}
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                self.old[s] = signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _header(a: argparse.Namespace, argv: list[str], ram_size: int) -> dict[str, Any]:
    return {
        "ram_size": ram_size,
        "source": "snapshot",
        "tracking": "proc",
        "clock_unit": "ns",
        "clock_hz": 1_000_000_000,
        "command": shlex.join([PROG, *argv]),
        "tool_versions": {"trace-snapshot": VERSION, "python": platform.python_version(),
                          "xxhash": xxhash.VERSION, "kernel": platform.release()},
        "snapshot": {"stop": "none" if a.no_stop else "ptrace",
                     "contents": not a.no_contents, "every": a.every, "count": a.count,
                     "host": platform.node()},
    }


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if not (a.pid or a.name is not None or a.user is not None or a.everything):
        raise SnapshotError("say which processes: --pid, --name, --user or --all")
    if a.count is not None and a.count < 1:
        raise SnapshotError("--count needs K >= 1")
    if a.every is not None and a.every <= 0:
        raise SnapshotError("--every needs a positive number of seconds")
    if a.no_contents and a.store_contents:
        raise SnapshotError("--store-contents and --no-contents exclude each other")
    count = a.count if a.count is not None else (None if a.every else 1)
    _check_kpageflags()
    progress = not a.quiet and sys.stderr.isatty()
    opts = Options(contents=not a.no_contents, store=a.store_contents, stop=not a.no_stop,
                   stop_timeout=a.stop_timeout, progress=progress, hold=a.debug_hold)
    t0 = time.monotonic_ns()
    w: TraceWriter | None = None
    taken = 0
    series = count != 1
    incomplete: str | None = None
    writing = False   # between a snapshot's STATE_BEGIN and STATE_END
    code = 0

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    def writer(first: Snapshot | None) -> TraceWriter:
        # the header's ram_size: 1 + the highest frame seen (FORMAT.md); a series cannot know
        # later frames when it writes the header, so it uses the end of physical memory
        top = first.max_frame() + 1 if first is not None else 0
        if series or top == 0:
            top = max(top, procfs.end_pfn())
        try:
            return TraceWriter(a.output, _header(a, argv, top * PAGE))
        except OSError as e:
            raise SnapshotError(f"cannot write {a.output}: {e.strerror}") from None

    with _Signals():
        try:
            k = 0
            next_t = time.monotonic()
            while count is None or k < count:
                targets = select(a.pid, a.name, a.user, a.everything, opts.stop,
                                 strict=k == 0, warn=warn)
                if k == 0 and not targets:
                    raise SnapshotError("no process matches the selection")
                if not targets and not (a.name or a.user or a.everything):
                    # only --pid: none of them can come back
                    if count is not None:
                        incomplete = f"every selected process exited after {taken} of " \
                                     f"{count} snapshots"
                        print(f"{PROG}: error: {incomplete} (the trace keeps them, marked "
                              "incomplete)", file=sys.stderr)
                        code = 1
                    break
                snap = take(targets, opts, t0) if targets else None
                if snap is None or not snap.dumps:
                    why = "; ".join(snap.notes) if snap is not None and snap.notes else \
                        "no selected process left"
                    if k == 0 or not series:
                        raise SnapshotError(f"no selected process could be read: {why}")
                    warn(f"snapshot {k}: {why}")
                    snap = None
                else:
                    for n in snap.notes:
                        warn(n)
                if w is None:
                    w = writer(snap)
                if snap is not None:
                    writing = True
                    c = write_snapshot(w, snap, k)
                    w.flush()
                    writing = False
                    taken += 1
                    if not a.quiet:
                        print(f"{PROG}: snapshot {k}: {c['snapshot.processes']} processes, "
                              f"{c['snapshot.present_pages']:,} present pages, "
                              f"{c['snapshot.frames']:,} frames, stopped "
                              f"{c['snapshot.stopped_ns'] / 1e6:,.0f} ms", file=sys.stderr)
                k += 1
                if count is not None and k >= count:
                    break
                next_t += a.every or 0
                while time.monotonic() < next_t:
                    if _LINGERING:
                        Stopper().release_lingering()
                    time.sleep(min(0.05, max(0.0, next_t - time.monotonic())))
        except Interrupted as e:
            code = 130
            if count is None and taken > 0 and not writing:
                code = 0  # an open-ended series ends with Ctrl-C; its snapshots are whole
            else:
                incomplete = (f"{e} after {taken} of {count} snapshots" if count
                              else f"{e} before the first snapshot")
                print(f"{PROG}: {e}; processes resumed", file=sys.stderr)
        except SnapshotError as e:
            if w is None:
                raise
            incomplete = str(e)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            code = 1
        except OSError as e:
            incomplete = f"{type(e).__name__}: {e}"
            print(f"{PROG}: error: {e}", file=sys.stderr)
            code = 1
        finally:
            try:
                if incomplete is not None:
                    if w is None:
                        w = writer(None)
                    w.abort(incomplete)
                elif w is not None:
                    w.close()
            except OSError as e:
                print(f"{PROG}: error: cannot finish {a.output}: {e.strerror}", file=sys.stderr)
                code = code or 1
    if code == 0 and not a.quiet:
        print(f"{PROG}: wrote {a.output} ({taken} snapshot{'s' if taken != 1 else ''})",
              file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SnapshotError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 1
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
