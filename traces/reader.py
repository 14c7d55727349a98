"""Read trace files (FORMAT.md) lazily: chunk headers first, a chunk's records when asked for.

Every problem with the file is raised as ``TraceError`` carrying the path and byte offset, so that
command-line tools can print one line. A file cut short is not an error: the reader stops at the
last complete chunk and records a warning in ``Trace.warnings``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
    pad8,
)
from memtrace.traces.timebase import (
    Phase,
    TimeBase,
    TraceMeta,
    phases_of,
    read_time_base,
    scan_meta,
)

MAX_RAW_CHUNK = 1 << 31


class TraceError(Exception):
    """A trace cannot be read: ``str()`` is one line naming the file and the byte offset."""

    def __init__(self, path: str, offset: int | None, what: str, hint: str = "") -> None:
        self.path, self.offset, self.what, self.hint = path, offset, what, hint
        where = f"{path}" if offset is None else f"{path} at byte {offset}"
        super().__init__(f"{where}: {what}" + (f" ({hint})" if hint else ""))


@dataclass(frozen=True)
class ChunkInfo:
    offset: int
    type: int
    flags: int
    payload_len: int
    raw_len: int
    t_first: int
    t_last: int
    seq: int
    payload_crc: int

    @property
    def checkpoint(self) -> bool:
        return bool(self.flags & CHUNK_FLAG_CHECKPOINT)

    @property
    def end(self) -> int:
        return self.offset + CHUNK_HEADER.size + pad8(self.payload_len)


@dataclass
class Chunk:
    """A decoded records chunk: its string table and its blocks, in trace order."""

    info: ChunkInfo
    strings: list[str]
    blocks: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def string(self, sid: int) -> str | None:
        if sid == NO_STRING or sid >= len(self.strings):
            return None
        return self.strings[sid]

    def records(self, kind: Kind) -> np.ndarray:
        """All records of one kind in this chunk, concatenated (order within the kind kept)."""
        arrs = [a for k, a in self.blocks if k == kind]
        if not arrs:
            return np.zeros(0, dtype=DTYPES[kind])
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    def write_vcpus(self) -> np.ndarray:
        """The vCPU of each WRITE record of this chunk, in the order of ``records(WRITE)``
        (FORMAT.md, VCPU: records before the chunk's first VCPU record are vCPU 0's)."""
        parts, vcpu = [], 0
        for k, a in self.blocks:
            if k == Kind.VCPU and len(a):
                vcpu = int(a["vcpu"][-1])
            elif k == Kind.WRITE:
                parts.append(np.full(len(a), vcpu, dtype=np.uint32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


class Trace:
    """An open trace file. Use ``open_trace``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.truncated = False
        self.complete_index = False
        try:
            self._fd = open(path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise TraceError(path, None, "no such file",
                             "give the path of a trace recorded by trace-record") from None
        except IsADirectoryError:
            raise TraceError(path, None, "is a directory, not a trace file") from None
        except OSError as e:
            raise TraceError(path, None, f"cannot open: {e.strerror}") from None
        self.size = os.fstat(self._fd.fileno()).st_size
        self._dctx = zstandard.ZstdDecompressor()
        self.header, self.data_offset = self._read_header()
        self.page_size = int(self.header.get("page_size", 4096))
        self.ram_size = int(self.header.get("ram_size", 0))
        self.clock_unit = str(self.header.get("clock_unit", "instructions"))
        self.chunks_all = self._read_index() or self._scan()
        self.chunks = [c for c in self.chunks_all if c.type == ChunkType.RECORDS
                       and not c.checkpoint]
        self.checkpoints = [c for c in self.chunks_all if c.type == ChunkType.RECORDS
                            and c.checkpoint]
        self.content_chunks = [c for c in self.chunks_all if c.type == ChunkType.CONTENT]
        self._content_index: dict[tuple[int, int], tuple[ChunkInfo, int]] | None = None

    # -- structure ------------------------------------------------------------------------------
    def _read_header(self) -> tuple[dict[str, Any], int]:
        m = self._read(0, FILE_HEADER.size)
        if self.size < FILE_HEADER.size or m[:8] != FILE_MAGIC:
            raise TraceError(self.path, 0, "not a memory trace (no MEMTRACE magic)",
                             "expected a file written by trace-record, trace-snapshot or a "
                             "generator in traces/")
        _, version, _flags, hlen = FILE_HEADER.unpack_from(m, 0)
        if version > FORMAT_VERSION:
            raise TraceError(self.path, 8, f"format version {version} is newer than this reader's "
                             f"version {FORMAT_VERSION}", "upgrade memtrace to read it")
        if version < 1:
            raise TraceError(self.path, 8, f"invalid format version {version}")
        end = FILE_HEADER.size + hlen
        if end > self.size:
            raise TraceError(self.path, FILE_HEADER.size, "file header cut short")
        try:
            header = json.loads(self._read(FILE_HEADER.size, hlen).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceError(self.path, FILE_HEADER.size,
                             f"file header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise TraceError(self.path, FILE_HEADER.size, "file header is not a JSON object")
        ps = header.get("page_size", 4096)
        if not isinstance(ps, int) or ps <= 0 or ps & (ps - 1):
            raise TraceError(self.path, FILE_HEADER.size, f"invalid page_size {ps!r}")
        rs = header.get("ram_size", 0)
        if not isinstance(rs, int) or rs < 0 or rs > 1 << 42:
            raise TraceError(self.path, FILE_HEADER.size, f"invalid ram_size {rs!r}")
        return header, pad8(end)

    def _chunk_at(self, offset: int) -> ChunkInfo | None:
        """Parse the chunk header at ``offset``; None if the file ends inside the chunk."""
        if offset + CHUNK_HEADER.size > self.size:
            return None
        raw = self._read(offset, CHUNK_HEADER.size)
        (magic, ctype, flags, plen, rawlen, t0, t1, seq, pcrc, hcrc) = CHUNK_HEADER.unpack(raw)
        if magic != CHUNK_MAGIC:
            raise TraceError(self.path, offset, "corrupt chunk: bad magic",
                             "use --salvage to analyze the chunks before it")
        if zlib.crc32(raw[:CHUNK_HEADER_CRC_SPAN]) != hcrc:
            raise TraceError(self.path, offset, "corrupt chunk: header checksum mismatch",
                             "use --salvage to analyze the chunks before it")
        info = ChunkInfo(offset, ctype, flags, plen, rawlen, t0, t1, seq, pcrc)
        if offset + CHUNK_HEADER.size + plen > self.size:
            return None
        return info

    def _read_index(self) -> list[ChunkInfo] | None:
        if self.size < self.data_offset + TRAILER.size:
            return None
        tail = self._read(self.size - TRAILER.size, TRAILER.size)
        magic, index_offset, crc, _ = TRAILER.unpack(tail)
        if magic != TRAILER_MAGIC or zlib.crc32(tail[:16]) != crc:
            return None
        try:
            info = self._chunk_at(index_offset)
            if info is None or info.type != ChunkType.INDEX:
                return None
            entries = np.frombuffer(self._payload(info), dtype=INDEX_ENTRY)
            chunks = []
            for e in entries:
                c = self._chunk_at(int(e["offset"]))
                if c is None:
                    return None
                chunks.append(c)
        except TraceError:
            return None  # fall back to scanning, which reports the problem precisely
        self.complete_index = True
        return chunks

    def _scan(self) -> list[ChunkInfo]:
        chunks: list[ChunkInfo] = []
        offset = self.data_offset
        while offset < self.size:
            if self.size - offset == TRAILER.size and \
                    self._read(offset, 8) == TRAILER_MAGIC:
                break
            info = self._chunk_at(offset)
            if info is None:
                self.truncated = True
                recs = [c for c in chunks if c.type == ChunkType.RECORDS and not c.checkpoint]
                self.warnings.append(
                    f"{self.path}: trace cut short at byte {offset} of {self.size}; reading the "
                    f"{len(recs)} complete chunks before it"
                    + (f" (up to time {recs[-1].t_last})" if recs else ""))
                break
            if info.type == ChunkType.INDEX:
                offset = info.end
                continue
            chunks.append(info)
            offset = info.end
        return chunks

    def _read(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` (fewer at the end of the file).

        Read, not mapped: the pages of a file mapping stay in the process once touched (the
        kernel also maps up to 64 KB around each page it faults in), so a replay's resident size
        grew with the trace: by all of it when payloads were sliced from a mapping (1 GB for 50 M
        page updates), by 64 KB per chunk header read. A read copies the same bytes and leaves
        them in the page cache only."""
        return os.pread(self._fd.fileno(), n, offset)

    def _payload(self, info: ChunkInfo) -> bytes:
        start = info.offset + CHUNK_HEADER.size
        payload = self._read(start, info.payload_len)
        if zlib.crc32(payload) != info.payload_crc:
            raise TraceError(self.path, info.offset, "corrupt chunk: payload checksum mismatch",
                             "use --salvage to analyze the chunks before it")
        if info.raw_len > MAX_RAW_CHUNK:
            raise TraceError(self.path, info.offset, f"chunk claims {info.raw_len} raw bytes")
        try:
            raw = self._dctx.decompress(payload, max_output_size=info.raw_len)
        except zstandard.ZstdError as e:
            raise TraceError(self.path, info.offset, f"corrupt chunk: zstd: {e}") from None
        if len(raw) != info.raw_len:
            raise TraceError(self.path, info.offset, "corrupt chunk: wrong decompressed length")
        return raw

    # -- records --------------------------------------------------------------------------------
    def read_chunk(self, info: ChunkInfo) -> Chunk:
        """Decompress and decode one records chunk."""
        raw = self._payload(info)
        chunk = Chunk(info, [])
        pos, n = 0, len(raw)
        while pos < n:
            if pos + BLOCK_HEADER.size > n:
                raise TraceError(self.path, info.offset, "corrupt chunk: block header cut short")
            kind, size, count = BLOCK_HEADER.unpack_from(raw, pos)
            pos += BLOCK_HEADER.size
            nbytes = size * count
            if size == 0 or pos + nbytes > n:
                raise TraceError(self.path, info.offset,
                                 f"corrupt chunk: block of kind {kind} overruns the chunk")
            if kind == Kind.STRINGS:
                table = raw[pos:pos + nbytes]
                chunk.strings = [s.decode("utf-8", "replace") for s in table.split(b"\0")[:-1]]
            elif (dt := DTYPES.get(kind)) is not None:
                if size != dt.itemsize:
                    raise TraceError(self.path, info.offset,
                                     f"corrupt chunk: kind {kind} record size {size}, "
                                     f"expected {dt.itemsize}")
                chunk.blocks.append((kind, np.frombuffer(raw, dtype=dt, count=count, offset=pos)))
            pos += pad8(nbytes)
        return chunk

    def iter_chunks(self, start_seq: int = 0, salvage: bool = False) -> Iterator[Chunk]:
        """Decoded records chunks in order, from the chunk with sequence ``start_seq`` on.

        With ``salvage``, a corrupt chunk ends the iteration with a warning instead of raising.
        """
        for info in self.chunks:
            if info.seq < start_seq:
                continue
            try:
                yield self.read_chunk(info)
            except TraceError as e:
                if not salvage:
                    raise
                self.warnings.append(f"{e}; analysis stops before it")
                return

    @property
    def t_begin(self) -> int:
        """Time of the first TIME record (a recorded trace's clock does not start at 0: the
        boot before the start marker is not traced)."""
        if not hasattr(self, "_t_begin"):
            self._t_begin = self.chunks[0].t_first if self.chunks else 0
            if self.chunks:
                try:
                    for kind, rec in self.read_chunk(self.chunks[0]).blocks:
                        if kind == Kind.TIME and len(rec):
                            self._t_begin = int(rec["t"][0])
                            break
                except TraceError:
                    pass  # reported when the chunk is replayed
        return self._t_begin

    @property
    def t_end(self) -> int:
        return self.chunks[-1].t_last if self.chunks else 0

    def _meta(self) -> TraceMeta:
        if not hasattr(self, "_meta_pass"):
            self._meta_pass = scan_meta(self)
        return self._meta_pass

    def time_base(self) -> TimeBase:
        """The trace's time base (``memtrace.traces.timebase``): computed on first use (one pass
        over the chunks, shared with ``phases``), then kept."""
        if not hasattr(self, "_time_base"):
            self._time_base = read_time_base(self, self._meta())
        return self._time_base

    def clock_hz_counter(self) -> int | None:
        """The recorder's ``tracer.clock_hz`` counter, if the trace has one."""
        return self._meta().counter_hz

    def phases(self) -> list[Phase]:
        """The phases the workload marked (MARK PHASE), with their spans in trace time."""
        return phases_of(self._meta(), self.t_end)

    # -- content store --------------------------------------------------------------------------
    def content(self, hash_lo: int, hash_hi: int) -> bytes | None:
        """The page bytes stored for a content hash, or None if the trace did not store it."""
        if self._content_index is None:
            self._content_index = {}
            for info in self.content_chunks:
                raw = self._payload(info)
                (n,) = struct.unpack_from("<Q", raw, 0)
                hashes = np.frombuffer(raw, dtype="<u8", count=2 * n, offset=8).reshape(n, 2)
                for i, (lo, hi) in enumerate(hashes.tolist()):
                    self._content_index[(lo, hi)] = (info, i)
        hit = self._content_index.get((int(hash_lo), int(hash_hi)))
        if hit is None:
            return None
        info, i = hit
        raw = self._payload(info)
        (n,) = struct.unpack_from("<Q", raw, 0)
        start = 8 + 16 * n + i * self.page_size
        return bytes(raw[start:start + self.page_size])

    def close(self) -> None:
        self._fd.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open a trace; raises ``TraceError`` (one line, with offset) when it cannot be read."""
    return Trace(os.fspath(path))


def follow(path: str | os.PathLike[str], offset: int = 0) -> tuple[int, int, int]:
    """Scan complete chunk headers of a trace that is being written, from ``offset`` (0: start).

    Returns ``(next_offset, t_last, chunks)``: where to continue next time, the latest time seen
    and how many records chunks were found. Cheap: reads only chunk headers.
    """
    t_last, n = 0, 0
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset == 0:
                head = f.read(FILE_HEADER.size)
                if len(head) < FILE_HEADER.size or head[:8] != FILE_MAGIC:
                    return 0, 0, 0
                offset = pad8(FILE_HEADER.size + FILE_HEADER.unpack(head)[3])
            while offset + CHUNK_HEADER.size <= size:
                f.seek(offset)
                raw = f.read(CHUNK_HEADER.size)
                (magic, ctype, flags, plen, _raw, _t0, t1, _seq, _pc, hcrc) = \
                    CHUNK_HEADER.unpack(raw)
                if magic != CHUNK_MAGIC or zlib.crc32(raw[:CHUNK_HEADER_CRC_SPAN]) != hcrc:
                    break
                if offset + CHUNK_HEADER.size + plen > size:
                    break
                if ctype == ChunkType.RECORDS and not flags & CHUNK_FLAG_CHECKPOINT:
                    t_last, n = t1, n + 1
                offset += CHUNK_HEADER.size + pad8(plen)
    except FileNotFoundError:
        return offset, 0, 0
    return offset, t_last, n
