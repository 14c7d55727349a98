"""The host side of trace-record's workloads, without QEMU: the job (options to job.sh and the job
disk), root sources (what counts as a Linux root, file systems on disk images, images in use),
the console's verdict, and the header's exit status written in place."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from memtrace.tracer.disks import (
    check_not_in_use,
    find_file_systems,
    is_linux_root,
    prepare_root,
)
from memtrace.tracer.qemu import SetupError
from memtrace.tracer.workload import Job, Outcome, job_disk, job_script, parse_copies, parse_env
from memtrace.traces.reader import open_trace
from memtrace.traces.writer import TraceWriter, update_header

needs_mke2fs = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs missing")


def test_env_and_copies(tmp_path):
    assert parse_env(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("1A=x", "A", "A-B=1"):
        with pytest.raises(SetupError, match="NAME=VALUE"):
            parse_env([bad])
    f = tmp_path / "data.bin"
    f.write_bytes(b"x")
    d = tmp_path / "tree"
    d.mkdir()
    got = parse_copies([str(f), f"{f}:/opt/x.bin", f"{f}:sub/", f"{d}:/srv/"], "/work")
    assert [g for _, g in got] == ["/work/data.bin", "/opt/x.bin", "/work/sub/data.bin",
                                   "/srv/tree"]
    with pytest.raises(SetupError, match="does not exist"):
        parse_copies([str(tmp_path / "missing")], "/root")
    with pytest.raises(SetupError, match="below /"):
        parse_copies([f"{f}:/a/../../etc"], "/root")
    with pytest.raises(SetupError, match="mounted over"):
        parse_copies([f"{f}:/proc/x"], "/root")


def test_job_script_marks_the_command():
    job = Job(run="echo hi", env={"X": "a b'c"}, workdir="/srv", settle=1.5)
    s = job_script(job, has_script=False)
    # the command is bracketed by START and STOP, the exit status goes in before STOP
    assert s.index("mark start") < s.index("command.sh") < s.index("phase settle") \
        < s.index("counter workload.exit_status") < s.index("mark stop")
    assert "export X='a b'\"'\"'c'" in s and "cd /srv" in s and "sleep 1.5" in s
    s = job_script(Job(script=Path("/x"), marks="workload"), has_script=True)
    assert "mark start" not in s and "/run/memtrace/script" in s
    # a workload that brackets itself and exits while tracing still gets its STOP
    assert "mark stop" in s
    # the job disk's shell is busybox: the script must parse
    bb = shutil.which("busybox") or shutil.which("sh")
    for text in (job_script(job, False), s):
        r = subprocess.run([bb, "-n"] if bb.endswith("sh") else [bb, "sh", "-n"], input=text,
                           text=True, capture_output=True)
        assert r.returncode == 0, r.stderr


@needs_mke2fs
def test_job_disk_holds_the_job(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("payload")
    job = Job(run="cat input.txt", copies=[(src, "/root/input.txt")])
    drive = job_disk(job, tmp_path)
    assert drive.readonly and drive.format == "raw"
    listing = subprocess.run(["debugfs", "-R", "ls -p /memtrace", str(drive.path)],
                             capture_output=True, text=True).stdout
    for name in ("job.sh", "command.sh", "marks"):
        assert f"/{name}/" in listing, listing
    got = subprocess.run(["debugfs", "-R", "cat /files/root/input.txt", str(drive.path)],
                         capture_output=True, text=True).stdout
    assert got == "payload"
    assert src.read_text() == "payload"


def test_linux_root_detection(tmp_path):
    assert is_linux_root({"etc", "bin"}) and is_linux_root({"etc", "usr", "usr/bin"})
    assert not is_linux_root({"bin", "usr/bin"}) and not is_linux_root({"etc", "usr"})
    d = tmp_path / "notroot"
    (d / "home").mkdir(parents=True)
    with pytest.raises(SetupError, match="not a Linux root"):
        prepare_root(str(d), [], tmp_path)
    tar = tmp_path / "docs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(d, arcname=".")
    with pytest.raises(SetupError, match="no Linux root"):
        prepare_root(str(tar), [], tmp_path)
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 200_000)
    with pytest.raises(SetupError, match="nor a disk image"):
        prepare_root(str(junk), [], tmp_path)
    with pytest.raises(SetupError, match="cannot add packages"):
        prepare_root(str(d), ["hello"], tmp_path)


def _mbr(parts: list[tuple[int, int]]) -> bytes:
    mbr = bytearray(512)
    for i, (ptype, lba) in enumerate(parts):
        e = 446 + 16 * i
        mbr[e + 4] = ptype
        struct.pack_into("<II", mbr, e + 8, lba, 2048)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def test_file_systems_on_images(tmp_path):
    ext = bytearray(4 << 20)
    ext[1080:1082] = b"\x53\xef"
    whole = tmp_path / "whole.img"
    whole.write_bytes(ext)
    assert find_file_systems(whole) == [(0, "ext2/3/4")]
    # MBR: an ext4 partition at 1 MiB and an XFS one at 3 MiB
    img = bytearray(8 << 20)
    img[:512] = _mbr([(0x83, 2048), (0x83, 6144)])
    img[(1 << 20) + 1080:(1 << 20) + 1082] = b"\x53\xef"
    img[3 << 20:(3 << 20) + 4] = b"XFSB"
    p = tmp_path / "mbr.img"
    p.write_bytes(img)
    assert find_file_systems(p) == [(1 << 20, "ext2/3/4"), (3 << 20, "XFS")]
    # GPT: protective MBR, header at LBA 1, entries at LBA 2, a Btrfs partition at 2 MiB
    img = bytearray(8 << 20)
    img[:512] = _mbr([(0xEE, 1)])
    hdr = bytearray(92)
    hdr[:8] = b"EFI PART"
    struct.pack_into("<QII", hdr, 72, 2, 4, 128)
    img[512:604] = hdr
    entry = bytearray(128)
    entry[:16] = b"\x01" * 16
    struct.pack_into("<Q", entry, 32, 4096)
    img[1024:1152] = entry
    img[(2 << 20) + 65600:(2 << 20) + 65608] = b"_BHRfS_M"
    p = tmp_path / "gpt.img"
    p.write_bytes(img)
    assert find_file_systems(p) == [(2 << 20, "Btrfs")]


def test_image_in_use_is_refused(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    check_not_in_use(img)  # nobody has it open
    writer = subprocess.Popen(["sh", "-c", f"exec 3<>{img}; exec sleep 30"])
    try:
        for _ in range(100):  # until the shell has opened it
            if any(os.path.realpath(f"/proc/{writer.pid}/fd/{fd}") == str(img)
                   for fd in os.listdir(f"/proc/{writer.pid}/fd")):
                break
            subprocess.run(["sleep", "0.05"])
        with pytest.raises(SetupError, match=f"process {writer.pid} .* open for writing"):
            check_not_in_use(img)
    finally:
        writer.kill()
        writer.wait()
    reader = subprocess.Popen(["sh", "-c", f"exec 3<{img}; exec sleep 30"])
    try:
        subprocess.run(["sleep", "0.2"])
        check_not_in_use(img)  # readers do not change it
    finally:
        reader.kill()
        reader.wait()


def test_outcome_from_console():
    o = Outcome.from_serial(b"x\r\nMEMTRACE-WORKLOAD-BEGIN\r\nMEMTRACE-WORKLOAD-DONE rc=3\r\n")
    assert (o.exit_status, o.root_error, o.job_error) == (3, None, None)
    o = Outcome.from_serial(b"MEMTRACE-ROOT-ERROR no Linux root on the disk\r\nMEMTRACE-POWEROFF")
    assert o.exit_status is None and o.root_error == "no Linux root on the disk"
    o = Outcome.from_serial(b"MEMTRACE-JOB-ERROR --workdir /x: no such directory\r\n"
                            b"MEMTRACE-WORKLOAD-DONE rc=125\r\n")
    assert o.job_error == "--workdir /x: no such directory" and o.exit_status == 125


def test_update_header_in_place(tmp_path):
    path = tmp_path / "t.mtr"
    with TraceWriter(path, {"source": "synthetic", "ram_size": 1 << 20, "page_size": 4096,
                            "workload": {"exit_status": None}, "header_reserve": " " * 64}) as w:
        w.time(5)
        w.page(1, 2, 3)
    size = path.stat().st_size
    with open_trace(path) as t:
        before = [len(c.blocks) for c in t.iter_chunks()]
    assert update_header(path, {"workload": {"exit_status": 3, "note": "ok"}})
    assert path.stat().st_size == size
    with open_trace(path) as t:
        assert t.header["workload"] == {"exit_status": 3, "note": "ok"}
        assert [len(c.blocks) for c in t.iter_chunks()] == before
    # more than the reserve holds: refused, the file unchanged
    raw = path.read_bytes()
    assert not update_header(path, {"workload": {"exit_status": 4, "note": "x" * 500}})
    assert path.read_bytes() == raw
    assert json.loads(raw[16:16 + struct.unpack_from("<I", raw, 12)[0]])["workload"][
        "exit_status"] == 3
