"""The package as a cluster's worker gets it: ``python -m build`` makes an sdist and a wheel
from it, the wheel goes into a fresh venv outside the repository, and from another folder that
venv's trace-record builds the guest image and the plugin from the package's own files into a
fresh cache, records a scenario with --verify, and its trace-analyze runs the oracle on it.

To keep the test off the network, the new cache is seeded with the downloads only (the locked
.deb files and the QEMU plugin header, hard-linked or copied from the clone's build/ cache that
the session fixture filled); everything built (kernel module, initramfs, plugin) is built anew
from the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import BUILD, REPO

pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_installed_outside_the_clone_records_and_verifies(tmp_path: Path, say) -> None:
    # an environment that knows nothing of the clone: no PYTHONPATH, no active venv
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    dist = tmp_path / "dist"
    t0 = time.monotonic()
    b = run([sys.executable, "-m", "build", "--outdir", dist, REPO], tmp_path, env, 900)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    wheels, sdists = list(dist.glob("memtrace-*.whl")), list(dist.glob("memtrace-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())

    t_build = time.monotonic() - t0
    venv = tmp_path / "venv"
    v = run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env, 300)
    assert v.returncode == 0, v.stderr
    # pip of the test's own environment installs into the new venv (no ensurepip needed)
    p = run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
             wheels[0]], tmp_path, env, 900)
    assert p.returncode == 0, p.stderr[-3000:]
    t_install = time.monotonic() - t0 - t_build

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([venv / "bin" / "python", "-c",
                 "import memtrace.guest.build_image as b, memtrace.tracer.qemu as q; "
                 "print(b.HERE); print(q.TRACER)"], work, env, 120)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(venv) and not Path(line).is_relative_to(REPO), line

    cache = tmp_path / "cache"
    (cache / "guest").mkdir(parents=True)
    shutil.copytree(BUILD / "guest" / "debs", cache / "guest" / "debs", copy_function=os.link)
    shutil.copytree(BUILD / "qemu-header", cache / "qemu-header")

    t1 = time.monotonic()
    # --cache wins over $MEMTRACE_CACHE (the tests' build/, where all is built already)
    rec = run([venv / "bin" / "trace-record", "--cache", cache, "--scenario", "single", "-n", "1",
               "--verify", "-o", "single.mtr"], work, env, 3000)
    t_record = time.monotonic() - t1
    assert rec.returncode == 0, rec.stderr[-3000:]
    assert "building the guest image" in rec.stderr and "building the tracer plugin" in rec.stderr
    assert "0 differ" in rec.stderr, rec.stderr[-2000:]
    assert (cache / "guest" / "manifest.json").is_file()
    assert (cache / "tracer" / "libmemtrace.so").is_file()
    assert not (work / "build").exists()  # nothing built in the current folder

    an = run([venv / "bin" / "trace-analyze", "--oracle", "single.mtr"], work, env, 1800)
    assert an.returncode == 0, an.stderr[-2000:]
    assert "oracle" in an.stdout.lower()

    env["MEMTRACE_CACHE"] = str(cache)
    shown = run([venv / "bin" / "trace-cache"], work, env, 120)
    assert shown.returncode == 0 and f"cache: {cache}" in shown.stdout
    assert " guest\n" in shown.stdout and " tracer\n" in shown.stdout
    say(f"wheel {wheels[0].stat().st_size >> 10} KiB, sdist {sdists[0].stat().st_size >> 10} "
        f"KiB; python -m build {t_build:.0f} s, venv + pip install {t_install:.0f} s; "
        f"guest and plugin built in a fresh cache and single n=1 recorded with 0 differing "
        f"frames in {t_record:.0f} s")
