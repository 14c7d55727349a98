"""Checkpoints: the replay state written into the trace so that readers can seek by time.

A checkpoint (FORMAT.md, "Seeking") holds the complete state after one chunk. Any trace can get
them after recording; the writer side needs no state of its own.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from memtrace.analyses.engine import Replay
from memtrace.analyses.state import ReplayState
from memtrace.traces.format import (
    CHUNK_FLAG_CHECKPOINT,
    MAP_PRESENT,
    Kind,
    MarkOp,
    PageCacheOp,
    TaskOp,
    VmaOp,
)
from memtrace.traces.reader import TraceError, open_trace
from memtrace.traces.writer import BlockBuffer, append_chunks, records


def state_blocks(st: ReplayState) -> BlockBuffer:
    """The state as records: TIME, STATE_BEGIN(reset), counters, losses, tasks, VMAs, page cache,
    mappings, pages."""
    b = BlockBuffer()
    b.add(Kind.TIME, records(Kind.TIME, t=st.t))
    b.add(Kind.MARK, records(Kind.MARK, op=MarkOp.STATE_BEGIN, name=b.string(None), arg=1))
    for name, value in st.counters.items():  # each counter's latest value
        b.add(Kind.COUNTER, records(Kind.COUNTER, name=b.string(name), value=value))
    for source, count in st.lost.items():    # losses so far, by source
        b.add(Kind.LOST, records(Kind.LOST, source=source, count=count))
    for t in st.tasks.values():
        b.add(Kind.TASK, records(Kind.TASK, op=TaskOp.EXISTING, pid=t.pid, tgid=t.tgid,
                                 ppid=t.ppid, mm=t.mm, name=b.string(t.comm)))
        if t.exe:
            b.add(Kind.TASK, records(Kind.TASK, op=TaskOp.EXEC, pid=t.pid, tgid=t.tgid,
                                     ppid=t.ppid, mm=t.mm, name=b.string(t.exe)))
            b.add(Kind.TASK, records(Kind.TASK, op=TaskOp.COMM, pid=t.pid, tgid=t.tgid,
                                     ppid=t.ppid, mm=t.mm, name=b.string(t.comm)))
    for mm, sp in st.spaces.items():
        for v in sp.vmas.values():
            op = VmaOp.BRK if v.heap else VmaOp.EXISTING
            b.add(Kind.VMA, records(Kind.VMA, op=op, mm=mm, start=v.start, end=v.end,
                                    vm_flags=v.vm_flags, pgoff=v.pgoff, ino=v.ino, dev=v.dev,
                                    path=b.string(None if v.heap else v.path)))
    frames = np.flatnonzero(st.named)
    if len(frames):
        b.add(Kind.PAGECACHE, records(Kind.PAGECACHE, op=PageCacheOp.ADD, dev=st.file_dev[frames],
                                      ino=st.file_ino[frames], index=st.file_index[frames],
                                      frame=frames))
    for mm, (vpn, fr) in st.mappings().items():
        b.add(Kind.MAP, records(Kind.MAP, mm=mm, vpn=vpn, frame=fr, flags=MAP_PRESENT))
    known = np.flatnonzero(st.content >= 0)
    if len(known):
        cid = st.content[known]
        b.add(Kind.PAGE, records(Kind.PAGE, frame=known, hash_lo=st.contents.lo[cid],
                                 hash_hi=st.contents.hi[cid]))
    b.add(Kind.MARK, records(Kind.MARK, op=MarkOp.STATE_END, name=b.string(None)))
    return b


def add_checkpoints(path: str, every: int = 16, progress: bool = False) -> int:
    """Append a checkpoint after every ``every``-th chunk of a closed trace; returns how many."""
    tr = open_trace(path)
    if tr.truncated or not tr.complete_index:
        tr.close()
        raise TraceError(path, None, "trace is not cleanly closed (no index)",
                         "checkpoints can only be added to a complete trace")
    if tr.checkpoints:
        tr.close()
        raise TraceError(path, None, "trace already has checkpoints")
    rp = Replay(tr, progress=False)
    new: list[tuple[int, int, bytes]] = []
    for info in tqdm(tr.chunks, desc="checkpoints", disable=not progress, leave=False):
        rp.apply_chunk(tr.read_chunk(info))
        if info.seq % every == every - 1 and info is not tr.chunks[-1]:
            new.append((info.seq, rp.state.t, state_blocks(rp.state).encode()))
    tr.close()
    append_chunks(path, [(raw, t, t, seq, CHUNK_FLAG_CHECKPOINT) for seq, t, raw in new])
    return len(new)


__all__ = ["add_checkpoints", "state_blocks"]
