"""Fixtures for the tracer tests: the built plugin and the test guest (see tracer_qemu.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.e2e.tracer import tracer_guest
from tests.e2e.tracer.tracer_qemu import BUILD, PLUGIN, QEMU, ROOT


def _newest_mtime(paths: list[str]) -> float:
    return max(os.path.getmtime(p) for p in paths)


@pytest.fixture(scope="session")
def plugin() -> str:
    """Build build/tracer/libmemtrace.so with tracer/build.sh when a source is newer."""
    srcs = [os.path.join(ROOT, "tracer", f) for f in os.listdir(os.path.join(ROOT, "tracer"))
            if f.endswith((".c", ".h", ".sh"))]
    if not os.path.exists(PLUGIN) or os.path.getmtime(PLUGIN) < _newest_mtime(srcs):
        r = subprocess.run([os.path.join(ROOT, "tracer", "build.sh")], capture_output=True,
                           text=True, timeout=1800)
        if r.returncode != 0:
            pytest.fail(f"tracer/build.sh failed:\n{r.stdout}\n{r.stderr}")
    return PLUGIN


@pytest.fixture(scope="session")
def guest() -> dict[str, str]:
    """Kernel + busybox initramfs (tests/e2e_tracer/tracer_guest.py), cached in build/e2e_guest."""
    if shutil.which(QEMU) is None:
        pytest.skip("qemu-system-x86_64 not installed")
    return tracer_guest.build_guest(os.path.join(BUILD, "e2e_guest"))
