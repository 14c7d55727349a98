"""Checks of recorded traces against FORMAT.md, and the final-state replay used for fidelity.

Uses the project's reader (traces/reader.py, ``open_trace``) for everything; only the checks
themselves live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memtrace.traces.format import NO_STRING, ChunkType, Kind, MarkOp
from memtrace.traces.reader import Trace, open_trace

ADDR_MASK = np.uint64((1 << 56) - 1)


@dataclass
class Summary:
    """What a full pass over a trace found."""

    header: dict
    complete_index: bool
    truncated: bool
    counts: dict[str, int] = field(default_factory=dict)
    marks: list[tuple[int, int, str | None, int]] = field(default_factory=list)  # t, op, name, arg
    tasks: list[dict] = field(default_factory=list)
    vmas: list[dict] = field(default_factory=list)
    pagecache: list[dict] = field(default_factory=list)
    counters: list[tuple[str | None, int]] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)
    maps: list[tuple[int, int, int, int]] = field(default_factory=list)  # mm, vpn, frame, flags
    page_lo: np.ndarray | None = None   # final hash per frame
    page_hi: np.ndarray | None = None
    page_seen: np.ndarray | None = None
    pages_after_stop: int = 0
    t_first: int = 0
    t_last: int = 0
    layout: list[tuple[str, int | str | None]] = field(default_factory=list)  # run-length view
    errors: list[str] = field(default_factory=list)


def _rec_dict(arr_row, names, chunk, string_fields) -> dict:
    d = {}
    for n in names:
        v = int(arr_row[n])
        d[n] = chunk.string(v) if n in string_fields else v
    return d


def summarize(path: str, *, layout_limit: int = 200) -> Summary:
    """Read every chunk, check the invariants of FORMAT.md, replay PAGE records."""
    tr: Trace = open_trace(path)
    s = Summary(tr.header, tr.complete_index, tr.truncated)
    frames = tr.ram_size // tr.page_size
    s.page_lo = np.zeros(frames, np.uint64)
    s.page_hi = np.zeros(frames, np.uint64)
    s.page_seen = np.zeros(frames, bool)
    err = s.errors
    # chunk-level invariants
    seqs = [c.seq for c in tr.chunks]
    if seqs != list(range(len(seqs))):
        err.append(f"chunk seq numbers not 0,1,2,...: {seqs[:10]}")
    for c in tr.chunks_all:
        if c.type == ChunkType.RECORDS and c.t_first > c.t_last:
            err.append(f"chunk at {c.offset}: t_first {c.t_first} > t_last {c.t_last}")
    t = 0
    first_time = None
    bracket_open = False
    stopped = False
    for ch in tr.iter_chunks():
        if ch.info.t_first > t and first_time is not None:
            err.append(f"chunk {ch.info.seq}: t_first {ch.info.t_first} after time {t}")
        for kind, arr in ch.blocks:
            name = Kind(kind).name
            s.counts[name] = s.counts.get(name, 0) + len(arr)
            if s.layout and s.layout[-1][0] == name and kind != Kind.MARK:
                s.layout[-1] = (name, s.layout[-1][1] + len(arr))
            elif len(s.layout) < layout_limit:
                if kind == Kind.MARK:
                    for r in arr:
                        s.layout.append((f"MARK {MarkOp(int(r['op'])).name}",
                                         ch.string(int(r["name"]))))
                else:
                    s.layout.append((name, len(arr)))
            if kind == Kind.TIME:
                ts = arr["t"].astype(np.uint64)
                if len(ts) and (ts[0] < t or np.any(np.diff(ts.astype(np.int64)) < 0)):
                    err.append(f"chunk {ch.info.seq}: time decreases")
                if first_time is None and len(ts):
                    first_time = int(ts[0])
                t = int(ts[-1]) if len(ts) else t
            elif kind == Kind.PAGE:
                f = arr["frame"].astype(np.int64)
                if len(f) and (f.max() >= frames or f.min() < 0):
                    err.append(f"chunk {ch.info.seq}: PAGE frame outside RAM")
                    f = f[(f >= 0) & (f < frames)]
                    arr = arr[(arr["frame"] < frames)]
                s.page_lo[f] = arr["hash_lo"]
                s.page_hi[f] = arr["hash_hi"]
                s.page_seen[f] = True
                if stopped:
                    s.pages_after_stop += len(arr)
            elif kind in (Kind.WRITE, Kind.UNSEEN):
                name = Kind(kind).name
                size = (arr["addr"] >> np.uint64(56)).astype(np.int64)
                if len(size) and (size.min() < 1 or size.max() > 8):
                    err.append(f"chunk {ch.info.seq}: {name} size outside 1..8")
                pa = arr["addr"] & ADDR_MASK
                if len(pa) and int(pa.max()) >= tr.ram_size:
                    err.append(f"chunk {ch.info.seq}: {name} outside RAM")
                if kind == Kind.UNSEEN and len(arr) and ((size != 8).any() or (pa & 7).any()):
                    err.append(f"chunk {ch.info.seq}: UNSEEN not 8 aligned bytes")
            elif kind == Kind.MAP:
                if len(arr) and int(arr["flags"].max()) > 7:
                    err.append(f"chunk {ch.info.seq}: MAP flags beyond bits 0-2")
                s.maps += [tuple(int(x) for x in r) for r in arr.tolist()]
            elif kind == Kind.MARK:
                for r in arr:
                    op, nm, arg = int(r["op"]), int(r["name"]), int(r["arg"])
                    s.marks.append((t, op, ch.string(nm), arg))
                    if op == MarkOp.STATE_BEGIN:
                        if bracket_open:
                            err.append("nested STATE_BEGIN")
                        bracket_open = True
                    elif op == MarkOp.STATE_END:
                        if not bracket_open:
                            err.append("STATE_END without STATE_BEGIN")
                        bracket_open = False
                    elif op == MarkOp.STOP:
                        stopped = True
                    elif op == MarkOp.START:
                        stopped = False
            elif kind == Kind.TASK:
                s.tasks += [_rec_dict(r, arr.dtype.names, ch, ("name",)) for r in arr]
            elif kind == Kind.VMA:
                s.vmas += [_rec_dict(r, arr.dtype.names, ch, ("path",)) for r in arr]
            elif kind == Kind.PAGECACHE:
                s.pagecache += [_rec_dict(r, arr.dtype.names, ch, ()) for r in arr]
            elif kind == Kind.COUNTER:
                s.counters += [(ch.string(int(r["name"])), int(r["value"])) for r in arr]
            elif kind == Kind.LOST:
                s.lost += [(int(r["source"]), int(r["count"])) for r in arr]
            # every string reference must resolve
            for fld in {Kind.TASK: ("name",), Kind.VMA: ("path",), Kind.MARK: ("name",),
                        Kind.COUNTER: ("name",)}.get(Kind(kind), ()):
                ids = arr[fld]
                bad = (ids != NO_STRING) & (ids >= len(ch.strings))
                if np.any(bad):
                    err.append(f"chunk {ch.info.seq}: {name}.{fld} refers past the string table")
    if bracket_open:
        err.append("STATE_BEGIN without STATE_END at the end of the trace")
    s.t_first = first_time or 0
    s.t_last = t
    tr.close()
    return s


def fidelity(s: Summary, ram_hashes: np.ndarray, skip: tuple[int, int]) -> tuple[int, int, list]:
    """Compare the replayed final content hash of every frame with the real RAM.

    Returns (frames compared, mismatches, first mismatching frames); frames never covered by a
    PAGE record count as mismatches. skip = [first, end) frames (the mailbox)."""
    frames = len(ram_hashes)
    keep = np.ones(frames, bool)
    keep[skip[0]:skip[1]] = False
    ok = s.page_seen & (s.page_lo == ram_hashes[:, 0]) & (s.page_hi == ram_hashes[:, 1])
    bad = np.nonzero(keep & ~ok)[0]
    return int(keep.sum()), len(bad), bad[:20].tolist()
