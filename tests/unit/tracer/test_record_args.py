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
    (["--smp", "0"], 2, "argument --smp: must be at least 1"),
    (["--qemu", "/bin/true"], 1, "--qemu /bin/true is not a QEMU system emulator"),
    (["--qemu", "/nonexistent/qemu"], 1, "--qemu /nonexistent/qemu: no such file"),
    (["--timeout", "0"], 1, "--timeout 0: give a positive number of seconds"),
    (["--scenario", "nope"], 2, "argument --scenario: invalid choice"),
    (["--layout", "zero-install"], 1, "--layout is a choice of the desktop scenario"),
    (["--scenario", "game-server", "--layout", "zero-install"], 1,
     "--layout is a choice of the desktop scenario"),
    (["--scenario", "desktop", "--layout", "thin-client"], 2, "argument --layout: invalid"),
    (["--scenario", "desktop", "--run", "true"], 1,
     "--scenario desktop runs its own script; drop --run/--script"),
    (["--scenario", "game-server", "--marks", "workload"], 1,
     "--scenario game-server marks its own phases; drop --marks"),
])
def test_bad_input_is_one_line(args, rc, says, tmp_path):
    p = record(*args)
    assert p.returncode == rc
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("trace-record: error:") and says in last, p.stderr
    assert "QEMU" not in p.stderr.replace(last, "") and "building" not in p.stderr


def test_qemu_without_plugin_support_is_one_line(tmp_path):
    """A QEMU built without --enable-plugins knows no -plugin option (Debian's builds all have
    it, so this one is a script that answers --version and -plugin as such a build does)."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in\n"
                    "  *--version*) echo 'QEMU emulator version 9.9.9';;\n"
                    "  *-plugin*) echo 'qemu-system-x86_64: -plugin: invalid option' >&2;"
                    " exit 1;;\n"
                    "esac\n")
    fake.chmod(0o755)
    plugin = tmp_path / "libmemtrace.so"
    plugin.write_bytes(b"")
    p = record("--qemu", str(fake), "--plugin", str(plugin), "-o", str(tmp_path / "t.mtr"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == (f"trace-record: error: QEMU 9.9.9 ({fake}) has no TCG plugin support "
                    "(built without --enable-plugins): use a QEMU that has it (Debian's do)"), \
        p.stderr
    assert "building" not in p.stderr
