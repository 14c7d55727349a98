"""What one process maps: its VMAs from /proc/PID/maps and its present pages from /proc/PID/pagemap
(PAGEMAP_SCAN finds the present ranges first on Linux 6.7+)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memtrace.snapshot import procfs
from memtrace.snapshot.errors import TargetGone, TargetSkipped
from memtrace.snapshot.frames import FrameTable
from memtrace.snapshot.procfs import PM_PFN_MASK, Mapping
from memtrace.snapshot.stop import Target

# PAGEMAP_SCAN (Linux 6.7): the present ranges of an address space in one ioctl
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), sizeof = 96
PAGE_IS_PRESENT = 1 << 3


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


def split_at_vmas(ranges: list[tuple[int, int]], vmas: list[Any]
                  ) -> list[tuple[int, int, int]]:
    """(VMA index, start, end) of each part of the present ranges ``[a, b)`` that lies in a
    VMA of ``vmas`` (sorted by address). A range can span adjacent VMAs; it can also lie in a
    gap of the maps read before it (a process that runs, --no-stop, mapped something since):
    such parts are left out, as the maps do not know them. Reading from the gap's start to the
    next VMA's end instead once asked for an 82 GiB pagemap read (a range in a 41 TiB gap)."""
    starts = np.array([m.start for m in vmas], dtype=np.uint64)
    out = []
    for a, b in ranges:
        i = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
        while a < b and i < len(vmas) and vmas[i].start < b:
            lo, hi = max(a, vmas[i].start), min(b, vmas[i].end)
            if hi > lo:
                out.append((i, lo, hi))
                a = hi
            i += 1
    return out


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
        if ranges is not None:
            for i, a, hi in split_at_vmas(ranges, vmas):
                e = procfs.read_pagemap(fd, a >> 12, (hi - a) >> 12)
                keep = np.flatnonzero(e & np.uint64(procfs.PM_PRESENT))
                vpns.append(np.uint64(a >> 12) + keep.astype(np.uint64))
                ents.append(e[keep])
                idx.append(np.full(len(keep), i, dtype=np.int32))
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
