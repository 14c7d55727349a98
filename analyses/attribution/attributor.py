"""The attribution of one instant: every (address space, frame) pair with its kind, its file
link and its share of the figures (the package docstring gives the rule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memtrace.analyses.attribution.elf import NO_SECTION
from memtrace.analyses.attribution.frozen import StateView
from memtrace.analyses.attribution.guestfiles import (
    NO_PATH,
    NO_ROOT,
    NOT_ELF,
    NOT_ON_HOST,
    GuestFiles,
    clean_path,
    is_file_path,
)
from memtrace.analyses.state import Task, Vma
from memtrace.traces.format import (
    VM_DONTEXPAND,
    VM_GROWSDOWN,
    VM_IO,
    VM_MAYSHARE,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    VM_WRITE,
)

KINDS = ("file", "shmem", "heap", "stack", "bss", "cow", "anon", "special", "zero", "unknown")
K_FILE, K_SHMEM, K_HEAP, K_STACK, K_BSS, K_COW, K_ANON, K_SPECIAL, K_ZERO, K_UNKNOWN = range(10)

# How a frame is tied to a file offset (``--by file``).
HOW = ("mapped", "cow", "bss", "copied")
H_NONE, H_MAPPED, H_COW, H_BSS, H_COPIED = -1, 0, 1, 2, 3

SPECIAL_FLAGS = VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_MIXEDMAP
SHM_PREFIXES = ("/dev/zero", "/SYSV", "memfd:", "/dev/shm/")
SPECIAL_PATHS = ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]")

# Metrics summed per group, in this order, for every table.
# frames: mapped frames (1/k of a frame mapped by k address spaces); linux_shared: what mmap/fork
# sharing already saves ((k-1)/k of such a frame: a library all instances map is here, not in
# saved); shareable: frames whose content other mapped frames hold too; saved: what full CBPS
# would save on top of that, split into self, cross and the zero page's share.
METRICS = ("frames", "linux_shared", "shareable", "saved", "saved_self", "saved_cross",
           "saved_zero")
M_FRAMES, M_LINUX, M_SHAREABLE, M_SAVED, M_SELF, M_CROSS, M_ZERO = range(len(METRICS))
NM = len(METRICS)

#: the section label of a pair tied to no file
NO_FILE = "(no file)"


def space_label(st: StateView, mm: int) -> tuple[str, str]:
    """("comm[tgid] ...", executable) of an address space: its thread-group leaders."""
    leaders: dict[int, Task] = {}
    for t in sorted(st.tasks.values(), key=lambda t: t.pid):
        if t.mm == mm and (t.tgid not in leaders or t.pid == t.tgid):
            leaders[t.tgid] = t
    if not leaders:
        return f"mm {mm:#x}", "?"
    names = " ".join(f"{t.comm}[{tgid}]" for tgid, t in sorted(leaders.items()))
    first = leaders[min(leaders)]
    return names, first.exe or f"({first.comm})"


def space_vmas(st: StateView, mm: int, depth: int = 4) -> tuple[list[Vma], list[bool]]:
    """The VMAs of an address space sorted by address, own and inherited (flagged True): the
    VMAs of its ancestors that no VMA of its own overlaps.

    A forked child starts with a copy of its parent's VMAs, but the trace reports only the VMAs
    the child maps afterwards (the agent has no fork-time dump), so the child's inherited
    mappings are looked up in its parent's (and grandparent's) address space as it is now.
    """
    own = sorted(st.spaces[mm].vmas.values(), key=lambda v: v.start)
    extra: list[Vma] = []
    seen = {mm}
    cur = mm
    for _ in range(depth):
        parent = next((st.tasks[t.ppid] for t in st.tasks.values()
                       if t.mm == cur and t.ppid in st.tasks), None)
        if parent is None or parent.mm in seen or parent.mm not in st.spaces:
            break
        seen.add(parent.mm)
        cur = parent.mm
        have = own + extra
        for v in st.spaces[cur].vmas.values():
            if not any(o.start < v.end and v.start < o.end for o in have):
                extra.append(v)
    ids = {id(v) for v in extra}
    vmas = sorted(own + extra, key=lambda v: v.start)
    return vmas, [id(v) in ids for v in vmas]


def vma_kind(v: Vma) -> int:
    """The kind of anonymous memory a VMA holds (or K_FILE for a file mapping)."""
    path = clean_path(v.path)
    if v.heap or path == "[heap]":
        return K_HEAP
    if path == "[stack]" or v.vm_flags & VM_GROWSDOWN:
        return K_STACK
    if path in SPECIAL_PATHS or v.vm_flags & SPECIAL_FLAGS:
        return K_SPECIAL
    if path and path.startswith(SHM_PREFIXES):
        return K_SHMEM
    if v.ino or is_file_path(path):
        return K_FILE
    if v.vm_flags & (VM_SHARED | VM_MAYSHARE):
        return K_SHMEM
    return K_ANON


@dataclass
class Attribution:
    """Every (address space, frame) pair mapped at one instant, with its share of the figures.

    ``metrics`` has one row per pair and the columns of ``METRICS``; tables are sums of rows.
    """

    t: int
    spaces: list[tuple[int, str, str]]          # (mm, tasks, exe) by space index
    space: np.ndarray                            # per pair: space index
    vpn: np.ndarray                              # per pair: a virtual page mapping the frame
    frame: np.ndarray                            # per pair
    cid: np.ndarray                              # per pair: content id (-1: unknown)
    copies: np.ndarray                           # per pair: mapped frames holding the content
    kind: np.ndarray                             # per pair: index into KINDS
    metrics: np.ndarray                          # per pair x METRICS
    files: list[tuple[int, int]]                 # (dev, ino) by file index
    file: np.ndarray                             # per pair: file index (-1: none)
    offset: np.ndarray                           # per pair: file offset (bytes)
    how: np.ndarray                              # per pair: index into HOW (-1: none)
    segment: list[str] = field(default_factory=list)   # per pair
    section: list[str] = field(default_factory=list)   # per pair
    mapped_frames: int = 0
    unknown_frames: int = 0
    shared_contents: int = 0
    host_checked: int = 0
    host_differ: int = 0
    #: mapped file pages not compared with the host, by why the host file is another one
    host_left_out: dict[str, int] = field(default_factory=dict)
    vma_from_parent: int = 0

    @property
    def totals(self) -> np.ndarray:
        return self.metrics.sum(axis=0)


class Attributor:
    """Computes ``Attribution``s; keeps what outlives one instant: file paths, host files."""

    def __init__(self, guest: GuestFiles | None = None) -> None:
        self.guest = guest or GuestFiles()
        self.paths: dict[tuple[int, int], str] = {}
        self._by_content: dict[tuple[int, int], str | None] = {}

    def learn_vmas(self, records: np.ndarray, chunk: Any) -> None:
        """Remember the path of every (dev, ino) a VMA record names (the trace's only paths)."""
        for dev, ino, sid in zip(records["dev"].tolist(), records["ino"].tolist(),
                                 records["path"].tolist(), strict=True):
            if ino and (dev, ino) not in self.paths:
                p = clean_path(chunk.string(sid))
                if p is not None and is_file_path(p):
                    self.paths[(dev, ino)] = p

    def path_of(self, dev: int, ino: int) -> str | None:
        return self.paths.get((dev, ino))

    def file_name(self, st: StateView, dev: int, ino: int) -> str:
        """A display name: the path, else the host file with the same contents, else dev:ino."""
        p = self.paths.get((dev, ino))
        if p is not None:
            return p
        key = (dev, ino)
        if key not in self._by_content:
            pages: dict[int, int] = {}
            if self.guest.root is not None:
                lo = st.contents.lo
                for frame, (d, i, idx) in st.file_of.items():
                    c = int(st.content[frame]) if frame < len(st.content) else -1
                    if d == dev and i == ino and c >= 0 and c != st.zero_cid:
                        pages[idx] = int(lo[c])
            self._by_content[key] = self.guest.name_by_content(pages)
        found = self._by_content[key]
        if found is not None:
            return f"{found} (by content)"
        return f"(dev {dev:#x} ino {ino})"

    def attribute(self, st: StateView, t: int | None = None) -> Attribution:
        """Attribute the state ``st`` (labelled with time ``t``, default ``st.t``)."""
        zero = st.zero_cid
        # -- pairs: one per (address space, frame), with the lowest virtual page mapping it
        maps = st.mappings()
        mms = sorted(maps)
        labels = [(mm, *space_label(st, mm)) for mm in mms]
        parts_s, parts_v, parts_f = [], [], []
        for i, mm in enumerate(mms):
            vpn, frame = maps[mm]
            parts_s.append(np.full(len(vpn), i, dtype=np.int64))
            parts_v.append(vpn)
            parts_f.append(frame)
        if parts_s:
            s_all, v_all, f_all = (np.concatenate(p) for p in (parts_s, parts_v, parts_f))
        else:
            s_all = v_all = f_all = np.zeros(0, dtype=np.int64)
        order = np.lexsort((v_all, f_all, s_all))
        s_all, v_all, f_all = s_all[order], v_all[order], f_all[order]
        first = np.ones(len(s_all), dtype=bool)
        first[1:] = (s_all[1:] != s_all[:-1]) | (f_all[1:] != f_all[:-1])
        space, vpn, frame = s_all[first], v_all[first], f_all[first]
        npairs = len(space)

        # -- frames: content, copies among mapped frames, address spaces mapping each
        uframes, finv = np.unique(frame, return_inverse=True)
        nspaces_of = np.bincount(finv, minlength=len(uframes))
        fcid = np.full(len(uframes), -1, dtype=np.int64)
        inside = uframes < len(st.content)  # mapped frames always are; a guard all the same
        fcid[inside] = st.content[uframes[inside]]
        known = fcid >= 0
        ncont = int(fcid.max()) + 1 if known.any() else 1
        per_content = np.bincount(fcid[known], minlength=ncont)
        fcopies = np.where(known, per_content[np.where(known, fcid, 0)], 1)
        shareable_f = fcopies >= 2

        # -- components of copies (see the package docstring): copies of one content are joined
        # when an address space maps both; label propagation over (content, space) keys
        fself = np.zeros(len(uframes))
        fcross = np.zeros(len(uframes))
        psel = shareable_f[finv]
        if psel.any():
            pf = finv[psel]                                  # frame index of each pair
            keys = fcid[pf] * max(len(mms), 1) + space[psel]
            _, kinv = np.unique(keys, return_inverse=True)
            lab = np.arange(len(uframes))
            while True:
                klab = np.full(int(kinv.max()) + 1, len(uframes), dtype=np.int64)
                np.minimum.at(klab, kinv, lab[pf])
                new = lab.copy()
                np.minimum.at(new, pf, klab[kinv])
                if np.array_equal(new, lab):
                    break
                lab = new
            sh = np.flatnonzero(shareable_f)
            size = np.bincount(lab[sh], minlength=len(uframes))
            roots = np.unique(lab[sh])
            ncomp = np.bincount(fcid[roots], minlength=ncont)
            s = size[lab[sh]].astype(np.float64)
            k = ncomp[fcid[sh]].astype(np.float64)
            fself[sh] = (s - 1) / s
            fcross[sh] = (k - 1) / (k * s)
        fsaved = fself + fcross

        # -- per pair
        w = 1.0 / nspaces_of[finv]
        cid = fcid[finv]
        copies = fcopies[finv]
        is_zero = cid == zero
        metrics = np.zeros((npairs, NM))
        metrics[:, M_FRAMES] = w
        metrics[:, M_LINUX] = 1.0 - w
        metrics[:, M_SHAREABLE] = w * shareable_f[finv]
        metrics[:, M_SAVED] = w * fsaved[finv]
        metrics[:, M_SELF] = w * fself[finv]
        metrics[:, M_CROSS] = w * fcross[finv]
        metrics[:, M_ZERO] = np.where(is_zero, metrics[:, M_SAVED], 0.0)

        kind, file, offset, how, nparent = self._kinds_and_files(st, mms, space, vpn, frame,
                                                                  cid)
        kind[is_zero] = K_ZERO
        att = Attribution(
            st.t if t is None else t, labels, space, vpn, frame, cid, copies, kind, metrics,
            [], np.full(npairs, -1, dtype=np.int64), offset, how,
            mapped_frames=len(uframes), unknown_frames=int((~known).sum()),
            shared_contents=int(np.count_nonzero(per_content >= 2)), vma_from_parent=nparent)
        self._sections(st, att, file)
        return att

    def _kinds_and_files(self, st: StateView, mms: list[int], space: np.ndarray, vpn: np.ndarray,
                         frame: np.ndarray, cid: np.ndarray
                         ) -> tuple[np.ndarray, list[tuple[int, int] | None], np.ndarray,
                                    np.ndarray, int]:
        """Kind, file, offset and link (HOW) of every pair, from its frame and its VMA."""
        ps = st.page_size
        n = len(space)
        kind = np.full(n, K_UNKNOWN, dtype=np.int64)
        files: list[tuple[int, int] | None] = [None] * n
        offset = np.zeros(n, dtype=np.int64)
        how = np.full(n, H_NONE, dtype=np.int64)
        nparent = 0
        # contents found in the page cache: where an anonymous copy may have come from; a file
        # with a known path is preferred, then the lowest (dev, ino, index)
        in_cache: dict[int, tuple[int, int, int, int]] = {}
        for fr, (dev, ino, idx) in st.file_of.items():
            c = int(st.content[fr]) if fr < len(st.content) else -1
            if c < 0 or c == st.zero_cid:
                continue
            rank = (0 if (dev, ino) in self.paths else 1, dev, ino, idx)
            old = in_cache.get(c)
            if old is None or rank < old:
                in_cache[c] = rank
        named = np.zeros(n, dtype=bool)
        inside = frame < len(st.named)
        named[inside] = st.named[frame[inside]]
        # VMAs of each space, sorted, with the previous VMA when adjacent (for .bss continuations)
        bounds = np.flatnonzero(np.diff(space, prepend=-1, append=len(mms) + 1))
        for j in range(len(bounds) - 1):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            if lo >= n:
                break
            vmas, inherited = space_vmas(st, mms[int(space[lo])])
            starts = np.array([v.start for v in vmas], dtype=np.int64)
            va = vpn[lo:hi] * ps
            vi = np.searchsorted(starts, va, side="right") - 1 if len(vmas) else \
                np.full(hi - lo, -1)
            vkinds = [vma_kind(v) for v in vmas]
            for p, i in zip(range(lo, hi), vi.tolist(), strict=True):
                v = vmas[i] if i >= 0 and va[p - lo] < vmas[i].end else None
                vk = vkinds[i] if v is not None else K_UNKNOWN
                if v is not None and inherited[i]:
                    nparent += 1
                if named[p]:
                    dev, ino, idx = st.file_of.get(int(frame[p]), (0, 0, 0))
                    kind[p] = K_SHMEM if vk == K_SHMEM else K_FILE
                    if ino:
                        files[p], offset[p], how[p] = (dev, ino), idx * ps, H_MAPPED
                    continue
                kind[p] = vk
                if v is not None and vk == K_FILE:
                    kind[p] = K_COW
                    files[p] = (v.dev, v.ino)
                    offset[p] = v.pgoff * ps + int(va[p - lo]) - v.start
                    how[p] = H_COW
                    continue
                if v is not None and vk == K_ANON and i > 0:
                    prev = vmas[i - 1]
                    if (prev.end == v.start and vkinds[i - 1] == K_FILE and prev.ino
                            and not prev.vm_flags & VM_SHARED and prev.vm_flags & VM_WRITE):
                        # a candidate .bss continuation: confirmed against the ELF in _sections
                        files[p] = (prev.dev, prev.ino)
                        offset[p] = (prev.pgoff * ps + prev.end - prev.start
                                     + int(va[p - lo]) - v.start)
                        how[p] = H_BSS
                        continue
                c = int(cid[p])
                if c >= 0 and c in in_cache:
                    _, dev, ino, idx = in_cache[c]
                    files[p], offset[p], how[p] = (dev, ino), idx * ps, H_COPIED
        return kind, files, offset, how, nparent

    def _sections(self, st: StateView, att: Attribution, files: list[tuple[int, int] | None]
                  ) -> None:
        """File indexes, segments and sections of the pairs tied to a file; confirms or drops
        .bss candidates; checks named pages against the host copies."""
        ps = st.page_size
        index: dict[tuple[int, int], int] = {}
        att.segment = [""] * len(files)
        att.section = [NO_FILE] * len(files)
        g = self.guest
        checked: set[int] = set()
        lo_arr, hi_arr = st.contents.lo, st.contents.hi
        for p, key in enumerate(files):
            if key is None:
                continue
            path = self.path_of(*key)
            h = int(att.how[p])
            off = int(att.offset[p])
            res = g.section(path, off, ps, by_vaddr=h in (H_COW, H_BSS))
            if h == H_BSS:
                if res is None or res[1] in (NO_ROOT, NO_PATH, NOT_ON_HOST, NOT_ELF) or \
                        not self._beyond_filesz(path, off, ps):
                    # not confirmed: plain anonymous memory
                    att.how[p] = H_NONE
                    att.kind[p] = K_ANON if att.kind[p] != K_ZERO else K_ZERO
                    continue
                if att.kind[p] != K_ZERO:
                    att.kind[p] = K_BSS
            if res is None:
                res = ("", NO_SECTION)
            att.file[p] = index.setdefault(key, len(index))
            att.segment[p], att.section[p] = res
            fr = int(att.frame[p])
            c = int(att.cid[p])
            if h == H_MAPPED and path is not None and g.root is not None and c >= 0 \
                    and fr not in checked:
                checked.add(fr)
                host_file = g.host_path(path)
                why = g.unlike_traced(host_file) if host_file is not None else None
                if why is not None:
                    att.host_left_out[why] = att.host_left_out.get(why, 0) + 1
                    continue
                host = g.host_page_hash(path, off, ps)
                if host is not None:
                    att.host_checked += 1
                    att.host_differ += host != (int(lo_arr[c]), int(hi_arr[c]))
        att.files = list(index)

    def _beyond_filesz(self, path: str | None, off: int, ps: int) -> bool:
        """True if file offset ``off`` of a private mapping lies past a PT_LOAD segment's file
        part but within its memory size: where the loader maps anonymous .bss."""
        if path is None:
            return False
        host = self.guest.host_path(path)
        lay = self.guest.layout(host) if host is not None else None
        if lay is None:
            return False
        return any(s[1] + s[3] <= off + ps and off < s[1] + s[4] and s[4] > s[3]
                   for s in lay.segments)
