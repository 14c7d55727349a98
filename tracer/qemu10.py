"""QEMU 10 on a Debian 12 host: the locked bookworm-backports packages, unpacked in the cache.

Debian 12 ships QEMU 7.2 (plugin API 1), Debian 13 QEMU 10.0 (plugin API 4). To run and test the
tracer on both from one Debian 12 machine without replacing the system's QEMU, the three
packages of bookworm-backports' QEMU 10.0 that a TCG run needs (`qemu-system-x86`: the binary,
`qemu-system-common`, `qemu-system-data`: firmware, option ROMs, keymaps) are extracted with
``dpkg-deb -x`` into ``CACHE/qemu10/<version>/`` (memtrace.tracer.cache) and run from there with
``-L CACHE/qemu10/<version>/usr/share/qemu``. The binary was built against bookworm's libraries,
which the system's QEMU 7.2 already pulled in. Debian 13 hosts run their own
``qemu-system-x86_64`` instead (``host_qemu10()``).

The versions and the sha256 of the three ``.deb`` files are the committed lock
``tracer/qemu10.lock.json``, pinned like the guest (``guest-agent/packages.lock.json``): every
unpack installs exactly those files; when bookworm-backports no longer serves a locked version the
unpack stops with one line naming it, and a re-lock is a deliberate, reviewed commit:

    python3 -m memtrace.tracer.qemu10            # unpack (or find) it, print the binary's path
    python3 -m memtrace.tracer.qemu10 --update   # re-lock to what bookworm-backports serves today
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from memtrace.guest import build_image
from memtrace.guest.build_image import KEYRING, MIRROR, Apt, BuildError, deb_path, lock_entry
from memtrace.guest.build_image import sha256_file as _sha256_file
from memtrace.tracer import cache
from memtrace.tracer.qemu import TRACER, SetupError

SUITE = "bookworm-backports"
ARCH = "amd64"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
LOCK = TRACER / "qemu10.lock.json"
RELOCK = "python3 -m memtrace.tracer.qemu10 --update"


def home() -> Path:
    """The cache item ``qemu10``: debs/, apt/ and one unpacked folder per locked version."""
    return cache.path("qemu10")


class BackportsApt(Apt):
    """The guest builder's private apt configuration, pointed at bookworm-backports alone."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        (root / "sources.list").write_text(
            f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n")

    def update(self) -> None:
        print(f"qemu10: apt-get update (private {SUITE} configuration in {self.root})",
              file=sys.stderr)
        subprocess.run(["apt-get", *self._opts(), "-q", "update"], check=True,
                       stdout=subprocess.DEVNULL, text=True)


def read_lock(path: Path = LOCK) -> dict[str, dict[str, object]]:
    """The committed lock: package -> {version, sha256, size, filename}."""
    try:
        doc = json.loads(path.read_text())
        pkgs = doc["packages"]
        if doc.get("suite") != SUITE or sorted(pkgs) != sorted(PACKAGES):
            raise ValueError(f"expected {SUITE} and the packages {', '.join(PACKAGES)}")
        for name, e in pkgs.items():
            if not (isinstance(e.get("version"), str)
                    and re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256", "")))):
                raise ValueError(f"entry {name!r} needs a version and a sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SetupError(f"{path}: not a QEMU 10 lock ({e}); re-lock with {RELOCK}") from None
    return pkgs


def write_lock(pkgs: dict[str, dict[str, object]], path: Path = LOCK) -> None:
    build_image.write_lock(
        path, pkgs, suite=SUITE, arch=ARCH,
        comment="QEMU 10 for Debian 12 hosts, unpacked in the memtrace cache "
                f"(tracer/qemu10.py). Re-lock with `{RELOCK}`: a deliberate, reviewed commit.")


def version_dir(version: str) -> Path:
    """CACHE/qemu10/<Debian version, made a folder name>."""
    return home() / re.sub(r"[^A-Za-z0-9.+-]", "_", version)


def _lock_digest(lock: dict[str, dict[str, object]]) -> str:
    return hashlib.sha256(json.dumps(lock, sort_keys=True).encode()).hexdigest()


def _check_served(apt: BackportsApt, lock: dict[str, dict[str, object]]) -> None:
    for name, e in sorted(lock.items()):
        served = apt.versions(name)
        want = str(e["version"])
        if want not in served:
            now = ", ".join(served) if served else "nothing"
            raise SetupError(f"{name} {want} is locked in tracer/{LOCK.name} but {SUITE} "
                             f"no longer serves it (it serves {now}); re-lock with {RELOCK} "
                             "(then commit the lock)")
        if served[want] != e["sha256"]:
            raise SetupError(f"{name} {want}: {SUITE}'s file has sha256 {served[want]}, the lock "
                             f"says {e['sha256']}; re-lock with {RELOCK} if that is expected")


def _fetch(lock: dict[str, dict[str, object]]) -> dict[str, Path]:
    """The locked .deb files: from the cache's qemu10/debs when their sha256 matches (no network),
    else downloaded after checking that bookworm-backports still serves each version."""
    debdir = home() / "debs"
    debs: dict[str, Path] = {}
    for name, e in lock.items():
        cached = deb_path(debdir, name, str(e["version"]))
        if cached and _sha256_file(cached) == e["sha256"]:
            debs[name] = cached
    need = {n: e for n, e in lock.items() if n not in debs}
    if not need:
        return debs
    apt = BackportsApt(home() / "apt")
    try:
        if not apt.has_lists():
            apt.update()
        try:
            _check_served(apt, need)
        except SetupError:
            apt.update()  # the lists may be older than the lock: look again with today's
            _check_served(apt, need)
        for name, e in sorted(need.items()):
            stale = deb_path(debdir, name, str(e["version"]))
            if stale:
                stale.unlink()
            deb = apt.download(name, str(e["version"]), debdir)
            if _sha256_file(deb) != e["sha256"]:
                deb.unlink()
                raise SetupError(f"{deb.name}: sha256 differs from {LOCK.name}; re-lock with "
                                 f"{RELOCK} if the archive changed it on purpose")
            debs[name] = deb
    except subprocess.CalledProcessError as e:
        raise SetupError(f"{' '.join(map(str, e.cmd[:2]))} ... failed (exit {e.returncode}) "
                         f"while fetching QEMU 10 from {SUITE}: network or mirror problem?"
                         ) from None
    except BuildError as e:
        raise SetupError(str(e.code).removeprefix("build_image: error: ")) from None
    return debs


def ensure(lock_path: Path = LOCK) -> tuple[Path, Path]:
    """The locked QEMU 10, unpacked in the cache (done once, under the item's lock, into a
    staging folder renamed into place): (binary, -L data folder)."""
    lock = read_lock(lock_path)
    version = str(lock["qemu-system-x86"]["version"])
    root = version_dir(version)
    binary = root / "usr/bin/qemu-system-x86_64"
    datadir = root / "usr/share/qemu"

    def ready() -> bool:
        stamp = root / ".unpacked"
        return (stamp.exists() and stamp.read_text().strip() == _lock_digest(lock)
                and binary.exists())

    if ready():
        return binary, datadir
    with cache.lock("qemu10"):
        if ready():  # another run unpacked it while we waited
            return binary, datadir
        debs = _fetch(lock)
        tmp = cache.staging(root)
        for name in PACKAGES:
            r = subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(tmp)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SetupError(f"dpkg-deb -x {debs[name].name} failed: "
                                 f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
        if not (tmp / "usr/bin/qemu-system-x86_64").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise SetupError(f"{debs['qemu-system-x86'].name} holds no "
                             "usr/bin/qemu-system-x86_64")
        (tmp / ".unpacked").write_text(_lock_digest(lock) + "\n")
        cache.replace(tmp, root)
    return binary, datadir


def relock(lock_path: Path = LOCK) -> list[str]:
    """Rewrite the lock with the versions bookworm-backports serves today; the changes."""
    apt = BackportsApt(home() / "apt")
    apt.update()
    try:
        new = {n: lock_entry(apt.show(n)) for n in PACKAGES}
    except BuildError as e:
        raise SetupError(str(e.code).removeprefix("build_image: error: ")) from None
    old = read_lock(lock_path) if lock_path.exists() else {}
    write_lock(new, lock_path)
    return [f"{n}: {old.get(n, {}).get('version', '-')} -> {new[n]['version']}"
            for n in PACKAGES if old.get(n, {}).get("version") != new[n]["version"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m memtrace.tracer.qemu10",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true",
                    help=f"re-lock {LOCK.name} to what {SUITE} serves today (commit it)")
    a = ap.parse_args(argv)
    try:
        if a.update:
            changes = relock()
            print(f"qemu10: re-locked {LOCK}: " + ("; ".join(changes) or "no change"))
        binary, datadir = ensure()
    except SetupError as e:
        print(f"qemu10: error: {e}", file=sys.stderr)
        return 1
    print(f"{binary} -L {datadir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
