"""The writer's own promises: defaults of its record helpers, the index of an empty trace and of
a full one, and ``update_header`` (trace-record fills in the workload's exit status at the end
by rewriting the header in place, at the same length)."""

from __future__ import annotations

import json

import numpy as np

from memtrace.traces.format import FILE_HEADER, NO_STRING, TRAILER, ChunkType, Kind, VmaOp
from memtrace.traces.reader import open_trace
from memtrace.traces.writer import HEADER_RESERVE, TraceWriter, update_header


def test_vma_defaults_are_zero_and_no_path(tmp_path):
    """A VMA written with only its span has no flags, offset, file or path (a default of
    VM_READ would make every anonymous VMA readable in the analyses)."""
    p = tmp_path / "v.mtr"
    with TraceWriter(p, {"ram_size": 1 << 20}) as w:
        w.vma(VmaOp.MAP, 7, 0xA000, 0x1000, 0x3000)
    (c,) = open_trace(p).iter_chunks()
    (r,) = c.records(Kind.VMA).tolist()
    assert r == (VmaOp.MAP, 7, 0xA000, 0x1000, 0x3000, 0, 0, 0, 0, NO_STRING)


def test_empty_trace_has_an_index(tmp_path):
    """A writer closed before any record still leaves a trace that reads cleanly (an empty
    index, t_last 0), not a file cut short."""
    p = tmp_path / "e.mtr"
    TraceWriter(p, {"ram_size": 1 << 20}).close()
    tr = open_trace(p)
    assert tr.complete_index and not tr.truncated and tr.warnings == []
    assert tr.chunks_all == [] and tr.t_end == 0


def test_index_chunk_spans_the_trace(tmp_path):
    """The index chunk's header carries t_first 0 and the latest t_last of the chunks it lists,
    as tracer/trace_writer.c writes it."""
    p = tmp_path / "i.mtr"
    with TraceWriter(p, {"ram_size": 1 << 20}) as w:
        for t in (10, 20, 30):
            w.time(t, 0)
            w.page(np.array([1]), np.array([t]), np.array([0]))
            w.flush()
    tr = open_trace(p)
    assert [(c.t_first, c.t_last) for c in tr.chunks] == [(0, 10), (10, 20), (20, 30)]
    _, index_offset, _, _ = TRAILER.unpack(p.read_bytes()[-TRAILER.size:])
    info = tr._chunk_at(index_offset)
    assert info is not None and info.type == ChunkType.INDEX
    assert (info.t_first, info.t_last, info.seq) == (0, 30, 0)


def header_of(p) -> tuple[int, bytes]:
    raw = p.read_bytes()
    hlen = FILE_HEADER.unpack_from(raw, 0)[3]
    return hlen, raw[FILE_HEADER.size:FILE_HEADER.size + hlen]


def written(tmp_path, header: dict) -> tuple:
    p = tmp_path / "h.mtr"
    with TraceWriter(p, {"ram_size": 1 << 20, **header}) as w:
        w.time(5, 0)
        w.page(np.array([2]), np.array([9]), np.array([9]))
    return p, p.read_bytes()


def test_update_header_uses_the_reserve(tmp_path):
    """With room under header_reserve the new keys go in, the reserve shrinks by exactly what
    they take, the header keeps its length and the chunks after it are untouched."""
    p, before = written(tmp_path, {"workload": {"run": "true"}, HEADER_RESERVE: " " * 64})
    hlen, _ = header_of(p)
    assert update_header(p, {"workload": {"run": "true", "exit_status": 0}})
    hlen2, body = header_of(p)
    header = json.loads(body)
    assert hlen2 == hlen and header["workload"] == {"run": "true", "exit_status": 0}
    # '"exit_status": 0' and ', ' take 18 bytes of the 64
    assert header[HEADER_RESERVE] == " " * (64 - len(', "exit_status": 0'))
    assert p.read_bytes()[FILE_HEADER.size + hlen:] == before[FILE_HEADER.size + hlen:]
    tr = open_trace(p)
    assert tr.complete_index and tr.chunks[0].t_last == 5


def test_update_header_small_room_pads_with_spaces(tmp_path):
    """Room too small for a header_reserve key: the reserve goes and the JSON is padded with
    trailing spaces (valid JSON) to the old length."""
    p, _ = written(tmp_path, {"workload": {"run": "true"}, HEADER_RESERVE: " " * 20})
    hlen, _ = header_of(p)
    # ', "header_reserve": "' + 20 spaces + '"' is 42 bytes; '"exit_status": 1234567890123456, '
    # takes 33 of them: 9 are left, fewer than the 22 an empty reserve key needs
    assert update_header(p, {"workload": {"run": "true", "exit_status": 1234567890123456}})
    hlen2, body = header_of(p)
    assert hlen2 == hlen and body.endswith(b"}}" + b" " * 9)
    header = json.loads(body)
    assert HEADER_RESERVE not in header and header["workload"]["exit_status"] == 1234567890123456
    assert open_trace(p).header == header


def test_update_header_without_room_changes_nothing(tmp_path):
    p, before = written(tmp_path, {"workload": {"run": "true"}})
    assert not update_header(p, {"workload": {"run": "true", "exit_status": 0}})
    assert p.read_bytes() == before
