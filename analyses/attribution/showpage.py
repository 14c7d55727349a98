"""``trace-analyze --show-page HASH``: a content from the trace's content store as a hex dump."""

from __future__ import annotations

import os
import string
import struct

import numpy as np

from memtrace.traces.pagehash import ZERO_HASH
from memtrace.traces.reader import Trace, open_trace


def hash_hex(lo: int, hi: int) -> str:
    """A content hash as --top prints it and --show-page reads it: hash_hi << 64 | hash_lo."""
    return f"{hi:016x}{lo:016x}"


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
