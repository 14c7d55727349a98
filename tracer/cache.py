"""Where recording's built things live: one user cache folder, shared safely by concurrent runs.

The cache holds what trace-record builds or fetches once and reuses: the guest image (``guest``,
``guest-TRACE``), the plugin builds (``tracer`` for the host's QEMU, ``tracer-qemu-VERSION``),
the unpacked QEMU 10 (``qemu10``), the QEMU headers and their apt state (``qemu-header``,
``qemu-include``, ``apt``) and, with the workloads, Debian roots (``roots``). Each is a folder
directly under the cache's root, so ``trace-cache`` can list and remove them by name.

Root: ``--cache DIR`` of the commands that build (``set_root``), else ``$MEMTRACE_CACHE``, else
``$XDG_CACHE_HOME/memtrace`` (``~/.cache/memtrace``). It lives here, in the tracer, because
trace-record is what builds everything in it; the guest builder imports only this small module.

Concurrency: a builder holds ``lock(name)`` (``fcntl.flock`` on ``.locks/NAME.lock``, released
by the kernel when the process dies) while it checks and builds an item, so two recordings
starting at once build it once: the second waits, then finds it up to date. A builder writes a
new version into ``staging(dest)`` (a sibling folder) and ``replace(staging, dest)`` renames it
into place, so a reader never sees half a build and a killed build leaves only a stray
``.NAME.new-PID`` folder (removed by the next build of that item and by ``trace-cache --clean``).
trace-record holds the guest image's and the plugin's locks shared from reading the manifest
until QEMU exits, so a rebuild of either waits for the recordings that use them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

ENV = "MEMTRACE_CACHE"
_root: Path | None = None


def default_root() -> Path:
    """``$MEMTRACE_CACHE``, else ``$XDG_CACHE_HOME/memtrace``, else ``~/.cache/memtrace``."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return (base / "memtrace").resolve()


def set_root(path: str | Path | None) -> None:
    """Use ``path`` as the cache from now on (``--cache DIR``); None: the default again. Also
    exported as $MEMTRACE_CACHE so that the build scripts run as subprocesses use it too."""
    global _root
    _root = Path(path).expanduser().resolve() if path is not None else None
    if _root is not None:
        os.environ[ENV] = str(_root)


def root() -> Path:
    return _root if _root is not None else default_root()


def path(name: str) -> Path:
    """The folder of one cached item (not created)."""
    return root() / name


@contextlib.contextmanager
def lock(name: str, shared: bool = False) -> Iterator[Path]:
    """Hold the item's lock (exclusive to build, shared to read); yields its folder."""
    with lock_at(root() / name, shared) as p:
        yield p


@contextlib.contextmanager
def lock_at(dest: Path, shared: bool = False) -> Iterator[Path]:
    """The lock of any built folder: ``.locks/NAME.lock`` beside it (the cache's own for an
    item, so a build given ``--out`` in the cache and trace-record's lock each other out)."""
    locks = dest.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{dest.name}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield dest
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def staging(dest: Path) -> Path:
    """A fresh sibling folder to build a new version of ``dest`` in (stale ones removed: only
    the lock's holder calls this, so no other build is using them)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for old in dest.parent.glob(f".{dest.name}.new-*"):
        shutil.rmtree(old, ignore_errors=True)
    for old in dest.parent.glob(f".{dest.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.new-{os.getpid()}"
    tmp.mkdir()
    return tmp


def replace(tmp: Path, dest: Path) -> None:
    """Put the finished build ``tmp`` at ``dest``: the old version is renamed away first, then
    the new one renamed in (a reader opening files meanwhile finds none, never a mix)."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def size(p: Path) -> int:
    """Bytes on disk under ``p`` (hard links counted once, symlinks not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for n in files:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def items() -> list[tuple[str, int]]:
    """(name, bytes) of every item in the cache, stray build folders included."""
    r = root()
    if not r.is_dir():
        return []
    return [(p.name, size(p)) for p in sorted(r.iterdir())
            if p.is_dir() and p.name != ".locks"]


def clean(names: list[str] | None = None) -> list[str]:
    """Remove the named items (all when None), each under its lock; returns what was removed."""
    removed = []
    for name, _ in items():
        item = name.split(".new-")[0].split(".old-")[0].lstrip(".")
        if names and item not in names:
            continue
        with lock(item):  # waits for a build of it to finish (its staging folder goes too)
            if (root() / name).exists():
                shutil.rmtree(root() / name)
                removed.append(name)
    return removed
