"""The reader: round trip, truncation at every byte, corruption, bad input."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import pytest

from memtrace.analyses.engine import Replay
from memtrace.traces.format import (
    CHUNK_FLAG_CHECKPOINT,
    CHUNK_HEADER,
    CHUNK_HEADER_CRC_SPAN,
    FORMAT_VERSION,
    ChunkType,
    Kind,
    TaskOp,
)
from memtrace.traces.reader import TraceError, follow, open_trace
from memtrace.traces.synthetic import generate
from memtrace.traces.writer import TraceWriter


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("s") / "syn.mtr"
    generate(p, instances=2, epochs=60)
    return p


def test_round_trip(tmp_path):
    p = tmp_path / "r.mtr"
    with TraceWriter(p, {"ram_size": 1 << 20, "scenario": {"name": "x"}}) as w:
        w.time(5, 1)
        w.page(np.arange(4), np.arange(4) + 10, np.arange(4) + 20)
        w.write([0x1000, 0x2003], [8, 1], [0x1122334455667788, 0xFF])
        w.task(TaskOp.EXEC, 3, 3, 1, 0xABC, 0x5000, "/bin/true")
        w.counter("ksm.pages_sharing", 42)
        w.content(1, 2, b"x" * 4096)
    tr = open_trace(p)
    assert tr.header["scenario"] == {"name": "x"} and tr.complete_index
    (c,) = list(tr.iter_chunks())
    assert [k for k, _ in c.blocks] == [Kind.TIME, Kind.PAGE, Kind.WRITE, Kind.TASK, Kind.COUNTER]
    assert c.records(Kind.PAGE)["hash_hi"].tolist() == [20, 21, 22, 23]
    wr = c.records(Kind.WRITE)
    assert (wr["addr"] >> np.uint64(56)).tolist() == [8, 1]
    assert c.string(c.records(Kind.TASK)["name"][0]) == "/bin/true"
    assert c.string(c.records(Kind.COUNTER)["name"][0]) == "ksm.pages_sharing"
    assert tr.content(1, 2) == b"x" * 4096 and tr.content(3, 4) is None


def test_truncation_at_every_chunk_boundary_region(sample, tmp_path):
    data = sample.read_bytes()
    full = Replay(open_trace(sample), progress=False).run().figures()
    header_end = open_trace(sample).data_offset
    cut_points = sorted(set(range(0, len(data), max(1, len(data) // 150))) | {len(data) - 1})
    for cut in cut_points:
        p = tmp_path / "cut.mtr"
        p.write_bytes(data[:cut])
        try:
            tr = open_trace(p)
        except TraceError as e:
            assert cut < header_end, f"header region only: {e}"  # header cut: a clean error
            continue
        st = Replay(tr, progress=False).run()  # never raises on a clean prefix
        if cut < len(data) - 24:
            assert tr.truncated or not tr.complete_index
        if tr.truncated:
            assert any("cut short" in w for w in tr.warnings)
        # exactly the chunks whose payload lies before the cut are read
        whole = [c for c in open_trace(sample).chunks if c.offset + 48 + c.payload_len <= cut]
        assert len(tr.chunks) == len(whole), cut
        if len(whole) == len(open_trace(sample).chunks):
            assert st.figures() == full


def test_random_corruption_never_crashes(sample, tmp_path):
    data = bytearray(sample.read_bytes())
    rng = random.Random(7)
    for _ in range(300):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        if rng.random() < 0.3:
            d = d[:rng.randrange(len(d))]
        p = tmp_path / "bad.mtr"
        p.write_bytes(bytes(d))
        try:
            tr = open_trace(p)
            Replay(tr, progress=False).run()
        except TraceError as e:
            assert str(p) in str(e)
        # salvage mode stops at the corrupt chunk instead of raising (header errors aside)
        try:
            tr = open_trace(p)
            Replay(tr, salvage=True, progress=False).run()
        except TraceError as e:
            assert "byte" in str(e) or "header" in str(e)


def test_newer_version_refused(sample, tmp_path):
    d = bytearray(sample.read_bytes())
    struct.pack_into("<H", d, 8, FORMAT_VERSION + 1)
    p = tmp_path / "new.mtr"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceError, match="newer than this reader"):
        open_trace(p)


def test_not_a_trace_and_missing(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(TraceError, match="not a memory trace"):
        open_trace(p)
    with pytest.raises(TraceError, match="no such file"):
        open_trace(tmp_path / "none.mtr")
    with pytest.raises(TraceError, match="directory"):
        open_trace(tmp_path)


def test_corrupt_payload_names_offset(sample, tmp_path):
    tr = open_trace(sample)
    info = tr.chunks[len(tr.chunks) // 2]
    d = bytearray(sample.read_bytes())
    d[info.offset + 60] ^= 0xFF
    p = tmp_path / "c.mtr"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceError, match=f"at byte {info.offset}: corrupt chunk"):
        Replay(open_trace(p), progress=False).run()
    tr2 = open_trace(p)
    Replay(tr2, salvage=True, progress=False).run()
    assert any("analysis stops before it" in w for w in tr2.warnings)


def test_mark_incomplete_on_cut_trace(sample, tmp_path):
    from memtrace.analyses.engine import Replay
    from memtrace.traces.writer import mark_incomplete

    data = sample.read_bytes()
    p = tmp_path / "killed.mtr"
    p.write_bytes(data[: len(data) * 2 // 3])  # as if the recorder was killed mid-chunk
    n_before = len(open_trace(p).chunks)
    mark_incomplete(p, "guest hung: timeout after 10 s")
    tr = open_trace(p)
    assert tr.complete_index and not tr.truncated and len(tr.chunks) == n_before + 1
    st = Replay(tr, progress=False).run()
    assert st.incomplete == "guest hung: timeout after 10 s"


def test_chunk_with_bad_magic_is_named(sample, tmp_path):
    """A chunk whose magic is wrong but whose header checksum matches (rewritten, not torn):
    the error says so at its offset, rather than letting the checksum speak for it."""
    tr = open_trace(sample)
    info = tr.chunks[len(tr.chunks) // 2]
    d = bytearray(sample.read_bytes())
    d[info.offset:info.offset + 4] = b"CHNX"
    head = bytes(d[info.offset:info.offset + CHUNK_HEADER.size])
    struct.pack_into("<I", d, info.offset + CHUNK_HEADER_CRC_SPAN,
                     zlib.crc32(head[:CHUNK_HEADER_CRC_SPAN]))
    p = tmp_path / "m.mtr"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceError, match=f"at byte {info.offset}: corrupt chunk: bad magic"):
        Replay(open_trace(p), progress=False).run()


def test_follow_counts_records_chunks_and_ignores_other_files(sample, tmp_path):
    """follow() (trace-record's progress line) on a whole trace and on a file that is not one
    (its magic bytes sort after ours)."""
    tr = open_trace(sample)
    recs = [c for c in tr.chunks if c.type == ChunkType.RECORDS
            and not c.flags & CHUNK_FLAG_CHECKPOINT]
    _, t_last, n = follow(sample)
    assert (t_last, n) == (recs[-1].t_last, len(recs))
    p = tmp_path / "z.mtr"
    p.write_bytes(b"ZZZZZZZZ" + sample.read_bytes()[8:])
    assert follow(p) == (0, 0, 0)


def test_header_without_ram_size_reads_as_zero(tmp_path):
    """``ram_size`` may be absent (a generator that does not know it): the reader takes 0 and
    the replay grows its frames from the records, rather than refusing the file."""
    p = tmp_path / "noram.mtr"
    with TraceWriter(p, {}) as w:
        w.time(1, 0)
        w.page(np.array([3]), np.array([7]), np.array([8]))
    tr = open_trace(p)
    assert "ram_size" not in tr.header and tr.ram_size == 0
    st = Replay(tr, progress=False).run()
    assert st.contents.lo[st.content[3]] == 7
