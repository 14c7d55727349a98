"""End to end with several vCPUs and on QEMU 10: trace-record --smp N [--qemu 10] boots the real
guest under multi-threaded TCG with the real plugin and agent.

QEMU 10 runs here too: on a Debian 12 host it is bookworm-backports' 10.0, unpacked under
build/qemu10 from the lock tracer/qemu10.lock.json (memtrace.tracer.qemu10); Debian 13 runs its
own. The tests marked with both QEMUs are the representative subset the README lists.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from memtrace.analyses.engine import Replay
from memtrace.traces.format import ADDR_MASK, Kind, LostSource, TaskOp, VmaOp
from memtrace.traces.reader import open_trace
from tests.e2e.record.test_record import record, shm_files

pytestmark = pytest.mark.e2e
QEMUS = ["system", "10"]


def _ok(p, verify: bool = True) -> None:
    assert p.returncode == 0, p.stderr[-3000:]
    if verify:
        assert "0 differ," in p.stderr, p.stderr[-2000:]
    assert not shm_files(p.pid), "guest RAM file left in /dev/shm"


def _plugin_api(trace: Path) -> str:
    with open_trace(trace) as tr:
        return str(tr.header["tool_versions"]["qemu_plugin_api_running"])


@pytest.mark.parametrize("qemu", QEMUS)
def test_terminal_server_on_4_vcpus_verifies(tmp_path, qemu):
    """Four instances on four vCPUs: every frame of the final RAM as the trace says."""
    out, stats = tmp_path / "ts4.mtr", tmp_path / "stats.json"
    p = record("--scenario", "terminal-server", "-n", "4", "--smp", "4", "--qemu", qemu,
               "--verify", "--stats", str(stats), "-o", str(out))
    _ok(p)
    s = json.loads(stats.read_text())
    print(f"QEMU {qemu}: {s['instructions']:,} instructions, {s['epochs']} epochs, "
          f"{s['stops']} stops ({s['stop_aborts']} gave way), gathering "
          f"{s['stop_gather_seconds']:.2f} s, max {s['stop_gather_max_seconds'] * 1e3:.1f} ms")
    assert s["vcpus"] == 4 and s["stops"] >= s["epochs"] > 100
    assert s["mailbox_errors"] == 0
    with open_trace(out) as tr:
        assert tr.header["vcpus"] == 4
        st = Replay(tr, progress=False).run()
    assert not st.lost, st.lost
    if qemu == "10":
        assert _plugin_api(out) == "4"


@dataclass
class Interleave:
    phys: int
    magic: int
    cpus: tuple[int, int]
    values: int


def _interleave_log(log: str) -> Interleave:
    m = re.search(r"INTERLEAVE-WORD phys=0x([0-9a-f]+) magic=0x([0-9a-f]+) cpus=(\d+),(\d+) "
                  r"values=(\d+)", log)
    assert m, log[-2000:]
    return Interleave(int(m.group(1), 16), int(m.group(2), 16), (int(m.group(3)),
                      int(m.group(4))), int(m.group(5)))


def _interleave_records(trace: Path, word: Interleave):
    """(writes, counters) in trace order: writes = [(v, vcpu, epoch, index)] of the stores to
    the word, counters = [(v, epoch, index)] of COUNTER interleave."""
    writes, counters = [], []
    index, epoch = 0, 0
    with open_trace(trace) as tr:
        for ch in tr.iter_chunks():
            vcpu = 0  # FORMAT.md: vCPU 0 until the chunk's first VCPU record
            for kind, rec in ch.blocks:
                if kind == Kind.TIME:
                    epoch = int(rec["epoch"][-1])
                elif kind == Kind.VCPU:
                    vcpu = int(rec["vcpu"][-1])
                elif kind == Kind.WRITE:
                    addr = rec["addr"] & np.uint64(ADDR_MASK)
                    size = rec["addr"] >> np.uint64(56)
                    for i in np.flatnonzero((addr == word.phys) & (size == 8)):
                        v = int(rec["value"][i]) - word.magic
                        if 0 <= v < word.values:
                            writes.append((v, vcpu, epoch, index + int(i)))
                elif kind == Kind.COUNTER:
                    for i, r in enumerate(rec):
                        if ch.string(int(r["name"])) == "interleave":
                            counters.append((int(r["value"]), epoch, index + i))
                index += len(rec)
    return writes, counters


@pytest.mark.parametrize("qemu", QEMUS)
def test_two_vcpus_stores_and_events_in_order(tmp_path, qemu):
    """Two threads pinned to CPU 0 and 1 take turns storing MAGIC+v into one word, v = 0, 1, ...
    (even on CPU 0, odd on CPU 1), each store followed by the agent event COUNTER interleave v.
    The trace must say which vCPU made each store, keep each vCPU's stores in program order and
    the epochs of the turns in order, and give the agent's events from both CPUs in the order
    they happened, each after its store; the final RAM verifies byte by byte."""
    out, log = tmp_path / "il.mtr", tmp_path / "serial.log"
    p = record("--scenario", "interleave", "-n", "2", "--smp", "2", "--qemu", qemu,
               "--mode", "writes", "--epoch", "1M", "--verify", "--serial-log", str(log),
               "-o", str(out))
    _ok(p)
    assert " 0 of them differ from guest RAM" in p.stderr, p.stderr[-2000:]
    word = _interleave_log(log.read_text(errors="replace"))
    writes, counters = _interleave_records(out, word)
    n = word.values
    assert sorted(v for v, *_ in writes) == list(range(n)), "each store recorded once"
    for v, vcpu, _, _ in writes:
        assert vcpu == word.cpus[v % 2], f"value {v} stored on CPU {word.cpus[v % 2]}, " \
                                         f"recorded as vCPU {vcpu}"
    for cpu in word.cpus:  # program order per vCPU
        mine = [v for v, vcpu, _, _ in writes if vcpu == cpu]
        assert mine == sorted(mine)
    by_value = {v: (epoch, idx) for v, _, epoch, idx in writes}
    epochs = [by_value[v][0] for v in range(n)]
    assert epochs == sorted(epochs), "a later turn recorded in an earlier epoch"
    assert len(set(epochs)) > 5, "the turns should span several epochs"
    assert [v for v, _, _ in counters] == list(range(n)), "agent events out of order"
    for v, epoch, idx in counters:
        assert idx > by_value[v][1], f"COUNTER {v} before its store"
        assert epoch >= by_value[v][0]
    if qemu == "10":
        assert _plugin_api(out) == "4"


def test_storm_on_4_vcpus_every_event_or_a_counted_loss(tmp_path):
    """One fork/exec/mmap storm per vCPU, all at once: every task and mapping event the storms
    caused is in the trace, in order per task, unless LOST records count the missing ones; the
    agent's sequence numbers never went backwards and no kretprobe missed."""
    out, log, stats = tmp_path / "storm.mtr", tmp_path / "serial.log", tmp_path / "stats.json"
    p = record("--scenario", "storm", "-n", "2", "--smp", "4", "--serial-log", str(log),
               "--stats", str(stats), "-o", str(out))
    _ok(p, verify=False)
    text = log.read_text(errors="replace")
    status = text.split("MEMTRACE-STATUS-BEGIN", 1)[1].split("MEMTRACE-STATUS-END", 1)[0]
    assert re.findall(r"nmissed=(\d+)", status) and all(
        x == "0" for x in re.findall(r"nmissed=(\d+)", status)), status
    s = json.loads(stats.read_text())
    assert s["mailbox_errors"] == 0, "malformed or out-of-order agent events"
    storms = [line.split()[1:] for line in re.findall(r"STORM-FORK [^\n]*", text)]
    assert len(storms) == 4, "one storm per vCPU"
    children = [(int(c.split(":")[0]), c.split(":")[1]) for st in storms for c in st]
    assert len(children) == 4 * 40
    tasks: dict[int, list[int]] = {}
    maps = unmaps = 0
    lost = {int(LostSource.AGENT_RING_FULL): 0, int(LostSource.AGENT_SEQ_GAP): 0}
    with open_trace(out) as tr:
        for ch in tr.iter_chunks():
            for kind, rec in ch.blocks:
                if kind == Kind.TASK:
                    for r in rec:
                        tasks.setdefault(int(r["pid"]), []).append(int(r["op"]))
                elif kind == Kind.VMA:
                    size = rec["end"] - rec["start"]
                    maps += int(((rec["op"] == VmaOp.MAP) & (size == 3 * 4096)).sum())
                    unmaps += int(((rec["op"] == VmaOp.UNMAP) & (size == 3 * 4096)).sum())
                elif kind == Kind.LOST:
                    for r in rec:
                        if int(r["source"]) in lost:
                            lost[int(r["source"])] += int(r["count"])
    missing = 0
    for pid, how in children:
        ops = [op for op in tasks.get(pid, []) if op in (TaskOp.NEW, TaskOp.EXEC, TaskOp.EXIT)]
        want = [TaskOp.NEW, TaskOp.EXEC, TaskOp.EXIT] if how == "exec" else [TaskOp.NEW,
                                                                             TaskOp.EXIT]
        if ops != want:
            missing += len(want) - len(set(ops) & set(want)) or 1
    missing += max(0, 4 * 400 - maps) + max(0, 4 * 400 - unmaps)
    counted = max(lost.values())
    print(f"storm on 4 vCPUs: {s['agent_events']:,} agent events, {maps} maps, {unmaps} unmaps, "
          f"missing {missing}, counted lost {lost}")
    assert missing <= counted, f"{missing} events missing but only {counted} counted as lost"
    if counted == 0:
        assert missing == 0


def test_one_vcpu_on_qemu10_verifies(tmp_path):
    """The API-4 build with one vCPU: pages mode, every frame verified."""
    out = tmp_path / "single.mtr"
    p = record("--scenario", "single", "-n", "1", "--qemu", "10", "--verify", "-o", str(out))
    _ok(p)
    assert _plugin_api(out) == "4"


# ---- bad input that needs QEMU and the plugin: one line, before the guest starts ------------
# (what needs neither is in tests/unit/tracer/test_record_args.py)


def _one_line_error(p, *words: str) -> str:
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, p.stderr[-2000:]
    for w in words:
        assert w in errors[0], errors[0]
    assert not shm_files(p.pid), "the guest was started"
    return errors[0]


def test_more_vcpus_than_the_plugin_takes_is_refused(tmp_path):
    line = _one_line_error(record("--smp", "65", "-o", str(tmp_path / "x.mtr")),
                           "-smp 65", "1 to 64")
    print(line)


def test_plugin_for_another_api_is_refused(tmp_path):
    """The API-1 build (for QEMU 7.2) given to QEMU 10: refused from build.json, and, for a copy
    without it, by QEMU itself (its message in one line)."""
    from memtrace.tracer import qemus

    sys_plugin = qemus.ensure_plugin(qemus.system_qemu())
    if qemus.system_qemu().series.startswith("10."):
        pytest.skip("the system QEMU is 10: no API-1 build to mismatch")
    _one_line_error(record("--qemu", "10", "--plugin", str(sys_plugin),
                           "-o", str(tmp_path / "x.mtr")), "built for QEMU 7.2", "not for QEMU 10")
    bare = tmp_path / "bare" / "libmemtrace.so"
    bare.parent.mkdir()
    shutil.copy(sys_plugin, bare)
    _one_line_error(record("--qemu", "10", "--plugin", str(bare), "-o", str(tmp_path / "x.mtr")),
                    "cannot load", "API version 1")
