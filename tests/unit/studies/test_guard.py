"""The guard between a worker and its command: SIGTERM passed on, and a command whose worker
died is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

SLEEPER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('term', flush=True), "
           "sys.exit(4)))\nprint('ready', flush=True)\ntime.sleep(120)\n")


def gone(pid: int, within: float = 20) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_is_passed_on_and_the_status_kept():
    p = subprocess.Popen([sys.executable, "-m", "memtrace.studies.guard", sys.executable,
                          "-c", SLEEPER], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 4
    assert p.stdout.read() == "term\n"


def test_command_is_stopped_when_the_worker_dies(tmp_path):
    """A 'worker' (an intermediate shell) starts the guard and is killed: the guard sees it
    is orphaned and stops the command."""
    pidfile = tmp_path / "pid"
    code = f"import os; open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n" + SLEEPER
    worker = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.Popen([sys.executable, '-m', "
                               "'memtrace.studies.guard', sys.executable, '-c', sys.argv[1]], "
                               "start_new_session=True).wait()", code])
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    worker.kill()
    worker.wait()
    assert gone(int(pidfile.read_text()))


def test_no_command_is_usage():
    r = subprocess.run([sys.executable, "-m", "memtrace.studies.guard"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_sigint_is_passed_on_as_sigterm(sig):
    p = subprocess.Popen([sys.executable, "-m", "memtrace.studies.guard", sys.executable,
                          "-c", SLEEPER], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(sig)
    assert p.wait(timeout=20) == 4
