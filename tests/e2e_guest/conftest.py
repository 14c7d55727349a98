"""Fixtures for the guest end-to-end tests: the image (built once, cached under build/guest)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))


def _load_builder():
    path = REPO / "guest-agent/build_image.py"
    spec = importlib.util.spec_from_file_location("build_image", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def guest_image() -> Path:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed")
    out = REPO / "build/guest"
    _load_builder().build(out)
    return out
