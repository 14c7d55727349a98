"""End to end: trace-record stopped from outside. SIGINT (Ctrl-C) or SIGTERM mid-recording and
QEMU refusing to start: the README's promises of an exit status, a trace marked INCOMPLETE and
still readable, guest RAM removed from /dev/shm and no QEMU left behind.

Real QEMU, the real guest image and plugin; nothing depends on wall-clock speed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtrace.analyses.engine import Replay
from memtrace.tracer.qemu import guest_dir
from memtrace.traces.reader import follow, open_trace
from tests.e2e.record.test_record import shm_files
from tests.paths import REPO

pytestmark = pytest.mark.e2e


def default_signals() -> None:
    """In the child: SIGINT at its default action (a shell starts background jobs with it
    ignored, which a Ctrl-C test must not inherit), and the most permissive umask, under which
    guest RAM must still be the owner's alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.umask(0)


def children(pid: int) -> set[int]:
    """The processes ``pid`` started (QEMU, the guest image check), from /proc."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def is_qemu(pid: int) -> bool:
    try:
        return "qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def alive(pid: int) -> bool:
    """A process still there and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def could_lock_exclusively(item: Path) -> bool:
    """Whether a builder could take the cache item's lock now (tracer/cache.py)."""
    with open(item.parent / ".locks" / f"{item.name}.lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_recording(tmp_path: Path, sig: signal.Signals) -> None:
    """A guest that never powers off (the idle scenario leaves a shell on the console), traced
    from boot; the signal comes once the trace holds a complete chunk and QEMU runs: status 4,
    the trace marked INCOMPLETE with the reason and readable to its end, /dev/shm clean, QEMU
    gone. Under umask 000 guest RAM in /dev/shm is 0600 while QEMU runs."""
    out = tmp_path / "sig.mtr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrace.tracer.record", "-q", "--scenario", "idle",
         "--append", "memtrace.shell=1", "--start", "now", "--timeout", "1200", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        preexec_fn=default_signals)
    qemu: set[int] = set()
    try:
        deadline = time.monotonic() + 900
        chunks, offset = 0, 0
        while chunks < 1:  # a complete chunk: the guest is being traced
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no trace chunk within 900 s"
            offset, _, n = follow(out, offset)
            chunks += n
            qemu |= {p for p in children(proc.pid) if is_qemu(p)}
            time.sleep(0.2)
        assert qemu, "no QEMU among trace-record's children"
        ram = shm_files(proc.pid)
        assert ram and {oct(stat.S_IMODE(os.stat(f).st_mode)) for f in ram} == {"0o600"}, \
            "guest RAM in /dev/shm readable by others"
        # the guest image is read-locked while QEMU runs: a rebuild would wait
        assert not could_lock_exclusively(guest_dir()), "the guest image is not read-locked"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(err[-600:])
    assert proc.returncode == 4, err[-2000:]
    assert "Traceback" not in err
    assert "INCOMPLETE: interrupted by signal" in err, err[-2000:]
    with open_trace(out) as tr:
        assert tr.chunks
        st = Replay(tr, progress=False).run()
    assert st.incomplete == "interrupted by signal" and st.t > 0
    assert not shm_files(proc.pid), "guest RAM left in /dev/shm"
    assert not [p for p in qemu if alive(p)], "QEMU left running"


def test_qemu_refusing_to_start_leaves_nothing(tmp_path: Path) -> None:
    """The installed QEMU, given a device it does not have (through a qemu-system-x86_64 in
    PATH that adds it), creates the guest RAM file in /dev/shm and exits with an error: one
    line that says QEMU's reason, status 1, and the RAM file removed all the same."""
    real = shutil.which("qemu-system-x86_64")
    assert real
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" -device memtrace-no-such-device\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    out = tmp_path / "never.mtr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrace.tracer.record", "-q", "--scenario", "idle",
         "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env=env)
    _, err = proc.communicate(timeout=900)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("trace-record: error: QEMU refused to start"), \
        lines
    assert "not a valid device model name" in lines[0]
    assert not shm_files(proc.pid), "guest RAM left in /dev/shm"
