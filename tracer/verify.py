"""Fidelity check: replay a trace to its final state and compare every frame with guest RAM.

The tracer's claim is that the trace holds every change to guest memory. After the run, the RAM
file QEMU used still holds the guest's final memory; any frame whose content differs from what the
replayed trace says was changed behind the tracer's back (device DMA, a missed store).

A writes-mode trace makes a second claim, byte by byte: its WRITE and UNSEEN records, applied in
order, leave every byte they touch as the guest left it (``verify_writes``).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from memtrace.analyses.engine import Replay
from memtrace.analyses.memimage import MemoryImage
from memtrace.traces.format import Kind
from memtrace.traces.reader import open_trace


@dataclass
class VerifyResult:
    frames: int = 0
    matched: int = 0
    unknown: int = 0
    mismatched: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched and self.unknown == 0

    def summary(self) -> str:
        s = (f"verify: {self.frames:,} frames compared with guest RAM: {self.matched:,} match, "
             f"{len(self.mismatched):,} differ, {self.unknown:,} never described by the trace")
        if self.mismatched:
            s += "; first differing frames: " + ", ".join(f"{f:#x}" for f in
                                                           self.mismatched[:10])
        return s


def data_ranges(path: str | Path, size: int) -> list[tuple[int, int]]:
    """The byte ranges of a (sparse) file that hold data, from SEEK_DATA/SEEK_HOLE; the rest
    reads as zeros. The whole file where the file system cannot tell."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                return [(0, size)]
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            out.append((data, hole))
            off = hole
    finally:
        os.close(fd)
    return out


def verify(trace_path: str | Path, ram_path: str | Path, exclude: tuple[int, int] | None = None,
           progress: bool = False) -> VerifyResult:
    """Compare the trace's final state with the RAM file; ``exclude`` = (phys, size) skipped.

    Frames in holes of the RAM file (never touched, or left out of a sparse stop image) are zero
    pages: they are checked against the zero page's hash all at once, and only the frames with
    data are read and hashed one by one (a large guest touches a small part of its RAM)."""
    tr = open_trace(trace_path)
    st = Replay(tr, progress=progress).run()
    ps = tr.page_size
    ram = np.memmap(ram_path, dtype=np.uint8, mode="r")
    nframes = len(ram) // ps
    check = np.ones(nframes, dtype=bool)
    if exclude:
        check[exclude[0] // ps:(exclude[0] + exclude[1]) // ps] = False
    content = np.full(nframes, -1, dtype=np.int64)
    n = min(nframes, len(st.content))
    content[:n] = st.content[:n]
    lo_of, hi_of = np.asarray(st.contents.lo), np.asarray(st.contents.hi)
    has_data = np.zeros(nframes, dtype=bool)
    for a, b in data_ranges(ram_path, len(ram)):
        has_data[a // ps:(b + ps - 1) // ps] = True
    res = VerifyResult()
    res.frames = int(check.sum())
    res.unknown = int((check & (content < 0)).sum())
    known = check & (content >= 0)
    zero = xxhash.xxh3_128_intdigest(bytes(ps))
    holes = np.flatnonzero(known & ~has_data)
    cids = content[holes]
    is_zero = ((lo_of[cids] == np.uint64(zero & 0xFFFFFFFFFFFFFFFF))
               & (hi_of[cids] == np.uint64(zero >> 64)))
    res.matched = int(is_zero.sum())
    bad = [int(f) for f in holes[~is_zero]]
    mv = memoryview(ram)
    digest = xxhash.xxh3_128_intdigest
    for f in np.flatnonzero(known & has_data).tolist():
        cid = int(content[f])
        v = digest(mv[f * ps:(f + 1) * ps])
        if (v & 0xFFFFFFFFFFFFFFFF) == int(lo_of[cid]) and (v >> 64) == int(hi_of[cid]):
            res.matched += 1
        else:
            bad.append(f)
    res.mismatched = sorted(bad)
    tr.close()
    return res


@dataclass
class WriteCheck:
    records: dict[str, int] = field(default_factory=dict)  # kind name -> records applied
    touched: int = 0  # bytes some record wrote
    differing: int = 0  # of those, bytes whose last value is not the byte in RAM
    first: list[int] = field(default_factory=list)  # physical addresses of the first of them

    @property
    def ok(self) -> bool:
        return self.differing == 0

    def summary(self) -> str:
        n = ", ".join(f"{v:,} {k}" for k, v in self.records.items())
        s = (f"verify: {n} records touched {self.touched:,} bytes; {self.differing:,} of them "
             "differ from guest RAM")
        if self.first:
            s += "; first: " + ", ".join(f"{a:#x}" for a in self.first)
        return s


def verify_writes(trace_path: str | Path, ram_path: str | Path,
                  exclude: tuple[int, int] | None = None) -> WriteCheck:
    """Apply the WRITE and UNSEEN records in trace order and compare each byte they touched with
    the RAM file; ``exclude`` = (phys, size) skipped.

    The records go to two images, one starting as zeros and one as 0xff bytes: a byte was
    touched where the two agree afterwards. That takes twice the guest's RAM in memory."""
    tr = open_trace(trace_path)
    ram = np.memmap(ram_path, dtype=np.uint8, mode="r")
    nframes = len(ram) // tr.page_size
    zeros, ones = MemoryImage(nframes, tr.page_size), MemoryImage(nframes, tr.page_size)
    ones.mem[:] = 0xFF
    res = WriteCheck(records={Kind.WRITE.name: 0, Kind.UNSEEN.name: 0})
    try:
        for ch in tr.iter_chunks():
            for kind, rec in ch.blocks:
                if kind in (Kind.WRITE, Kind.UNSEEN):
                    res.records[Kind(kind).name] += len(rec)
                    zeros.apply_writes(rec)
                    ones.apply_writes(rec)
    finally:
        tr.close()
    touched = zeros.mem == ones.mem
    del ones
    if exclude:
        touched[exclude[0]:exclude[0] + exclude[1]] = False
    bad = np.flatnonzero(touched & (zeros.mem != ram[:len(zeros.mem)]))
    res.touched, res.differing, res.first = int(touched.sum()), len(bad), bad[:10].tolist()
    return res
