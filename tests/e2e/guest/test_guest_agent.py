"""End-to-end tests of the guest agent: real QEMU (TCG), real guest, mailbox read from guest RAM.

Each test boots the guest once (about 10-60 s of wall time under TCG; the timeout is generous and
nothing depends on speed). Timings are appended to build/guest/e2e-timings.json.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from tests.e2e.guest.guestrun import GuestRun, boot
from tests.e2e.guest.guestrun import mailbox as mb
from tests.paths import REPO

pytestmark = pytest.mark.e2e

BAD = re.compile(r"Oops|BUG:|WARNING:|Call Trace|general protection|Kernel panic")
VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 1, 2, 4, 0x80


def _record_time(name: str, run: GuestRun) -> None:
    f = REPO / "build/guest/e2e-timings.json"
    data = json.loads(f.read_text()) if f.exists() else {}
    data[name] = round(run.seconds, 1)
    f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_log(name: str, run: GuestRun) -> Path:
    p = REPO / f"build/guest/e2e-{name}.log"
    p.write_text(run.log)
    return p


def _check_clean(run: GuestRun, name: str) -> None:
    log = _save_log(name, run)
    assert run.returncode == 0, f"QEMU failed, see {log}"
    assert "MEMTRACE-AGENT-LOADED rc=0" in run.log, f"agent did not load, see {log}"
    assert re.search(r"memtrace: loaded: kernel \S+, mailbox", run.log), "no load line in dmesg"
    assert "MEMTRACE-SCENARIO-DONE rc=0" in run.log, f"scenario failed, see {log}"
    bad = [ln for ln in run.log.splitlines() if BAD.search(ln)]
    assert not bad, f"kernel problems: {bad[:5]} (see {log})"


def _check_sequence(run: GuestRun) -> mb.Accounting:
    assert run.ctrl is not None, "no mailbox found in guest RAM"
    acc = mb.account(run.events, run.ctrl)
    assert acc.ordered, "seq not strictly increasing in ring order"
    assert acc.gaps == run.ctrl.dropped, f"seq gaps {acc.gaps} != dropped {run.ctrl.dropped}"
    return acc


def _marks(events: list[mb.Event]) -> list[tuple[int, str, int]]:
    return [(int(e["op"]), str(e["name"]), e.seq) for e in events if e.type == mb.MARK]


def _last_state_dump(events: list[mb.Event]) -> list[mb.Event]:
    """Events of the state dump that precedes the last MARK START."""
    start_idx = max(i for i, e in enumerate(events) if e.type == mb.MARK and e["op"] == 1)
    begin = max(i for i in range(start_idx) if events[i].type == mb.MARK and events[i]["op"] == 4)
    end = next(i for i in range(begin, start_idx) if events[i].type == mb.MARK
               and events[i]["op"] == 5)
    return events[begin + 1:end]


def _perms(flags: int) -> str:
    return ("r" if flags & VM_READ else "-") + ("w" if flags & VM_WRITE else "-") + (
        "x" if flags & VM_EXEC else "-") + ("s" if flags & VM_MAYSHARE else "p")  # as /proc maps


@pytest.fixture(scope="module")
def selftest(guest_image: Path) -> GuestRun:
    # a 2 MiB mailbox (16,384 slots) with a live consumer playing the tracer: the run's 29,000
    # slots of events exercise tail, wrap and PAD, while the 12,000-event state dump fits even
    # when this Python consumer is starved for a while (with 1 MiB it then overflowed now and
    # then, a drop the agent counts but that left the dump-against-/proc test incomplete)
    # A drop is the agent's documented policy when the ring is full (counted, and checked by
    # test_selftest_sequence_and_drops), but it leaves the dump-against-/proc comparison
    # without its subject: then the run is repeated (seen once in ~20 runs: one event of the
    # 11,880-event dump dropped while this Python consumer was starved), never the bound widened.
    for _attempt in range(3):
        run = boot(guest_image, "selftest", n=2, mailbox_size="2M", phys=0x1F000000,
                   consume=True, extra="memtrace.mark_gid=1000")
        _save_log("selftest", run)
        _record_time("selftest", run)
        try:
            dump = _last_state_dump(run.events)
        except ValueError:
            return run  # no dump at all: the tests say what is missing
        if dump and dump[-1].seq - dump[0].seq + 1 == len(dump):
            return run
    return run


def test_selftest_boots_and_unloads_cleanly(selftest: GuestRun) -> None:
    _check_clean(selftest, "selftest")
    status = "\n".join(selftest.lines_between("MEMTRACE-STATUS-BEGIN", "MEMTRACE-STATUS-END"))
    assert "hook kretprobe mmap_region ok" in status, "/proc/memtrace missing or incomplete"
    assert "missing" not in status
    assert "MEMTRACE-RMMOD rc=0" in selftest.log
    assert "MEMTRACE-PROC-STILL-THERE" not in selftest.log
    assert re.search(r"memtrace: unloaded: head \d+ seq \d+ dropped \d+", selftest.log)
    assert selftest.consumed_live > 0, "the live consumer never saw events"


def test_proc_memtrace_refuses_other_users(selftest: GuestRun) -> None:
    """/proc/memtrace takes commands from root only; /proc/memtrace-mark (mark_gid=1000) takes
    phase and counter marks from members of group 1000 and nothing else (scenarios/perm.py runs
    each attempt as another user). Only the member's two marks reach the ring."""
    got = dict(re.findall(r"MT-PERM (\S+ \S+ \S+ \S+) -> (\S+)", selftest.log))
    assert got == {
        "user /proc/memtrace phase user-phase-main": "EACCES",
        "user /proc/memtrace stop stop": "EACCES",
        "user /proc/memtrace-mark phase user-phase-outsider": "EACCES",
        "member /proc/memtrace phase member-phase-main": "EACCES",
        "member /proc/memtrace-mark phase member-phase": "ok",
        "member /proc/memtrace-mark counter 7": "ok",
        "member /proc/memtrace-mark stop stop": "EPERM",
    }, got
    phases = [e["name"] for e in selftest.events if e.type == mb.MARK and e["op"] == 3]
    assert "member-phase" in phases
    assert not [p for p in phases if p.startswith("user-") or p.endswith("-main")], phases
    counters = [(e["name"], e["value"]) for e in selftest.events if e.type == mb.COUNTER]
    assert ("member.value", 7) in counters
    assert len([e for e in selftest.events if e.type == mb.MARK and e["op"] == 2]) == 1


def test_selftest_sequence_and_drops(selftest: GuestRun) -> None:
    acc = _check_sequence(selftest)
    assert acc.first_seq == 0
    ops = [op for op, _, _ in _marks(selftest.events)]
    # load dump, then start: dump + START ... STOP
    assert ops.count(4) >= 2 and ops.count(5) >= 2
    assert ops.index(1) < ops.index(2)


def test_state_dump_matches_proc(selftest: GuestRun) -> None:
    m = re.search(r"MEMTRACE-SELFTEST sleeper=(\d+)", selftest.log)
    assert m
    sleeper = int(m.group(1))
    dump = _last_state_dump(selftest.events)
    assert dump[-1].seq - dump[0].seq + 1 == len(dump), "events lost during the state dump"
    tasks = {e.pid: e for e in dump if e.type == mb.TASK_EXISTING}

    # tasks: pid 1, the sleeper and every kernel thread listed by /proc before the dump
    ps = [ln.split() for ln in selftest.lines_between("MT-PS-BEGIN", "MT-PS-END")]
    stable = [row for row in ps if len(row) >= 4 and (row[2] == "2" or row[0] in ("1", "2"))]
    assert len(stable) > 10
    for row in stable + [[str(sleeper), str(sleeper), "1", "python3"]]:
        pid, tgid, comm = int(row[0]), int(row[1]), row[3]
        assert pid in tasks, f"task {row} missing from the state dump"
        assert tasks[pid]["tgid"] == tgid
        # /proc/<pid>/comm of a kworker also names its current work queue
        assert comm.startswith(str(tasks[pid]["comm"])) or comm == "python3", (row, tasks[pid])
    assert tasks[1]["mm"] != 0 and tasks[2]["mm"] == 0
    sleeper_row = next(row for row in ps if row[0] == str(sleeper))
    assert tasks[sleeper]["ppid"] == int(sleeper_row[2])

    # VMAs of the sleeper == /proc/<pid>/maps printed just before the dump
    mm = tasks[sleeper]["mm"]
    assert tasks[sleeper]["pgd"] % 4096 == 0 and tasks[sleeper]["pgd"] > 0
    got = []
    for e in dump:
        if e.type == mb.VMA and e["mm"] == mm:
            assert e["op"] == 5
            got.append((e["start"], e["end"], _perms(int(e["vm_flags"])),
                        e["pgoff"] if e["ino"] else 0, e["ino"],
                        e["path"] if e["ino"] else ""))
    want = []
    for ln in selftest.lines_between(f"MT-MAPS-BEGIN {sleeper}", f"MT-MAPS-END {sleeper}"):
        parts = ln.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        ino = int(parts[4])
        path = parts[5] if len(parts) > 5 and ino else ""
        want.append((lo, hi, parts[1], int(parts[2], 16) // 4096 if ino else 0, ino, path))
    assert len(want) > 20
    assert got == want

    # page cache: every regular file of the root fs is fully in the page cache (initramfs)
    pages: dict[tuple[int, int], set[int]] = defaultdict(set)
    frames: set[int] = set()
    for e in dump:
        if e.type == mb.PAGECACHE:
            assert e["op"] == 1
            pages[(int(e["dev"]), int(e["ino"]))].add(int(e["index"]))
            assert e["frame"] not in frames, "a frame appears twice in the page-cache dump"
            frames.add(int(e["frame"]))
    files = [ln.split(None, 3) for ln in selftest.lines_between("MT-FILES-BEGIN", "MT-FILES-END")]
    files = [f for f in files if len(f) == 4 and f[0].isdigit()]
    assert len(files) > 1000
    missing = []
    for dev, ino, size, name in files:
        n = (int(size) + 4095) // 4096
        have = pages.get((int(dev), int(ino)), set())
        if not set(range(n)) <= have:
            missing.append((name, n, len(have)))
    assert not missing, f"{len(missing)} files not fully in the dump, e.g. {missing[:5]}"


def test_storm_events(selftest: GuestRun) -> None:
    ev = selftest.events
    m = re.search(r"STORM-FORK (.*)", selftest.log)
    assert m
    children = [(int(p), kind) for p, kind in (x.split(":") for x in m.group(1).split())]
    assert len(children) == 40
    # the storm process: parent of the children
    first_new = next(e for e in ev if e.type == mb.TASK_NEW and e.pid == children[0][0])
    storm = int(first_new["ppid"])
    for pid, kind in children:
        idx = {t: [i for i, e in enumerate(ev) if e.type == t and e.pid == pid]
               for t in (mb.TASK_NEW, mb.TASK_EXEC, mb.TASK_EXIT)}
        assert len(idx[mb.TASK_NEW]) == 1 and len(idx[mb.TASK_EXIT]) == 1, (pid, idx)
        assert ev[idx[mb.TASK_NEW][0]]["ppid"] == storm
        if kind == "exec":
            assert len(idx[mb.TASK_EXEC]) == 1
            assert idx[mb.TASK_NEW][0] < idx[mb.TASK_EXEC][0] < idx[mb.TASK_EXIT][0]
            assert ev[idx[mb.TASK_EXEC][0]]["path"] == "/bin/busybox"
        else:
            assert not idx[mb.TASK_EXEC]
            assert idx[mb.TASK_NEW][0] < idx[mb.TASK_EXIT][0]

    vmas = [e for e in ev if e.type == mb.VMA and e.pid == storm]
    size3 = 3 * 4096
    maps3 = [e for e in vmas if e["op"] == 1 and e["end"] - e["start"] == size3 and not e["ino"]]
    unmaps3 = [e for e in vmas if e["op"] == 2 and e["end"] - e["start"] == size3]
    assert len(maps3) >= 300 and len(unmaps3) >= 300

    m = re.search(r"STORM-MPROTECT ([0-9a-f]+) ([0-9a-f]+) rc=0", selftest.log)
    assert m
    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
    prot = [e for e in vmas if e["op"] == 3 and e["start"] == lo and e["end"] == hi]
    assert prot and int(prot[0]["vm_flags"]) & 7 == VM_READ

    big = 64 * 4096
    assert any(e["op"] == 1 and e["end"] - e["start"] == big for e in vmas), "mremap MAP missing"

    m = re.search(r"STORM-BRK ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", selftest.log)
    assert m
    new, final = int(m.group(2), 16), int(m.group(3), 16)
    brks = [int(e["end"]) for e in vmas if e["op"] == 4]
    assert new in brks and final in brks

    m = re.search(r"STORM-PAGECACHE ino=(\d+)", selftest.log)
    assert m
    ino = int(m.group(1))
    pc = [e for e in ev if e.type == mb.PAGECACHE and e["ino"] == ino and e.seq > first_new.seq]
    adds = {int(e["index"]) for e in pc if e["op"] == 1}
    dels = {int(e["index"]) for e in pc if e["op"] == 2}
    assert adds == {0, 1, 2} and dels == {0, 1, 2}
    assert len(pc) == 6, "each page added and deleted exactly once (no duplicate hooks)"
    first_del = min(i for i, e in enumerate(pc) if e["op"] == 2)
    assert all(e["op"] == 1 for e in pc[:first_del])

    counters = [(e["name"], e["value"]) for e in ev if e.type == mb.COUNTER]
    assert ("selftest.value", 12345) in counters
    assert any(op == 3 and name == "storm" for op, name, _ in _marks(ev))


def test_drop_accounting_small_ring(guest_image: Path) -> None:
    """A 64 KiB ring nobody consumes overflows: every lost event is counted and leaves a gap."""
    run = boot(guest_image, "storm", n=1, mailbox_size="64K", phys=0x1F000000,
               extra="memtrace.dump_wait_ms=0")
    _check_clean(run, "storm-small-ring")
    _record_time("storm-small-ring", run)
    acc = _check_sequence(run)
    assert run.ctrl is not None and run.ctrl.dropped > 0
    assert acc.first_seq == 0 and acc.last_seq + 1 + run.ctrl.dropped == run.ctrl.next_seq
    # /proc/memtrace, read after MARK STOP: the counters of that moment. The shell's own
    # events after it (cat's exec and exit) came later, so the final ring may have dropped
    # more; what was written by then is exact: every event with a smaller seq, none lost
    status = dict(ln.split(" ", 1) for ln in run.lines_between("MEMTRACE-STATUS-BEGIN",
                                                                "MEMTRACE-STATUS-END")
                  if " " in ln)
    dropped, next_seq = int(status["dropped"]), int(status["next_seq"])
    assert int(status["tail"]) == 0, "nobody consumes this ring"
    assert 0 < dropped <= run.ctrl.dropped and next_seq <= run.ctrl.next_seq, status
    written = [e for e in run.events if e.seq < next_seq]
    assert len(written) == next_seq - dropped, (len(written), status)


SCENARIOS = ["single", "terminal-server", "zero-install", "server-heap", "ksm"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(guest_image: Path, name: str) -> None:
    run = boot(guest_image, name, n=2, mailbox_size="16M", phys=0x1E000000)
    _check_clean(run, name)
    _record_time(name, run)
    acc = _check_sequence(run)
    assert acc.gaps == 0, "a 16 MiB ring should not overflow in these scenarios"
    ops = _marks(run.events)
    assert [op for op, _, _ in ops if op in (1, 2)][-2:] == [1, 2], "START then STOP expected"
    execs = [e for e in run.events if e.type == mb.TASK_EXEC]
    assert execs, "no exec seen"
    if name == "ksm":
        sharing = [int(e["value"]) for e in run.events
                   if e.type == mb.COUNTER and e["name"] == "ksm.pages_sharing"]
        assert sharing and max(sharing) > 0, f"KSM never merged: {sharing}"
    if name == "zero-install":
        paths = {str(e["path"]) for e in execs}
        assert any(p.startswith("/zi/") for p in paths), paths


def test_manifest(guest_image: Path) -> None:
    man = json.loads((guest_image / "manifest.json").read_text())
    assert man["suite"] == "bookworm"
    assert re.fullmatch(r"6\.1\.0-\d+-amd64", man["kernel_release"])
    assert any(p.startswith("linux-image-") for p in man["packages"])
    for key, name in (("bzImage", "bzImage"), ("initramfs", "initramfs.cpio"),
                      ("module", "memtrace_agent.ko")):
        digest = hashlib.sha256((guest_image / name).read_bytes()).hexdigest()
        assert man["files"][key]["sha256"] == digest
    ko = (guest_image / "memtrace_agent.ko").read_bytes()
    assert f"vermagic={man['kernel_release']} ".encode() in ko
    assert b"built for kernel %s but running on %s" in ko
