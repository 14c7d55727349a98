"""The guest is built from the committed package lock (guest-agent/packages.lock.json), and a
lock the archive no longer honours stops the build with one line that says what to do.

These tests talk to Debian's archive (deb.debian.org), as every guest build does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

BUILD = [sys.executable, str(REPO / "guest-agent/build_image.py")]
LOCK = REPO / "guest-agent/packages.lock.json"


def test_built_guest_is_the_lock(guest_image):
    lock = json.loads(LOCK.read_text())
    manifest = json.loads((guest_image / "manifest.json").read_text())
    assert manifest["packages"] == {n: e["version"] for n, e in lock["packages"].items()}
    assert manifest["lock"] == "guest-agent/packages.lock.json"
    # every file of the root says which packages made it, and they are locked ones
    files = json.loads((guest_image / "rootfs-files.json").read_text())
    owners = {p for rec in files.values() for p in rec["packages"]}
    assert owners - {"memtrace"} <= set(lock["packages"])
    assert "zlib1g" in owners and "libc6" in owners


def _build_with(lock: dict, tmp_path: Path, guest_image: Path) -> subprocess.CompletedProcess:
    lockf = tmp_path / "lock.json"
    lockf.write_text(json.dumps(lock))
    out = tmp_path / "out"
    # today's package lists, so only the check is tested, not apt's download of them
    shutil.copytree(guest_image / "apt", out / "apt")
    return subprocess.run([*BUILD, "--lock", str(lockf), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("what", ["version", "sha256"])
def test_lock_not_served_is_one_line(what, tmp_path, guest_image):
    lock = json.loads(LOCK.read_text())
    entry = lock["packages"]["zlib1g"]
    served = entry["version"]
    if what == "version":
        entry["version"] = "1:0.0-memtrace-test"
    else:
        entry["sha256"] = "0" * 64
    r = _build_with(lock, tmp_path, guest_image)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("build_image: error: zlib1g ")
    assert "build_image.py --update" in last
    if what == "version":
        assert "1:0.0-memtrace-test is locked but bookworm no longer serves it" in last
        assert served in last and "--newest" in last
    else:
        assert "sha256" in last and "0" * 64 in last
    assert "Traceback" not in r.stderr
    # nothing was built
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_not_a_lock(tmp_path):
    lockf = tmp_path / "lock.json"
    lockf.write_text('{"suite": "bookworm", "arch": "amd64", "packages": {"zlib1g": "1.2"}}')
    r = subprocess.run([*BUILD, "--lock", str(lockf), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"build_image: error: {lockf}: not a package lock (entry 'zlib1g' needs a version and a "
        "sha256); re-lock with python3 guest-agent/build_image.py --update"]
