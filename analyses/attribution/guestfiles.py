"""Guest paths, and the guest's files as found on the host under ``--guest-root``."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memtrace.analyses.attribution.elf import ElfLayout
from memtrace.traces.pagehash import ZERO_HASH, page_hash

# Section labels when a file's section cannot be known.
NO_ROOT = "(no --guest-root)"
NOT_ON_HOST = "(not in guest root)"
NOT_ELF = "(not ELF)"
NO_PATH = "(path unknown)"

MAX_INDEXED_FILE = 256 << 20  # host files larger than this are not indexed by content


def clean_path(path: str | None) -> str | None:
    """A guest path as the kernel reports it, without the " (deleted)" the kernel appends."""
    if path is None:
        return None
    return path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path


def is_file_path(path: str | None) -> bool:
    """True for a real file path; False for none and for kernel names such as [heap]."""
    return bool(path) and not path.startswith("[")


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
