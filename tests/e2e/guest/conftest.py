"""Fixtures for the guest end-to-end tests: the image (built once, cached under build/guest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memtrace.guest import build_image
from tests.paths import REPO

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def guest_image() -> Path:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed")
    out = REPO / "build/guest"
    build_image.build(out)
    return out
