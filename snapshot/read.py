"""Reading pages through /proc/PID/mem and hashing them: the reads planned in runs, a reader
thread copying the next batch while the main thread hashes the last."""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from memtrace.snapshot import procfs
from memtrace.snapshot.layout import ProcDump
from memtrace.snapshot.procfs import PAGE_SIZE as PAGE
from memtrace.snapshot.stop import Target

try:
    from tqdm import tqdm
except ImportError:  # a minimal guest has numpy, zstandard and xxhash only: no progress bar
    tqdm = None

#: pages per read job: the reader thread fills one 8 MiB buffer while the main thread hashes
#: the previous one
JOB_PAGES = 2048
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
