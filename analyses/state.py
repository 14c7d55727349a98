"""The replayed state of the guest at one instant, updated change by change.

Page frames, their contents (as dense content ids), which frames are named (in the page cache),
which address spaces map which frames, the live tasks and their VMAs. Alongside it the incremental
counters behind the thesis's figures (eq. 4.6-4.9), kept exact after every change so that the oracle
can be read at every content change without recomputation.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from memtrace.analyses import kernels
from memtrace.analyses.kernels import (
    C_DISTINCT_ALL,
    C_DISTINCT_ANON,
    C_DISTINCT_MAPPED,
    C_KNOWN,
    C_MAPPED,
    C_NAMED_MAPPED,
    C_PAIRS,
    C_UNKNOWN_ANON,
    C_UNKNOWN_MAPPED,
    C_VPAGES,
    C_ZERO_CID,
    C_ZERO_MAPPED,
    LOW_MASK,
    MMID_SHIFT,
    N_COUNTERS,
    ContentTable,
    Table,
)
from memtrace.traces.format import TaskOp, VmaOp
from memtrace.traces.pagehash import ZERO_HASH

CLONE_VM = 0x100  # clone flag: the child shares the parent's address space (a thread)
EXITED_KEPT = 1000


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


@dataclass(slots=True)
class Vma:
    """One VMA. Never changed once in a space (a change replaces it), so spaces share them."""

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

    def part(self, lo: int, hi: int) -> Vma:
        """The piece [lo, hi) of this VMA (a file offset moves with its start)."""
        off = self.pgoff + ((lo - self.start) >> 12 if self.ino else 0)
        return Vma(lo, hi, self.vm_flags, off, self.ino, self.dev, self.path, self.heap)


@dataclass(eq=False)
class AddressSpace:
    """One mm: its VMAs and tasks. Its mappings (virtual page -> frame) live in the state's
    tables under ``mmid``; ``frozen`` holds a copy instead for a space kept for later.

    ``vmas`` (start -> Vma) is read by analyses; the state changes it only through
    ``put_vma``/``drop_vma``, which keep the sorted list of starts that finds overlaps."""

    mm: int
    mmid: int = 0
    vmas: dict[int, Vma] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    had_tasks: bool = False
    state: ReplayState | None = field(default=None, repr=False)
    frozen: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self._starts) != len(self.vmas):
            self._starts = sorted(self.vmas)

    def put_vma(self, v: Vma) -> None:
        if v.start not in self.vmas:
            insort(self._starts, v.start)
        self.vmas[v.start] = v

    def drop_vma(self, start: int) -> None:
        del self.vmas[start]
        del self._starts[bisect_left(self._starts, start)]

    def copy_vmas(self, other: AddressSpace) -> None:
        """Start with ``other``'s VMAs (a fork)."""
        self.vmas = dict(other.vmas)
        self._starts = list(other._starts)

    def overlapping(self, start: int, end: int) -> list[Vma]:
        """The VMAs that overlap [start, end), in address order."""
        starts = self._starts
        i = bisect_right(starts, start) - 1
        if i < 0 or self.vmas[starts[i]].end <= start:
            i += 1
        j = bisect_left(starts, end, i)
        return [self.vmas[a] for a in starts[i:j]]

    def vma_at(self, addr: int) -> Vma | None:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            v = self.vmas[self._starts[i]]
            if addr < v.end:
                return v
        return None

    def mapping(self) -> tuple[np.ndarray, np.ndarray]:
        """(virtual pages, frames) of the present mappings, sorted by virtual page."""
        if self.frozen is not None:
            return self.frozen
        if self.state is None or not self.npages:
            e = np.zeros(0, dtype=np.int64)
            return e, e
        vpn, frame = self.state.vmap.select(self.mmid)
        o = np.argsort(vpn)
        return vpn[o], frame[o]

    @property
    def npages(self) -> int:
        if self.frozen is not None:
            return len(self.frozen[0])
        if self.state is None:
            return 0
        return int(self.state.space_pages[self.mmid])

    def lookup(self, vpns: np.ndarray) -> np.ndarray:
        """Frames mapped at ``vpns`` (-1 where nothing is mapped)."""
        vpns = np.asarray(vpns, dtype=np.int64)
        if self.frozen is not None:
            v, f = self.frozen
            i = np.minimum(np.searchsorted(v, vpns), max(len(v) - 1, 0))
            hit = (v[i] == vpns) if len(v) else np.zeros(len(vpns), dtype=bool)
            return np.where(hit, f[i] if len(v) else -1, -1)
        if self.state is None:
            return np.full(len(vpns), -1, dtype=np.int64)
        return self.state.vmap.lookup((np.uint64(self.mmid) << np.uint64(MMID_SHIFT))
                                      | vpns.astype(np.uint64))

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames, how many of this space's virtual pages map each), sorted by frame."""
        if self.frozen is not None or self.state is None:
            f, refs = np.unique(self.mapping()[1], return_counts=True)
            return f, refs.astype(np.int64)
        f, refs = self.state.frame_pairs.select(self.mmid)
        o = np.argsort(f)
        return f[o], refs[o]

    @property
    def pages(self) -> dict[int, int]:
        """A copy of the mappings as a dict (virtual page -> frame); arrays: ``mapping()``."""
        vpn, frame = self.mapping()
        return dict(zip(vpn.tolist(), frame.tolist(), strict=True))

    @property
    def frame_refs(self) -> dict[int, int]:
        """A copy of frame -> how many virtual pages of this space map it."""
        f, refs = self.frames()
        return dict(zip(f.tolist(), refs.tolist(), strict=True))

    def freeze(self, mapping: tuple[np.ndarray, np.ndarray] | None = None) -> AddressSpace:
        """A copy that keeps its mappings (``mapping()``, unless given) when the state moves
        on."""
        return AddressSpace(self.mm, self.mmid, dict(self.vmas), set(self.pids),
                            self.had_tasks, None, self.mapping() if mapping is None else mapping)


class BadRecord(ValueError):
    """A record the state cannot hold: the trace is corrupt (``hint`` says what to check)."""

    hint = "the trace is corrupt"


class FrameBeyondRam(BadRecord):
    """A record names a frame far beyond the guest RAM the trace declares."""

    hint = "the trace is corrupt or its header's ram_size is wrong"

    def __init__(self, frame: int, ram_size: int) -> None:
        super().__init__(f"frame {frame:#x} is beyond guest RAM ({ram_size} bytes)")
        self.frame = frame


class ContentListener(Protocol):
    def __call__(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None: ...


def _counter(index: int, doc: str) -> property:
    return property(lambda self: int(self.cnt[index]), doc=doc)


class ReplayState:
    """State of the traced guest after the records applied so far.

    The per-record work is done by the compiled loops of ``analyses.kernels``; this class owns the
    arrays they work on, grows them, and keeps the Python-side objects (tasks, VMAs, marks).

    Memory is bounded by what is live: when the content table runs out of ids, the contents that
    no frame holds any more (all three reference counts zero, and the listeners told; the zero
    page's content stays) are forgotten and their ids given to new contents (``recycle``); the
    table grows when more than half of it is still live after that. A content that comes back
    later gets an id again, maybe another one. Analyses hear of forgotten ids before they are
    given again (``forget_listeners``, ``Analysis.on_content_forgotten``).
    """

    #: initial size of the content table, in bits of its slots (half as many ids); None: room
    #: for about one content per frame. Tests make it small so that ids are recycled often.
    content_bits: int | None = None

    def __init__(self, nframes: int = 0, page_size: int = 4096,
                 max_frames: int | None = None) -> None:
        self.page_size = page_size
        self.ram_size = nframes * page_size  # as the trace declares it
        self.t = 0
        #: frames beyond this are an error (FrameBeyondRam), not a reason to grow
        self.max_frames = max_frames if max_frames is not None else max(4 * nframes, 1 << 24)
        # room for about one content per frame before the table has to grow
        self.contents = ContentTable(self.content_bits or
                                     max(12, (2 * max(nframes, 1)).bit_length()))
        self.zero_cid = self.contents.id_of(*ZERO_HASH)
        self.listeners: list[ContentListener] = []
        # the current instant's content change log (see end_instant), kept across reset
        self._ilog = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64),
                      np.zeros(1, dtype=np.int64))
        #: False: never forget a content (an analysis keeps ids of its own, ``holds_content_ids``)
        self.recycle = True
        #: called with the ids of forgotten contents, before the ids are given again
        self.forget_listeners: list[Callable[[np.ndarray], None]] = []
        self.forgotten = 0  # contents forgotten so far
        self._alloc(max(nframes, 1))
        self._init_state()

    def _alloc(self, nframes: int) -> None:
        self._frame_arrays(np.zeros((nframes, 2), dtype=np.int64), nframes)
        self.content[:] = -1
        self.named = np.zeros(nframes, dtype=bool)
        self.file_dev = np.zeros(nframes, dtype=np.uint64)
        self.file_ino = np.zeros(nframes, dtype=np.uint64)
        self.file_index = np.zeros(nframes, dtype=np.uint64)
        # as many rows as the content table has ids before it grows (zeros are not written:
        # memory is faulted in as ids are used)
        self._content_arrays(np.zeros((len(self.contents.lo), 4), dtype=np.int32))

    def _init_state(self) -> None:
        self.spaces: dict[int, AddressSpace] = {}
        self.tasks: dict[int, Task] = {}
        #: the last EXITED_KEPT tasks that exited (a long trace's would grow without bound)
        self.exited: deque[Task] = deque(maxlen=EXITED_KEPT)
        self.exited_count = 0
        self.lost: dict[int, int] = {}
        self.counters: dict[str, int] = {}
        self.marks: list[tuple[int, int, str | None]] = []
        self.incomplete: str | None = None
        self.cnt = np.zeros(N_COUNTERS, dtype=np.int64)  # see analyses.kernels.C_*
        self.cnt[C_ZERO_CID] = self.zero_cid
        bits = max(12, min(16, self.nframes.bit_length()))
        self.vmap = Table(bits)         # (mmid, virtual page) -> frame
        self.frame_pairs = Table(bits)  # (mmid, frame) -> virtual pages of mmid mapping it
        # entries in vmap, frame_pairs; most entries each may hold before it must grow
        self.tab_n = np.zeros(4, dtype=np.int64)
        self.space_pages = np.zeros(64, dtype=np.int64)  # present virtual pages per mmid
        self.space_ids = Table(6)  # kernels.space_key(mm) -> mmid, for the spaces in ``spaces``
        self.next_mmid = 1
        self.version = 0  # bumped by every change
        self._all_mappings: tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]] | None = None
        self._views()

    vpages = _counter(C_VPAGES, "present virtual pages over all address spaces")
    pairs = _counter(C_PAIRS, "(address space, frame) pairs: the no-sharing figure")
    mapped_frames = _counter(C_MAPPED, "frames mapped by at least one address space")
    named_mapped = _counter(C_NAMED_MAPPED, "mapped frames that are named")
    unknown_mapped = _counter(C_UNKNOWN_MAPPED, "mapped frames of unknown content")
    unknown_anon = _counter(C_UNKNOWN_ANON, "... of which anonymous")
    known_frames = _counter(C_KNOWN, "frames whose content is known")
    distinct_all = _counter(C_DISTINCT_ALL, "distinct contents over all known frames")
    distinct_mapped = _counter(C_DISTINCT_MAPPED, "distinct contents over mapped frames")
    distinct_anon = _counter(C_DISTINCT_ANON, "distinct contents over mapped anonymous frames")
    zero_mapped = _counter(C_ZERO_MAPPED, "mapped frames holding the zero page")

    # -- figures --------------------------------------------------------------------------------
    def figures(self) -> dict[str, int]:
        """The thesis's four figures (eq. 4.6-4.9) and companions, in pages, at this instant.

        Frames whose content is unknown count as distinct contents of their own.
        """
        c = self.cnt.tolist()
        return {
            "no_sharing": c[C_PAIRS],
            "mmap_fork": c[C_MAPPED],
            "ksm_hint_all": c[C_NAMED_MAPPED] + c[C_DISTINCT_ANON] + c[C_UNKNOWN_ANON],
            "full_cbps": c[C_DISTINCT_MAPPED] + c[C_UNKNOWN_MAPPED],
            "zero_pages": c[C_ZERO_MAPPED],
            "guest_frames": c[C_KNOWN],
            "guest_distinct": c[C_DISTINCT_ALL],
        }

    def mappings(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """mm -> (virtual pages, frames) sorted by virtual page, for every space with pages:
        one pass over the mapping table (``AddressSpace.mapping()`` scans it for one space),
        kept until the next change."""
        if self._all_mappings is not None and self._all_mappings[0] == self.version:
            return self._all_mappings[1]
        occupied = self.vmap.keys != 0
        keys, frames = self.vmap.keys[occupied], self.vmap.vals[occupied]
        if not len(keys):
            self._all_mappings = (self.version, {})
            return {}
        order = np.argsort(keys)
        keys, frames = keys[order], frames[order]
        mmid = (keys >> np.uint64(MMID_SHIFT)).astype(np.int64)
        vpn = (keys & np.uint64(LOW_MASK)).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, mmid[1:] != mmid[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        by_mmid = {int(mmid[a]): (vpn[a:b], frames[a:b])
                   for a, b in zip(starts.tolist(), ends.tolist(), strict=True)}
        out = {mm: by_mmid[sp.mmid] for mm, sp in self.spaces.items() if sp.mmid in by_mmid}
        self._all_mappings = (self.version, out)
        return out

    @property
    def file_of(self) -> dict[int, tuple[int, int, int]]:
        """Named frames -> (device, inode, page index in the file): a copy."""
        fr = np.flatnonzero(self.named)
        return dict(zip(fr.tolist(), zip(self.file_dev[fr].tolist(), self.file_ino[fr].tolist(),
                                         self.file_index[fr].tolist(), strict=True),
                        strict=True))

    # -- storage --------------------------------------------------------------------------------
    # What one record touches sits together in memory: a frame's content id and proc_count share
    # a row, and so do a content's three reference counts (columns: all, mapped, anon) and its
    # change-log mark (0, or 1 + where the block's log holds it), so that a page update costs a few
    # cache misses, not one per array. The 1-D names are views.
    def _frame_arrays(self, rows: np.ndarray, nframes: int) -> None:
        self._frames2 = rows
        self.content = rows[:, 0]
        self.proc_count = rows[:, 1]
        self.nframes = nframes

    def _content_arrays(self, rows: np.ndarray) -> None:
        self._refs = rows
        self.ref_all = rows[:, 0]
        self.ref_mapped = rows[:, 1]
        self.ref_anon = rows[:, 2]
        self._mark = rows[:, 3]

    def ensure_frames(self, max_frame: int) -> None:
        if max_frame < self.nframes:
            return
        if max_frame >= self.max_frames:
            raise FrameBeyondRam(max_frame, self.ram_size)
        n = max(max_frame + 1, 2 * self.nframes)
        rows = np.zeros((n, 2), dtype=np.int64)
        rows[:, 0] = -1
        rows[:self.nframes] = self._frames2
        self._frame_arrays(rows, n)
        for name in ("named", "file_dev", "file_ino", "file_index"):
            old = getattr(self, name)
            new = np.zeros(n, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        self._views()

    def _ensure_ids(self, n: int, exact: bool = False) -> None:
        """Room for ``n`` content ids in the per-id arrays (at least twice as many as now,
        unless ``exact``)."""
        if n > len(self.ref_all):
            size = n if exact else max(n, 2 * len(self.ref_all))
            rows = np.zeros((size, 4), dtype=self._refs.dtype)
            rows[:len(self._refs)] = self._refs
            self._content_arrays(rows)
            self._views()

    def _room_for_maps(self, mm: int, vpn: int, frame: int) -> None:
        """The mapping loop stopped short: make the address space ``mm``, grow the frame arrays
        to ``frame``, grow a mapping table that is full."""
        if vpn > LOW_MASK:
            raise BadRecord(f"virtual page {vpn:#x} of mm {mm:#x} is beyond 2**{MMID_SHIFT}")
        self._space(mm)
        self.ensure_frames(frame)
        for i, table in enumerate((self.vmap, self.frame_pairs)):
            if self.tab_n[i] >= self.tab_n[2 + i]:
                table.reserve(int(self.tab_n[i]), 1)
        self._views()

    def _views(self) -> None:
        """The tuples of arrays the compiled loops take, rebuilt whenever an array is replaced
        (building them for every block cost more than small blocks' work)."""
        self.tab_n[2] = len(self.vmap.keys) // 2
        self.tab_n[3] = len(self.frame_pairs.keys) // 2
        self._fs = (self.content, self.proc_count, self.named, self.ref_all, self.ref_mapped,
                    self.ref_anon, self.cnt)
        shifts = np.array([self.vmap.shift, self.frame_pairs.shift, self.space_ids.shift],
                          dtype=np.uint64)
        self._tb = (self.vmap.keys, self.vmap.vals, self.frame_pairs.keys, self.frame_pairs.vals,
                    shifts, self.tab_n, self.space_pages, self.space_ids.keys,
                    self.space_ids.vals)
        self._files = (self.file_dev, self.file_ino, self.file_index)

    def _run(self, kernel: Callable[..., int | None], *args: object, changes: int,
             records: int | None = None, make_room: Callable[[int], None] | None = None,
             views: Callable[[], tuple[object, ...]] = tuple) -> None:
        """Run a kernel over the frame state.

        ``changes`` bounds how many content ids it can touch (the size of the change log the
        listeners get, once per call). With ``records``, the kernel takes a start index and
        returns where it stopped; ``make_room(i)`` then grows what record ``i`` lacked and the
        kernel goes on from there, with the arrays ``views()`` gives (growing replaces them).
        """
        self.version += 1
        log = self._instant_log(changes) if self.listeners else None
        if records is None:
            kernel(*args, self._fs, (self._mark, *log) if log else _NO_LOG)
        else:
            i = 0
            while (i := kernel(*args, *views(), i, self._fs,
                               (self._mark, *log) if log else _NO_LOG)) < records:
                assert make_room is not None
                make_room(i)

    def _instant_log(self, changes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The change log of the current instant, with room for ``changes`` more contents. A
        content is logged once per instant, with its mapped count when it first changed; the
        log's places stay valid as it grows (``_mark`` holds 1 + a content's place)."""
        cid, before, n = self._ilog
        need = int(n[0]) + changes
        if need > len(cid):
            size = max(need, 2 * len(cid), 1024)
            grown = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            grown[0][:n[0]] = cid[:n[0]]
            grown[1][:n[0]] = before[:n[0]]
            self._ilog = (*grown, n)
        return self._ilog

    def end_instant(self) -> None:
        """All records of the current time stamp are applied: hand the listeners the contents
        whose mapped reference count differs from what it was when the instant began."""
        cid_log, before_log, n = self._ilog
        k = int(n[0])
        if not k:
            return
        n[0] = 0
        cids = cid_log[:k].copy()
        self._mark[cids] = 0
        before = before_log[:k].copy()
        after = self.ref_mapped[cids].astype(np.int64)
        moved = before != after
        if moved.any():
            for listener in self.listeners:
                listener(cids[moved], before[moved], after[moved])

    # -- record application ---------------------------------------------------------------------
    def apply_pages(self, frame: np.ndarray, hash_lo: np.ndarray, hash_hi: np.ndarray) -> None:
        """PAGE records, in order."""
        if not len(frame):
            return
        if self.recycle and self.contents.room() < len(frame):
            self._content_room(len(frame))
        ids = self.contents.ids(hash_lo, hash_hi)
        self._ensure_ids(len(self.contents))
        self._run(kernels.apply_pages, frame, ids, changes=2 * len(frame), records=len(frame),
                  make_room=lambda i: self.ensure_frames(int(frame[i])))

    def _content_room(self, k: int) -> None:
        """Room for ``k`` new contents: forget the contents no frame holds, then grow the table
        if more than half of it is live (or ``k`` do not fit), so that a collection forgets at
        least as many contents as it keeps. What a collection costs is one insertion per kept
        content (about 25 ns) and a pass over the ids; a table twice as large as what is live
        makes that 25-50 ns per forgotten content, against 120-170 ns per page update."""
        ct = self.contents
        self.forgotten += ct.collect(self.ref_all, self._mark, self.zero_cid,
                                     self.forget_listeners)
        need = max(SPARE * ct.live, ct.live + k)
        if need > ct.capacity:
            cap = -(-max(need, ct.capacity * 5 // 4) // 64) * 64
            ct.grow(cap)
            self._ensure_ids(cap, exact=True)

    def _space(self, mm: int) -> AddressSpace:
        sp = self.spaces.get(mm)
        if sp is None:
            sp = self.spaces[mm] = AddressSpace(mm, self.next_mmid, state=self)
            self.next_mmid += 1
            if self.next_mmid >= len(self.space_pages):
                self.space_pages = np.resize(self.space_pages, 2 * len(self.space_pages))
                self.space_pages[self.next_mmid:] = 0
            self.space_ids.reserve(len(self.spaces) - 1, 1)
            self.space_ids.put(kernels.space_key(np.uint64(mm)), sp.mmid)
            self._views()
        return sp

    def apply_maps(self, rec: np.ndarray) -> None:
        """MAP records, in order."""
        mm, vpn, frame = rec["mm"], rec["vpn"], rec["frame"]
        self._run(kernels.apply_maps, mm, vpn, frame, rec["flags"], changes=2 * len(rec),
                  records=len(rec), views=lambda: (self._tb,),
                  make_room=lambda i: self._room_for_maps(int(mm[i]), int(vpn[i]),
                                                          int(frame[i])))

    def release_space(self, mm: int) -> None:
        """The address space is gone: drop all its mappings."""
        sp = self.spaces.pop(mm, None)
        if sp is None:
            return
        self.space_ids.remove(kernels.space_key(np.uint64(mm)))
        if sp.npages:
            self._run(kernels.release_space, sp.mmid, self._tb, changes=int(self.tab_n[1]))
        sp.state = None  # a stale reference sees an empty space, not another's mappings

    def apply_pagecache(self, rec: np.ndarray) -> None:
        """PAGECACHE records, in order."""
        frame = rec["frame"]
        self._run(kernels.apply_pagecache, rec["op"], frame, rec["dev"], rec["ino"],
                  rec["index"], changes=len(rec), records=len(rec),
                  make_room=lambda i: self.ensure_frames(int(frame[i])),
                  views=lambda: (self._files,))

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
                    dst.copy_vmas(src)
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
            self.exited_count += 1
            self._detach(pid, task.mm)
        elif op == TaskOp.COMM and name:
            task.comm = name

    def apply_vma(self, op: int, mm: int, start: int, end: int, vm_flags: int, pgoff: int,
                  ino: int, dev: int, path: str | None) -> None:
        sp = self._space(mm)
        if op in (VmaOp.MAP, VmaOp.EXISTING):
            _cut(sp, start, end)
            sp.put_vma(Vma(start, end, vm_flags, pgoff, ino, dev, path))
        elif op == VmaOp.UNMAP:
            _cut(sp, start, end)
        elif op == VmaOp.PROTECT:
            for v in _cut(sp, start, end):
                sp.put_vma(replace(v, vm_flags=vm_flags))
        elif op == VmaOp.BRK:
            heap = next((v for v in sp.vmas.values() if v.heap), None)
            if heap is not None:
                sp.drop_vma(heap.start)
            if end > start:
                _cut(sp, start, end)
                sp.put_vma(Vma(start, end, vm_flags or 0x3, 0, 0, 0, "[heap]", heap=True))

    def reset(self) -> None:
        """Forget everything (MARK STATE_BEGIN with reset): all frames leave, all spaces go."""
        for mm in list(self.spaces):
            self.release_space(mm)
        known = np.flatnonzero((self.content >= 0) | self.named)
        self._run(kernels.forget_frames, known, changes=len(known))
        t = self.t
        self._init_state()
        self.t = t


#: ids per live content the content table keeps room for at least (see ``_content_room``)
SPARE = 2

_NO_LOG = (np.zeros((0, 4), dtype=np.int32)[:, 3], np.zeros(0, dtype=np.int64),
           np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))


def _cut(sp: AddressSpace, start: int, end: int) -> list[Vma]:
    """Remove [start, end) from the VMAs of ``sp``, splitting those that overlap its edges.

    Returns the removed pieces (clipped to the range).
    """
    removed = []
    for v in sp.overlapping(start, end):
        sp.drop_vma(v.start)
        if v.start < start:
            sp.put_vma(v.part(v.start, start))
        if v.end > end:
            sp.put_vma(v.part(end, v.end))
        removed.append(v.part(max(v.start, start), min(v.end, end)))
    return removed
