"""C unit tests of the tracer's parts, compiled with gcc in a temporary directory.

- test_pt_walk.c: the x86-64 page-table walker against page tables built in a file.
- test_writer_mailbox.c: the mailbox decoder (checked in C) and the trace writer, whose output
  is read back here with traces/reader.py.
- test_vcpu_stop.c: stopping every vCPU at an epoch end, with threads playing QEMU's vCPUs (idle
  and resume under a global lock, exclusive sections).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from memtrace.traces.format import Kind, MarkOp
from memtrace.traces.reader import open_trace
from tests.paths import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = str(REPO)
TRACER = os.path.join(ROOT, "tracer")
CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-g", f"-I{TRACER}"]


def _pkg(flag: str) -> list[str]:
    return subprocess.run(["pkg-config", flag, "glib-2.0"], check=True, capture_output=True,
                          text=True).stdout.split()


def _compile(tmp_path, out: str, sources: list[str], libs: list[str] = ()) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    exe = str(tmp_path / out)
    cmd = ["gcc", *CFLAGS, *_pkg("--cflags"), "-o", exe, *sources, *libs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return exe


def test_pt_walk(tmp_path):
    exe = _compile(tmp_path, "test_pt_walk",
                   [os.path.join(HERE, "c", "test_pt_walk.c"), os.path.join(TRACER, "pt_walk.c")])
    r = subprocess.run([exe, str(tmp_path / "ram.bin")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "all checks passed" in r.stdout


@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_vcpu_stop(tmp_path, threads):
    """No simulated vCPU runs a block while the world is held, a stop gives way to an exclusive
    section (the run ends: no deadlock), every thread's idle/resume keeps the count right."""
    exe = _compile(tmp_path, "test_vcpu_stop",
                   [os.path.join(HERE, "c", "test_vcpu_stop.c"),
                    os.path.join(TRACER, "vcpu_stop.c")], [*_pkg("--libs"), "-lpthread"])
    r = subprocess.run([exe, str(threads), "2000"], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout


@pytest.fixture(scope="module")
def writer_exe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writer")
    return _compile(tmp, "test_writer_mailbox",
                    [os.path.join(HERE, "c", "test_writer_mailbox.c"),
                     os.path.join(TRACER, "trace_writer.c"), os.path.join(TRACER, "mailbox.c")],
                    [*_pkg("--libs"), "-lzstd", "-lpthread"])


def _check_contents(path: str) -> None:
    tr = open_trace(path)
    assert tr.header["test"] == "café"
    assert tr.header["mode"] == "writes"
    chunks = list(tr.iter_chunks())
    assert len(chunks) >= 3, "64 KiB chunks: the test data must span several"
    assert [c.info.seq for c in chunks] == list(range(len(chunks)))

    def allof(kind):
        arrs = [c.records(kind) for c in chunks]
        return np.concatenate(arrs)

    times = allof(Kind.TIME)
    assert times["t"].tolist() == [100, 100, 200]  # 50 raised to the current time
    assert times["epoch"].tolist() == [1, 2, 3]
    pages = allof(Kind.PAGE)
    assert len(pages) == 10000
    i = np.arange(10000, dtype=np.uint64)
    assert (pages["frame"] == i).all() and (pages["hash_lo"] == i * 3).all()
    assert (pages["hash_hi"] == i * 5).all()
    writes = allof(Kind.WRITE)
    assert len(writes) == 20001 + 30000
    j = np.arange(20000, dtype=np.uint64)
    assert (writes["addr"][:20000] == (j * 8) | (np.uint64(8) << np.uint64(56))).all()
    assert (writes["value"][:20000] == j).all()
    # each WRITE's vCPU from the chunk's VCPU records (vCPU 0 implied at a chunk's start)
    vcpus = np.concatenate([c.write_vcpus() for c in chunks])
    assert (vcpus[:20000] == 0).all() and vcpus[-1] == 0
    runs = writes["value"][20000:50000]
    assert (vcpus[20000:50000] == runs >> np.uint64(32)).all()
    assert ((runs & np.uint64(0xFFFFFFFF)) == np.arange(30000, dtype=np.uint64)).all()
    assert sum(len(c.records(Kind.VCPU)) for c in chunks) >= 20, "a VCPU record per run"
    assert int(writes["addr"][-1]) == 0x1000 | (3 << 56) and int(writes["value"][-1]) == 0xABCDEF
    assert allof(Kind.UNSEEN).tolist() == [(0x2008 | (8 << 56), 0x1122334455667788)]
    marks, tasks = [], []
    for c in chunks:
        for r in c.records(Kind.MARK):
            marks.append((int(r["op"]), c.string(int(r["name"])), int(r["arg"])))
        for r in c.records(Kind.TASK):
            tasks.append((int(r["op"]), int(r["pid"]), c.string(int(r["name"])), int(r["flags"])))
        for r in c.records(Kind.VMA):
            assert c.string(int(r["path"])) == "/bin/x"
            assert (int(r["start"]), int(r["end"]), int(r["dev"])) == (0x400000, 0x401000, 0x801)
        for r in c.records(Kind.COUNTER):
            assert (c.string(int(r["name"])), int(r["value"])) == ("c.one", 77)
    assert marks == [(MarkOp.PHASE, "phase-x", 9), (MarkOp.PHASE, "phase-x", 10)]
    assert tasks == [(1, 7, "comm-7", 0x11), (3, 8, None, 0)]
    assert allof(Kind.MAP).tolist() == [(0xFFFF1000, 0x400, 1234, 7)]
    assert allof(Kind.PAGECACHE).tolist() == [(1, 0x801, 99, 0, 1234)]
    assert allof(Kind.LOST).tolist() == [(2, 0, 5)]
    # record order inside chunks: the kinds appear as written
    order = [Kind(k).name for c in chunks for k, _ in c.blocks]
    first = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]
    assert first[:3] == ["TIME", "PAGE", "TASK"]
    tr.close()


def test_writer_and_mailbox(tmp_path, writer_exe):
    out = str(tmp_path / "w.mtr")
    r = subprocess.run([writer_exe, out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tr = open_trace(out)
    assert tr.complete_index and not tr.truncated and not tr.warnings
    tr.close()
    _check_contents(out)


def test_writer_without_close_is_readable(tmp_path, writer_exe):
    """A writer that never reaches tw_close (a killed QEMU) leaves whole chunks, no index."""
    out = str(tmp_path / "w.mtr")
    r = subprocess.run([writer_exe, out, "noclose"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tr = open_trace(out)
    assert not tr.complete_index and not tr.truncated
    tr.close()
    _check_contents(out)
    # cut the file inside its last chunk: the reader keeps the chunks before it
    size = os.path.getsize(out)
    with open(out, "r+b") as f:
        f.truncate(size - 100)
    tr = open_trace(out)
    assert tr.truncated and tr.warnings
    assert len(list(tr.iter_chunks())) >= 2
    tr.close()


def test_plugin_build_for_qemu10_uses_api4():
    """The build for QEMU 10.0 (plugin API 4, as Debian 13 ships it; on Debian 12 the locked
    bookworm-backports QEMU under build/qemu10) counts with per-vCPU inline ops and a
    conditional callback, not with API 1's shared inline add and a call per block."""
    from memtrace.tracer import qemus

    q = qemus.qemu10()
    plugin = qemus.ensure_plugin(q)
    info = qemus.build_info(plugin)
    assert info and info["plugin_api"] == 4 and info["qemu_series"] == q.series, info
    nm = subprocess.run(["nm", "-D", str(plugin)], capture_output=True, text=True).stdout
    assert "qemu_plugin_register_vcpu_tb_exec_cond_cb" in nm
    assert "qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu" in nm
    assert "qemu_plugin_register_vcpu_tb_exec_inline\n" not in nm
    assert "qemu_plugin_register_vcpu_tb_exec_cb\n" not in nm
