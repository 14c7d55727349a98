"""End to end: trace-record boots the real guest image under real QEMU with the real plugin and
guest agent, records a scenario, verifies the trace against guest RAM, and trace-analyze reads it.

Slow (minutes under TCG) and generous with timeouts; nothing depends on wall-clock speed.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.analyses.engine import Replay
from memtrace.traces.format import Kind, MarkOp, TaskOp
from memtrace.traces.reader import open_trace
from tests.paths import REPO

pytestmark = pytest.mark.e2e
ROOT = REPO


def shm_files(pid: int) -> list[str]:
    """The files trace-record run as ``pid`` has in /dev/shm (its names carry its pid, so
    recordings running beside the tests do not count)."""
    return glob.glob(f"/dev/shm/memtrace-{pid}-*")


class Recorded(subprocess.CompletedProcess[str]):
    pid: int


def record(*args: str, timeout: float = 3000) -> Recorded:
    with subprocess.Popen([sys.executable, "-m", "memtrace.tracer.record", "-q", *args], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    p = Recorded(proc.args, proc.returncode, out, err)
    p.pid = proc.pid
    return p


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", "-q", *args],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)


@pytest.fixture(scope="session")
def single_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "single.mtr"
    p = record("--scenario", "single", "-n", "1", "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 differ" in p.stderr, p.stderr[-2000:]
    assert not shm_files(p.pid), "guest RAM file left in /dev/shm"
    return out


def test_verify_and_analyze(single_trace):
    tr = open_trace(single_trace)
    assert tr.complete_index and not tr.truncated
    h = tr.header
    assert h["source"] == "recorded" and h["scenario"]["name"] == "single"
    assert h["mode"] == "pages" and h["clock_unit"] == "instructions"
    assert h["tracking"] in ("pagemap-scan", "store-callbacks")
    st = Replay(tr, progress=False).run()
    assert st.incomplete is None
    # the trace ends in one consistent instant: an address space whose tasks are alive maps
    # its program (the shell that wrote STOP and exited before the tracer took the final state
    # used to stay alive in the trace with its page tables torn down: mapped nothing)
    live = {mm: sp for mm, sp in st.spaces.items() if sp.pids}
    assert live and all(sp.npages > 0 for sp in live.values()), \
        {mm: (sorted(sp.pids), sp.npages) for mm, sp in live.items()}
    ops = [op for _, op, _ in st.marks]
    assert MarkOp.START in ops and MarkOp.STOP in ops
    assert not st.lost, f"guest events lost: {st.lost}"
    p = analyze(str(single_trace), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    peak = doc["results"]["sharing"]["summary"]
    # a real multi-process workload maps pages, and Linux already shares some (libraries)
    assert peak["peak_no_sharing"] > peak["peak_mmap_fork"] > 0
    assert peak["peak_mmap_fork"] >= peak["peak_ksm_hint_all"] >= peak["peak_full_cbps"] > 0
    # the guest's clock is in every trace (every 100 ms of guest time): the oracle weighs by it
    oracle = doc["results"]["oracle"]["summary"]
    assert oracle["time_base"].startswith("guest seconds ("), oracle["time_base"]
    assert oracle["guest_seconds"] > 0.5
    assert oracle["oracle_min"] <= oracle["oracle_mean"] <= oracle["oracle_max"]


def test_trace_has_tasks_vmas_and_mappings(single_trace):
    tr = open_trace(single_trace)
    kinds: dict[int, int] = {}
    execs = []
    for chunk in tr.iter_chunks():
        for kind, rec in chunk.blocks:
            kinds[kind] = kinds.get(kind, 0) + len(rec)
            if kind == Kind.TASK:
                execs += [chunk.string(r["name"]) for r in rec if r["op"] == TaskOp.EXEC]
    for k in (Kind.TIME, Kind.PAGE, Kind.TASK, Kind.VMA, Kind.PAGECACHE, Kind.MAP):
        assert kinds.get(k, 0) > 0, f"no {Kind(k).name} records"
    assert any(e and "python3" in e for e in execs), execs


def test_writes_mode_verifies_byte_by_byte(tmp_path):
    """--mode writes --verify: frames by their PAGE records, and every byte the WRITE and UNSEEN
    records touched, against guest RAM when tracing stopped."""
    out = tmp_path / "writes.mtr"
    p = record("--scenario", "single", "-n", "1", "--mode", "writes", "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 differ," in p.stderr, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if "records touched" in x]
    assert line and line[0].endswith(" 0 of them differ from guest RAM"), p.stderr[-2000:]
    print(line[0])
    counts = {}
    with open_trace(out) as tr:
        assert tr.header["mode"] == "writes"
        for ch in tr.iter_chunks():
            for kind, rec in ch.blocks:
                counts[kind] = counts.get(kind, 0) + len(rec)
    assert counts.get(Kind.WRITE, 0) > 10_000_000 and counts.get(Kind.UNSEEN, 0) > 0
    assert not shm_files(p.pid), "guest RAM file left in /dev/shm"


def test_timeout_keeps_partial_trace(tmp_path):
    """A guest that never powers off (a shell waiting on the console after the scenario)."""
    out = tmp_path / "hung.mtr"
    p = record("--scenario", "idle", "--append", "memtrace.shell=1", "--start", "now",
               "--timeout", "60", "-o", str(out))
    assert p.returncode == 4, p.stderr[-2000:]
    assert "INCOMPLETE" in p.stderr and "timeout" in p.stderr
    st = Replay(open_trace(out), progress=False).run()
    assert st.incomplete and "timeout" in st.incomplete
    assert not shm_files(p.pid)


def test_bad_plugin_argument_is_refused(tmp_path):
    from memtrace.tracer.qemu import plugin_path

    p = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-display", "none",
                        "-nodefaults", "-plugin", f"{plugin_path()},mode=bogus", "-S"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "mode" in p.stderr and "Segmentation" not in p.stderr


def test_disk_full_keeps_readable_prefix(tmp_path):
    """The trace's file system fills up mid-run: a clear error, a non-zero exit, and the trace
    stays readable up to its last complete chunk (runs as root: it mounts a small tmpfs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "t.mtr"
        p = record("--scenario", "single", "-n", "1", "-o", str(out))
        assert p.returncode == 4, p.stderr[-2000:]
        assert "No space left on device" in p.stderr
        assert "Traceback" not in p.stderr
        tr = open_trace(out)
        assert tr.chunks, "no complete chunk survived"
        Replay(tr, progress=False).run()
        tr.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_attribution_finds_the_data_and_the_binary(tmp_path):
    """server-heap: two processes read the same 4 MiB file into anonymous memory. The data must
    come out on top as cross-instance anonymous sharing (1024 pages each, so >= 1000 pages
    saved), and python3.11 as the file with the most sharing."""
    out = tmp_path / "sh.mtr"
    p = record("--scenario", "server-heap", "-n", "2", "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert " 0 differ, 0 never described" in p.stderr, p.stderr[-2000:]
    # the instant with the most sharing: where the oracle saves most against mmap/fork
    o = json.loads(analyze(str(out), "--oracle", "--format", "json").stdout)
    rows = o["results"]["oracle"]["tables"]["series"]["rows"]  # t, t_end, oracle, mmap_fork...
    t_best = max(rows, key=lambda r: r[3] - r[2])[0]
    a = analyze(str(out), "--by", "file,kind", "--at", str(t_best), "--format", "json")
    assert a.returncode == 0, a.stderr
    tables = json.loads(a.stdout)["results"]["attribution"]["tables"]
    kind = {r[0]: dict(zip(tables["by_kind"]["columns"], r, strict=True))
            for r in tables["by_kind"]["rows"]}
    top_kind = max(kind.values(), key=lambda r: r["saved"])
    assert top_kind["kind"] == "anon" and top_kind["saved_cross"] >= 1000, kind
    files = [dict(zip(tables["by_file"]["columns"], r, strict=True))
             for r in tables["by_file"]["rows"] if not r[0].startswith("(")]
    assert max(files, key=lambda r: r["saved"])["file"].endswith("python3.11"), files[:3]
