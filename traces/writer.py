"""Write trace files (FORMAT.md): buffered records, one zstd frame per chunk, index at close.

A chunk is written whole with one ``write`` call, so a reader (or a crash) only ever sees complete
chunks followed by at most one partial one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np
import zstandard

from memtrace.traces.format import (
    BLOCK_HEADER,
    CHUNK_FLAG_CHECKPOINT,
    CHUNK_HEADER,
    CHUNK_HEADER_CRC_SPAN,
    CHUNK_MAGIC,
    DTYPES,
    FILE_HEADER,
    FILE_MAGIC,
    FORMAT_VERSION,
    INDEX_ENTRY,
    NO_STRING,
    TRAILER,
    TRAILER_MAGIC,
    ChunkType,
    Kind,
    MarkOp,
    pad8,
)
from memtrace.traces.private import create_private, make_private

DEFAULT_CHUNK_BYTES = 4 << 20


def encode_header(header: dict[str, Any]) -> bytes:
    """The file header: magic, version and the JSON object, padded to 8 bytes."""
    body = json.dumps(header, sort_keys=True).encode()
    raw = FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(body)) + body
    return raw + b"\0" * (pad8(len(raw)) - len(raw))


def encode_chunk(ctype: int, raw: bytes, t_first: int, t_last: int, seq: int, flags: int = 0,
                 cctx: zstandard.ZstdCompressor | None = None) -> bytes:
    """One chunk: header, a zstd frame of ``raw``, zero padding."""
    payload = (cctx or zstandard.ZstdCompressor(level=3)).compress(raw)
    head = CHUNK_HEADER.pack(CHUNK_MAGIC, ctype, flags, len(payload), len(raw), t_first, t_last,
                             seq, zlib.crc32(payload), 0)
    span = head[:CHUNK_HEADER_CRC_SPAN]
    head = span + struct.pack("<I", zlib.crc32(span))
    pad = pad8(len(payload)) - len(payload)
    return head + payload + b"\0" * pad


class BlockBuffer:
    """Records in trace order, grouped into runs of one kind (the blocks of a chunk)."""

    def __init__(self) -> None:
        self.runs: list[tuple[Kind, list[np.ndarray]]] = []
        self.strings: dict[str, int] = {}
        self.nbytes = 0
        self.nrecords = 0

    def string(self, s: str | None) -> int:
        if s is None:
            return NO_STRING
        sid = self.strings.get(s)
        if sid is None:
            sid = self.strings[s] = len(self.strings)
        return sid

    def add(self, kind: Kind, arr: np.ndarray) -> None:
        if len(arr) == 0:
            return
        if self.runs and self.runs[-1][0] == kind:
            self.runs[-1][1].append(arr)
        else:
            self.runs.append((kind, [arr]))
        self.nbytes += arr.nbytes
        self.nrecords += len(arr)

    def encode(self) -> bytes:
        parts: list[bytes] = []
        if self.strings:
            table = b"".join(s.encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"
                             for s in self.strings)
            parts.append(BLOCK_HEADER.pack(Kind.STRINGS, 1, len(table)))
            parts.append(table + b"\0" * (pad8(len(table)) - len(table)))
        for kind, arrs in self.runs:
            dt = DTYPES[kind]
            count = sum(len(a) for a in arrs)
            parts.append(BLOCK_HEADER.pack(kind, dt.itemsize, count))
            parts.extend(np.ascontiguousarray(a, dtype=dt).tobytes() for a in arrs)
        return b"".join(parts)


def records(kind: Kind, **fields: Any) -> np.ndarray:
    """Build an array of records of ``kind`` from field values (scalars or equal-length arrays)."""
    n = max((np.size(v) for v in fields.values()), default=1)
    arr = np.zeros(n, dtype=DTYPES[kind])
    for name, value in fields.items():
        arr[name] = value
    return arr


class TraceWriter:
    """Append records to a new trace file.

    Records go into the current chunk; the chunk is compressed and written when it holds about
    ``chunk_bytes`` raw bytes, at ``flush()``, and at ``close()``, which also writes the index.
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, level: int = 3,
                 private: bool = False) -> None:
        """``private``: the trace will hold page contents; create it 0600 from the start
        (``memtrace.traces.private``). A trace given contents later is narrowed to 0600 before
        the first one is written."""
        self.path = os.fspath(path)
        self.header = {"format_version": FORMAT_VERSION, "page_size": 4096, "hash": "xxh3_128",
                       "clock_unit": "instructions", **header}
        self.chunk_bytes = chunk_bytes
        self._cctx = zstandard.ZstdCompressor(level=level)
        self.private = private
        fd = create_private(self.path) if private else os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._f: BinaryIO = os.fdopen(fd, "wb")
        self._f.write(encode_header(self.header))
        self._index: list[tuple[int, int, int, int, int, int]] = []
        self._buf = BlockBuffer()
        self._seq = 0
        self._t = 0
        self._t_chunk_start = 0
        self._contents: set[tuple[int, int]] = set()
        self._pending_content: list[tuple[int, int, bytes]] = []
        self.closed = False

    # -- records ------------------------------------------------------------------------------
    @property
    def now(self) -> int:
        return self._t

    def add(self, kind: Kind, arr: np.ndarray) -> None:
        """Append an array of records of one kind (its dtype must be ``DTYPES[kind]``)."""
        self._buf.add(kind, arr)
        if self._buf.nbytes >= self.chunk_bytes:
            self.flush()

    def string(self, s: str | None) -> int:
        """Id of ``s`` in the current chunk's string table (use it at once: ids are per chunk)."""
        return self._buf.string(s)

    def time(self, t: int, epoch: int = 0) -> None:
        if t < self._t:
            raise ValueError(f"time goes backwards: {t} < {self._t}")
        self._t = t
        self.add(Kind.TIME, records(Kind.TIME, t=t, epoch=epoch))

    def page(self, frame: Any, hash_lo: Any, hash_hi: Any) -> None:
        self.add(Kind.PAGE, records(Kind.PAGE, frame=frame, hash_lo=hash_lo, hash_hi=hash_hi))

    def write(self, paddr: Any, size: Any, value: Any) -> None:
        addr = np.asarray(paddr, dtype=np.uint64) | (np.asarray(size, dtype=np.uint64) << 56)
        self.add(Kind.WRITE, records(Kind.WRITE, addr=addr, value=value))

    def task(self, op: int, pid: int, tgid: int, ppid: int = 0, mm: int = 0, pgd: int = 0,
             name: str | None = None, flags: int = 0) -> None:
        rec = records(Kind.TASK, op=op, pid=pid, tgid=tgid, ppid=ppid, mm=mm, pgd=pgd, flags=flags)
        rec["name"] = self.string(name)
        self.add(Kind.TASK, rec)

    def vma(self, op: int, pid: int, mm: int, start: int, end: int, vm_flags: int = 0,
            pgoff: int = 0, ino: int = 0, dev: int = 0, path: str | None = None) -> None:
        rec = records(Kind.VMA, op=op, pid=pid, mm=mm, start=start, end=end, vm_flags=vm_flags,
                      pgoff=pgoff, ino=ino, dev=dev)
        rec["path"] = self.string(path)
        self.add(Kind.VMA, rec)

    def pagecache(self, op: Any, dev: Any, ino: Any, index: Any, frame: Any) -> None:
        self.add(Kind.PAGECACHE, records(Kind.PAGECACHE, op=op, dev=dev, ino=ino, index=index,
                                         frame=frame))

    def map(self, mm: Any, vpn: Any, frame: Any, flags: Any) -> None:
        self.add(Kind.MAP, records(Kind.MAP, mm=mm, vpn=vpn, frame=frame, flags=flags))

    def mark(self, op: int, name: str | None = None, arg: int = 0) -> None:
        rec = records(Kind.MARK, op=op, arg=arg)
        rec["name"] = self.string(name)
        self.add(Kind.MARK, rec)

    def lost(self, source: int, count: int) -> None:
        self.add(Kind.LOST, records(Kind.LOST, source=source, count=count))

    def counter(self, name: str, value: int) -> None:
        rec = records(Kind.COUNTER, value=value)
        rec["name"] = self.string(name)
        self.add(Kind.COUNTER, rec)

    def content(self, hash_lo: int, hash_hi: int, data: bytes) -> None:
        """Store a page's bytes in the content store (once per distinct content)."""
        key = (int(hash_lo), int(hash_hi))
        if key in self._contents:
            return
        if not self.private:
            make_private(self._f.fileno())  # page bytes are the owner's alone
            self.private = True
        self._contents.add(key)
        self._pending_content.append((key[0], key[1], bytes(data)))
        if len(self._pending_content) * 4096 >= self.chunk_bytes:
            self._flush_content()

    # -- chunks -------------------------------------------------------------------------------
    def _emit(self, ctype: int, raw: bytes, t_first: int, t_last: int, seq: int,
              flags: int = 0) -> None:
        offset = self._f.tell()
        self._f.write(encode_chunk(ctype, raw, t_first, t_last, seq, flags, self._cctx))
        self._f.flush()
        self._index.append((offset, t_first, t_last, seq, ctype, flags))

    def flush(self) -> None:
        """Write the current chunk (if it holds anything)."""
        if self._buf.nrecords == 0:
            return
        self._emit(ChunkType.RECORDS, self._buf.encode(), self._t_chunk_start, self._t, self._seq)
        self._seq += 1
        self._buf = BlockBuffer()
        self._t_chunk_start = self._t

    def _flush_content(self) -> None:
        if not self._pending_content:
            return
        n = len(self._pending_content)
        hashes = np.array([(lo, hi) for lo, hi, _ in self._pending_content], dtype="<u8")
        raw = struct.pack("<Q", n) + hashes.tobytes() + b"".join(d for *_, d in
                                                                 self._pending_content)
        self._emit(ChunkType.CONTENT, raw, self._t, self._t, self._seq)
        self._pending_content = []

    def checkpoint(self, after_seq: int, t: int, blocks: BlockBuffer) -> None:
        """Write a checkpoint chunk: the full state as it stands after chunk ``after_seq``."""
        self.flush()
        self._emit(ChunkType.RECORDS, blocks.encode(), t, t, after_seq, CHUNK_FLAG_CHECKPOINT)

    def close(self) -> None:
        """Flush, then write the index chunk and the trailer."""
        if self.closed:
            return
        self.flush()
        self._flush_content()
        write_index(self._f, self._index)
        self._f.close()
        self.closed = True

    def abort(self, reason: str) -> None:
        """Close after a failure: mark the trace incomplete, keep what was recorded."""
        if not self.closed:
            self.mark(MarkOp.INCOMPLETE, reason)
            self.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(f"writer stopped by {type(exc).__name__}")


def write_index(f: BinaryIO, entries: Iterable[tuple[int, int, int, int, int, int]]) -> None:
    """Append the index chunk and the trailer at the current position of ``f``."""
    arr = np.zeros(0, dtype=INDEX_ENTRY)
    rows = list(entries)
    if rows:
        arr = np.zeros(len(rows), dtype=INDEX_ENTRY)
        for i, (offset, t_first, t_last, seq, ctype, flags) in enumerate(rows):
            arr[i] = (offset, t_first, t_last, seq, ctype, flags, 0)
    offset = f.tell()
    t_last = max((r[2] for r in rows), default=0)
    f.write(encode_chunk(ChunkType.INDEX, arr.tobytes(), 0, t_last, 0))
    head = struct.pack("<8sQ", TRAILER_MAGIC, offset)
    f.write(TRAILER.pack(TRAILER_MAGIC, offset, zlib.crc32(head), 0))
    f.flush()


def append_chunks(path: str | os.PathLike[str],
                  chunks: Iterable[tuple[bytes, int, int, int, int]]) -> None:
    """Append records chunks ``(raw, t_first, t_last, seq, flags)`` to an existing trace and
    write a fresh index and trailer.

    Works on cleanly closed traces (the old index is replaced) and on traces cut short (the
    incomplete tail, which no reader can use, is dropped first).
    """
    from memtrace.traces.reader import open_trace  # the reader knows where the valid chunks end

    tr = open_trace(path)
    entries = [(c.offset, c.t_first, c.t_last, c.seq, c.type, c.flags) for c in tr.chunks_all]
    end = max((c.end for c in tr.chunks_all), default=tr.data_offset)
    tr.close()
    with open(path, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        for raw, t_first, t_last, seq, flags in chunks:
            off = f.tell()
            f.write(encode_chunk(ChunkType.RECORDS, raw, t_first, t_last, seq, flags))
            entries.append((off, t_first, t_last, seq, ChunkType.RECORDS, flags))
        write_index(f, entries)
        f.flush()
        os.fsync(f.fileno())


def mark_incomplete(path: str | os.PathLike[str], reason: str) -> None:
    """Append a MARK INCOMPLETE record (with the reason) to a trace a recorder had to stop."""
    from memtrace.traces.reader import open_trace

    tr = open_trace(path)
    t = tr.t_end
    seq = (tr.chunks[-1].seq + 1) if tr.chunks else 0
    tr.close()
    b = BlockBuffer()
    b.add(Kind.MARK, records(Kind.MARK, op=MarkOp.INCOMPLETE, name=b.string(reason)))
    append_chunks(path, [(b.encode(), t, t, seq, 0)])


HEADER_RESERVE = "header_reserve"


def update_header(path: str | os.PathLike[str], changes: dict[str, Any]) -> bool:
    """Set top-level header keys of a finished trace in place, for facts a recorder learns only
    at the end (trace-record: the workload's exit status). The file's layout cannot move, so
    the new JSON must fit in the old header's length: a recorder leaves room with a string of
    spaces under ``header_reserve``, which this shrinks (or drops) to make the new header
    exactly as long as the old one. Returns False, changing nothing, when it does not fit."""
    with open(path, "r+b") as f:
        raw = f.read(FILE_HEADER.size)
        if len(raw) < FILE_HEADER.size or raw[:8] != FILE_MAGIC:
            return False
        hlen = FILE_HEADER.unpack(raw)[3]
        header = json.loads(f.read(hlen).decode())
        header.update(changes)
        header.pop(HEADER_RESERVE, None)
        body = json.dumps(header, sort_keys=True).encode()
        room = hlen - len(body)
        if room < 0:
            return False
        if room >= len(b', "": ""') + len(HEADER_RESERVE):
            header[HEADER_RESERVE] = ""
            body = json.dumps(header, sort_keys=True).encode()
            header[HEADER_RESERVE] = " " * (hlen - len(body))
            body = json.dumps(header, sort_keys=True).encode()
        else:
            body += b" " * room  # JSON allows trailing whitespace
        assert len(body) == hlen
        f.seek(FILE_HEADER.size)
        f.write(body)
    return True
