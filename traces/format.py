"""Constants and record layouts of trace format version 1 (see FORMAT.md, the normative text).

Every record kind is a fixed-size numpy structured dtype so that a reader turns a block of records
into an array with a single ``numpy.frombuffer`` call.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import numpy as np

FORMAT_VERSION = 1
FILE_MAGIC = b"MEMTRACE"
CHUNK_MAGIC = b"CHNK"
TRAILER_MAGIC = b"MTINDEX\0"
NO_STRING = 0xFFFFFFFF

# magic, version u16, flags u16, header length u32
FILE_HEADER = struct.Struct("<8sHHI")
# magic, type, flags, payload_len, raw_len, t_first, t_last, seq, payload_crc, header_crc
CHUNK_HEADER = struct.Struct("<4sHHIIQQQII")
CHUNK_HEADER_CRC_SPAN = 44  # bytes of the chunk header covered by header_crc
BLOCK_HEADER = struct.Struct("<HHI")  # kind, record_size, count
TRAILER = struct.Struct("<8sQII")  # magic, index_offset, crc32(first 16 bytes), pad

ADDR_MASK = (1 << 56) - 1  # WRITE/UNSEEN.addr: bits 0-55 physical address, 56-63 size


class ChunkType(IntEnum):
    RECORDS = 1
    CONTENT = 2
    INDEX = 3


CHUNK_FLAG_CHECKPOINT = 1


class Kind(IntEnum):
    STRINGS = 1
    TIME = 2
    PAGE = 3
    WRITE = 4
    TASK = 5
    VMA = 6
    PAGECACHE = 7
    MAP = 8
    MARK = 9
    LOST = 10
    COUNTER = 11
    UNSEEN = 12
    VCPU = 13


class TaskOp(IntEnum):
    NEW = 1
    EXEC = 2
    EXIT = 3
    EXISTING = 4
    COMM = 5


class VmaOp(IntEnum):
    MAP = 1
    UNMAP = 2
    PROTECT = 3
    BRK = 4
    EXISTING = 5


class PageCacheOp(IntEnum):
    ADD = 1
    DEL = 2


class MarkOp(IntEnum):
    START = 1
    STOP = 2
    PHASE = 3
    STATE_BEGIN = 4
    STATE_END = 5
    INCOMPLETE = 6
    SNAPSHOT = 7


class LostSource(IntEnum):
    AGENT_RING_FULL = 1
    AGENT_SEQ_GAP = 2
    TRACER_BUFFER = 3


def lost_source_name(source: int) -> str:
    """``agent_ring_full`` etc., or the number of a source this version does not know."""
    try:
        return LostSource(source).name.lower()
    except ValueError:
        return f"source {source}"


def events_lost(lost: dict[int, int]) -> int:
    """Guest events lost, from the LOST counts by source (FORMAT.md, LOST): an event the agent
    dropped for a full ring (source 1) also leaves a gap in the sequence numbers (source 2), so
    the two overlap and the larger sum counts; the tracer's own losses (3) add."""
    agent = max(lost.get(LostSource.AGENT_RING_FULL, 0), lost.get(LostSource.AGENT_SEQ_GAP, 0))
    others = sum(v for k, v in lost.items()
                 if k not in (LostSource.AGENT_RING_FULL, LostSource.AGENT_SEQ_GAP))
    return agent + others


# COUNTER names with a meaning the format defines (FORMAT.md, "Counters")
#: the guest's CLOCK_MONOTONIC in ns, written by the guest agent every 100 ms
COUNTER_GUEST_CLOCK_NS = "guest.clock_ns"
#: the guest kernel's HZ, written by the guest agent with its first clock counter
COUNTER_GUEST_HZ = "guest.hz"
#: a recorder's estimate of clock units per guest second, written when it closes the trace
COUNTER_CLOCK_HZ = "tracer.clock_hz"

MAP_PRESENT = 1
MAP_WRITABLE = 2
MAP_DIRTY = 4

# VMA.vm_flags: the guest kernel's vm_flags bits (include/linux/mm.h, Linux 6.1), as the
# agent reports them; trace-snapshot sets the first four from /proc/PID/maps.
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYSHARE = 0x80
VM_GROWSDOWN = 0x100
VM_PFNMAP = 0x400
VM_IO = 0x4000
VM_DONTEXPAND = 0x40000
VM_HUGETLB = 0x400000
VM_MIXEDMAP = 0x10000000
VM_MERGEABLE = 0x80000000


def _dt(fields: list[tuple[str, str]]) -> np.dtype:
    return np.dtype(fields)


DTYPES: dict[Kind, np.dtype] = {
    Kind.TIME: _dt([("t", "<u8"), ("epoch", "<u8")]),
    Kind.PAGE: _dt([("frame", "<u8"), ("hash_lo", "<u8"), ("hash_hi", "<u8")]),
    Kind.WRITE: _dt([("addr", "<u8"), ("value", "<u8")]),
    Kind.TASK: _dt([("op", "<u4"), ("pid", "<u4"), ("tgid", "<u4"), ("ppid", "<u4"),
                    ("mm", "<u8"), ("pgd", "<u8"), ("name", "<u4"), ("flags", "<u4")]),
    Kind.VMA: _dt([("op", "<u4"), ("pid", "<u4"), ("mm", "<u8"), ("start", "<u8"),
                   ("end", "<u8"), ("vm_flags", "<u8"), ("pgoff", "<u8"), ("ino", "<u8"),
                   ("dev", "<u4"), ("path", "<u4")]),
    Kind.PAGECACHE: _dt([("op", "<u4"), ("dev", "<u4"), ("ino", "<u8"), ("index", "<u8"),
                         ("frame", "<u8")]),
    Kind.MAP: _dt([("mm", "<u8"), ("vpn", "<u8"), ("frame", "<u8"), ("flags", "<u8")]),
    Kind.MARK: _dt([("op", "<u4"), ("name", "<u4"), ("arg", "<u8")]),
    Kind.LOST: _dt([("source", "<u4"), ("pad", "<u4"), ("count", "<u8")]),
    Kind.COUNTER: _dt([("name", "<u4"), ("pad", "<u4"), ("value", "<u8")]),
    Kind.UNSEEN: _dt([("addr", "<u8"), ("value", "<u8")]),
    Kind.VCPU: _dt([("vcpu", "<u4"), ("pad", "<u4")]),
}

RECORD_SIZES: dict[Kind, int] = {k: d.itemsize for k, d in DTYPES.items()}
RECORD_SIZES[Kind.STRINGS] = 1

INDEX_ENTRY = _dt([("offset", "<u8"), ("t_first", "<u8"), ("t_last", "<u8"), ("seq", "<u8"),
                   ("type", "<u2"), ("flags", "<u2"), ("pad", "<u4")])

# Fields that hold string-table references, per kind.
STRING_FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.TASK: ("name",),
    Kind.VMA: ("path",),
    Kind.MARK: ("name",),
    Kind.COUNTER: ("name",),
}


def pad8(n: int) -> int:
    """Round ``n`` up to a multiple of 8."""
    return (n + 7) & ~7
