"""Unit test of guest-agent/mailbox.py on a synthetic ring (no QEMU)."""

from __future__ import annotations

import struct

from memtrace.guest import mailbox


def _ring(nslots: int = 16) -> bytearray:
    buf = bytearray(mailbox.SLOTS_OFFSET + nslots * mailbox.SLOT_SIZE)
    return buf


def _put(buf: bytearray, pos: int, etype: int, seq: int, payload: bytes, nslots_total: int) -> int:
    n = -(-(16 + len(payload)) // 64)
    idx = pos % nslots_total
    if idx + n > nslots_total:
        pad = nslots_total - idx
        struct.pack_into("<HHIQ", buf, mailbox.SLOTS_OFFSET + idx * 64, 0, pad, 0, 0)
        pos += pad
        idx = 0
    off = mailbox.SLOTS_OFFSET + idx * 64
    struct.pack_into("<HHIQ", buf, off, etype, n, 42, seq)
    buf[off + 16:off + 16 + len(payload)] = payload
    return pos + n


def test_decode_wrap_and_accounting() -> None:
    ns = 16
    buf = _ring(ns)
    vma = struct.pack("<IIQQQQQQ", 1, 2, 0xAA, 0x1000, 0x3000, 0x73, 0, 7) + b"/usr/bin/x\0"
    pc = struct.pack("<IIQQQ", 1, 2, 7, 0, 0x1234)
    pos = 14  # start near the end: the 2-slot VMA event needs a PAD
    tail = pos
    pos = _put(buf, pos, mailbox.PAGECACHE, 5, pc, ns)
    pos = _put(buf, pos, mailbox.VMA, 7, vma, ns)  # seq 6 was dropped
    struct.pack_into("<8sIIQQQQ", buf, 0, b"MTAGENT1", 1, ns, pos, tail, 1, 8)
    ctrl, events = mailbox.read_unconsumed(bytes(buf))
    assert [e.type for e in events] == [mailbox.PAGECACHE, mailbox.VMA]
    assert events[1]["path"] == "/usr/bin/x" and events[1]["end"] == 0x3000
    assert events[0]["frame"] == 0x1234
    acc = mailbox.account(events, ctrl)
    assert acc.ordered
    # seqs 0..4 were consumed earlier (not in this window): only count gaps inside the window
    assert events[-1].seq - events[0].seq + 1 - len(events) == ctrl.dropped
