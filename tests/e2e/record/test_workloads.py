"""End to end: your own workload (trace-record --run / --script) in a Linux root on a virtio disk,
from each kind of root: the project's locked Debian root, a directory, a tar archive (what
docker export writes), a raw partitioned disk image and a qcow2 image; a guest with RAM above
4 GiB; and the bad inputs of issue #14, each a one-line error or a kept, marked trace, with
/dev/shm left clean and the user's files unchanged.

Real QEMU, the real guest kernel (its virtio, ext4 modules loaded by the init shim) and the real
agent. The Debian root is built once with mmdebstrap (cached in the build cache, CACHE/roots/).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from memtrace.analyses.engine import Replay
from memtrace.guest.build_image import sha256_file
from memtrace.tracer.qemu import guest_dir
from memtrace.traces.format import Kind, MarkOp, TaskOp
from memtrace.traces.reader import open_trace
from tests.e2e.record.test_record import record, shm_files

pytestmark = pytest.mark.e2e

# a workload that allocates and fills memory (perl is in Debian's minbase)
PERL_FILL = "perl -e '$x = \"ab\" x 20_000_000; print length($x), qq(\\n)'"


@pytest.fixture(scope="session")
def debian_base() -> Path:
    """The project's locked Debian base root (rootfs/ and root.ext4), built once."""
    if os.geteuid() != 0:
        pytest.skip("building a Debian root needs root (mmdebstrap)")
    from memtrace.guest.roots import build

    return Path(build("base")["dir"])


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> str:
    """The last stderr line is trace-record's one-line error, and there is no traceback."""
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("trace-record: error: "), p.stderr[-2000:]
    for w in words:
        assert w in last, last
    return last


def fingerprint(tree: Path) -> str:
    """Names, sizes, modes and times of everything under a tree."""
    h = hashlib.sha256()
    for p in sorted(tree.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(tree)} {st.st_size} {st.st_mode} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def records(path: Path) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    with open_trace(path) as t:
        for ch in t.iter_chunks():
            for kind, rec in ch.blocks:
                out.setdefault(kind, []).append(rec)
    return out


def test_built_root_runs_the_command(debian_base, tmp_path):
    """--run on the locked Debian root with --copy, --env, --workdir, marks and an exit status;
    the disk's DMA into guest RAM is in the trace: --verify finds 0 differing frames."""
    data = tmp_path / "input.txt"
    data.write_text("copied into the guest\n")
    out = tmp_path / "built.mtr"
    p = record("--run", "cat input.txt; echo \"GREETING=$GREETING\"; "
                        "memtrace-mark phase fill; " + PERL_FILL + "; "
                        "memtrace-mark counter items 42; memtrace-mark start; "
                        "echo start-rc=$?; exit 3",
               "--copy", f"{data}:/srv/job/", "--env", "GREETING=hello world",
               "--workdir", "/srv/job", "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    # the workload's output and exit status come back
    assert "copied into the guest" in p.stdout and "GREETING=hello world" in p.stdout
    assert "40000000" in p.stdout
    # memtrace-mark start is refused while trace-record brackets the command
    assert "start-rc=2" in p.stdout and "--marks workload" in p.stdout
    assert "workload (exit status 3): ok" in p.stderr, p.stderr[-2000:]
    assert ", 0 differ," in p.stderr, p.stderr[-2000:]
    assert not shm_files(p.pid)
    with open_trace(out) as t:
        w = t.header["workload"]
        assert w["exit_status"] == 3 and w["workdir"] == "/srv/job"
        assert w["root"]["kind"] == "debian" and w["root"]["lock"] == "guest-agent/roots.lock.json"
        assert "perl-base" in w["root"]["packages"]
        assert t.header["guest_image"]["initdisk"]["sha256"]
    st = Replay(open_trace(out), progress=False).run()
    ops = [(op, name) for _, op, name in st.marks]
    assert (MarkOp.PHASE, "fill") in ops and ops[-1][0] == MarkOp.STOP
    assert [op for op, _ in ops].count(MarkOp.START) == 1
    assert st.counters["items"] == 42 and st.counters["workload.exit_status"] == 3
    recs = records(out)
    # the root's files are named pages of the disk's file system (perl's, libc's ...)
    paths = set()
    with open_trace(out) as t:
        for ch in t.iter_chunks():
            for kind, rec in ch.blocks:
                if kind == Kind.VMA:
                    paths |= {ch.string(r["path"]) for r in rec}
    assert any(p and p.endswith("/perl") for p in paths), sorted(x for x in paths if x)[:20]
    assert sum(len(r) for r in recs[Kind.PAGECACHE]) > 1000
    assert data.read_text() == "copied into the guest\n"


def test_directory_root_and_script(tmp_path):
    """A directory root (the guest image's own small tree, with python3.11 and no Debian
    packaging) and --script: the tree is copied into a throwaway image, never written."""
    tree = guest_dir() / "rootfs"
    before = fingerprint(tree)
    script = tmp_path / "work.py"
    script.write_text("#!/usr/bin/python3\nimport os, sys\n"
                      "blob = bytearray(os.urandom(1 << 20)) * 8\n"
                      "print('python', sys.version.split()[0], len(blob))\n")
    out = tmp_path / "dir.mtr"
    p = record("--root", str(tree), "--script", str(script), "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "python 3.11" in p.stdout and "8388608" in p.stdout, p.stdout[-2000:]
    assert "exit status 0" in p.stderr and ", 0 differ," in p.stderr, p.stderr[-2000:]
    with open_trace(out) as t:
        assert t.header["workload"]["root"] == {"kind": "directory", "path": str(tree)}
    assert fingerprint(tree) == before
    assert not shm_files(p.pid)


def test_tar_root_verifies(debian_base, tmp_path):
    """A tar archive of a root, as docker export writes one: 0 differing frames, the archive
    unchanged; --marks workload lets the workload bracket the trace itself."""
    tar = tmp_path / "root.tar"
    subprocess.run(["tar", "-C", str(debian_base / "rootfs"), "--numeric-owner", "-cf",
                    str(tar), "."], check=True)
    digest = sha256_file(tar)
    out = tmp_path / "tar.mtr"
    # `memtrace-mark stop` returns once the tracer has the STOP: the sleep killed right after
    # it is alive in the trace (without the wait, its EXIT fell into the epoch that carried STOP)
    p = record("--root", str(tar), "--marks", "workload", "--verify", "-o", str(out),
               "--run", "echo setup; memtrace-mark start; " + PERL_FILL
               + "; memtrace-mark phase after; sleep 600 & memtrace-mark stop; kill $!; "
               "echo done")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "setup" in p.stdout and "done" in p.stdout
    assert ", 0 differ," in p.stderr, p.stderr[-2000:]
    assert sha256_file(tar) == digest
    with open_trace(out) as t:
        assert t.header["workload"]["root"]["kind"] == "tar"
        assert t.header["workload"]["marks"] == "workload"
    st = Replay(open_trace(out), progress=False).run()
    ops = [(op, name) for _, op, name in st.marks]
    assert (MarkOp.PHASE, "after") in ops and ops[-1][0] == MarkOp.STOP  # the workload's STOP
    sleeps = task_pids(out, TaskOp.EXEC, "sleep")
    assert len(sleeps) == 1, sleeps
    assert not sleeps & task_pids(out, TaskOp.EXIT), "the sleep's exit is in the trace"
    assert not shm_files(p.pid)


def _partitioned_image(tree: Path, path: Path) -> None:
    """A raw disk image with an MBR and one Linux partition at 1 MiB holding an ext4 copy of
    tree (mke2fs writes it at the offset, no mount)."""
    size_mib = 160
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree),
                    "-E", f"offset={1 << 20}", str(path), f"{size_mib - 1}M"], check=True)
    mbr = bytearray(512)
    mbr[446 + 4] = 0x83
    struct.pack_into("<II", mbr, 446 + 8, 2048, (size_mib - 1) * 2048)
    mbr[510:512] = b"\x55\xaa"
    with path.open("r+b") as f:
        f.write(mbr)


def test_disk_images_raw_and_qcow2(tmp_path):
    """A raw image with a partition table and a qcow2 image of a whole-disk file system: the
    guest finds the root on /dev/vda1 and /dev/vda; the images are opened read-only under a
    throwaway overlay."""
    tree = guest_dir() / "rootfs"
    raw = tmp_path / "disk.img"
    _partitioned_image(tree, raw)
    whole = tmp_path / "whole.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(whole), "160M"],
                   check=True)
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(whole), str(qcow)], check=True)
    for image, dev in ((raw, "/dev/vda1"), (qcow, "/dev/vda")):
        digest = sha256_file(image)
        out = tmp_path / f"{image.suffix[1:]}.mtr"
        p = record("--root", str(image), "--run", "echo on $(hostname); ls /usr/bin/python3",
                   "--serial-log", str(tmp_path / "serial.log"), "-o", str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "/usr/bin/python3" in p.stdout
        assert f"MEMTRACE-ROOT dev={dev} fs=ext4" in (tmp_path / "serial.log").read_text()
        assert sha256_file(image) == digest, f"{image} was modified"
        with open_trace(out) as t:
            root = t.header["workload"]["root"]
            assert root["kind"] == "image" and root["format"] == ("raw" if image == raw
                                                                  else "qcow2")
        assert not shm_files(p.pid)


@pytest.mark.parametrize("qemu,smp", [("system", 1), ("10", 2)])
def test_ram_above_4g(debian_base, tmp_path, qemu, smp):
    """--ram 6G: the machine maps 2 GiB below the PCI hole and 4 GiB at 4 GiB; Linux gives
    user pages from the high zone first, so the workload's memory lies there. Frames in the
    trace are RAM-file pages (FORMAT.md, Frames) and --verify finds 0 differing frames. On
    QEMU 7.2 a store's hwaddr is already a RAM-file offset; on QEMU 10 (plugin API 4) it is a
    guest physical address the plugin translates, here with two vCPUs."""
    out = tmp_path / "big.mtr"
    p = record("--ram", "6G", "--qemu", qemu, "--smp", str(smp), "--run", PERL_FILL,
               "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1,572,608 frames compared" in p.stderr and ", 0 differ," in p.stderr, p.stderr[-2000:]
    with open_trace(out) as t:
        assert t.header["ram_layout"] == {"below_4g": 2 << 30, "high_base": 4 << 30}
        assert t.header["vcpus"] == smp
    high = (2 << 30) >> 12
    recs = records(out)
    pages = np.concatenate([r["frame"] for r in recs[Kind.PAGE]])
    maps = np.concatenate([r["frame"][r["flags"] & 1 == 1] for r in recs[Kind.MAP]])
    assert pages.max() < (6 << 30) >> 12
    assert (maps >= high).sum() > 10_000, "the workload's pages should lie above 4 GiB"
    assert not shm_files(p.pid)


def test_bad_input_before_boot(tmp_path):
    """Refused before QEMU starts, each in one line: not a Linux root, a missing --copy file, a
    package Debian does not have, an image another process writes."""
    notroot = tmp_path / "notroot"
    (notroot / "home").mkdir(parents=True)
    p = record("--root", str(notroot), "--run", "true", "-o", str(tmp_path / "x.mtr"))
    one_line_error(p, "not a Linux root")
    p = record("--run", "true", "--copy", str(tmp_path / "missing.txt"),
               "-o", str(tmp_path / "x.mtr"))
    one_line_error(p, "missing.txt does not exist")
    p = record("--run", "true", "--packages", "no-such-package-memtrace",
               "-o", str(tmp_path / "x.mtr"))
    one_line_error(p, "no-such-package-memtrace does not exist")
    img = tmp_path / "busy.img"
    _partitioned_image(guest_dir() / "rootfs", img)
    with img.open("r+b"):
        p = record("--root", str(img), "--run", "true", "-o", str(tmp_path / "x.mtr"))
    one_line_error(p, "in use", "open for writing")
    assert not (tmp_path / "x.mtr").exists()


def test_bad_input_in_the_guest(debian_base, tmp_path):
    """A command the guest does not have: a one-line error and a kept trace marked incomplete;
    a missing --workdir: one line, no trace; a workload that never exits: --timeout stops it
    and keeps the trace, marked."""
    out = tmp_path / "notfound.mtr"
    p = record("--run", "no-such-command-memtrace --flag", "-o", str(out))
    last = one_line_error(p, "not found in the guest", "no-such-command-memtrace")
    st = Replay(open_trace(out), progress=False).run()
    assert st.incomplete and "not found" in st.incomplete, last
    out = tmp_path / "nodir.mtr"
    p = record("--run", "true", "--workdir", "/no/such/dir", "-o", str(out))
    one_line_error(p, "--workdir /no/such/dir: no such directory in the guest")
    assert not out.exists()
    out = tmp_path / "hang.mtr"
    p = record("--run", "echo waiting; sleep 100000", "--timeout", "60", "-o", str(out))
    assert p.returncode == 4, p.stderr[-2000:]
    assert "waiting" in p.stdout and "did not exit" in p.stderr
    st = Replay(open_trace(out), progress=False).run()
    assert st.incomplete and "timeout" in st.incomplete
    assert not shm_files(p.pid)


def task_pids(path: Path, op: int, name_end: str = "") -> set[int]:
    """Pids of the TASK records of one op (whose name ends with name_end, when given)."""
    out: set[int] = set()
    with open_trace(path) as t:
        for ch in t.iter_chunks():
            for kind, rec in ch.blocks:
                if kind == Kind.TASK:
                    out |= {int(r["pid"]) for r in rec if r["op"] == op
                            and (ch.string(r["name"]) or "").endswith(name_end)}
    return out


def exec_paths(path: Path) -> set[str]:
    out: set[str] = set()
    with open_trace(path) as t:
        for ch in t.iter_chunks():
            for kind, rec in ch.blocks:
                if kind == Kind.TASK:
                    out |= {ch.string(r["name"]) or "" for r in rec if r["op"] == TaskOp.EXEC}
    return out


def test_desktop_one_user(tmp_path):
    """The thesis's desktop on the real software, one user (the sizes of Table 5.1 are
    documented commands: README): Xvfb, an Xfce session, Firefox ESR with the local page,
    LibreOffice Writer with the document, in the locked Debian root; phases; 0 differing
    frames."""
    if os.geteuid() != 0:
        pytest.skip("building the desktop root needs root (mmdebstrap)")
    out = tmp_path / "desktop.mtr"
    p = record("--scenario", "desktop", "-n", "1", "--settle", "5", "--verify", "-o", str(out),
               timeout=5400)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "desktop n=1 (exit status 0): ok" in p.stderr and ", 0 differ," in p.stderr
    assert "firefox up" in p.stdout and "writer up" in p.stdout
    with open_trace(out) as t:
        assert t.header["scenario"] == {"name": "desktop", "n": 1, "smp": 1,
                                        "layout": "terminal-server"}
        assert t.header["workload"]["root"]["name"] == "desktop"
        assert "firefox-esr" in t.header["workload"]["root"]["packages"]
    st = Replay(open_trace(out), progress=False).run()
    phases = [name for _, op, name in st.marks if op == MarkOp.PHASE]
    assert phases == ["x", "session", "firefox", "writer", "settle"], phases
    assert st.counters["desktop.users"] == 1 and "guest.clock_ns" in st.counters
    execs = exec_paths(out)
    for prog in ("/usr/bin/Xvfb", "/usr/bin/xfwm4", "/usr/lib/firefox-esr/firefox-esr",
                 "/usr/lib/libreoffice/program/soffice.bin"):
        assert prog in execs, sorted(execs)
    f = st.figures()
    assert f["no_sharing"] > f["mmap_fork"] > f["ksm_hint_all"] >= f["full_cbps"] > 0
    # a desktop user maps far more than the miniature scenarios: over 200 MiB
    assert f["mmap_fork"] * 4096 > 200 << 20, f
    assert not shm_files(p.pid)


def test_game_server_one(tmp_path):
    """A dedicated OpenArena server from its own copy of the game tree, loading a map whose data
    the engine decompresses from the .pk3 into its heap; 0 differing frames."""
    if os.geteuid() != 0:
        pytest.skip("building the game-server root needs root (mmdebstrap)")
    out = tmp_path / "game.mtr"
    p = record("--scenario", "game-server", "-n", "1", "--settle", "3", "--verify",
               "-o", str(out), timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert ", 0 differ," in p.stderr and "oasago2 loaded" in p.stdout
    st = Replay(open_trace(out), progress=False).run()
    assert [name for _, op, name in st.marks if op == MarkOp.PHASE] == ["load", "settle"]
    assert "/srv/game1/ioq3ded" in exec_paths(out)
    # the engine's zone and hunk and the map in its heap: one server maps 30.5-31.5 MiB
    # (7,813-8,070 pages in four runs), most of it anonymous, and most of that zeros (the
    # zone is cleared at start): KSM hint all and full CBPS merge them into one page
    f = st.figures()
    assert f["mmap_fork"] * 4096 > 24 << 20, f
    assert f["no_sharing"] > f["mmap_fork"] > 2 * f["ksm_hint_all"], f
    assert not shm_files(p.pid)
