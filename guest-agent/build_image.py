#!/usr/bin/env python3
"""Build the memtrace guest: kernel, initramfs and agent module from locked Debian packages.

Usage: python3 guest-agent/build_image.py [--out CACHE/guest] [--update | --newest]
                                          [--from-trace TRACE] [--force]

The package set (names, versions, sha256 of each .deb) is the committed lock
guest-agent/packages.lock.json: a build installs exactly those versions, fetched with a private
apt configuration under <out>/apt (so a Debian 12 or 13 host builds the same guest) and checked
against the lock's sha256. When the archive no longer serves a locked version the build stops with
one line naming the package, the locked and the served version; then either re-lock
(``--update``: resolves today's bookworm and rewrites the lock, a deliberate, reviewed commit) or
build today's versions once without touching the lock (``--newest``). ``--from-trace TRACE``
rebuilds the guest a trace was recorded with (the versions in its header), while Debian still
serves them. Outputs (all under --out):

  bzImage            the kernel (linux-image-<abi>-unsigned)
  initramfs.cpio     the root filesystem (uncompressed newc cpio; it stays in RAM)
  memtrace_agent.ko  the agent module (also inside the initramfs)
  rootfs/            the unpacked root (what ``trace-analyze --guest-root`` reads)
  rootfs-files.json  for every file of rootfs/: its sha256 and the packages it was made from
  manifest.json      suite, packages and versions, kernel release, sha256 of the three files

A build is skipped when the inputs (this script, the agent sources, init, scenarios and the lock)
are unchanged and the outputs exist.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import types
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("MEMTRACE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get(
    "MEMTRACE_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
ARCH = "amd64"
TRIPLET = "x86_64-linux-gnu"
PYVER = "3.11"
KBUILD_PKG = "linux-kbuild-6.1"

# Python 3.11 and the shared libraries its binary and lib-dynload modules need.
PYTHON_PKGS = [
    f"python{PYVER}-minimal",
    f"libpython{PYVER}-minimal",
    f"libpython{PYVER}-stdlib",
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libdb5.3",
    "libcrypt1",
    "libuuid1",
    "libssl3",
    "libsqlite3-0",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
]
BUSYBOX_PKG = "busybox-static"

# stdlib parts that a workload never imports (saves RAM and copy time in zero-install)
PY_PRUNE = [
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    f"config-{PYVER}-{TRIPLET}",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = HERE / "packages.lock.json"
RELOCK = "python3 guest-agent/build_image.py --update"
# owner of the files the project itself puts into the root (init, scenarios, the agent module)
PROJECT = "memtrace"
AGENT_SOURCES = ["memtrace_agent.c", "Kbuild", "Makefile"]
DEFAULT_CMDLINE = "console=ttyS0 memmap=1M$0x1f000000 nokaslr"


def _cache_module() -> types.ModuleType:
    """memtrace.tracer.cache (the build cache's locks and staging), also when this file runs as a
    script under a python without the package: tracer/ is this folder's sibling in a clone and
    in an installed package alike (memtrace/guest, memtrace/tracer)."""
    try:
        from memtrace.tracer import cache
        return cache
    except ImportError:
        spec = importlib.util.spec_from_file_location("memtrace_cache",
                                                      HERE.parent / "tracer" / "cache.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


cache = _cache_module()


def log(msg: str) -> None:
    print(f"[build_image] {msg}", file=sys.stderr, flush=True)


class BuildError(SystemExit):
    """A build that cannot go on; the message is one line saying what to do."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"build_image: error: {msg}")


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- apt (private configuration)


class Apt:
    """apt-get/apt-cache on a private bookworm configuration (independent of the host's sources)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        dirs = ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial")
        for d in dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        (root / "sources.list").write_text(
            f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n"
            f"deb [signed-by={KEYRING}] {MIRROR} {SUITE}-updates main\n"
            f"deb [signed-by={KEYRING}] {SECURITY_MIRROR} {SUITE}-security main\n"
        )

    def _opts(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::SourceList": r / "sources.list",
            "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences",
            "Dir::Etc::PreferencesParts": r / "preferences.d",
            "Dir::State": r / "state",
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "Acquire::Languages": "none",
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        }
        out: list[str] = []
        for k, v in opts.items():
            if v == "":
                continue
            out += ["-o", f"{k}={v}"]
        return out

    def update(self) -> None:
        log("apt-get update (private bookworm configuration)")
        run(["apt-get", *self._opts(), "-q", "update"], stdout=subprocess.DEVNULL)

    def show(self, pkg: str) -> dict[str, str]:
        out = run(
            ["apt-cache", *self._opts(), "show", "--no-all-versions", pkg], capture_output=True
        ).stdout
        fields: dict[str, str] = {}
        key = ""
        for line in out.splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, val = line.partition(":")
            fields[key] = val.strip()
        if "Version" not in fields:
            raise BuildError(f"package {pkg} not found in {SUITE}")
        return fields

    def versions(self, pkg: str) -> dict[str, str]:
        """Every version of ``pkg`` the configured suites serve -> the sha256 of its .deb."""
        res = subprocess.run(["apt-cache", *self._opts(), "show", pkg], capture_output=True,
                             text=True)
        out: dict[str, str] = {}
        ver = ""
        for line in res.stdout.splitlines():
            if line.startswith("Version:"):
                ver = line.split(":", 1)[1].strip()
            elif line.startswith("SHA256:") and ver:
                out.setdefault(ver, line.split(":", 1)[1].strip())
        return out

    def has_lists(self) -> bool:
        return any((self.root / "state/lists").glob("*Packages*"))

    def download(self, pkg: str, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        existing = deb_path(dest, pkg, version)
        if existing:
            return existing
        log(f"downloading {pkg}={version}")
        run(["apt-get", *self._opts(), "-q", "download", f"{pkg}={version}"], cwd=dest,
            stdout=subprocess.DEVNULL)
        found = deb_path(dest, pkg, version)
        if not found:
            raise BuildError(f"download of {pkg}={version} produced no .deb")
        return found


def deb_path(dest: Path, pkg: str, version: str) -> Path | None:
    ver = version.split(":", 1)[-1]
    for cand in dest.glob(f"{pkg}_*.deb"):
        # apt escapes ':' in the epoch as %3a
        v = cand.name[len(pkg) + 1:].rsplit("_", 1)[0].replace("%3a", ":").split(":", 1)[-1]
        if v == ver:
            return cand
    return None


def lock_entry(fields: dict[str, str]) -> dict[str, object]:
    """What the lock keeps of a package: enough to fetch it again and to know it is the same."""
    return {"version": fields["Version"], "sha256": fields["SHA256"],
            "size": int(fields["Size"]), "filename": fields["Filename"]}


def resolve_packages(apt: Apt) -> dict[str, dict[str, object]]:
    """Resolve the package set as bookworm serves it today: name -> lock entry."""
    apt.update()
    meta = apt.show("linux-image-amd64")
    m = re.search(r"linux-image-(\d+\.\d+\.\d+-\d+-amd64)\b", meta.get("Depends", ""))
    if not m:
        raise BuildError(f"cannot find the kernel ABI in linux-image-amd64 Depends: {meta}")
    abi = m.group(1)
    base = abi.rsplit("-", 1)[0]
    names = [
        f"linux-image-{abi}-unsigned",
        f"linux-headers-{abi}",
        f"linux-headers-{base}-common",
        KBUILD_PKG,
        BUSYBOX_PKG,
        *PYTHON_PKGS,
    ]
    return {n: lock_entry(apt.show(n)) for n in names}


# ---------------------------------------------------------------- the lock


def read_lock(path: Path) -> dict[str, dict[str, object]]:
    """The committed lock: name -> {version, sha256, size, filename}."""
    try:
        doc = json.loads(path.read_text())
        pkgs = doc["packages"]
        for name, e in pkgs.items():
            if not (isinstance(e, dict) and isinstance(e.get("version"), str)
                    and re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256", "")))):
                raise ValueError(f"entry {name!r} needs a version and a sha256")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{path}: not a package lock ({e}); re-lock with {RELOCK}") from None
    if doc.get("suite") != SUITE or doc.get("arch") != ARCH:
        raise BuildError(f"{path}: locks {doc.get('suite')}/{doc.get('arch')}, this build needs "
                         f"{SUITE}/{ARCH}; re-lock with {RELOCK}")
    return pkgs


LOCK_COMMENT = ("The guest's Debian packages, installed exactly (guest-agent/build_image.py). "
                f"Re-lock with `{RELOCK}`: a deliberate, reviewed commit; traces recorded "
                "before it keep the versions they were made with in their header.")


def write_lock(path: Path, pkgs: dict[str, dict[str, object]], comment: str = LOCK_COMMENT,
               suite: str = SUITE, arch: str = ARCH) -> None:
    """Write a lock of Debian packages (the guest's here; QEMU 10's in tracer/qemu10.py), one
    file replaced at once."""
    doc = {
        "comment": comment,
        "suite": suite,
        "arch": arch,
        "packages": dict(sorted(pkgs.items())),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def lock_changes(old: dict[str, dict[str, object]], new: dict[str, dict[str, object]]
                 ) -> list[str]:
    """One line per package whose version differs between two locks."""
    out = []
    for name in sorted(set(old) | set(new)):
        a = old.get(name, {}).get("version")
        b = new.get(name, {}).get("version")
        if a != b:
            out.append(f"{name}: {a or '-'} -> {b or '-'}")
    return out


def trace_packages(trace: Path) -> dict[str, dict[str, object]]:
    """The package versions in a trace's header (``guest_image.packages``), as a lock without
    sha256: the archive's signed index vouches for the files (apt checks them)."""
    try:
        from memtrace.traces.reader import open_trace
        with open_trace(trace) as t:
            header = t.header
    except Exception as e:  # noqa: BLE001  (any reader error: one line)
        raise BuildError(f"{trace}: cannot read the trace header ({e})") from None
    pkgs = (header.get("guest_image") or {}).get("packages")
    if not isinstance(pkgs, dict) or not pkgs:
        raise BuildError(f"{trace}: its header names no guest packages (not recorded by "
                         "trace-record?)")
    return {n: {"version": v} for n, v in pkgs.items()}


def check_served(apt: Apt, lock: dict[str, dict[str, object]], trace: Path | None = None
                 ) -> None:
    """Stop with one line if the archive no longer serves a locked version (or serves a
    different file under it)."""
    for name, e in sorted(lock.items()):
        served = apt.versions(name)
        want = str(e["version"])
        if want not in served:
            now = ", ".join(served) if served else "nothing"
            if trace is not None:
                raise BuildError(
                    f"{name} {want}, in {trace}'s guest, is no longer served by {SUITE} (it "
                    f"serves {now}): that guest cannot be rebuilt from the archive any more")
            raise BuildError(
                f"{name} {want} is locked but {SUITE} no longer serves it (it serves {now}); "
                f"re-lock with {RELOCK} (then commit the lock), or build today's versions "
                "once with --newest")
        sha = e.get("sha256")
        if sha and served[want] != sha:
            raise BuildError(f"{name} {want}: the archive's file has sha256 {served[want]}, the "
                             f"lock says {sha}; re-lock with {RELOCK} if that is expected")


# ---------------------------------------------------------------- kernel + module


def kernel_abi(pkgs: dict[str, str]) -> str:
    for name in pkgs:
        m = re.fullmatch(r"linux-image-(.+)-unsigned", name)
        if m:
            return m.group(1)
    raise BuildError("no kernel image in the package lock")


def extract(debs: dict[str, Path], dest: Path) -> dict[str, str]:
    """Unpack the packages into ``dest``; returns path (relative to dest) -> package name."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    owners: dict[str, str] = {}
    for name, deb in debs.items():
        run(["dpkg-deb", "-x", str(deb), str(dest)])
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
            for member in tar.getmembers():
                if not member.isdir():
                    owners[os.path.normpath(member.name)] = name
    return owners


def fixup_headers(kroot: Path, abi: str) -> Path:
    """The arch headers Makefile includes the common one by absolute /usr/src path: repoint it."""
    hdr = kroot / "usr/src" / f"linux-headers-{abi}"
    mk = hdr / "Makefile"
    text = mk.read_text()
    fixed = text.replace("/usr/src/", f"{kroot / 'usr/src'}/")
    if fixed != text:
        mk.write_text(fixed)
    return hdr


def build_module(hdr: Path, moddir: Path, cc: str | None) -> Path:
    if moddir.exists():
        shutil.rmtree(moddir)
    moddir.mkdir(parents=True)
    for name in AGENT_SOURCES:
        shutil.copy2(HERE / name, moddir / name)
    cmd = ["make", "-C", str(hdr), f"M={moddir}", "modules"]
    if cc:
        cmd.append(f"CC={cc}")
    log("building memtrace_agent.ko")
    res = subprocess.run(cmd, text=True, capture_output=True)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        sys.stderr.write(res.stdout)
        raise BuildError("the agent module did not build (compiler output above)")
    if "warning:" in res.stderr:
        raise BuildError("the agent module built with warnings (above); the build allows none")
    return moddir / "memtrace_agent.ko"


# ---------------------------------------------------------------- root filesystem


def elf_needed(path: Path) -> list[str]:
    res = subprocess.run(["readelf", "-d", str(path)], text=True, capture_output=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", res.stdout)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def find_lib(pyroot: Path, name: str) -> Path | None:
    for d in (f"lib/{TRIPLET}", f"usr/lib/{TRIPLET}", "lib64", "lib"):
        p = pyroot / d / name
        if p.exists() or p.is_symlink():
            return p.resolve()
    return None


def stage_rootfs(pyroot: Path, bbroot: Path, module: Path, rootfs: Path,
                 origin: dict[str, list[str]]) -> list[str]:
    """Lay out the guest root. Returns notes (modules dropped for missing libraries).

    ``origin`` starts as the unpacked packages' files ("pyroot/...", "bbroot/..." -> [package])
    and ends as the root's own files (guest path -> the packages they were made from)."""
    notes: list[str] = []
    unpacked = dict(origin)
    origin.clear()

    def came_from(tree: Path, src: Path, dst: Path) -> None:
        rel = src.resolve().relative_to(tree.resolve()).as_posix()
        origin["/" + dst.relative_to(rootfs).as_posix()] = unpacked[f"{tree.name}/{rel}"]
    if rootfs.exists():
        shutil.rmtree(rootfs)
    for d in ("bin", "usr/bin", f"usr/lib/{TRIPLET}", "usr/lib64", "proc", "sys", "dev", "tmp",
              "run", "data", "lib/modules", "scenarios", "etc", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    # merged-/usr style: /lib and /lib64 are symlinks into /usr; /sbin -> bin (busybox)
    shutil.move(str(rootfs / "lib/modules"), str(rootfs / "usr/lib/modules"))
    shutil.rmtree(rootfs / "lib")
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "lib64").symlink_to("usr/lib64")
    (rootfs / "sbin").symlink_to("bin")
    shutil.copy2(bbroot / "bin/busybox", rootfs / "bin/busybox")
    came_from(bbroot, bbroot / "bin/busybox", rootfs / "bin/busybox")
    (rootfs / "bin/sh").symlink_to("busybox")

    py = rootfs / f"usr/bin/python{PYVER}"
    shutil.copy2(pyroot / f"usr/bin/python{PYVER}", py)
    came_from(pyroot, pyroot / f"usr/bin/python{PYVER}", py)
    (rootfs / "usr/bin/python3").symlink_to(f"python{PYVER}")
    shutil.copytree(pyroot / f"usr/lib/python{PYVER}", rootfs / f"usr/lib/python{PYVER}",
                    symlinks=True)
    pylib = rootfs / f"usr/lib/python{PYVER}"
    for name in PY_PRUNE:
        if (pylib / name).exists():
            shutil.rmtree(pylib / name)
    for cache in list(pylib.rglob("__pycache__")):
        shutil.rmtree(cache)
    for link in [f for f in pylib.rglob("*") if f.is_symlink()]:
        # absolute links point outside the root on the host (sitecustomize.py ->
        # /etc/python3.11/...): dangling in the guest, and the .pyc compiled through them
        # would be the host's file
        if os.readlink(link).startswith("/"):
            notes.append(f"dropped {link.relative_to(rootfs)} -> {os.readlink(link)}")
            link.unlink()
    for f in pylib.rglob("*"):
        if f.is_file() and not f.is_symlink():
            came_from(pyroot, pyroot / f.relative_to(rootfs), f)

    libdir = rootfs / f"usr/lib/{TRIPLET}"
    ldso = find_lib(pyroot, "ld-linux-x86-64.so.2")
    if not ldso:
        raise BuildError("ld-linux-x86-64.so.2 not found in libc6")
    shutil.copy2(ldso, libdir / "ld-linux-x86-64.so.2")
    came_from(pyroot, ldso, libdir / "ld-linux-x86-64.so.2")
    (rootfs / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(f"../lib/{TRIPLET}/ld-linux-x86-64.so.2")

    # DT_NEEDED closure; lib-dynload modules whose libraries are missing are dropped
    todo = [py, *sorted((pylib / "lib-dynload").glob("*.so"))]
    have: set[str] = {"ld-linux-x86-64.so.2"}
    while todo:
        elf = todo.pop()
        missing = []
        for need in elf_needed(elf):
            if need in have:
                continue
            src = find_lib(pyroot, need)
            if src is None:
                missing.append(need)
                continue
            dst = libdir / need
            shutil.copy2(src, dst)
            came_from(pyroot, src, dst)
            have.add(need)
            todo.append(dst)
        if missing:
            if elf == py:
                raise BuildError(f"python needs missing libraries {missing}")
            notes.append(f"dropped {elf.name}: missing {missing}")
            elf.unlink()
            origin.pop("/" + elf.relative_to(rootfs).as_posix(), None)

    shutil.copy2(module, rootfs / "usr/lib/modules/memtrace_agent.ko")
    init = rootfs / "init"
    shutil.copy2(HERE / "init.sh", init)
    init.chmod(0o755)
    for src in sorted((HERE / "scenarios").iterdir()):
        if src.is_file():
            dst = rootfs / "scenarios" / src.name
            shutil.copy2(src, dst)
            dst.chmod(0o755)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    for f in rootfs.rglob("*"):
        guest = "/" + f.relative_to(rootfs).as_posix()
        if f.is_file() and not f.is_symlink() and guest not in origin:
            origin[guest] = [PROJECT]
    return notes


def compile_pyc(rootfs: Path) -> None:
    """Precompile the stdlib with the guest's own python (run on the host through its ld.so)."""
    libdir = rootfs / f"usr/lib/{TRIPLET}"
    env = {"PYTHONHOME": str(rootfs / "usr"), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    cmd = [
        str(libdir / "ld-linux-x86-64.so.2"), "--library-path", str(libdir),
        str(rootfs / f"usr/bin/python{PYVER}"), "-m", "compileall", "-q",
        "--invalidation-mode", "unchecked-hash",
        "-s", str(rootfs), "-p", "/",
        str(rootfs / f"usr/lib/python{PYVER}"), str(rootfs / "scenarios"),
    ]
    log("precompiling the stdlib (.pyc, unchecked-hash)")
    run(cmd, env=env, stdout=subprocess.DEVNULL)


def write_cpio(rootfs: Path, out: Path) -> None:
    """Deterministic newc cpio: sorted names, mtime 0, uid/gid 0, plus /dev/console."""
    entries: list[Path] = sorted(rootfs.rglob("*"), key=lambda p: p.relative_to(rootfs).as_posix())
    ino = 1

    def header(name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
        nonlocal ino
        fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        ino += 1
        h = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        h += name.encode() + b"\0"
        return h + b"\0" * (-len(h) % 4)

    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for p in entries:
            name = p.relative_to(rootfs).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(p).encode()
                mode = stat.S_IFLNK | 0o777
            elif stat.S_ISDIR(st.st_mode):
                data = b""
                mode = stat.S_IFDIR | 0o755
            else:
                data = p.read_bytes()
                mode = stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)
            f.write(header(name, mode, len(data)))
            f.write(data + b"\0" * (-len(data) % 4))
        f.write(header("dev/console", stat.S_IFCHR | 0o600, 0, (5, 1)))
        f.write(header("TRAILER!!!", 0, 0))
    tmp.replace(out)


# ---------------------------------------------------------------- driver


def input_digest(lock: dict[str, dict[str, object]], cc: str | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(lock, sort_keys=True).encode())
    h.update(repr(cc).encode())
    files = [Path(__file__).resolve(), HERE / "init.sh", *(HERE / n for n in AGENT_SOURCES)]
    files += sorted(p for p in (HERE / "scenarios").iterdir() if p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fetch_debs(apt: Apt, lock: dict[str, dict[str, object]], debdir: Path,
               trace: Path | None = None) -> dict[str, Path]:
    """The locked .deb files: from the cache when its sha256 matches the lock (no network),
    else downloaded after checking that the archive still serves every locked version."""
    debs: dict[str, Path] = {}
    for name, e in lock.items():
        cached = deb_path(debdir, name, str(e["version"]))
        if cached and (not e.get("sha256") or sha256_file(cached) == e["sha256"]):
            debs[name] = cached
    need = {n: e for n, e in lock.items() if n not in debs}
    if not need:
        return debs
    if not apt.has_lists():
        apt.update()
    try:
        check_served(apt, need, trace)
    except BuildError:
        apt.update()  # the lists may be older than the lock: look again with today's
        check_served(apt, need, trace)
    for name, e in sorted(need.items()):
        stale = deb_path(debdir, name, str(e["version"]))
        if stale:
            stale.unlink()
        deb = apt.download(name, str(e["version"]), debdir)
        if e.get("sha256") and sha256_file(deb) != e["sha256"]:
            deb.unlink()
            raise BuildError(f"{deb.name}: sha256 differs from the lock's; re-lock with "
                             f"{RELOCK} if the archive changed it on purpose")
        debs[name] = deb
    return debs


def file_record(rootfs: Path, origin: dict[str, list[str]]) -> dict[str, dict[str, object]]:
    """Every regular file of the root: sha256 and the packages it was made from. Compiled
    .pyc files come from their .py and the python that compiled them."""
    out: dict[str, dict[str, object]] = {}
    for f in sorted(rootfs.rglob("*")):
        if not f.is_file() or f.is_symlink():
            continue
        guest = "/" + f.relative_to(rootfs).as_posix()
        owners = origin.get(guest)
        if owners is None and f.suffix == ".pyc" and f.parent.name == "__pycache__":
            src = (f.parent.parent / (f.name.split(".", 1)[0] + ".py")).resolve()
            if src.is_relative_to(rootfs.resolve()):
                owners = origin.get("/" + src.relative_to(rootfs.resolve()).as_posix())
            if owners is not None:
                owners = sorted({*owners, f"python{PYVER}-minimal"})
        if owners is None:
            raise BuildError(f"{guest}: no package or project file made it (build_image.py "
                             "must say where every file of the root comes from)")
        out[guest] = {"sha256": sha256_file(f), "packages": owners}
    return out


def build(out: Path, update: bool = False, force: bool = False, cc: str | None = None,
          newest: bool = False, lock_path: Path = LOCK, from_trace: Path | None = None) -> dict:
    """Build (or find up to date) the guest under ``out``; returns its manifest."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    apt = Apt(out / "apt")
    if from_trace is not None:
        lock, lock_source = trace_packages(from_trace), f"trace {from_trace}"
    elif update or newest:
        lock = resolve_packages(apt)
        lock_source = "newest (not locked)"
        if update:
            old = read_lock(lock_path) if lock_path.exists() else {}
            write_lock(lock_path, lock)
            changes = lock_changes(old, lock)
            log(f"re-locked {lock_path}: " + ("; ".join(changes) if changes else "no change"))
            lock_source = str(lock_path)
    else:
        if not lock_path.exists():
            raise BuildError(f"no package lock at {lock_path}; create it with {RELOCK}")
        lock, lock_source = read_lock(lock_path), str(lock_path)

    digest = input_digest(lock, cc)
    if not force and (old := up_to_date(out, digest)) is not None:
        log(f"up to date: {out}")
        return old
    # one build at a time per folder; a run that waited finds the other's build up to date
    with cache.lock_at(out):
        if not force and (old := up_to_date(out, digest)) is not None:
            log(f"up to date: {out} (built by another run meanwhile)")
            return old
        stage = cache.staging(out)
        try:
            for keep in ("debs", "apt"):  # downloads and package lists: reused, hard-linked
                if (out / keep).is_dir():
                    shutil.copytree(out / keep, stage / keep, symlinks=True,
                                    copy_function=os.link)
            manifest = build_into(stage, lock, lock_source, digest, cc, from_trace)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        cache.replace(stage, out)
    log(f"done: {out}")
    return manifest


def up_to_date(out: Path, digest: str) -> dict | None:
    """The manifest of a complete build of ``digest`` in ``out``, else None."""
    manifest_f = out / "manifest.json"
    outputs = [out / "bzImage", out / "initramfs.cpio", out / "memtrace_agent.ko",
               out / "rootfs-files.json", manifest_f]
    if all(p.exists() for p in outputs):
        old = json.loads(manifest_f.read_text())
        if old.get("input_digest") == digest:
            return old
    return None


def build_into(out: Path, lock: dict[str, dict[str, object]], lock_source: str,
               digest: str, cc: str | None, from_trace: Path | None) -> dict:
    """Build the guest in the (staging) folder ``out``; returns its manifest."""
    apt = Apt(out / "apt")

    debs = fetch_debs(apt, lock, out / "debs", from_trace)

    abi = kernel_abi(lock)
    base = abi.rsplit("-", 1)[0]
    kroot = out / "kroot"
    kernel_pkgs = [f"linux-image-{abi}-unsigned", f"linux-headers-{abi}",
                   f"linux-headers-{base}-common", KBUILD_PKG]
    log("extracting kernel packages")
    extract({n: debs[n] for n in kernel_pkgs}, kroot)
    hdr = fixup_headers(kroot, abi)
    release = (hdr / "include/config/kernel.release").read_text().strip()
    uts = (hdr / "include/generated/utsrelease.h").read_text()
    m = re.search(r'UTS_RELEASE "([^"]+)"', uts)
    uts_release = m.group(1) if m else release
    module = build_module(hdr, out / "module", cc)

    log("extracting userland packages")
    pyroot = out / "pyroot"
    bbroot = out / "bbroot"
    origin: dict[str, list[str]] = {}
    for tree, names in ((pyroot, PYTHON_PKGS), (bbroot, [BUSYBOX_PKG])):
        owners = extract({n: debs[n] for n in names}, tree)
        origin.update({f"{tree.name}/{k}": [v] for k, v in owners.items()})

    rootfs = out / "rootfs"
    notes = stage_rootfs(pyroot, bbroot, module, rootfs, origin)
    origin["/usr/lib/modules/memtrace_agent.ko"] = sorted([PROJECT, *kernel_pkgs[1:]])
    for n in notes:
        log(n)
    compile_pyc(rootfs)
    files = file_record(rootfs, origin)
    (out / "rootfs-files.json").write_text(json.dumps(files, indent=1, sort_keys=True) + "\n")
    log("writing initramfs.cpio")
    write_cpio(rootfs, out / "initramfs.cpio")
    shutil.copy2(kroot / "boot" / f"vmlinuz-{abi}", out / "bzImage")
    shutil.copy2(module, out / "memtrace_agent.ko")
    # keep the heavy intermediate trees out of the way but reusable for debugging
    shutil.rmtree(kroot / "lib", ignore_errors=True)  # 400 MB of modules we never load

    manifest = {
        "suite": SUITE,
        "arch": ARCH,
        "packages": {n: str(e["version"]) for n, e in sorted(lock.items())},
        "lock": lock_source if lock_source != str(LOCK) else "guest-agent/packages.lock.json",
        "kernel_release": uts_release,
        "default_cmdline": DEFAULT_CMDLINE,
        "files": {
            "bzImage": {"path": "bzImage", "sha256": sha256_file(out / "bzImage")},
            "initramfs": {
                "path": "initramfs.cpio",
                "sha256": sha256_file(out / "initramfs.cpio"),
            },
            "module": {
                "path": "memtrace_agent.ko",
                "sha256": sha256_file(out / "memtrace_agent.ko"),
            },
        },
        "rootfs": {"path": "rootfs", "files": "rootfs-files.json"},
        "notes": notes,
        "input_digest": digest,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="where to build (default CACHE/guest, CACHE/guest-TRACE with "
                         "--from-trace; CACHE: $MEMTRACE_CACHE, else ~/.cache/memtrace)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--update", action="store_true",
                     help="re-lock: resolve today's bookworm, rewrite guest-agent/"
                          "packages.lock.json (commit it), and build that")
    how.add_argument("--newest", action="store_true",
                     help="build today's bookworm versions without touching the lock")
    how.add_argument("--from-trace", type=Path, metavar="TRACE",
                     help="build the package versions a trace was recorded with (its header)")
    ap.add_argument("--lock", type=Path, default=LOCK, help=argparse.SUPPRESS)
    ap.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    ap.add_argument("--cc", default=None, help="module compiler (default: the kernel's gcc-12)")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        out = cache.path(f"guest-{args.from_trace.stem}" if args.from_trace else "guest")
    try:
        manifest = build(out, update=args.update, force=args.force, cc=args.cc,
                         newest=args.newest, lock_path=args.lock, from_trace=args.from_trace)
    except subprocess.CalledProcessError as e:
        cmd = " ".join(map(str, e.cmd[:2]))
        raise BuildError(f"{cmd} ... failed with exit status {e.returncode} (output above)"
                         ) from None
    print(json.dumps({k: manifest[k] for k in ("suite", "kernel_release", "lock", "files")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
