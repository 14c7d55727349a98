"""FORMAT.md and the code agree: kinds, record sizes and field names come from one table."""

from __future__ import annotations

import re

from memtrace.traces import format as fmt
from memtrace.traces.format import (
    ADDR_MASK,
    CHUNK_FLAG_CHECKPOINT,
    CHUNK_HEADER,
    DTYPES,
    FILE_HEADER,
    FORMAT_VERSION,
    INDEX_ENTRY,
    MAP_DIRTY,
    MAP_PRESENT,
    MAP_WRITABLE,
    RECORD_SIZES,
    TRAILER,
    Kind,
    MarkOp,
    PageCacheOp,
    TaskOp,
    VmaOp,
)
from tests.paths import REPO

DOC = (REPO / "traces" / "FORMAT.md").read_text()


def test_version_in_title():
    assert re.search(rf"^# Memory trace format, version {FORMAT_VERSION}$", DOC, re.M)


def test_record_table_matches_dtypes():
    rows = re.findall(r"^\| (\d+) \| ([A-Z]+) \| (\d+) \| (.*) \|$", DOC, re.M)
    assert len(rows) == len(Kind)
    for num, name, size, fields in rows:
        kind = Kind(int(num))
        assert kind.name == name
        if kind == Kind.STRINGS:
            continue
        dt = DTYPES[kind]
        assert dt.itemsize == int(size), name
        documented = re.findall(r"`(\w+) (u\d+)`", fields)
        assert [f for f, _ in documented] == list(dt.names), name
        for f, t in documented:
            assert dt[f].itemsize * 8 == int(t[1:]), (name, f)


def test_structure_sizes():
    assert FILE_HEADER.size == 16
    assert CHUNK_HEADER.size == 48
    assert TRAILER.size == 24
    assert INDEX_ENTRY.itemsize == 40
    assert "payload length P" in DOC and "last 24 bytes" in DOC and "entries of 40 bytes" in DOC


def test_c_writer_kinds_match():
    """tracer/trace_writer.h numbers the kinds as this document does (the C side of the format)."""
    header = (REPO / "tracer" / "trace_writer.h").read_text()
    enum = re.search(r"enum tw_kind \{(.*?)\};", header, re.S)
    assert enum
    c_kinds = {name: int(num) for name, num in re.findall(r"TW_([A-Z]+) = (\d+)", enum.group(1))}
    assert c_kinds == {k.name: int(k) for k in Kind}


def test_c_writer_record_sizes_match():
    """trace_writer.h asserts, at compile time, the size of each record struct; those sizes are
    the table's (UNSEEN shares WRITE's struct)."""
    header = (REPO / "tracer" / "trace_writer.h").read_text()
    asserted = {name.upper(): int(size) for name, size in re.findall(
        r"_Static_assert\(sizeof\(struct tw_rec_(\w+)\) == (\d+)", header)}
    table = {k.name: RECORD_SIZES[k] for k in Kind if k not in (Kind.STRINGS, Kind.UNSEEN)}
    assert asserted == table


def paragraph(start: str) -> str:
    """The bullet of FORMAT.md that starts with ``start``, up to the next bullet, on one line."""
    i = DOC.index(start)
    return " ".join(DOC[i:DOC.index("\n- ", i)].split())


def test_op_numbers_match_doc():
    """The op numbers the document lists in prose ("1 NEW ... 5 COMM") are the enums' values:
    the C agent and tracer write them, so a renumbered enum misreads every trace."""
    for start, enum in (("- **TASK** `op`", TaskOp), ("- **VMA** `op`", VmaOp),
                        ("- **PAGECACHE** `op`", PageCacheOp), ("- **MARK** `op`", MarkOp)):
        documented = {name: int(num) for num, name in
                      re.findall(r"\b(\d+) ([A-Z][A-Z_]+)\b", paragraph(start))}
        assert documented == {op.name: int(op) for op in enum}, start


def test_flag_bits_match_doc():
    """The bits the document names: chunk flags, MAP flags, VMA vm_flags, WRITE's address."""
    assert re.search(r"flags \(u16\): bit 0 = checkpoint", DOC)
    assert CHUNK_FLAG_CHECKPOINT == 1 << 0
    m = paragraph("- **MAP**")
    assert "bit 0 = present" in m and "bit 1 = writable" in m and "bit 2 = dirty" in m
    assert (MAP_PRESENT, MAP_WRITABLE, MAP_DIRTY) == (1 << 0, 1 << 1, 1 << 2)
    vm = dict(re.findall(r"(VM_[A-Z]+) (0x[0-9a-f]+)", paragraph("- **VMA** `op`")))
    assert len(vm) == 4
    assert {k: int(v, 16) for k, v in vm.items()} == {k: getattr(fmt, k) for k in vm}
    (bits,) = re.findall(r"bits 0-(\d+) RAM address", DOC)
    assert ADDR_MASK == (1 << (int(bits) + 1)) - 1 == 0x00FF_FFFF_FFFF_FFFF
