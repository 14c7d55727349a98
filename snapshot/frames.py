"""What is known about the frames seen so far (kpageflags, kpagecount, content hash), and the
sort-based array helpers the snapshot uses on frame numbers."""

from __future__ import annotations

import numpy as np

from memtrace.snapshot.procfs import KPF, kpf
from memtrace.traces.pagehash import ZERO_HASH


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
