"""The replayed state of the guest at one instant, updated change by change.

Page frames, their contents (as dense content ids), which frames are named (in the page cache),
which address spaces map which frames, the live tasks and their VMAs. Alongside it the incremental
counters behind the thesis's figures (eq. 4.6-4.9), kept exact after every change so that the oracle
can be read at every content change without recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from analyses.content import ZERO_HASH, ContentTable, one_of_each
from traces.format import MAP_PRESENT, PageCacheOp, TaskOp, VmaOp

CLONE_VM = 0x100  # clone flag: the child shares the parent's address space (a thread)


@dataclass
class Task:
    pid: int
    tgid: int
    ppid: int
    comm: str
    mm: int
    exe: str | None = None
    born: int = 0
    died: int | None = None


@dataclass
class Vma:
    start: int
    end: int
    vm_flags: int
    pgoff: int
    ino: int
    dev: int
    path: str | None
    heap: bool = False

    @property
    def anonymous(self) -> bool:
        """Not backed by a file (its path may still be a kernel name such as [heap])."""
        return self.ino == 0


@dataclass
class AddressSpace:
    """One mm: virtual page -> frame, and how many virtual pages map each frame."""

    mm: int
    pages: dict[int, int] = field(default_factory=dict)
    frame_refs: dict[int, int] = field(default_factory=dict)
    vmas: dict[int, Vma] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    had_tasks: bool = False

    def vma_at(self, addr: int) -> Vma | None:
        for v in self.vmas.values():
            if v.start <= addr < v.end:
                return v
        return None


class ContentListener(Protocol):
    def __call__(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None: ...


class ReplayState:
    """State of the traced guest after the records applied so far."""

    def __init__(self, nframes: int = 0, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.t = 0
        # room for about one content per frame before the table has to grow
        self.contents = ContentTable(max(12, (4 * max(nframes, 1)).bit_length()))
        self.zero_cid = self.contents.id_of(*ZERO_HASH)
        self.listeners: list[ContentListener] = []
        self._alloc(max(nframes, 1))
        self._init_state()

    def _alloc(self, nframes: int) -> None:
        self.nframes = nframes
        self.content = np.full(nframes, -1, dtype=np.int64)
        self.proc_count = np.zeros(nframes, dtype=np.int32)
        self.named = np.zeros(nframes, dtype=bool)
        self.ref_all = np.zeros(1024, dtype=np.int64)
        self.ref_mapped = np.zeros(1024, dtype=np.int64)
        self.ref_anon = np.zeros(1024, dtype=np.int64)
        self._scratch = np.zeros(1024, dtype=np.int64)  # per content id, for one_of_each
        self._frame_scratch = np.zeros(nframes, dtype=np.int64)

    def _init_state(self) -> None:
        self.file_of: dict[int, tuple[int, int, int]] = {}
        self.spaces: dict[int, AddressSpace] = {}
        self.tasks: dict[int, Task] = {}
        self.exited: list[Task] = []
        self.lost: dict[int, int] = {}
        self.counters: dict[str, int] = {}
        self.marks: list[tuple[int, int, str | None]] = []
        self.incomplete: str | None = None
        # incremental counters (see figures())
        self.vpages = 0            # present virtual pages over all address spaces
        self.pairs = 0             # (address space, frame) pairs: the "no sharing" figure
        self.mapped_frames = 0     # frames mapped by at least one address space: "mmap/fork"
        self.named_mapped = 0      # mapped frames that are named
        self.unknown_mapped = 0    # mapped frames whose content is not known
        self.unknown_anon = 0      # ... of which anonymous
        self.known_frames = 0      # frames whose content is known (whole-guest view)
        self.distinct_all = 0      # distinct contents over all known frames
        self.distinct_mapped = 0   # distinct contents over mapped frames
        self.distinct_anon = 0     # distinct contents over mapped anonymous frames
        self.zero_mapped = 0       # mapped frames holding the zero page content
        self.version = 0           # bumped by every change

    # -- figures --------------------------------------------------------------------------------
    def figures(self) -> dict[str, int]:
        """The thesis's four figures (eq. 4.6-4.9) and companions, in pages, at this instant.

        Frames whose content is unknown count as distinct contents of their own.
        """
        return {
            "no_sharing": self.pairs,
            "mmap_fork": self.mapped_frames,
            "ksm_hint_all": self.named_mapped + self.distinct_anon + self.unknown_anon,
            "full_cbps": self.distinct_mapped + self.unknown_mapped,
            "zero_pages": self.zero_mapped,
            "guest_frames": self.known_frames,
            "guest_distinct": self.distinct_all,
        }

    # -- frame changes --------------------------------------------------------------------------
    def ensure_frames(self, max_frame: int) -> None:
        if max_frame < self.nframes:
            return
        n = max(max_frame + 1, 2 * self.nframes)
        for name, fill in (("content", -1), ("proc_count", 0), ("named", False),
                           ("_frame_scratch", 0)):
            old = getattr(self, name)
            new = np.full(n, fill, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        self.nframes = n

    def _ensure_contents(self) -> None:
        n = len(self.contents)
        if n > len(self.ref_all):
            size = max(n, 2 * len(self.ref_all))
            for name in ("ref_all", "ref_mapped", "ref_anon", "_scratch"):
                old = getattr(self, name)
                new = np.zeros(size, dtype=np.int64)
                new[:len(old)] = old
                setattr(self, name, new)

    def change_frames(self, frames: np.ndarray, apply: Callable[[], None]) -> None:
        """Apply ``apply`` (which mutates content/proc_count/named of ``frames`` only) and update
        every counter by taking the frames' old contribution out and their new one in.

        ``frames`` must be unique.
        """
        if len(frames) == 0:
            return
        old_c = self.content[frames]
        old_m = self.proc_count[frames] > 0
        old_n = self.named[frames]
        apply()
        self._ensure_contents()
        new_c = self.content[frames]
        new_m = self.proc_count[frames] > 0
        new_n = self.named[frames]
        self.version += 1

        def d(new: np.ndarray, old: np.ndarray) -> int:
            return int(np.count_nonzero(new)) - int(np.count_nonzero(old))

        self.mapped_frames += d(new_m, old_m)
        self.named_mapped += d(new_m & new_n, old_m & old_n)
        self.unknown_mapped += d(new_m & (new_c < 0), old_m & (old_c < 0))
        self.unknown_anon += d(new_m & ~new_n & (new_c < 0), old_m & ~old_n & (old_c < 0))
        self.known_frames += d(new_c >= 0, old_c >= 0)
        self.zero_mapped += d(new_m & (new_c == self.zero_cid), old_m & (old_c == self.zero_cid))

        # Each frame takes its old content's reference out and puts its new one in, for three
        # reference counts (all frames, mapped frames, mapped anonymous frames). The number of
        # distinct contents changes by the contents whose count crossed zero.
        unchanged = (old_c == new_c) & (old_m == new_m) & (old_n == new_n)
        if unchanged.all():
            return
        if unchanged.any():
            keep = ~unchanged
            old_c, new_c, old_m, new_m = old_c[keep], new_c[keep], old_m[keep], new_m[keep]
            old_n, new_n = old_n[keep], new_n[keep]
        c = np.concatenate([old_c, new_c])
        k = len(old_c)
        out_in = np.concatenate([np.full(k, -1, dtype=np.int64), np.ones(k, dtype=np.int64)])
        sel_all = c >= 0
        sel_m = sel_all & np.concatenate([old_m, new_m])
        sel_a = sel_m & ~np.concatenate([old_n, new_n])
        self.distinct_all += self._move(self.ref_all, c[sel_all], out_in[sel_all])
        self.distinct_mapped += self._move(self.ref_mapped, c[sel_m], out_in[sel_m])
        self.distinct_anon += self._move(self.ref_anon, c[sel_a], out_in[sel_a])

    def _move(self, ref: np.ndarray, cids: np.ndarray, delta: np.ndarray) -> int:
        """Add ``delta`` to ``ref`` at ``cids`` (repeats allowed); return the change in the
        number of contents with a positive count. Mapped-count changes go to the listeners."""
        if len(cids) == 0:
            return 0
        rep = cids[one_of_each(cids, self._scratch)]
        before = ref[rep]
        np.add.at(ref, cids, delta)
        after = ref[rep]
        if ref is self.ref_mapped and self.listeners:
            moved = before != after
            if moved.any():
                for listener in self.listeners:
                    listener(rep[moved], before[moved], after[moved])
        return int(np.count_nonzero(after)) - int(np.count_nonzero(before))

    # -- record application ---------------------------------------------------------------------
    def apply_pages(self, frame: np.ndarray, hash_lo: np.ndarray, hash_hi: np.ndarray) -> None:
        frame = frame.astype(np.int64)
        self.ensure_frames(int(frame.max()))
        if len(frame) > 1:
            # keep the last update of each frame
            last = one_of_each(frame, self._frame_scratch)
            if not last.all():
                frame, hash_lo, hash_hi = frame[last], hash_lo[last], hash_hi[last]
        ids = self.contents.ids(hash_lo, hash_hi)
        self._ensure_contents()
        # Only contents change: mapped and named status stay, so the general change_frames
        # reduces to moving references from the old contents to the new ones.
        old = self.content[frame]
        self.content[frame] = ids
        self.version += 1
        m = self.proc_count[frame] > 0
        a = m & ~self.named[frame]
        had = old >= 0
        self.known_frames += len(frame) - int(np.count_nonzero(had))
        if not had.all():
            self.unknown_mapped -= int(np.count_nonzero(m & ~had))
            self.unknown_anon -= int(np.count_nonzero(a & ~had))
        z = self.zero_cid
        self.zero_mapped += int(np.count_nonzero(m & (ids == z))) - \
            int(np.count_nonzero(m & (old == z)))
        k = len(frame)
        ones = np.ones(k, dtype=np.int64)
        for ref, sel, attr in ((self.ref_all, None, "distinct_all"),
                               (self.ref_mapped, m, "distinct_mapped"),
                               (self.ref_anon, a, "distinct_anon")):
            o = old if sel is None else old[sel]
            n = ids if sel is None else ids[sel]
            o = o[o >= 0]
            cids = np.concatenate([o, n])
            delta = np.concatenate([-ones[:len(o)], ones[:len(n)]])
            setattr(self, attr, getattr(self, attr) + self._move(ref, cids, delta))

    def _space(self, mm: int) -> AddressSpace:
        sp = self.spaces.get(mm)
        if sp is None:
            sp = self.spaces[mm] = AddressSpace(mm)
        return sp

    def _apply_refs(self, deltas: dict[int, int]) -> None:
        """Change how many address spaces map each frame (frame -> delta)."""
        deltas = {f: v for f, v in deltas.items() if v}
        if not deltas:
            return
        frames = np.fromiter(deltas.keys(), dtype=np.int64, count=len(deltas))
        dv = np.fromiter(deltas.values(), dtype=np.int32, count=len(deltas))
        self.ensure_frames(int(frames.max()))
        self.pairs += int(dv.sum())

        def apply() -> None:
            self.proc_count[frames] += dv

        self.change_frames(frames, apply)

    def apply_maps(self, rec: np.ndarray) -> None:
        deltas: dict[int, int] = {}
        vdelta = 0
        sp: AddressSpace | None = None
        for mm, vpn, frame, flags in zip(rec["mm"].tolist(), rec["vpn"].tolist(),
                                         rec["frame"].tolist(), rec["flags"].tolist(),
                                         strict=True):
            if sp is None or sp.mm != mm:
                sp = self._space(mm)
            pages, refs = sp.pages, sp.frame_refs
            old = pages.get(vpn)
            if flags & MAP_PRESENT:
                if old == frame:
                    continue
                pages[vpn] = frame
                r = refs.get(frame, 0)
                refs[frame] = r + 1
                if r == 0:
                    deltas[frame] = deltas.get(frame, 0) + 1
                if old is None:
                    vdelta += 1
            else:
                if old is None:
                    continue
                del pages[vpn]
                vdelta -= 1
            if old is not None:
                r = refs[old] - 1
                if r:
                    refs[old] = r
                else:
                    del refs[old]
                    deltas[old] = deltas.get(old, 0) - 1
        self.vpages += vdelta
        self._apply_refs(deltas)

    def release_space(self, mm: int) -> None:
        """The address space is gone: drop all its mappings."""
        sp = self.spaces.pop(mm, None)
        if sp is None:
            return
        self.vpages -= len(sp.pages)
        self._apply_refs({f: -1 for f in sp.frame_refs})

    def apply_pagecache(self, rec: np.ndarray) -> None:
        frames = np.unique(rec["frame"].astype(np.int64))
        self.ensure_frames(int(frames.max()))

        def apply() -> None:
            for op, dev, ino, index, frame in zip(rec["op"].tolist(), rec["dev"].tolist(),
                                                  rec["ino"].tolist(), rec["index"].tolist(),
                                                  rec["frame"].tolist(), strict=True):
                if op == PageCacheOp.ADD:
                    self.file_of[frame] = (dev, ino, index)
                    self.named[frame] = True
                elif op == PageCacheOp.DEL:
                    self.file_of.pop(frame, None)
                    self.named[frame] = False

        self.change_frames(frames, apply)

    def _attach(self, pid: int, mm: int) -> None:
        if mm:
            sp = self._space(mm)
            sp.pids.add(pid)
            sp.had_tasks = True

    def _detach(self, pid: int, mm: int) -> None:
        sp = self.spaces.get(mm)
        if sp is not None:
            sp.pids.discard(pid)
            if not sp.pids and sp.had_tasks:
                self.release_space(mm)

    def apply_task(self, op: int, pid: int, tgid: int, ppid: int, mm: int, name: str | None,
                   flags: int = 0) -> None:
        task = self.tasks.get(pid)
        if op in (TaskOp.NEW, TaskOp.EXISTING):
            if task is not None:
                self._detach(pid, task.mm)
            parent = self.tasks.get(ppid) if op == TaskOp.NEW else None
            exe = parent.exe if parent is not None and parent.tgid == ppid else None
            self.tasks[pid] = Task(pid, tgid, ppid, name or "?", mm, exe, self.t)
            self._attach(pid, mm)
            if op == TaskOp.NEW and not flags & CLONE_VM and parent is not None:
                # fork: the child's address space starts as a copy of the parent's VMAs (the
                # agent reports VMA changes, not the copy fork makes)
                src = self.spaces.get(parent.mm)
                dst = self.spaces.get(mm)
                if src is not None and dst is not None and dst is not src and not dst.vmas:
                    dst.vmas = {s: replace(v) for s, v in src.vmas.items()}
        elif task is None:
            if op == TaskOp.EXEC:
                self.tasks[pid] = Task(pid, tgid, ppid, "?", mm, name, self.t)
                self._attach(pid, mm)
        elif op == TaskOp.EXEC:
            task.exe = name
            if name:
                task.comm = name.rsplit("/", 1)[-1][:15]
            if mm != task.mm:
                old = task.mm
                task.mm = mm
                self._attach(pid, mm)
                self._detach(pid, old)
        elif op == TaskOp.EXIT:
            task.died = self.t
            self.exited.append(self.tasks.pop(pid))
            self._detach(pid, task.mm)
        elif op == TaskOp.COMM and name:
            task.comm = name

    def apply_vma(self, op: int, mm: int, start: int, end: int, vm_flags: int, pgoff: int,
                  ino: int, dev: int, path: str | None) -> None:
        sp = self._space(mm)
        if op in (VmaOp.MAP, VmaOp.EXISTING):
            _cut(sp, start, end)
            sp.vmas[start] = Vma(start, end, vm_flags, pgoff, ino, dev, path)
        elif op == VmaOp.UNMAP:
            _cut(sp, start, end)
        elif op == VmaOp.PROTECT:
            for v in _cut(sp, start, end):
                v.vm_flags = vm_flags
                sp.vmas[v.start] = v
        elif op == VmaOp.BRK:
            heap = next((v for v in sp.vmas.values() if v.heap), None)
            if heap is not None:
                del sp.vmas[heap.start]
            if end > start:
                _cut(sp, start, end)
                sp.vmas[start] = Vma(start, end, vm_flags or 0x3, 0, 0, 0, "[heap]", heap=True)

    def reset(self) -> None:
        """Forget everything (MARK STATE_BEGIN with reset): all frames leave, all spaces go."""
        for mm in list(self.spaces):
            self.release_space(mm)
        known = np.flatnonzero((self.content >= 0) | self.named)

        def apply() -> None:
            self.content[known] = -1
            self.named[known] = False

        self.change_frames(known, apply)
        t = self.t
        self._init_state()
        self.t = t


def _cut(sp: AddressSpace, start: int, end: int) -> list[Vma]:
    """Remove [start, end) from the VMAs of ``sp``, splitting those that overlap its edges.

    Returns the removed pieces (clipped to the range).
    """
    removed = []
    for v in [v for v in sp.vmas.values() if v.start < end and v.end > start]:
        del sp.vmas[v.start]
        if v.start < start:
            sp.vmas[v.start] = Vma(v.start, start, v.vm_flags, v.pgoff, v.ino, v.dev, v.path,
                                   v.heap)
        if v.end > end:
            off = v.pgoff + ((end - v.start) >> 12 if v.ino else 0)
            sp.vmas[end] = Vma(end, v.end, v.vm_flags, off, v.ino, v.dev, v.path, v.heap)
        lo, hi = max(v.start, start), min(v.end, end)
        off = v.pgoff + ((lo - v.start) >> 12 if v.ino else 0)
        removed.append(Vma(lo, hi, v.vm_flags, off, v.ino, v.dev, v.path, v.heap))
    return removed
