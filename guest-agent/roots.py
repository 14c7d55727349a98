#!/usr/bin/env python3
"""Debian root file systems for workloads on a disk, built with mmdebstrap from locked packages.

Usage (from the repository, with the project's venv):
  python -m memtrace.guest.roots build NAME [--packages p1,p2]   # -> CACHE/roots/<key>/
  python -m memtrace.guest.roots lock NAME                        # re-lock NAME (commit it)
  python -m memtrace.guest.roots list

A root is Debian bookworm, mmdebstrap's ``minbase`` variant (the Essential and Required
packages: about 90, 170 MB) plus the packages of its recipe. The project's own roots (the ones
its scenarios use: ``base``, ``desktop``, ``game-server``) are locked in the committed
guest-agent/roots.lock.json like the guest itself (README, "The guest is pinned"): every package
of the finished root, with version and .deb sha256. A build pins apt to exactly those versions
(an apt preferences file, Pin-Priority 1001, inside the root while mmdebstrap runs) after
checking that bookworm still serves each of them with the locked sha256; a version no longer
served stops the build with one line naming it and the re-lock command. ``lock NAME`` builds the
recipe with today's versions and rewrites its entry (a deliberate, reviewed commit).

Extra packages (``--packages``, trace-record --packages) are added to a locked root: the
locked packages keep their versions, the new ones and their new dependencies come at today's
versions, and the root's manifest (and the trace header) lists what was installed. Such a root
is cached under a key that covers the lock, the package names and the archive's index (a new
index builds again).

Output, under CACHE/roots/<key>/ (CACHE: the build cache, tracer/cache.py): ``rootfs/`` (the
tree, also what ``trace-analyze --guest-root`` reads), ``root.ext4`` (an ext4 image of it,
``mke2fs -d``, sparse, with free room for the workload; trace-record runs the guest on a
throwaway qcow2 overlay of it) and ``manifest.json`` (recipe, packages and versions, the cache
key). .deb files are kept in CACHE/roots/debs, apt's lists in CACHE/roots/apt (a private
configuration, as build_image.py: bookworm, -updates and -security, main). Needs root
(mmdebstrap's root mode), mmdebstrap and e2fsprogs (scripts/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memtrace.guest.build_image import (
    ARCH,
    KEYRING,
    MIRROR,
    SECURITY_MIRROR,
    SUITE,
    Apt,
    BuildError,
    lock_changes,
)
from memtrace.tracer import cache

HERE = Path(__file__).resolve().parent
ROOTS_LOCK = HERE / "roots.lock.json"
VARIANT = "minbase"
# file times inside the root (mmdebstrap honours it): the same lock gives the same bytes
SOURCE_DATE_EPOCH = "1700000000"
# a fixed file system UUID and directory hash seed: the same tree gives the same image
FS_UUID = "6d656d74-7261-4365-8000-000000000001"
FREE_SPACE = 2 << 30  # free room in the ext4 image for the workload (sparse: costs no disk)
# bump when the way a root is built changes (mmdebstrap options, hooks, the image): cached
# roots of another version are built again
BUILD_VERSION = 1
LISTS_MAX_AGE = 24 * 3600  # apt lists older than this are refreshed before an unlocked build

# The recipes: packages on top of minbase. The lock holds the full resolved set of each.
RECIPES: dict[str, list[str]] = {
    "base": [],
    # the thesis's desktop (seed chapter 5.1): a framebuffer X server, an Xfce session, Firefox
    # and LibreOffice Writer per user (trace-record --scenario desktop)
    "desktop": ["xvfb", "xauth", "x11-utils", "dbus-x11", "xfce4-session", "xfwm4",
                "xfce4-panel", "xfdesktop4", "xfce4-settings", "fonts-dejavu-core",
                "firefox-esr", "libreoffice-writer", "procps"],
    # dedicated game servers: OpenArena (Quake 3 engine; maps decompressed from .pk3 into heap)
    "game-server": ["openarena-server", "procps"],
}
# free room in a recipe's image where its scenario needs more than FREE_SPACE (zero-install
# copies the applications once per user: 3 users need about 4 GB)
FREE: dict[str, int] = {"desktop": 8 << 30, "game-server": 4 << 30}


def log(msg: str) -> None:
    print(f"[roots] {msg}", file=sys.stderr, flush=True)


def relock_cmd(name: str) -> str:
    return f"python -m memtrace.guest.roots lock {name}"


# ---------------------------------------------------------------- the lock


def read_roots_lock(path: Path = ROOTS_LOCK) -> dict[str, dict]:
    """name -> {"include": [...], "packages": {pkg: {version, sha256, size, filename}}}."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        roots = doc["roots"]
        for name, r in roots.items():
            if not isinstance(r.get("include"), list) or not isinstance(r.get("packages"), dict):
                raise ValueError(f"root {name!r} needs include and packages")
            for pkg, e in r["packages"].items():
                if not (isinstance(e, dict) and isinstance(e.get("version"), str)
                        and re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256", "")))):
                    raise ValueError(f"root {name!r}: entry {pkg!r} needs a version and a sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BuildError(f"{path}: not a roots lock ({e})") from None
    if doc.get("suite") != SUITE or doc.get("arch") != ARCH or doc.get("variant") != VARIANT:
        raise BuildError(f"{path}: locks {doc.get('suite')}/{doc.get('arch')}/"
                         f"{doc.get('variant')}, this build needs {SUITE}/{ARCH}/{VARIANT}")
    return roots


def write_roots_lock(roots: dict[str, dict], path: Path = ROOTS_LOCK) -> None:
    doc = {
        "comment": "Debian roots for workloads on a disk, installed exactly "
                   "(guest-agent/roots.py). Re-lock one with `python -m memtrace.guest.roots "
                   "lock NAME`: a deliberate, reviewed commit.",
        "suite": SUITE,
        "arch": ARCH,
        "variant": VARIANT,
        "roots": {n: {"include": r["include"], "packages": dict(sorted(r["packages"].items()))}
                  for n, r in sorted(roots.items())},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- apt


def home() -> Path:
    """The cache item ``roots``: one folder per root key, and debs/, apt/ they share."""
    return cache.path("roots")


def private_apt() -> Apt:
    return Apt(home() / "apt")


def fresh_lists(apt: Apt, max_age: float = LISTS_MAX_AGE) -> None:
    """Download the archive's index if it is missing or older than max_age seconds."""
    lists = list((apt.root / "state/lists").glob("*Packages*"))
    if not lists or time.time() - min(p.stat().st_mtime for p in lists) > max_age:
        apt.update()


def index_digest(apt: Apt) -> str:
    """Identity of the archive's index as downloaded (the Release files name every Packages
    file by hash)."""
    h = hashlib.sha256()
    for p in sorted((apt.root / "state/lists").glob("*Release")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def served_versions(apt: Apt, names: list[str]) -> dict[str, dict[str, str]]:
    """Every version the archive serves of each package -> its .deb's sha256 (one apt-cache
    call for all of them: one per package takes a second each)."""
    served: dict[str, dict[str, str]] = {n: {} for n in names}
    if not names:
        return served
    out = subprocess.run(["apt-cache", *apt._opts(), "show", *names], capture_output=True,
                         text=True).stdout
    pkg = ver = ""
    for line in out.splitlines():
        if line.startswith("Package:"):
            pkg, ver = line.split(":", 1)[1].strip(), ""
        elif line.startswith("Version:"):
            ver = line.split(":", 1)[1].strip()
        elif line.startswith("SHA256:") and pkg in served and ver:
            served[pkg].setdefault(ver, line.split(":", 1)[1].strip())
    return served


def check_packages_exist(apt: Apt, names: list[str]) -> None:
    for n in names:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", n):
            raise BuildError(f"--packages: {n!r} is not a Debian package name")
    served = served_versions(apt, names)
    for n in names:
        if not served[n]:
            raise BuildError(f"package {n} does not exist in {SUITE} (main, -updates, "
                             "-security); check the name with apt-cache search")


def check_locked_served(apt: Apt, name: str, pkgs: dict[str, dict]) -> None:
    """One line and stop if the archive no longer serves a locked version with its sha256."""
    all_served = served_versions(apt, sorted(pkgs))
    for pkg, e in sorted(pkgs.items()):
        served = all_served[pkg]
        want = e["version"]
        if want not in served:
            now = ", ".join(served) if served else "nothing"
            raise BuildError(
                f"root {name}: {pkg} {want} is locked but {SUITE} no longer serves it (it serves "
                f"{now}); re-lock with {relock_cmd(name)} (then commit "
                "guest-agent/roots.lock.json)")
        if served[want] != e["sha256"]:
            raise BuildError(f"root {name}: {pkg} {want}: the archive's file has sha256 "
                             f"{served[want]}, the lock says {e['sha256']}; re-lock with "
                             f"{relock_cmd(name)} if that is expected")


def package_fields(apt: Apt, versions: dict[str, str]) -> dict[str, dict[str, object]]:
    """Lock entries (version, sha256, size, pool file) of the given package versions, from one
    apt-cache call."""
    out = subprocess.run(["apt-cache", *apt._opts(), "show", *(f"{p}={v}" for p, v in
                                                              sorted(versions.items()))],
                         capture_output=True, text=True).stdout
    entries: dict[str, dict[str, object]] = {}
    for stanza in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace():
                k, _, v = line.partition(":")
                fields.setdefault(k, v.strip())
        pkg = fields.get("Package")
        if pkg in versions and fields.get("Version") == versions[pkg] and pkg not in entries:
            entries[pkg] = {"version": versions[pkg], "sha256": fields["SHA256"],
                            "size": int(fields["Size"]), "filename": fields["Filename"]}
    missing = sorted(set(versions) - set(entries))
    if missing:
        raise BuildError(f"the archive has no record of {', '.join(missing[:5])} at the "
                         "installed versions")
    return entries


# ---------------------------------------------------------------- building


def root_key(name: str, include: list[str], pinned: dict[str, dict], extra: list[str],
             index: str | None) -> str:
    h = hashlib.sha256()
    doc = {"name": name, "include": include, "pinned": pinned, "extra": extra, "index": index,
           "variant": VARIANT, "epoch": SOURCE_DATE_EPOCH,
           "free": FREE.get(name, FREE_SPACE),
           "build": BUILD_VERSION}
    h.update(json.dumps(doc, sort_keys=True).encode())
    return h.hexdigest()[:16]


def mmdebstrap(target: Path, include: list[str], pinned: dict[str, dict], debs: Path,
               logfile: Path) -> None:
    """Build the tree at target with mmdebstrap: minbase + include, locked versions pinned."""
    prefs = target.parent / "preferences"
    prefs.write_text("".join(f"Package: {p}\nPin: version {e['version']}\nPin-Priority: 1001\n\n"
                             for p, e in sorted(pinned.items())))
    debs.mkdir(parents=True, exist_ok=True)
    mirrors = [f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main",
               f"deb [signed-by={KEYRING}] {MIRROR} {SUITE}-updates main",
               f"deb [signed-by={KEYRING}] {SECURITY_MIRROR} {SUITE}-security main"]
    cmd = [
        "mmdebstrap", f"--variant={VARIANT}", "--mode=root", f"--architectures={ARCH}",
        "--skip=essential/unlink", "--skip=download/empty",
        f"--keyring={KEYRING}",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives \"$1\"/etc/apt/preferences.d",
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--setup-hook=cp {prefs} \"$1\"/etc/apt/preferences.d/memtrace-lock",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        "--customize-hook=rm -f \"$1\"/etc/apt/preferences.d/memtrace-lock "
        "\"$1\"/etc/resolv.conf \"$1\"/etc/hostname",
        "--customize-hook=echo memtrace-guest > \"$1\"/etc/hostname",
    ]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [SUITE, str(target), *mirrors]
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    with logfile.open("w") as logf:
        r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = [ln for ln in logfile.read_text(errors="replace").splitlines()
                if ln.startswith(("E:", "mmdebstrap: error", "W: Unable"))]
        raise BuildError("mmdebstrap failed" + (f": {tail[-1]}" if tail else "")
                         + f" (log: {logfile})")


def installed_packages(rootfs: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={rootfs / 'var/lib/dpkg'}", "-W",
                          "-f=${db:Status-Abbrev}\t${Package}\t${Version}\n"],
                         capture_output=True, text=True, check=True).stdout
    pkgs = {}
    for line in out.splitlines():
        status, pkg, ver = line.split("\t")
        if status.startswith("ii"):
            pkgs[pkg] = ver
    return pkgs


def make_ext4(rootfs: Path, image: Path, label: str = "memtrace-root",
              free: int = FREE_SPACE) -> None:
    """An ext4 image of a directory tree (owners, modes, links as they are), without mounting:
    ``mke2fs -d``. Inode tables are written now (lazy_itable_init=0), so the guest's kernel
    does not initialise them in the background while a workload runs."""
    used = int(subprocess.run(["du", "-s", "-B1", "--apparent-size", str(rootfs)],
                              capture_output=True, text=True, check=True).stdout.split()[0])
    files = sum(1 for _ in rootfs.rglob("*"))
    size = (used + used // 4 + free + (64 << 20)) // (1 << 20)
    inodes = max(65536, 2 * files + 65536)
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(rootfs), "-L", label,
                        "-N", str(inodes), "-U", FS_UUID,
                        "-E", f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={FS_UUID}",
                        str(tmp), f"{size}M"],
                       capture_output=True, text=True,
                       env={**os.environ, "E2FSPROGS_FAKE_TIME": SOURCE_DATE_EPOCH,
                            "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        msg = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise BuildError(f"mke2fs -d {rootfs} failed: {msg}")
    tmp.replace(image)


def build(name: str = "base", extra: list[str] | None = None, newest: bool = False,
          lock_path: Path = ROOTS_LOCK, out_base: Path | None = None) -> dict:
    """Build (or find cached) the root NAME (+ extra packages); returns its manifest, with
    ``dir`` set to the directory that holds rootfs/ and root.ext4.

    Under the lock of ``out_base`` (default the cache item ``roots``): the roots share debs/
    and apt/, so one build at a time; a root is built in a staging folder renamed into place."""
    if os.geteuid() != 0:
        raise BuildError("building a Debian root needs root (mmdebstrap --mode=root)")
    if shutil.which("mmdebstrap") is None:
        raise BuildError("mmdebstrap is not installed: run bash scripts/setup.sh")
    extra = sorted(set(extra or []))
    if name not in RECIPES:
        raise BuildError(f"no root recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    include = sorted(set(RECIPES[name]))
    out_base = out_base or home()
    with cache.lock_at(out_base):
        return _build(name, include, extra, newest, lock_path, out_base)


def _build(name: str, include: list[str], extra: list[str], newest: bool, lock_path: Path,
           out_base: Path) -> dict:
    apt = Apt(out_base / "apt")
    locked = read_roots_lock(lock_path).get(name)
    if newest:
        pinned: dict[str, dict] = {}
    elif locked is None:
        raise BuildError(f"root {name} is not locked in {lock_path}; lock it with "
                         f"{relock_cmd(name)}")
    else:
        if locked["include"] != include:
            raise BuildError(f"root {name}: the lock was made for packages {locked['include']}, "
                             f"the recipe says {include}; re-lock with {relock_cmd(name)}")
        pinned = locked["packages"]
    index = None
    if extra or newest:
        fresh_lists(apt)
        check_packages_exist(apt, extra)
        index = index_digest(apt)
    key = root_key(name, include, pinned, extra, index)
    out = out_base / key
    manifest_f = out / "manifest.json"
    if manifest_f.exists() and (out / "root.ext4").exists():
        manifest = json.loads(manifest_f.read_text())
        manifest["dir"] = str(out)
        return manifest

    if pinned:
        if not apt.has_lists():
            apt.update()
        try:
            check_locked_served(apt, name, pinned)
        except BuildError:
            apt.update()  # the lists may be older than the lock
            check_locked_served(apt, name, pinned)
    tmp = cache.staging(out)
    try:
        manifest = _build_into(tmp, name, include, extra, pinned, lock_path, key, out_base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache.replace(tmp, out)
    manifest["dir"] = str(out)
    log(f"done: {out}")
    return manifest


def _build_into(out: Path, name: str, include: list[str], extra: list[str], pinned: dict,
                lock_path: Path, key: str, out_base: Path) -> dict:
    """mmdebstrap the root into the staging folder ``out``, its ext4 image and manifest."""
    newest = not pinned
    rootfs = out / "rootfs"
    log(f"building root {name}" + (f" + {','.join(extra)}" if extra else "")
        + f" with mmdebstrap ({'today' if newest else 'locked'} versions) -> {out}")
    t0 = time.monotonic()
    mmdebstrap(rootfs, include + extra, pinned, out_base / "debs", out / "mmdebstrap.log")
    got = installed_packages(rootfs)
    if pinned:
        wrong = [f"{p} {got.get(p, 'missing')} (locked {e['version']})"
                 for p, e in sorted(pinned.items()) if got.get(p) != e["version"]]
        if not extra:
            wrong += [f"{p} {v} (not locked)" for p, v in sorted(got.items()) if p not in pinned]
        if wrong:
            raise BuildError(f"root {name}: installed packages differ from the lock: "
                             f"{'; '.join(wrong[:5])}; re-lock with {relock_cmd(name)}")
    log(f"mmdebstrap done in {time.monotonic() - t0:.0f} s; writing root.ext4")
    make_ext4(rootfs, out / "root.ext4", free=FREE.get(name, FREE_SPACE))
    manifest = {
        "name": name,
        "suite": SUITE,
        "variant": VARIANT,
        "include": include,
        "extra": extra,
        "locked": bool(pinned),
        "lock": "guest-agent/roots.lock.json" if pinned and lock_path == ROOTS_LOCK
                else str(lock_path) if pinned else "newest (not locked)",
        "packages": dict(sorted(got.items())),
        "image": {"path": "root.ext4", "size": (out / "root.ext4").stat().st_size},
        "key": key,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def lock(name: str, lock_path: Path = ROOTS_LOCK) -> list[str]:
    """Build NAME's recipe with today's versions and write its lock entry; returns the changes."""
    manifest = build(name, newest=True, lock_path=lock_path)
    apt = private_apt()
    entries = package_fields(apt, manifest["packages"])
    roots = read_roots_lock(lock_path)
    old = roots.get(name, {}).get("packages", {})
    roots[name] = {"include": manifest["include"], "packages": entries}
    write_roots_lock(roots, lock_path)
    return lock_changes(old, entries)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find cached) a root")
    b.add_argument("name", nargs="?", default="base")
    b.add_argument("--packages", default="", help="extra packages, comma separated")
    b.add_argument("--newest", action="store_true", help="today's versions, ignoring the lock")
    lk = sub.add_parser("lock", help="re-lock a root with today's versions (commit the lock)")
    lk.add_argument("name")
    sub.add_parser("list", help="the recipes and what the lock says")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            extra = [p.strip() for p in a.packages.split(",") if p.strip()]
            m = build(a.name, extra, newest=a.newest)
            print(json.dumps({k: m[k] for k in ("name", "extra", "lock", "dir", "image")},
                             indent=1))
        elif a.cmd == "lock":
            changes = lock(a.name)
            log(f"re-locked {a.name} in {ROOTS_LOCK}: "
                + ("; ".join(changes) if changes else "no change"))
        else:
            roots = read_roots_lock()
            for n, inc in sorted(RECIPES.items()):
                r = roots.get(n)
                print(f"{n}: {', '.join(inc) or '(minbase only)'}; "
                      + (f"locked, {len(r['packages'])} packages" if r else "not locked"))
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(map(str, e.cmd[:2]))} ... failed with exit status "
                         f"{e.returncode}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
