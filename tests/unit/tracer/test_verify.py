"""tracer/verify.py against memory images with known differences: what --verify reports is
what differs, frame by frame and (writes mode) byte by byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memtrace.tracer.verify import verify, verify_writes
from memtrace.traces.format import Kind
from memtrace.traces.pagehash import page_hash
from memtrace.traces.writer import TraceWriter, records
from tests.helpers import Builder

PS = 4096


def filled(token: int) -> bytes:
    return token.to_bytes(8, "little") * (PS // 8)


def test_every_kind_of_difference_is_found_and_frames_beyond_the_trace_are_unknown(
        tmp_path: Path) -> None:
    """Eight frames described, six of them later changed in RAM (one byte each): all six
    differ, whichever way their hashes compare; RAM beyond the trace's frames is unknown."""
    nframes = 8
    b = Builder(tmp_path / "t.mtr", nframes=nframes).at(1)
    image = bytearray()
    for f in range(nframes):
        b.page(f, 100 + f)
        image += filled(100 + f)
    b.at(2).close()
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(image) + bytes(2 * PS))  # two frames more than the trace knows
    res = verify(tmp_path / "t.mtr", ram)
    assert (res.frames, res.matched, res.unknown, res.mismatched) == (10, 8, 2, [])
    assert not res.ok
    res = verify(tmp_path / "t.mtr", ram, exclude=(nframes * PS, 2 * PS))
    assert (res.frames, res.matched, res.unknown) == (8, 8, 0) and res.ok is True
    changed = [1, 2, 3, 5, 6, 7]
    for f in changed:
        image[f * PS + 9] ^= 0x40
    # the changed frames' hashes lie on both sides of the traced ones (lo and hi)
    lows = [page_hash(bytes(image[f * PS:(f + 1) * PS]))[0] < page_hash(filled(100 + f))[0]
            for f in changed]
    assert any(lows) and not all(lows)
    ram.write_bytes(bytes(image))
    res = verify(tmp_path / "t.mtr", ram)
    assert res.mismatched == changed and res.matched == 2 and res.unknown == 0
    assert not res.ok
    assert res.summary() == ("verify: 8 frames compared with guest RAM: 2 match, 6 differ, 0 "
                             "never described by the trace; first differing frames: 0x1, 0x2, "
                             "0x3, 0x5, 0x6, 0x7")


def writes_trace(path: Path, nframes: int, stores: list[tuple[int, int, int]],
                 unseen: list[tuple[int, int, int]]) -> None:
    """WRITE records (address, size, value), then UNSEEN ones, in one records chunk."""
    w = TraceWriter(path, {"ram_size": nframes * PS, "source": "synthetic", "mode": "writes"})
    w.time(1)
    for a, size, v in stores:
        w.write(a, size, v)
    w.time(2)
    for a, size, v in unseen:
        w.add(Kind.UNSEEN, records(Kind.UNSEEN, addr=np.uint64(a) | np.uint64(size) << 56,
                                   value=v))
    w.time(3)
    w.close()


def test_verify_writes_byte_by_byte(tmp_path: Path) -> None:
    """Stores of 1, 2, 4 and 8 bytes, one overwritten later, and UNSEEN words: the bytes they
    touch are compared, others not; a differing touched byte is found, an excluded one not."""
    nframes = 4
    stores = [(0x10, 8, 0x1122334455667788), (0x18, 4, 0xAABBCCDD), (0x1C, 2, 0xEEFF),
              (0x1E, 1, 0x99), (0x10, 1, 0x42),                 # the first byte again
              (PS + 3, 8, 0x0102030405060708),                  # unaligned, in frame 1
              (2 * PS + 100, 4, 0x5A5A5A5A)]                    # frame 2
    unseen = [(3 * PS + 8, 8, 0xFFFFFFFF00000000)]
    writes_trace(tmp_path / "w.mtr", nframes, stores, unseen)
    ram = np.zeros(nframes * PS, dtype=np.uint8)
    for a, size, v in stores + unseen:
        ram[a:a + size] = np.frombuffer(int(v).to_bytes(8, "little")[:size], np.uint8)
    path = tmp_path / "ram"
    path.write_bytes(ram.tobytes())
    res = verify_writes(tmp_path / "w.mtr", path)
    touched = 8 + 4 + 2 + 1 + 8 + 4 + 8
    assert res.records == {"WRITE": len(stores), "UNSEEN": len(unseen)}
    assert (res.touched, res.differing, res.first) == (touched, 0, [])
    assert res.ok is True
    assert res.summary() == (f"verify: 7 WRITE, 1 UNSEEN records touched {touched} bytes; 0 of "
                             "them differ from guest RAM")
    # a byte no record touched may differ; touched ones may not (the overwritten first byte,
    # an unaligned store's last byte, the UNSEEN word's top byte)
    bad = ram.copy()
    bad[0x11 + 2 * PS] ^= 1                      # untouched
    for a in (0x10, PS + 10, 3 * PS + 15):
        bad[a] ^= 0x80
    path.write_bytes(bad.tobytes())
    res = verify_writes(tmp_path / "w.mtr", path)
    assert (res.touched, res.differing, res.first) == (touched, 3, [0x10, PS + 10, 3 * PS + 15])
    assert res.ok is False
    assert res.summary().endswith("3 of them differ from guest RAM; first: 0x10, 0x100a, 0x300f")
    # excluding frame 1 (a mailbox, say) drops its byte and only it
    res = verify_writes(tmp_path / "w.mtr", path, exclude=(PS, PS))
    assert (res.touched, res.differing, res.first) == (touched - 8, 2, [0x10, 3 * PS + 15])
    res = verify_writes(tmp_path / "w.mtr", path, exclude=(3 * PS, PS))
    assert (res.touched, res.differing, res.first) == (touched - 8, 2, [0x10, PS + 10])


def test_both_halves_of_the_hash_are_compared(tmp_path: Path) -> None:
    """A PAGE record right in its low 64 bits and wrong in its high ones (above or below the
    page's own): the frame differs. (One trace each: the replay keys contents by the low half.)"""
    data = filled(7)
    lo, hi = page_hash(data)
    ram = tmp_path / "ram"
    ram.write_bytes(data)
    for claimed, mismatched in ((hi, []), (hi + 1, [0]), (hi - 1, [0])):
        w = TraceWriter(tmp_path / "h.mtr", {"ram_size": PS, "source": "synthetic"})
        w.time(1)
        w.page(np.array([0]), np.array([lo], dtype=np.uint64), np.array([claimed], np.uint64))
        w.time(2)
        w.close()
        res = verify(tmp_path / "h.mtr", ram)
        assert (res.frames, res.matched + len(res.mismatched), res.mismatched) == \
            (1, 1, mismatched), claimed - hi
