"""trace-record's bad input: one line, a non-zero status, before any guest is built or QEMU
starts (these run in a second each: nothing boots)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def record(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memtrace.tracer.record", "-q", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, rc, says", [
    (["-o", "/proc/nope/x.mtr"], 1, "-o /proc/nope/x.mtr: cannot create the folder /proc/nope"),
    (["-o", "/tmp"], 1, "-o /tmp: is a folder"),
    (["--epoch", "0"], 2, "an epoch is at least 10,000 guest instructions"),
    (["--epoch", "soon"], 2, "argument --epoch"),
    (["-n", "0"], 2, "argument -n: must be at least 1"),
    (["--timeout", "0"], 1, "--timeout 0: give a positive number of seconds"),
    (["--scenario", "nope"], 2, "argument --scenario: invalid choice"),
])
def test_bad_input_is_one_line(args, rc, says, tmp_path):
    p = record(*args)
    assert p.returncode == rc
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("trace-record: error:") and says in last, p.stderr
    assert "QEMU" not in p.stderr and "building" not in p.stderr
