#!/usr/bin/env python3
"""Decoder for the guest agent's mailbox (PROTOCOL.md, version 1). Stdlib only.

Two uses:
  * after the guest stopped: decode every unread event left in a RAM file
        python3 guest-agent/mailbox.py /dev/shm/NAME [--phys 0x1f000000] [--size 1M] [--events]
  * while the guest runs: ``Consumer`` plays the tracer's part (reads head, decodes the slots
    from tail to head, then advances tail), on a RAM file shared with QEMU
    (``-object memory-backend-file,...,share=on``). Below the PCI hole, phys == file offset.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

MAGIC = b"MTAGENT1"
VERSION = 1
SLOTS_OFFSET = 4096
SLOT_SIZE = 64
HEADER = struct.Struct("<HHIQ")  # type, nslots, pid, seq
CTRL = struct.Struct("<8sIIQQQQ16s")  # magic, version, nslots, head, tail, dropped, next_seq
TAIL_OFFSET = 24
DEFAULT_PHYS = 0x1F000000
DEFAULT_SIZE = 1 << 20

PAD, TASK_NEW, TASK_EXEC, TASK_EXIT, TASK_EXISTING, VMA, PAGECACHE, MARK, COUNTER, TASK_COMM = (
    range(10)
)
TYPE_NAMES = {
    PAD: "PAD", TASK_NEW: "TASK_NEW", TASK_EXEC: "TASK_EXEC", TASK_EXIT: "TASK_EXIT",
    TASK_EXISTING: "TASK_EXISTING", VMA: "VMA", PAGECACHE: "PAGECACHE", MARK: "MARK",
    COUNTER: "COUNTER", TASK_COMM: "TASK_COMM",
}
VMA_OPS = {1: "MAP", 2: "UNMAP", 3: "PROTECT", 4: "BRK", 5: "EXISTING"}
PC_OPS = {1: "ADD", 2: "DEL"}
MARK_OPS = {1: "START", 2: "STOP", 3: "PHASE", 4: "STATE_BEGIN", 5: "STATE_END"}

# fixed payload layout per type: (struct, field names); a trailing string follows when named
_TASK = (struct.Struct("<IIQQQ16s"), ("tgid", "ppid", "clone_flags", "mm", "pgd", "comm"))
PAYLOADS: dict[int, tuple[struct.Struct, tuple[str, ...], str | None]] = {
    TASK_NEW: (*_TASK, None),
    TASK_EXISTING: (*_TASK, None),
    TASK_EXEC: (struct.Struct("<IIQQ"), ("tgid", "_pad", "mm", "pgd"), "path"),
    TASK_EXIT: (struct.Struct("<II"), ("tgid", "_pad"), None),
    VMA: (struct.Struct("<IIQQQQQQ"),
          ("op", "dev", "mm", "start", "end", "vm_flags", "pgoff", "ino"), "path"),
    PAGECACHE: (struct.Struct("<IIQQQ"), ("op", "dev", "ino", "index", "frame"), None),
    MARK: (struct.Struct("<IIQ"), ("op", "_pad", "arg"), "name"),
    COUNTER: (struct.Struct("<QQ"), ("_pad", "value"), "name"),
    TASK_COMM: (struct.Struct("<II16s"), ("tgid", "_pad", "comm"), None),
}


class MailboxError(Exception):
    pass


@dataclass
class Control:
    magic: bytes
    version: int
    nslots: int
    head: int
    tail: int
    dropped: int
    next_seq: int

    @classmethod
    def parse(cls, buf: bytes | memoryview | mmap.mmap, offset: int = 0) -> Control:
        magic, version, nslots, head, tail, dropped, next_seq, _ = CTRL.unpack_from(buf, offset)
        return cls(bytes(magic), version, nslots, head, tail, dropped, next_seq)

    def check(self) -> None:
        if self.magic != MAGIC:
            raise MailboxError(f"no agent mailbox (magic {self.magic!r})")
        if self.version != VERSION:
            raise MailboxError(f"mailbox protocol version {self.version}, decoder knows {VERSION}")
        if self.nslots == 0 or self.nslots & (self.nslots - 1):
            raise MailboxError(f"slot count {self.nslots} is not a power of two")


@dataclass
class Event:
    type: int
    nslots: int
    pid: int
    seq: int
    fields: dict[str, int | str] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"UNKNOWN{self.type}")

    def __getitem__(self, key: str) -> int | str:
        return self.fields[key]

    def get(self, key: str, default: int | str | None = None) -> int | str | None:
        return self.fields.get(key, default)

    def describe(self) -> str:
        f = dict(self.fields)
        if self.type == VMA:
            f["op"] = VMA_OPS.get(int(f["op"]), f["op"])
        elif self.type == PAGECACHE:
            f["op"] = PC_OPS.get(int(f["op"]), f["op"])
        elif self.type == MARK:
            f["op"] = MARK_OPS.get(int(f["op"]), f["op"])
        parts = []
        for k, v in f.items():
            if k.startswith("_"):
                continue
            if isinstance(v, int) and k in ("mm", "pgd", "start", "end", "vm_flags", "frame"):
                parts.append(f"{k}={v:#x}")
            else:
                parts.append(f"{k}={v}")
        return f"seq={self.seq} {self.type_name} pid={self.pid} " + " ".join(parts)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_event(data: bytes) -> Event:
    """Decode one event from its slots (data holds at least nslots * 64 bytes)."""
    etype, nslots, pid, seq = HEADER.unpack_from(data, 0)
    ev = Event(etype, nslots, pid, seq)
    layout = PAYLOADS.get(etype)
    if layout is None:
        return ev
    st, names, strname = layout
    values = st.unpack_from(data, HEADER.size)
    for name, val in zip(names, values, strict=True):
        ev.fields[name] = _cstr(val) if isinstance(val, bytes) else val
    if strname is not None:
        ev.fields[strname] = _cstr(data[HEADER.size + st.size:nslots * SLOT_SIZE])
    return ev


def iter_slots(buf: bytes | memoryview | mmap.mmap, nslots: int, start: int,
               end: int) -> Iterator[tuple[int, Event]]:
    """Events in slot positions [start, end) (counts of slots ever written); yields (pos, ev)."""
    pos = start
    while pos < end:
        idx = pos & (nslots - 1)
        off = SLOTS_OFFSET + idx * SLOT_SIZE
        etype, n, _pid, _seq = HEADER.unpack_from(buf, off)
        if n == 0 or idx + n > nslots:
            raise MailboxError(f"corrupt slot at position {pos}: type {etype} nslots {n}")
        if etype != PAD:
            yield pos, decode_event(bytes(buf[off:off + n * SLOT_SIZE]))
        pos += n


def read_unconsumed(buf: bytes | memoryview | mmap.mmap) -> tuple[Control, list[Event]]:
    """All events between tail and head (the whole stream when nobody consumed)."""
    ctrl = Control.parse(buf)
    ctrl.check()
    return ctrl, [ev for _, ev in iter_slots(buf, ctrl.nslots, ctrl.tail, ctrl.head)]


def read_file(path: str, phys: int = DEFAULT_PHYS, size: int = DEFAULT_SIZE
              ) -> tuple[Control, list[Event]]:
    with open(path, "rb") as f:
        f.seek(phys)
        return read_unconsumed(f.read(size))


class Consumer:
    """The tracer's side of the ring on a shared RAM file: poll() returns new events."""

    def __init__(self, path: str, phys: int = DEFAULT_PHYS, size: int = DEFAULT_SIZE) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=phys)
        self.ctrl: Control | None = None

    def ready(self) -> bool:
        return self.map[:8] == MAGIC

    def poll(self) -> list[Event]:
        if not self.ready():
            return []
        ctrl = Control.parse(self.map)
        ctrl.check()
        self.ctrl = ctrl
        head = ctrl.head  # read head first; slots below head are complete (agent: smp_wmb)
        if head == ctrl.tail:
            return []
        events = [ev for _, ev in iter_slots(self.map, ctrl.nslots, ctrl.tail, head)]
        struct.pack_into("<Q", self.map, TAIL_OFFSET, head)
        return events

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class Accounting:
    events: int
    first_seq: int
    last_seq: int
    gaps: int  # sequence numbers missing between first and last (and after last, up to next_seq)
    dropped: int
    ordered: bool


def account(events: list[Event], ctrl: Control) -> Accounting:
    """Check sequence order and that every missing number is counted as dropped."""
    seqs = [ev.seq for ev in events]
    ordered = all(b > a for a, b in zip(seqs, seqs[1:], strict=False))
    first = seqs[0] if seqs else 0
    last = seqs[-1] if seqs else -1
    gaps = (last - first + 1 - len(seqs)) + first + (ctrl.next_seq - 1 - last)
    return Accounting(len(seqs), first, last, gaps, ctrl.dropped, ordered)


def parse_size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in mult:
        return int(t[:-1], 0) * mult[t[-1]]
    return int(t, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="decode the memtrace agent mailbox in a RAM file")
    ap.add_argument("ramfile")
    ap.add_argument("--phys", type=lambda s: int(s, 0), default=DEFAULT_PHYS)
    ap.add_argument("--size", type=parse_size, default=DEFAULT_SIZE)
    ap.add_argument("--events", action="store_true", help="print every event")
    args = ap.parse_args(argv)
    ctrl, events = read_file(args.ramfile, args.phys, args.size)
    if args.events:
        for ev in events:
            print(ev.describe())
    counts: dict[str, int] = {}
    for ev in events:
        counts[ev.type_name] = counts.get(ev.type_name, 0) + 1
    acc = account(events, ctrl)
    print(f"slots={ctrl.nslots} head={ctrl.head} tail={ctrl.tail} dropped={ctrl.dropped} "
          f"next_seq={ctrl.next_seq} events={len(events)} ordered={acc.ordered} gaps={acc.gaps}")
    for k in sorted(counts):
        print(f"  {k}: {counts[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
