"""The PT_LOAD segments and sections of an ELF file, and which of them a page falls in."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Section labels when no section holds the page.
NO_SECTION = "(no section)"
PAST_EOF = "(past end of file)"


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
