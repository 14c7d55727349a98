"""Two guest builds started at once into one cache folder: one builds, the other waits on the
item's lock and finds that build up to date; the image is whole and no staging folder is left.

The cache is seeded with the locked .deb files only (hard links from build/guest/debs), so
this runs without the network; the builds themselves are real (module, initramfs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.paths import BUILD


def test_two_builds_at_once_build_once(tmp_path: Path, guest_image: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "guest").mkdir(parents=True)
    shutil.copytree(BUILD / "guest" / "debs", cache / "guest" / "debs", copy_function=os.link)
    env = {**os.environ, "MEMTRACE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "memtrace.guest.build_image"]  # default --out: CACHE/guest
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=1200)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    built = [e for e in errs if "writing initramfs.cpio" in e]
    waited = [e for e in errs if "built by another run meanwhile" in e]
    assert len(built) == 1 and len(waited) == 1, errs
    out = cache / "guest"
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["files"].values():
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert manifest["input_digest"] == json.loads(
        (guest_image / "manifest.json").read_text())["input_digest"]
    assert sorted(p.name for p in cache.iterdir()) == [".locks", "guest"]
