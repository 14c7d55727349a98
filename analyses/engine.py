"""The replay engine: one pass over a trace, the state at each instant, any number of analyses."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from memtrace.analyses.base import Analysis, Context, Interval
from memtrace.analyses.state import BadRecord, ReplayState
from memtrace.traces.format import Kind, MarkOp
from memtrace.traces.reader import Chunk, ChunkInfo, Trace, TraceError


class Replay:
    """Replays ``trace`` into a ``ReplayState`` and drives ``analyses`` over it."""

    def __init__(self, trace: Trace, analyses: Sequence[Analysis] = (), salvage: bool = False,
                 progress: bool | None = None, interval: Interval | None = None) -> None:
        self.trace = trace
        self.analyses = list(analyses)
        self.salvage = salvage
        self.progress = sys.stderr.isatty() if progress is None else progress
        nframes = trace.ram_size // trace.page_size if trace.ram_size else 0
        self.state = ReplayState(nframes, trace.page_size)
        self.t_start: int | None = None
        self.interrupted = False
        self.context = Context(trace, self.state, interval)
        for a in self.analyses:
            if a.wants_content_deltas:
                self.state.listeners.append(a.on_content)
            if a.holds_content_ids:
                self.state.recycle = False
            self.state.forget_listeners.append(a.on_content_forgotten)
            a.begin(self.context)

    # -- time -----------------------------------------------------------------------------------
    def _advance(self, t: int) -> None:
        """Time moves to ``t``: the instant before it is complete (its net content changes go
        to the listeners), and the state it left held on [old t, t)."""
        st = self.state
        if self.t_start is None:
            self.t_start = t
            st.t = t
            return
        if t > st.t:
            st.end_instant()
            for a in self.analyses:
                a.on_interval(st, st.t, t)
            st.t = t

    # -- records --------------------------------------------------------------------------------
    def apply_chunk(self, chunk: Chunk, until: int | None = None) -> bool:
        """Apply one chunk's records; stop before the first TIME record later than ``until``.

        Returns False if it stopped early.
        """
        try:
            return self._apply_blocks(chunk, until)
        except BadRecord as e:
            raise TraceError(self.trace.path, chunk.info.offset, str(e), e.hint) from None

    def _apply_blocks(self, chunk: Chunk, until: int | None) -> bool:
        st = self.state
        for kind, rec in chunk.blocks:
            if kind == Kind.TIME:
                for t in rec["t"].tolist():
                    if until is not None and t > until:
                        return False
                    self._advance(t)
                continue
            if self.t_start is None:
                self.t_start = st.t
            if kind == Kind.PAGE:
                st.apply_pages(rec["frame"], rec["hash_lo"], rec["hash_hi"])
            elif kind == Kind.MAP:
                st.apply_maps(rec)
            elif kind == Kind.PAGECACHE:
                st.apply_pagecache(rec)
            elif kind == Kind.TASK:
                for r in rec.tolist():
                    op, pid, tgid, ppid, mm, _pgd, name, flags = r
                    st.apply_task(op, pid, tgid, ppid, mm, chunk.string(name), flags)
            elif kind == Kind.VMA:
                for r in rec.tolist():
                    op, _pid, mm, start, end, vm_flags, pgoff, ino, dev, path = r
                    st.apply_vma(op, mm, start, end, vm_flags, pgoff, ino, dev, chunk.string(path))
            elif kind == Kind.MARK:
                for op, name, arg in rec.tolist():
                    if op == MarkOp.STATE_BEGIN and arg & 1:
                        st.reset()
                    elif op == MarkOp.INCOMPLETE:
                        st.incomplete = chunk.string(name) or "unknown reason"
                    st.marks.append((st.t, op, chunk.string(name)))
            elif kind == Kind.LOST:
                for source, _pad, count in rec.tolist():
                    st.lost[source] = st.lost.get(source, 0) + count
            elif kind == Kind.COUNTER:
                for name, _pad, value in rec.tolist():
                    st.counters[chunk.string(name) or "?"] = value
            else:
                continue  # WRITE and unknown kinds: contents come from PAGE records
            for a in self.analyses:
                a.on_records(st, kind, rec, chunk)
        return True

    def _chunks(self, infos: Iterable[ChunkInfo]) -> Iterable[Chunk]:
        for info in infos:
            try:
                yield self.trace.read_chunk(info)
            except TraceError as e:
                if not self.salvage:
                    raise
                self.trace.warnings.append(f"{e}; analysis stops before it")
                return

    def run(self, until: int | None = None) -> ReplayState:
        """Replay from the start (to time ``until`` if given) and finish the analyses."""
        self._replay(self.trace.chunks, until)
        return self.finish()

    def _replay(self, infos: Sequence[ChunkInfo], until: int | None) -> None:
        total = sum(c.payload_len for c in infos)
        bar = None
        try:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="replay",
                       disable=not self.progress, file=sys.stderr, leave=False)
            for chunk in self._chunks(infos):
                going = self.apply_chunk(chunk, until)
                bar.update(chunk.info.payload_len)
                bar.set_postfix_str(f"t={self.state.t:,}", refresh=False)
                if not going:
                    break
        except KeyboardInterrupt:
            self.interrupted = True
            self.trace.warnings.append(
                f"{self.trace.path}: interrupted at time {self.state.t}; results cover the trace "
                "up to there")
        finally:
            if bar is not None:
                bar.close()

    def finish(self) -> ReplayState:
        self.state.end_instant()
        for a in self.analyses:
            a.end(self.state)
        return self.state

    def seek(self, t: int) -> ReplayState:
        """The state at time ``t``, starting from the last checkpoint at or before ``t``.

        Chunks before the checkpoint are not decoded. Analyses are not finished.
        """
        cps = [c for c in self.trace.checkpoints if c.t_last <= t]
        start_seq = 0
        if cps:
            cp = max(cps, key=lambda c: (c.seq, c.offset))
            self.apply_chunk(self.trace.read_chunk(cp))
            start_seq = cp.seq + 1
        self._replay([c for c in self.trace.chunks if c.seq >= start_seq], t)
        self.state.end_instant()
        return self.state


def state_digest(st: ReplayState) -> dict[str, object]:
    """A comparable summary of a state: contents by hash, mappings, page cache, tasks."""
    known = np.flatnonzero(st.content >= 0)
    return {
        "t": st.t,
        "contents": dict(zip(known.tolist(), st.contents.lo[st.content[known]].tolist(),
                             strict=True)),
        "named": dict(sorted(st.file_of.items())),
        "spaces": {mm: sp.pages for mm, sp in st.spaces.items() if sp.npages},
        "vmas": {mm: sorted((v.start, v.end, v.vm_flags, v.pgoff, v.ino, v.dev, v.path)
                            for v in sp.vmas.values())
                 for mm, sp in st.spaces.items() if sp.vmas},
        "tasks": {pid: (t.tgid, t.comm, t.mm) for pid, t in st.tasks.items()},
        "counters": dict(sorted(st.counters.items())),
        "figures": st.figures(),
    }
