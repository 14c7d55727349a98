"""Attribution: who holds the shareable frames, what kind of memory they are, where they came from.

The figures say *how much* memory full content-based page sharing (CBPS) could save; this analysis
says *whose* it is, the question of thesis chapter 6 and of Barker et al. [BWSS12]: heap, library
or stack pages, sharing within one instance ("self sharing") or between instances ("cross
sharing"). ``trace-analyze --by task|file|section|kind`` attributes every mapped frame and every
saved page, at one instant (``--at T``; default: the sample with the most frames mapped, the same
instant ``--sharing`` reports as its peak) or averaged over samples every ``--interval``
(``--average``). ``--top K`` lists the K most duplicated contents and every copy's owner;
``--show-page HASH`` prints one content from the trace's content store.

The attribution rule (every table sums to the same totals):

* A content held by n mapped frames saves n - 1 frames under full CBPS (its n copies become one).
* Self and cross sharing. Copies are grouped into *components*: two copies are in one component
  when one address space maps both (directly or through other copies of that content). The
  instance is the address space: threads share it, a forked child has its own. With K components
  of sizes s_1..s_K (summing to n), deduplicating inside each address space alone saves n - K
  (self sharing) and deduplicating what remains across address spaces saves K - 1 (cross
  sharing). A copy in a component of size s gets (s - 1)/s of self saving (its component's s - 1
  shared by its s copies) and (K - 1)/(K s) of cross saving (the K - 1 shared by the K components,
  each component's part by its copies). When all copies are in one space, or each in its own,
  every copy gets (n - 1)/n, the plain rule.
* A frame mapped by k address spaces (fork, shared libraries) is split 1/k to each, as the
  proportional set size (PSS) does, for frames, shareable frames and savings alike. So the
  ``frames`` column of any table sums to the mapped frames ("mmap/fork") and ``saved`` to
  mmap/fork - full CBPS.
* Frames whose content is unknown count as frames but are never shareable.

Memory kinds (``--by kind``), from the frame and the VMA that maps it in each address space:
``zero`` (the zero page's content, whatever maps it: counted apart as Barker et al. do), ``file``
(a page-cache page mapped from a file), ``shmem`` (shared memory: VM_SHARED anonymous mappings,
/dev/zero, /SYSV, memfd:, /dev/shm/), ``heap`` (the brk area), ``stack`` ([stack] or
VM_GROWSDOWN), ``cow`` (an anonymous private copy of a page of a file mapping, made by a write),
``bss`` (anonymous memory continuing a file mapping where an ELF segment's memsz exceeds its
filesz: confirmed against the ELF file under --guest-root), ``anon`` (other anonymous mmap),
``special`` (vdso, vvar, device mappings: VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND) and
``unknown`` (no VMA known at that address).

Files (``--by file``): a named frame belongs to its page-cache file and offset (``file_of``); an
anonymous copy in a file-backed private VMA (``cow``, ``bss``) to the file and offset the VMA maps
there; any other anonymous frame whose content is also in the page cache (a ``read()`` of a data
file into the heap, say) to that file and offset as a *copy*. Paths come from the VMA records of
the whole trace; a file never mapped has no path in the trace and is named by its device and inode,
or, with ``--guest-root``, by the host file whose pages have the same contents.

Sections (``--by section``): with ``--guest-root DIR`` (the unpacked guest image) the same paths are
opened on the host (symlinks resolved inside DIR; ``--guest-path-map`` rewrites guest paths first,
e.g. for copies made at run time) and, when the file is an ELF object, a page-cache page is
attributed by file offset to the section holding most of its bytes (sh_offset/sh_size), and an
anonymous copy by virtual address within its PT_LOAD segment (sh_addr/sh_size), which reaches
NOBITS sections such as .bss past the segment's filesz.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import string
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from memtrace.analyses.base import Analysis, Result, Table, positive_int
from memtrace.analyses.kernels import ContentTable
from memtrace.analyses.state import AddressSpace, ReplayState, Task, Vma
from memtrace.traces.format import (
    VM_DONTEXPAND,
    VM_GROWSDOWN,
    VM_IO,
    VM_MAYSHARE,
    VM_PFNMAP,
    VM_SHARED,
    VM_WRITE,
    Kind,
)
from memtrace.traces.pagehash import ZERO_HASH, page_hash
from memtrace.traces.reader import Trace, open_trace

VIEWS = ("task", "file", "section", "kind")
KINDS = ("file", "shmem", "heap", "stack", "bss", "cow", "anon", "special", "zero", "unknown")
K_FILE, K_SHMEM, K_HEAP, K_STACK, K_BSS, K_COW, K_ANON, K_SPECIAL, K_ZERO, K_UNKNOWN = range(10)

# How a frame is tied to a file offset (``--by file``).
HOW = ("mapped", "cow", "bss", "copied")
H_NONE, H_MAPPED, H_COW, H_BSS, H_COPIED = -1, 0, 1, 2, 3

VM_MIXEDMAP = 0x10000000
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

# Section labels when a file's section cannot be known.
NO_FILE = "(no file)"
NO_ROOT = "(no --guest-root)"
NOT_ON_HOST = "(not in guest root)"
NOT_ELF = "(not ELF)"
NO_PATH = "(path unknown)"
NO_SECTION = "(no section)"
PAST_EOF = "(past end of file)"

MAX_INDEXED_FILE = 256 << 20  # host files larger than this are not indexed by content


# -- the state read at one instant -------------------------------------------------------------
@dataclass
class FrozenState:
    """A copy of the parts of a ``ReplayState`` the attribution reads, kept for later.

    The default instant (the sample with the most frames mapped) is only known at the end of the
    replay, so each new maximum is copied when it is seen. Content ids stay valid: the content
    table only ever appends. VMA objects are replaced, never changed, by the state, so copying the
    dicts that hold them is enough; tasks are changed in place, so they are copied.
    """

    t: int
    page_size: int
    content: np.ndarray
    named: np.ndarray
    file_of: dict[int, tuple[int, int, int]]
    spaces: dict[int, AddressSpace]
    tasks: dict[int, Task]
    zero_cid: int
    contents: ContentTable
    mapped_frames: int = 0

    def mappings(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """mm -> (virtual pages, frames), as ``ReplayState.mappings``."""
        return {mm: sp.mapping() for mm, sp in self.spaces.items() if sp.npages}


#: what the attribution reads: a live replay state or a copy kept for later
StateView = ReplayState | FrozenState


def freeze(st: ReplayState, t: int | None = None) -> FrozenState:
    maps = st.mappings()
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    spaces = {mm: sp.freeze(maps.get(mm, empty)) for mm, sp in st.spaces.items()
              if mm in maps or sp.vmas}
    return FrozenState(st.t if t is None else t, st.page_size, st.content.copy(),
                       st.named.copy(), dict(st.file_of), spaces,
                       {pid: copy.copy(task) for pid, task in st.tasks.items()}, st.zero_cid,
                       st.contents, st.mapped_frames)


# -- guest files on the host ------------------------------------------------------------------
def clean_path(path: str | None) -> str | None:
    """A guest path as the kernel reports it, without the " (deleted)" the kernel appends."""
    if path is None:
        return None
    return path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path


def is_file_path(path: str | None) -> bool:
    """True for a real file path; False for none and for kernel names such as [heap]."""
    return bool(path) and not path.startswith("[")


def _perms(flags: int) -> str:
    return ("r" if flags & 4 else "-") + ("w" if flags & 2 else "-") + ("x" if flags & 1 else "-")


@dataclass
class ElfLayout:
    """The program headers and section headers of one ELF file: all a page lookup needs.

    Parsed once per file (pyelftools reads lazily, but a table of tuples makes the per-page
    lookups cheap and lets the file be closed at once).
    """

    size: int
    #: PT_LOAD segments: (index among PT_LOADs, p_offset, p_vaddr, p_filesz, p_memsz, "rwx")
    segments: list[tuple[int, int, int, int, int, str]]
    #: sections: (name, nobits, alloc, tls, sh_offset, sh_addr, sh_size)
    sections: list[tuple[str, bool, bool, bool, int, int, int]]

    @classmethod
    def parse(cls, path: Path) -> ElfLayout | None:
        """The layout of an ELF file, or None if it is not one (or is damaged)."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.constants import SH_FLAGS
        from elftools.elf.elffile import ELFFile

        try:
            with open(path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    return None
                f.seek(0)
                elf = ELFFile(f)
                segs = []
                for seg in elf.iter_segments():
                    if seg["p_type"] == "PT_LOAD":
                        segs.append((len(segs), seg["p_offset"], seg["p_vaddr"], seg["p_filesz"],
                                     seg["p_memsz"], _perms(seg["p_flags"])))
                secs = []
                for sec in elf.iter_sections():
                    if sec["sh_type"] == "SHT_NULL" or sec["sh_size"] == 0:
                        continue
                    fl = sec["sh_flags"]
                    secs.append((sec.name, sec["sh_type"] == "SHT_NOBITS",
                                 bool(fl & SH_FLAGS.SHF_ALLOC), bool(fl & SH_FLAGS.SHF_TLS),
                                 sec["sh_offset"], sec["sh_addr"], sec["sh_size"]))
                return cls(os.fstat(f.fileno()).st_size, segs, secs)
        except (ELFError, OSError):
            return None
        except Exception:  # a damaged ELF trips pyelftools in many ways: treat it as not ELF
            return None

    def by_offset(self, off: int, ps: int) -> tuple[str, str]:
        """(segment, section) of the file page at ``off``: the page-cache view, by file offset.

        A page can hold bytes of several sections; it goes to the one with the most bytes in it.
        """
        if off >= self.size:
            return "", PAST_EOF
        end = off + ps
        seg = _best((s[1], s[1] + s[3], s) for s in self.segments)(off, end)
        sec = _best((s[4], s[4] + s[6], s) for s in self.sections if not s[1])(off, end)
        return (f"LOAD{seg[0]} {seg[5]}" if seg else "", sec[0] if sec else NO_SECTION)

    def by_vaddr(self, off: int, ps: int) -> tuple[str, str] | None:
        """(segment, section) of the page a private mapping shows at file offset ``off``.

        Anonymous copies live at a virtual address: the segment's p_vaddr + (off - p_offset).
        Looking the section up by address (sh_addr) reaches NOBITS sections (.bss) beyond the
        segment's filesz, where the loader maps anonymous memory. A file page shared by two
        segments (unaligned layouts) goes to the writable one: only writes make copies. None
        if no PT_LOAD segment covers the offset.
        """
        cands = [s for s in self.segments
                 if s[1] - s[1] % ps <= off < s[1] + s[4]]
        if not cands:
            return None
        seg = max(cands, key=lambda s: ("w" in s[5], s[0]))
        v0 = seg[2] + (off - seg[1])
        sec = _best((s[5], s[5] + s[6], s) for s in self.sections
                    if s[2] and not (s[1] and s[3]))(v0, v0 + ps)
        return f"LOAD{seg[0]} {seg[5]}", sec[0] if sec else NO_SECTION


def _best(ranges: Iterable[tuple[int, int, Any]]) -> Any:
    """A function (lo, hi) -> the item whose [start, end) overlaps [lo, hi) the most, or None."""
    items = list(ranges)

    def pick(lo: int, hi: int) -> Any:
        best, most = None, 0
        for start, end, item in items:
            n = min(end, hi) - max(start, lo)
            if n > most:
                best, most = item, n
        return best

    return pick


class GuestFiles:
    """The guest's files as found on the host under ``--guest-root``, and their ELF layouts.

    Guest paths are rewritten by ``--guest-path-map GUEST=HOST`` rules first (a ``*`` in GUEST
    matches one path component: ``/zi/*/lib=/usr/lib`` maps the zero-install copies made at run
    time back to the image's originals), then resolved inside the root: absolute symlinks in the
    image point into the image, not into the host.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None,
                 path_map: Sequence[str] = ()) -> None:
        self.root = Path(root).resolve() if root else None
        self.rules = [parse_path_map(r) for r in path_map]
        self._host: dict[str, Path | None] = {}
        self._layout: dict[Path, ElfLayout | None] = {}
        self._lookup: dict[tuple[str, int, bool], tuple[str, str] | None] = {}
        self._page_hash: dict[tuple[Path, int], tuple[int, int] | None] = {}
        self._index: dict[int, tuple[str, int]] | None = None
        self.image = ImageFiles.beside(self.root) if self.root else None
        self.traced: dict[str, Any] | None = None  # the trace's guest_image manifest
        self._unlike: dict[Path, str | None] = {}

    def traced_with(self, guest_image: dict[str, Any] | None) -> None:
        """The manifest of the image the trace was recorded with (its header's guest_image):
        host pages are then compared only for files the two images are known to share."""
        self.traced = guest_image
        self._unlike.clear()

    def unlike_traced(self, host: Path) -> str | None:
        """Why the host file cannot be taken for the traced one (None: it can, or nothing
        says otherwise). Only a root made by build_image.py says which packages made a file."""
        if self.image is None or not self.traced or self.root is None:
            return None
        if host not in self._unlike:
            guest = "/" + host.relative_to(self.root).as_posix()
            self._unlike[host] = self.image.unlike(guest, self.traced)
        return self._unlike[host]

    def map_path(self, path: str) -> str:
        comps = path.split("/")
        for parts, repl in self.rules:
            if len(comps) >= len(parts) and all(
                    fnmatch.fnmatchcase(c, p) for c, p in zip(comps, parts, strict=False)):
                rest = comps[len(parts):]
                return "/".join([repl.rstrip("/"), *rest]) if rest else repl
        return path

    def host_path(self, guest_path: str) -> Path | None:
        """The host file that holds ``guest_path``, or None."""
        if self.root is None:
            return None
        if guest_path not in self._host:
            self._host[guest_path] = resolve_in_root(self.root, self.map_path(guest_path))
        return self._host[guest_path]

    def layout(self, host: Path) -> ElfLayout | None:
        if host not in self._layout:
            self._layout[host] = ElfLayout.parse(host)
        return self._layout[host]

    @property
    def elf_files(self) -> int:
        return sum(1 for v in self._layout.values() if v is not None)

    def section(self, guest_path: str | None, off: int, ps: int, by_vaddr: bool
                ) -> tuple[str, str] | None:
        """(segment, section label) of a page of a guest file; None when ``by_vaddr`` finds the
        offset in no segment (so it is no .bss continuation)."""
        if self.root is None:
            return "", NO_ROOT
        if guest_path is None:
            return "", NO_PATH
        key = (guest_path, off, by_vaddr)
        if key not in self._lookup:
            host = self.host_path(guest_path)
            if host is None:
                res: tuple[str, str] | None = ("", NOT_ON_HOST)
            else:
                lay = self.layout(host)
                if lay is None:
                    res = ("", NOT_ELF)
                else:
                    res = lay.by_vaddr(off, ps) if by_vaddr else lay.by_offset(off, ps)
            self._lookup[key] = res
        return self._lookup[key]

    def host_page_hash(self, guest_path: str, off: int, ps: int) -> tuple[int, int] | None:
        """The content hash of the host copy's page at ``off`` (zero-filled past the end of the
        file, as the page cache holds it), to check that the host file is the traced one."""
        host = self.host_path(guest_path)
        if host is None:
            return None
        key = (host, off)
        if key not in self._page_hash:
            try:
                with open(host, "rb") as f:
                    f.seek(off)
                    data = f.read(ps)
                self._page_hash[key] = page_hash(data.ljust(ps, b"\0")) if data else None
            except OSError:
                self._page_hash[key] = None
        return self._page_hash[key]

    def name_by_content(self, pages: dict[int, int]) -> str | None:
        """The guest path of the host file whose pages have these contents (file index ->
        hash_lo), for files the trace names by inode only (read, never mapped). At least half of
        the known pages must match, at the same index."""
        if self.root is None or not pages:
            return None
        if self._index is None:
            self._index = self._build_index()
        votes: dict[str, int] = {}
        for idx, lo in pages.items():
            hit = self._index.get(lo)
            if hit is not None and hit[1] == idx:
                votes[hit[0]] = votes.get(hit[0], 0) + 1
        if not votes:
            return None
        path, n = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
        return path if 2 * n >= len(pages) else None

    def _build_index(self) -> dict[int, tuple[str, int]]:
        """hash_lo of every page of every regular file under the root (zero pages left out)."""
        assert self.root is not None
        index: dict[int, tuple[str, int]] = {}
        zero_lo = ZERO_HASH[0]
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                p = Path(dirpath, name)
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_size > MAX_INDEXED_FILE:
                        continue
                    data = p.read_bytes()
                except OSError:
                    continue
                guest = "/" + p.relative_to(self.root).as_posix()
                for i in range(0, len(data), 4096):
                    lo = page_hash(data[i:i + 4096].ljust(4096, b"\0"))[0]
                    if lo != zero_lo:
                        index.setdefault(lo, (guest, i // 4096))
        return index


class ImageFiles:
    """A root made by guest-agent/build_image.py: its manifest and, for every file, the
    packages it was made from (``rootfs-files.json``), so a trace recorded with another build
    is compared only on files of packages whose versions the two share."""

    def __init__(self, manifest: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
        self.manifest = manifest
        self.files = files

    @classmethod
    def beside(cls, root: Path) -> ImageFiles | None:
        mf = root.parent / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
            info = manifest.get("rootfs") or {}
            if info.get("path") != root.name:
                return None
            files = json.loads((root.parent / info["files"]).read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(manifest, files)

    def unlike(self, guest: str, traced: dict[str, Any]) -> str | None:
        """None if ``guest`` is made from the same inputs in both images, else why not."""
        rec = self.files.get(guest)
        if rec is None:
            return "not a file of the image"
        mine = self.manifest.get("packages", {})
        theirs = traced.get("packages", {})
        for pkg in rec["packages"]:
            if pkg == "memtrace":
                if traced.get("input_digest") == self.manifest.get("input_digest"):
                    continue
                mod = (traced.get("files", {}).get("module", {}).get("sha256"))
                if guest.endswith("/memtrace_agent.ko") and mod == rec["sha256"]:
                    continue
                return "the project's own files (init, scenarios, agent) of another build"
            if mine.get(pkg) != theirs.get(pkg):
                return f"{pkg} {theirs.get(pkg, '(absent)')} traced, {mine.get(pkg)} here"
        return None


def parse_path_map(rule: str) -> tuple[list[str], str]:
    """``GUEST=HOST`` -> (GUEST's components, HOST); raises ValueError for a malformed rule."""
    guest, sep, host = rule.partition("=")
    if not sep or not guest.startswith("/") or not host.startswith("/"):
        raise ValueError(f"not a path map: {rule!r} (give GUEST=HOST, both absolute, e.g. "
                         "/zi/*/lib=/usr/lib)")
    return guest.rstrip("/").split("/"), host


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> Path | None:
    """The regular file at guest ``path`` inside ``root``, following symlinks the way the guest
    would (an absolute target starts again at ``root``); None if it is missing or escapes."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    cur: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if cur:
                cur.pop()
            continue
        cand = root.joinpath(*cur, part)
        if cand.is_symlink():
            links += 1
            if links > max_links:
                return None
            target = os.readlink(cand)
            if target.startswith("/"):
                cur = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        cur.append(part)
    final = root.joinpath(*cur)
    return final if final.is_file() else None


# -- one instant ------------------------------------------------------------------------------
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

        # -- components of copies (see the module docstring): copies of one content are joined
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


# -- tables -----------------------------------------------------------------------------------
def group(att: Attribution, keys: Sequence[Any], sel: np.ndarray | None = None
          ) -> dict[Any, np.ndarray]:
    """Sum the metric rows of the pairs by ``keys`` (one hashable per pair)."""
    ids: dict[Any, int] = {}
    rows = range(len(keys)) if sel is None else np.flatnonzero(sel).tolist()
    gi = np.fromiter((ids.setdefault(keys[p], len(ids)) for p in rows), dtype=np.int64,
                     count=len(rows))
    m = att.metrics if sel is None else att.metrics[sel]
    sums = np.zeros((len(ids), NM))
    for j in range(NM):
        sums[:, j] = np.bincount(gi, weights=m[:, j], minlength=len(ids))
    return {k: sums[i] for k, i in ids.items()}


def views_of(att: Attribution, attributor: Attributor, st: StateView
             ) -> dict[str, dict[Any, Any]]:
    """Every grouped view of one instant: view name -> {key: metric sums}."""
    names = [a[1] for a in att.spaces]
    fname = [attributor.file_name(st, *k) for k in att.files]
    sp = att.space.tolist()
    fi = att.file.tolist()
    hw = att.how.tolist()
    no = NO_FILE
    out: dict[str, dict[Any, Any]] = {
        "task": group(att, [(f"{att.spaces[s][0]:#x}", names[s], att.spaces[s][2]) for s in sp]),
        "exe": group(att, [att.spaces[s][2] for s in sp]),
        "kind": group(att, [KINDS[k] for k in att.kind.tolist()]),
        "file": group(att, [(fname[f] if f >= 0 else no, HOW[h] if f >= 0 else "")
                            for f, h in zip(fi, hw, strict=True)]),
        "section": group(att, att.section),
        "file_section": group(att, [(fname[f] if f >= 0 else no, g, s)
                                    for f, g, s in zip(fi, att.segment, att.section,
                                                       strict=True)]),
    }
    # spaces per executable, for the exe table
    exes: dict[str, int] = {}
    for a in att.spaces:
        exes[a[2]] = exes.get(a[2], 0) + 1
    out["exe_spaces"] = exes
    return out


def _r(x: float) -> float:
    return round(float(x), 2)


def _pct(x: float, total: float) -> float:
    return round(100.0 * x / total, 1) if total else 0.0


def _sorted(d: dict[Any, np.ndarray]) -> list[tuple[Any, np.ndarray]]:
    return sorted(d.items(), key=lambda kv: (-kv[1][M_SAVED], -kv[1][M_LINUX],
                                             -kv[1][M_FRAMES], str(kv[0])))


def hash_hex(lo: int, hi: int) -> str:
    """A content hash as --top prints it and --show-page reads it: hash_hi << 64 | hash_lo."""
    return f"{hi:016x}{lo:016x}"


# -- the analysis -----------------------------------------------------------------------------
class _Select(argparse.Action):
    """Stores an attribution option and selects the analysis, so that ``--by task`` or
    ``--top 10`` alone runs it (trace-analyze selects analyses by their store_true switch)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.dest == "attr_by":
            views = list(getattr(namespace, self.dest, None) or [])
            for v in str(values).split(","):
                v = v.strip()
                if v == "all":
                    views.extend(VIEWS)
                elif v in VIEWS:
                    views.append(v)
                else:
                    parser.error(f"--by: unknown view {v!r} (choose from {', '.join(VIEWS)}, "
                                 "all; several with commas)")
            values = list(dict.fromkeys(views))
        elif self.dest == "attr_average":
            values = True
        setattr(namespace, self.dest, values)
        setattr(namespace, f"run_{AttributionAnalysis.name}", True)


def _usage_error(msg: str) -> NoReturn:
    """Options are checked when the analysis is built, after parsing: exit as argparse would."""
    print(f"trace-analyze: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class AttributionAnalysis(Analysis):
    """Attribute frames and savings to tasks, executables, files, ELF sections and memory kinds.

    One instant is attributed from a copy of the state taken during the replay (the default
    instant, the peak, is known only at the end); ``--average`` attributes every sample as it
    passes and averages the tables.
    """

    name = "attribution"
    flag = "--attribution"
    help = ("who holds the shareable frames and saved pages: by task/executable (self vs cross "
            "sharing), file and ELF section, memory kind (heap, stack, cow, ...); same as "
            "--by all --top 10")
    default = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from memtrace.analyses.base import parse_time

        g = parser.add_argument_group(
            "attribution (--attribution; --by and --top select it too)")
        g.add_argument("--by", dest="attr_by", action=_Select, metavar="VIEW[,VIEW]",
                       default=None,
                       help="attribute frames and savings by task (address spaces and "
                            "executables, self vs cross sharing), file (and offset), section "
                            "(ELF section, needs --guest-root) or kind (heap, stack, file, cow, "
                            "bss, shmem, anon, zero, ...); all: every view")
        g.add_argument("--top", dest="attr_top", action=_Select, type=positive_int, metavar="K",
                       default=None,
                       help="the K most duplicated contents and their copies' owners")
        when = g.add_mutually_exclusive_group()
        when.add_argument("--at", dest="attr_at", action=_Select, type=parse_time, metavar="T",
                          default=None,
                          help="attribute the state at time T (default: the sample with the "
                               "most frames mapped)")
        when.add_argument("--average", dest="attr_average", action=_Select, nargs=0,
                          default=False,
                          help="average the attribution over samples every --interval")
        g.add_argument("--guest-root", metavar="DIR", default=None,
                       help="the unpacked guest image (e.g. build/guest/rootfs): guest files "
                            "are opened there for ELF sections and by-content names")
        g.add_argument("--guest-path-map", metavar="GUEST=HOST", action="append", default=[],
                       help="rewrite guest paths before looking them up under --guest-root; "
                            "* matches one component (e.g. /zi/*/lib=/usr/lib); repeatable")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AttributionAnalysis:
        views = getattr(args, "attr_by", None)
        top = getattr(args, "attr_top", None)
        if views is None and top is None:  # --attribution (or only --at/--average) alone
            views, top = list(VIEWS), 10
        root = getattr(args, "guest_root", None)
        if root is not None and not Path(root).is_dir():
            _usage_error(f"--guest-root {root}: not a directory")
        try:
            guest = GuestFiles(root, getattr(args, "guest_path_map", []) or [])
        except ValueError as e:
            _usage_error(f"--guest-path-map: {e}")
        return cls(views or [], top or 0, getattr(args, "attr_at", None),
                   bool(getattr(args, "attr_average", False)), None, guest)

    def __init__(self, views: Sequence[str] = VIEWS, top: int = 0, at: int | None = None,
                 average: bool = False, interval: int | None = None,
                 guest: GuestFiles | None = None) -> None:
        self.views = list(views)
        self.top = top
        self.at = at
        self.average = average
        self.interval = interval
        self.attributor = Attributor(guest)
        self.snap: FrozenState | None = None
        self.best = -1
        self.sums: dict[str, dict[Any, Any]] = {}
        self.nsamples = 0
        self.att: Attribution | None = None
        self.at_note: str | None = None

    def begin(self, replay: Any) -> None:
        super().begin(replay)
        tr = replay.trace
        self.grid = replay.grid(100, self.interval)
        self.interval = self.grid.step
        self.attributor.guest.traced_with(tr.header.get("guest_image"))

    def on_records(self, st: ReplayState, kind: int, records: np.ndarray, chunk: Any) -> None:
        if kind == Kind.VMA:
            self.attributor.learn_vmas(records, chunk)

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        samples = list(self.grid.instants_in(t0, t1))
        if samples and self.at is None and st.mapped_frames > self.best:
            self.best = st.mapped_frames
            self.snap = freeze(st, samples[0])
        if self.at is not None and self.snap is None and self.at < t1:
            if self.at < t0:
                self.at_note = f"--at {self.at} is before the trace's first state; using {t0}"
            self.snap = freeze(st, max(self.at, t0))
        if samples and self.average:
            self._accumulate(st, samples[0], len(samples))

    def _accumulate(self, st: StateView, t: int, weight: int) -> None:
        att = self.attributor.attribute(st, t)
        for view, groups in views_of(att, self.attributor, st).items():
            acc = self.sums.setdefault(view, {})
            for k, v in groups.items():
                acc[k] = acc.get(k, 0) + v * weight
        acc = self.sums.setdefault("_totals", {})
        for k, v in (("totals", att.totals), ("mapped", att.mapped_frames),
                     ("shared_contents", att.shared_contents)):
            acc[k] = acc.get(k, 0) + v * weight
        self.nsamples += weight

    def end(self, st: ReplayState) -> None:
        if self.at is None and st.mapped_frames > self.best:
            self.best = st.mapped_frames
            self.snap = freeze(st)
        if self.at is not None and self.snap is None:
            self.at_note = (f"--at {self.at} is past the trace's end ({st.t}); using the final "
                            "state")
            self.snap = freeze(st)
        if self.average and self.nsamples == 0:
            self._accumulate(st, st.t, 1)
        if self.snap is None:
            self.snap = freeze(st)
        self.att = self.attributor.attribute(self.snap)

    # -- report -------------------------------------------------------------------------------
    def result(self) -> Result:
        r = Result(self.name)
        att, snap = self.att, self.snap
        assert att is not None and snap is not None
        unit = self.replay.trace.clock_unit
        if self.average:
            n = self.nsamples
            views = {k: {g: v / n for g, v in d.items()} for k, d in self.sums.items()}
            tot = views.pop("_totals")
            totals = tot["totals"]
            step = self.grid.step
            r.summary["mode"] = (f"average of {n} samples every {step}"
                                 + ("" if step.seconds else f" {unit}"))
            r.summary["samples"] = n
            r.summary["interval"] = step.value if step.seconds else int(step.value)
            r.units["interval"] = "s" if step.seconds else unit
            r.summary["mapped_frames"] = _r(tot["mapped"])
            r.summary["shared_contents"] = _r(tot["shared_contents"])
        else:
            views = views_of(att, self.attributor, snap)
            totals = att.totals
            r.summary["mode"] = ("the state at --at T" if self.at is not None
                                 else "the sample with the most frames mapped")
            r.summary["t"] = att.t
            r.units["t"] = unit
            r.summary["mapped_frames"] = att.mapped_frames
            r.summary["shared_contents"] = att.shared_contents
            r.summary["unknown_content_frames"] = att.unknown_frames
            r.summary["pairs_with_parent_vmas"] = att.vma_from_parent
            r.units["pairs_with_parent_vmas"] = "(space, frame) pairs"
            if att.vma_from_parent:
                r.notes.append(
                    f"{att.vma_from_parent} (space, frame) pairs lie in no VMA the trace reported "
                    "for their space and were classified by the parent's VMA at that address "
                    "(forked children inherit VMAs the trace does not list)")
        r.units["mapped_frames"] = "frames"
        saved = float(totals[M_SAVED])
        r.summary["linux_shared"] = _r(totals[M_LINUX])
        r.units["linux_shared"] = "pages already shared by mmap/fork"
        r.summary["shareable_frames"] = _r(totals[M_SHAREABLE])
        r.units["shareable_frames"] = "frames"
        for j, key in ((M_SAVED, "saved"), (M_SELF, "saved_self"), (M_CROSS, "saved_cross"),
                       (M_ZERO, "saved_zero")):
            r.summary[key] = _r(totals[j])
            r.units[key] = "pages"
        r.summary["self_pct"] = _pct(totals[M_SELF], saved)
        r.units["self_pct"] = "% of saved"
        nonzero = saved - float(totals[M_ZERO])
        r.summary["self_pct_without_zero"] = _pct(totals[M_SELF] - _zero_self(views), nonzero)
        r.units["self_pct_without_zero"] = "% of saved, zero pages left out"
        g = self.attributor.guest
        r.summary["guest_root"] = str(g.root) if g.root else None
        if g.root is not None:
            r.summary["elf_files"] = g.elf_files
            r.summary["host_pages_checked"] = att.host_checked
            r.summary["host_pages_differ"] = att.host_differ
            left = sum(att.host_left_out.values())
            r.summary["host_pages_left_out"] = left
            r.units["host_pages_left_out"] = ("mapped file pages not compared: the root's "
                                              "manifest says the file differs from the traced")
            if left:
                r.summary["host_left_out_why"] = dict(sorted(att.host_left_out.items()))
                r.notes.append(
                    f"compared {att.host_checked} mapped file pages with the host copies under "
                    f"--guest-root; left out {left} whose files the root's manifest says differ "
                    "from the traced image's: " + "; ".join(
                        f"{why} ({n} pages)" for why, n in sorted(att.host_left_out.items())))
            if att.host_differ:
                r.notes.append(
                    f"{att.host_differ} of {att.host_checked} mapped file pages differ from the "
                    "host copies under --guest-root: the image is not the traced one (or a "
                    "--guest-path-map points to other files); their sections may be wrong")
        if self.at_note:
            r.notes.append(self.at_note)

        cols = list(METRICS)

        def rows(d: dict[Any, np.ndarray], with_pct: bool = True) -> list[tuple[Any, list[Any]]]:
            return [(k, [_r(x) for x in v] + ([_pct(v[M_SAVED], saved)] if with_pct else []))
                    for k, v in _sorted(d)]

        if "task" in self.views:
            r.tables["by_task"] = Table(
                ["mm", "tasks", "exe", *cols, "saved_pct"],
                [[*k, *v] for k, v in rows(views["task"])],
                "by address space (one instance; frames mapped by k spaces count 1/k to each); "
                "saved_self: duplicates inside the space, saved_cross: between spaces")
            spaces = views["exe_spaces"]
            r.tables["by_exe"] = Table(
                ["exe", "spaces", *cols, "saved_pct"],
                [[k, _r(spaces.get(k, 0)), *v] for k, v in rows(views["exe"])],
                "by executable (the address spaces running it, summed)")
        if "kind" in self.views:
            r.tables["by_kind"] = Table(
                ["kind", *cols, "saved_pct"], [[k, *v] for k, v in rows(views["kind"])],
                "by memory kind (zero: the zero page's content, whatever maps it)")
        if "file" in self.views:
            r.tables["by_file"] = self._file_table(views["file"], saved)
            if not self.average:
                r.tables["file_pages"] = self._file_pages(att, snap)
        if "section" in self.views:
            r.tables["by_section"] = Table(
                ["section", *cols, "saved_pct"], [[k, *v] for k, v in rows(views["section"])],
                "by ELF section (all files; page-cache pages by file offset, private copies by "
                "address)" + ("" if g.root else ": give --guest-root to open the ELF files"))
            r.tables["by_file_section"] = Table(
                ["file", "segment", "section", *cols, "saved_pct"],
                [[*k, *v] for k, v in rows(views["file_section"])],
                "by file, PT_LOAD segment and section")
        if self.top:
            top, copies = self._top(att, snap)
            r.tables["top"] = top
            r.tables["top_copies"] = copies
            if self.average:
                r.notes.append("--top lists the sample with the most frames mapped")
        r.notes.append(
            "a content held by n mapped frames saves n-1 (full CBPS); each copy gets (s-1)/s "
            "of self saving and (K-1)/(K*s) of cross saving (K groups of copies mapped by "
            "common address spaces, s copies in its group); a frame mapped by k spaces is "
            "split 1/k each")
        return r

    def _file_table(self, d: dict[tuple[str, str], np.ndarray], saved: float) -> Table:
        """One row per file: its frames and savings, split by how the frames hold its pages."""
        files: dict[str, np.ndarray] = {}
        split: dict[str, dict[str, float]] = {}
        for (name, how), v in d.items():
            files[name] = files.get(name, 0) + v
            s = split.setdefault(name, {})
            s[how] = s.get(how, 0.0) + float(v[M_SAVED])
        out = []
        for name, v in _sorted(files):
            s = split[name]
            out.append([name, *(_r(x) for x in v), _r(s.get("mapped", 0)),
                        _r(s.get("cow", 0) + s.get("bss", 0)), _r(s.get("copied", 0)),
                        _pct(v[M_SAVED], saved)])
        return Table(["file", *METRICS, "saved_mapped", "saved_private", "saved_copied",
                      "saved_pct"], out,
                     "by file: saved_mapped from its page-cache pages, saved_private from "
                     "private copies in its mappings (cow, .bss), saved_copied from anonymous "
                     "pages with the content of one of its pages (e.g. read into the heap)")

    def _file_pages(self, att: Attribution, st: StateView) -> Table:
        """Every shareable page tied to a file: file, offset, section, how, copies, saving."""
        sel = (att.file >= 0) & (att.metrics[:, M_SHAREABLE] > 0)
        names = [self.attributor.file_name(st, *k) for k in att.files]
        keys = [(names[int(att.file[p])], int(att.offset[p]), att.segment[p], att.section[p],
                 HOW[int(att.how[p])], int(att.copies[p])) if sel[p] else None
                for p in range(len(att.file))]
        d = group(att, keys, sel)
        rows = [[k[0], f"{k[1]:#x}", k[2], k[3], k[4], k[5], _r(v[M_FRAMES]), _r(v[M_SAVED]),
                 _r(v[M_SELF]), _r(v[M_CROSS])]
                for k, v in sorted(d.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][4]))]
        return Table(["file", "offset", "segment", "section", "how", "copies", "frames", "saved",
                      "saved_self", "saved_cross"], rows,
                     "shareable pages tied to a file, by file and offset")

    def _top(self, att: Attribution, st: StateView) -> tuple[Table, Table]:
        """The K contents with the most copies among mapped frames, and every copy's owner."""
        lo, hi = st.contents.lo, st.contents.hi
        shared = np.flatnonzero(att.copies >= 2)
        cids, first = np.unique(att.cid[shared], return_index=True)
        ncopies = dict(zip(cids.tolist(), att.copies[shared[first]].tolist(), strict=True))
        order = sorted(ncopies, key=lambda c: (-ncopies[c], hash_hex(int(lo[c]), int(hi[c]))))
        chosen = order[:self.top]
        rank = {c: i + 1 for i, c in enumerate(chosen)}
        names = [self.attributor.file_name(st, *k) for k in att.files]
        top_rows: list[list[Any]] = []
        copy_rows: list[list[Any]] = []
        per: dict[int, list[int]] = {c: [] for c in chosen}
        for p in np.flatnonzero(np.isin(att.cid, chosen)).tolist():
            per[int(att.cid[p])].append(p)
        ps = st.page_size
        for c in chosen:
            h = hash_hex(int(lo[c]), int(hi[c]))
            owners: dict[tuple[str, str], int] = {}
            kinds: dict[str, int] = {}
            for p in sorted(per[c], key=lambda p: (int(att.space[p]), int(att.vpn[p]))):
                who = att.spaces[int(att.space[p])][1]
                k = KINDS[int(att.kind[p])]
                fi = int(att.file[p])
                owners[(who, k)] = owners.get((who, k), 0) + 1
                kinds[k] = kinds.get(k, 0) + 1
                copy_rows.append([rank[c], h, int(att.frame[p]), who,
                                  f"{int(att.vpn[p]) * ps:#x}", k, names[fi] if fi >= 0 else "",
                                  f"{int(att.offset[p]):#x}" if fi >= 0 else "",
                                  att.section[p] if fi >= 0 else ""])
            summary = "; ".join(f"{who} {k} x{n}" for (who, k), n in
                                sorted(owners.items(), key=lambda kv: (-kv[1], kv[0])))
            top_rows.append([rank[c], h, ncopies[c], ncopies[c] - 1,
                             " ".join(f"{k}:{n}" for k, n in sorted(kinds.items())), summary])
        top = Table(["rank", "hash", "copies", "saved", "kinds", "owners"], top_rows,
                    "the most duplicated contents among mapped frames (hash: give it, or a "
                    "prefix, to --show-page)")
        copies = Table(["rank", "hash", "frame", "owner", "address", "kind", "file", "offset",
                        "section"], copy_rows,
                       "every mapping of the top contents' copies (one row per address space "
                       "and frame)")
        return top, copies


def _zero_self(views: dict[str, dict[Any, Any]]) -> float:
    """Self saving of the zero page's content (from the kind view, where zero is its own kind)."""
    z = views.get("kind", {}).get("zero")
    return float(z[M_SELF]) if z is not None else 0.0


# -- --show-page ------------------------------------------------------------------------------
class PageNotFound(Exception):
    """--show-page cannot show the content: ``str()`` is one line for the user."""


def stored_hashes(trace: Trace) -> list[tuple[int, int]]:
    """(hash_lo, hash_hi) of every content in the trace's content store (FORMAT.md type 2:
    ``n``, then n pairs of hashes, then the pages)."""
    out: list[tuple[int, int]] = []
    for info in trace.content_chunks:
        raw = trace._payload(info)  # the reader's checked decompression of one chunk
        (n,) = struct.unpack_from("<Q", raw, 0)
        pairs = np.frombuffer(raw, dtype="<u8", count=2 * n, offset=8).reshape(n, 2)
        out.extend((int(a), int(b)) for a, b in pairs.tolist())
    return out


def find_content(trace: Trace, spec: str) -> tuple[int, int, bytes]:
    """The content named by ``spec`` (32 hex digits, hash_hi << 64 | hash_lo, or a unique
    prefix) and its bytes; raises PageNotFound with the reason."""
    s = spec.strip().lower().removeprefix("0x")
    if not s or len(s) > 32 or any(ch not in string.hexdigits for ch in s):
        raise PageNotFound(f"--show-page: not a content hash: {spec!r} (give the 32 hex digits "
                           "--top prints, or a prefix of them)")
    stored = stored_hashes(trace)
    cands = {(lo, hi) for lo, hi in stored if hash_hex(lo, hi).startswith(s)}
    if hash_hex(*ZERO_HASH).startswith(s) and len(s) >= 8:
        cands.add(ZERO_HASH)  # the zero page is known without a store
    if not cands:
        if not stored:
            raise PageNotFound(f"{trace.path}: the trace has no content store (it was recorded "
                               f"without page contents): cannot show {s}")
        raise PageNotFound(f"{trace.path}: no content {s} in the trace's content store "
                           f"({len(stored)} contents)")
    if len(cands) > 1:
        some = ", ".join(sorted(hash_hex(lo, hi) for lo, hi in cands)[:4])
        raise PageNotFound(f"--show-page: prefix {s} matches {len(cands)} contents ({some}"
                           f"{', ...' if len(cands) > 4 else ''}): give more digits")
    lo, hi = cands.pop()
    data = trace.content(lo, hi)
    if data is None:
        data = bytes(trace.page_size)  # only the zero page gets here
    return lo, hi, data


def hexdump(data: bytes, width: int = 16) -> list[str]:
    """Lines like ``xxd`` (offset, 2-byte groups, ASCII); a run of identical lines is one ``*``
    (as ``hexdump`` does), and the last line is the length."""
    out: list[str] = []
    prev: bytes | None = None
    starred = False
    for off in range(0, len(data), width):
        row = data[off:off + width]
        if row == prev:
            if not starred:
                out.append("*")
                starred = True
            continue
        prev, starred = row, False
        groups = " ".join(row[i:i + 2].hex() for i in range(0, len(row), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.append(f"{off:08x}: {groups.ljust(width * 5 // 2 - 1)}  {text}")
    out.append(f"{len(data):08x}")
    return out


def show_page(path: str | os.PathLike[str], spec: str) -> str:
    """The text --show-page prints: a header line and the hex dump."""
    with open_trace(path) as tr:
        lo, hi, data = find_content(tr, spec)
    zero = " (the zero page)" if (lo, hi) == ZERO_HASH else ""
    head = f"content {hash_hex(lo, hi)}{zero}: {len(data)} bytes"
    return "\n".join([head, *hexdump(data)]) + "\n"
