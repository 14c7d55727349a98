"""The kernel's /proc formats, in one place: maps, pagemap, kpageflags, kpagecount, stat, status,
smaps_rollup, zoneinfo (Documentation/admin-guide/mm/pagemap.rst, proc(5)).

Everything here reads; nothing stops or changes a process. The per-page files are read in batches
with ``os.pread`` into numpy arrays, like ``tools/mm/page-types.c`` does (64 Ki entries at a time):
one system call per batch, never one per page, because a snapshot reads hundreds of thousands of
entries while the processes it looks at are stopped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from memtrace.traces.format import VM_EXEC, VM_READ, VM_SHARED, VM_WRITE

PAGE_SIZE = 4096
PAGE_SHIFT = 12
#: entries per pread of pagemap/kpageflags/kpagecount (512 KiB), as tools/mm/page-types.c
BATCH = 64 * 1024
#: two frames closer than this are read with one pread of kpageflags (the entries between are
#: cheap; a system call is not)
GAP_MERGE = 128

# -- /proc/PID/pagemap: one u64 per virtual page ------------------------------------------------
PM_PFN_MASK = (1 << 55) - 1   # bits 0-54: frame number if present (0 without CAP_SYS_ADMIN)
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56   # the page is mapped exactly once
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61             # file page or shared anonymous (shmem)
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


class KPF(IntEnum):
    """Bits of /proc/kpageflags (include/uapi/linux/kernel-page-flags.h; 32 and up are the
    kernel-internal ones of include/linux/kernel-page-flags.h, shown to root as well)."""

    LOCKED = 0
    ERROR = 1
    REFERENCED = 2
    UPTODATE = 3
    DIRTY = 4
    LRU = 5
    ACTIVE = 6
    SLAB = 7
    WRITEBACK = 8
    RECLAIM = 9
    BUDDY = 10
    MMAP = 11
    ANON = 12
    SWAPCACHE = 13
    SWAPBACKED = 14
    COMPOUND_HEAD = 15
    COMPOUND_TAIL = 16
    HUGE = 17
    UNEVICTABLE = 18
    HWPOISON = 19
    NOPAGE = 20
    KSM = 21
    THP = 22
    OFFLINE = 23
    ZERO_PAGE = 24
    IDLE = 25
    PGTABLE = 26
    RESERVED = 32
    MLOCKED = 33
    MAPPEDTODISK = 34
    PRIVATE = 35
    PRIVATE_2 = 36
    OWNER_PRIVATE = 37
    ARCH = 38
    UNCACHED = 39
    SOFTDIRTY = 40
    ARCH_2 = 41
    ARCH_3 = 42


def kpf(*bits: KPF) -> np.uint64:
    """A mask of kpageflags bits, for numpy tests like ``flags & kpf(KPF.ANON)``."""
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return np.uint64(m)


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in one kpageflags value (for messages and tests)."""
    return [k.name for k in KPF if flags >> int(k) & 1]




def new_encode_dev(major: int, minor: int) -> int:
    """The kernel's dev_t encoding (include/linux/kdev_t.h), what stat() returns as st_dev."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps: a VMA."""

    start: int
    end: int
    perms: str          # e.g. "r-xp"
    offset: int         # bytes into the file (for anonymous VMAs: start, as the kernel sets it)
    major: int
    minor: int
    ino: int
    path: str           # "" for anonymous, "[heap]", "[stack]", "/usr/lib/...", "... (deleted)"

    @property
    def vm_flags(self) -> int:
        p = self.perms
        return ((VM_READ if p[0] == "r" else 0) | (VM_WRITE if p[1] == "w" else 0)
                | (VM_EXEC if p[2] == "x" else 0) | (VM_SHARED if p[3] == "s" else 0))

    @property
    def pgoff(self) -> int:
        return self.offset >> PAGE_SHIFT

    @property
    def dev(self) -> int:
        return new_encode_dev(self.major, self.minor)

    @property
    def file_backed(self) -> bool:
        """Backed by an inode: a regular file, a deleted one, shmem (``/dev/zero (deleted)``,
        ``/SYSV...``, ``/memfd:...``) or a device. Pseudo-paths like ``[heap]`` have no inode."""
        return self.ino != 0

    @property
    def vpn_start(self) -> int:
        return self.start >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def user(self) -> bool:
        """In the user half of the address space. ``[vsyscall]`` (0xffffffffff600000) is not:
        pagemap does not cover it and /proc/PID/mem offsets beyond 2^63 do not fit an off_t."""
        return self.end <= 1 << 63


_MAPS_LINE = re.compile(
    r"([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][-sp]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) *(.*)")


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/PID/maps (``start-end perms offset major:minor inode [path]``).

    The path is everything after the inode's padding, so paths with spaces and the
    `` (deleted)`` suffix survive; the kernel escapes newlines in paths as ``\\012``.
    """
    out = []
    for line in text.splitlines():
        m = _MAPS_LINE.fullmatch(line)
        if m is None:
            if line.strip():
                raise ValueError(f"unexpected line in maps: {line!r}")
            continue
        s, e, perms, off, ma, mi, ino, path = m.groups()
        out.append(Mapping(int(s, 16), int(e, 16), perms, int(off, 16), int(ma, 16),
                           int(mi, 16), int(ino), path))
    return out


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def read_maps(pid: int) -> list[Mapping]:
    return parse_maps(read_text(f"/proc/{pid}/maps"))


# -- per-page files ------------------------------------------------------------------------------
def pread_u64(fd: int, first: int, count: int) -> np.ndarray:
    """``count`` u64 entries from entry ``first`` of a per-page /proc file, in batches.

    Stops early (a shorter array) where the file ends, as kpageflags does past the last frame.
    """
    out = np.empty(count, dtype=np.uint64)
    got = 0
    while got < count:
        n = min(BATCH, count - got)
        view = memoryview(out[got:got + n]).cast("B")
        r = os.preadv(fd, [view], (first + got) * 8)
        if r <= 0:
            break
        got += r // 8
        if r < n * 8:
            break
    return out[:got]


def read_pagemap(fd: int, vpn: int, npages: int) -> np.ndarray:
    """The pagemap entries of ``npages`` virtual pages from page number ``vpn``."""
    return pread_u64(fd, vpn, npages)


def present_pages(fd: int, mapping: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(vpn, entry) of the pages of one VMA that are present in RAM (swapped pages are not)."""
    ent = read_pagemap(fd, mapping.vpn_start, mapping.npages)
    idx = np.flatnonzero(ent & np.uint64(PM_PRESENT))
    return idx.astype(np.uint64) + np.uint64(mapping.vpn_start), ent[idx]


def spans(frames: np.ndarray, gap: int | None = None, limit: int = BATCH
          ) -> Iterator[tuple[int, int, int, int]]:
    """Group sorted unique frame numbers into read windows.

    Yields ``(lo, hi, i, j)``: read entries ``lo..hi-1`` to cover ``frames[i:j]``. Frames closer
    than ``gap`` share a window; a window never exceeds ``limit`` entries.
    """
    n = len(frames)
    if n == 0:
        return
    gap = GAP_MERGE if gap is None else gap
    f = frames.astype(np.int64)
    breaks = np.flatnonzero(np.diff(f) > gap) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [n]])
    for i, j in zip(starts.tolist(), ends.tolist(), strict=True):
        while i < j:
            lo = int(f[i])
            # frames of this group that fit into one window of `limit` entries
            k = i + int(np.searchsorted(f[i:j], lo + limit, side="left"))
            yield lo, int(f[k - 1]) + 1, i, k
            i = k


def read_per_frame(fd: int, frames: np.ndarray) -> np.ndarray:
    """One u64 per frame (sorted unique) from /proc/kpageflags or /proc/kpagecount."""
    out = np.zeros(len(frames), dtype=np.uint64)
    for lo, hi, i, j in spans(frames):
        chunk = pread_u64(fd, lo, hi - lo)
        rel = frames[i:j].astype(np.int64) - lo
        ok = rel < len(chunk)
        out[i:j][ok] = chunk[rel[ok]]
    return out


KPAGEFLAGS = "/proc/kpageflags"
KPAGECOUNT = "/proc/kpagecount"


class KPageFiles:
    """/proc/kpageflags and /proc/kpagecount, open for batched reads by frame number."""

    def __init__(self) -> None:
        self.flags_fd = os.open(KPAGEFLAGS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.count_fd = os.open(KPAGECOUNT, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.flags_fd)
            raise

    def flags(self, frames: np.ndarray) -> np.ndarray:
        return read_per_frame(self.flags_fd, frames)

    def counts(self, frames: np.ndarray) -> np.ndarray:
        return read_per_frame(self.count_fd, frames)

    def close(self) -> None:
        os.close(self.flags_fd)
        os.close(self.count_fd)


# -- processes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) that a snapshot needs."""

    pid: int
    comm: str
    state: str   # R S D T t Z X I ...
    ppid: int
    flags: int   # PF_* (PF_KTHREAD = 0x00200000)


PF_KTHREAD = 0x00200000


def parse_stat(text: str) -> Stat:
    """Parse a stat line. The comm is in parentheses and may itself contain ``)`` and spaces,
    so the fields after it are found from the last ``)``."""
    open_, close = text.index("("), text.rindex(")")
    rest = text[close + 2:].split()
    return Stat(int(text[:open_]), text[open_ + 1:close], rest[0], int(rest[1]), int(rest[6]))


def read_stat(pid: int, tid: int | None = None) -> Stat:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return parse_stat(read_text(path))


def thread_ids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())


def all_pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def read_cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def read_status(pid: int) -> dict[str, str]:
    out = {}
    for line in read_text(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def effective_uid(pid: int) -> int:
    """The effective uid (second field of ``Uid:``), what ``ps -u`` selects on."""
    return int(read_status(pid)["Uid"].split()[1])


def read_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as name -> kB (Rss, Pss, Anonymous, ...); {} for kernel threads."""
    out = {}
    for line in read_text(f"/proc/{pid}/smaps_rollup").splitlines()[1:]:
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k] = int(parts[0])
    return out


def pfnmap_starts(proc: str) -> set[int]:
    """Start addresses of the VMAs whose smaps VmFlags say ``pf`` (VM_PFNMAP) or ``io``
    (VM_IO): memory that is not the process's RAM ([vvar], device memory). ``proc`` is
    /proc/PID or /proc/PID/task/TID."""
    out = set()
    start = 0
    for line in read_text(f"{proc}/smaps").splitlines():
        if _MAPS_LINE.fullmatch(line):
            start = int(line[:line.index("-")], 16)
        elif line.startswith("VmFlags:"):
            flags = line.split()[1:]
            if "pf" in flags or "io" in flags:
                out.add(start)
    return out


def ancestors(pid: int) -> list[int]:
    """``pid`` and its ancestors up to the root of the pid namespace."""
    out = []
    while pid > 0 and pid not in out:
        out.append(pid)
        try:
            pid = read_stat(pid).ppid
        except (OSError, ValueError):
            break
    return out


# -- the machine ---------------------------------------------------------------------------------
def end_pfn() -> int:
    """One past the highest frame number of any memory zone (/proc/zoneinfo ``start_pfn`` +
    ``spanned``): no present page can have a larger frame number. 0 if unknown."""
    try:
        text = read_text("/proc/zoneinfo")
    except OSError:
        return 0
    best = 0
    spanned = None
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["spanned"]:
            spanned = int(parts[1])
        elif parts[:1] == ["start_pfn:"] and spanned is not None:
            best = max(best, int(parts[1]) + spanned)
            spanned = None
    return best


def meminfo() -> dict[str, int]:
    out = {}
    for line in read_text("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0])
    return out


KSM_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "general_profit", "ksm_zero_pages")


def ksm_counters() -> dict[str, int]:
    """The KSM sysfs counters that exist on this kernel (empty without CONFIG_KSM)."""
    out = {}
    for name in KSM_COUNTERS:
        try:
            out[name] = int(read_text(f"/sys/kernel/mm/ksm/{name}").split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out
