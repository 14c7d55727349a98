"""The build cache (memtrace.tracer.cache): where it is, concurrent builds, trace-cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtrace.tracer import cache, cache_cli

# One builder as trace-record's are written: check, lock, check again, build into a staging
# folder slowly (so the other process surely arrives while it builds), rename into place.
BUILDER = r"""
import os, sys, time
from pathlib import Path
from memtrace.tracer import cache
start = Path(sys.argv[1])
while not start.exists():
    time.sleep(0.001)
item = cache.path("thing")
def ready():
    return (item / "done").exists()
if not ready():
    with cache.lock("thing"):
        if not ready():
            with open(cache.root() / "builds.log", "a") as log:
                log.write(f"{os.getpid()}\n")
            tmp = cache.staging(item)
            with open(tmp / "image", "wb") as f:
                for _ in range(20):
                    f.write(b"x" * 65536)
                    f.flush()
                    time.sleep(0.01)
            (tmp / "done").write_text("ok")
            cache.replace(tmp, item)
print((item / "image").stat().st_size)
"""

READER = r"""
import sys, time
from pathlib import Path
from memtrace.tracer import cache
stop = Path(sys.argv[1])
seen = set()
while not stop.exists():
    try:
        seen.add((cache.path("thing") / "image").stat().st_size)
    except FileNotFoundError:
        seen.add(0)
    time.sleep(0.001)
print(sorted(seen))
"""


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_root() == tmp_path / "xdg" / "memtrace"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_root() == tmp_path / "home" / ".cache" / "memtrace"
    monkeypatch.setenv(cache.ENV, str(tmp_path / "mine"))
    assert cache.root() == tmp_path / "mine"
    cache.set_root(tmp_path / "opt")
    try:
        assert cache.root() == tmp_path / "opt" and os.environ[cache.ENV] == str(tmp_path / "opt")
    finally:
        cache.set_root(None)


def test_two_builds_at_once_build_once_and_no_reader_sees_half(tmp_path: Path) -> None:
    env = {**os.environ, cache.ENV: str(tmp_path / "c")}
    start, stop = tmp_path / "start", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(stop)], env=env,
                              stdout=subprocess.PIPE, text=True)
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, str(start)], env=env,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)  # both interpreters up and waiting
    start.touch()
    outs = [b.communicate(timeout=120)[0] for b in builders]
    stop.touch()
    seen = reader.communicate(timeout=60)[0]
    assert [b.returncode for b in builders] == [0, 0]
    assert [o.strip() for o in outs] == [str(20 * 65536)] * 2  # both see the whole image
    assert len((tmp_path / "c" / "builds.log").read_text().split()) == 1  # built once
    assert set(eval(seen)) <= {0, 20 * 65536}  # absent or whole, never torn
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".thing")] == []


def test_trace_cache_lists_and_cleans(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))  # --cache sets it: restored after
    root = tmp_path / "c"
    (root / "guest").mkdir(parents=True)
    (root / "guest" / "bzImage").write_bytes(b"k" * 100_000)
    (root / "tracer").mkdir()
    (root / "tracer" / "libmemtrace.so").write_bytes(b"p" * 5000)
    (root / ".guest.new-123").mkdir()  # a killed build's leftover
    try:
        cache_cli.main(["--cache", str(root)])
        out = capsys.readouterr().out
        assert f"cache: {root}" in out and "guest" in out and "tracer" in out
        assert "KiB  total" in out
        with pytest.raises(SystemExit) as e:
            cache_cli.main(["--cache", str(root), "--clean", "nothing-such"])
        assert e.value.code == 2
        assert "no item nothing-such" in capsys.readouterr().err
        cache_cli.main(["--cache", str(root), "--clean", "guest"])
        assert sorted(p.name for p in root.iterdir()) == [".locks", "tracer"]
        cache_cli.main(["--cache", str(root), "--clean"])
        assert [p.name for p in root.iterdir()] == [".locks"]
        cache_cli.main(["--cache", str(root)])
        assert "(empty)" in capsys.readouterr().out
    finally:
        cache.set_root(None)
