#!/usr/bin/env python3
"""Build the memtrace guest: kernel, initramfs and agent module from Debian bookworm packages.

Usage: python3 guest-agent/build_image.py [--out build/guest] [--update] [--force]

Everything comes from pinned Debian packages (suite bookworm), fetched with a private apt
configuration under <out>/apt, so the same guest is built on a Debian 12 or 13 host. The resolved
package versions are stored in <out>/packages.lock.json and reused until --update is given.
Outputs (all under --out):

  bzImage            the kernel (linux-image-<abi>-unsigned)
  initramfs.cpio     the root filesystem (uncompressed newc cpio; it stays in RAM)
  memtrace_agent.ko  the agent module (also inside the initramfs)
  manifest.json      suite, packages and versions, kernel release, sha256 of the three files

A build is skipped when the inputs (this script, the agent sources, init, scenarios and the lock)
are unchanged and the outputs exist.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
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
AGENT_SOURCES = ["memtrace_agent.c", "Kbuild", "Makefile"]
DEFAULT_CMDLINE = "console=ttyS0 memmap=1M$0x1f000000 nokaslr"


def log(msg: str) -> None:
    print(f"[build_image] {msg}", file=sys.stderr, flush=True)


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
            raise SystemExit(f"package {pkg} not found in {SUITE}")
        return fields

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
            raise SystemExit(f"download of {pkg}={version} produced no .deb")
        return found


def deb_path(dest: Path, pkg: str, version: str) -> Path | None:
    ver = version.split(":", 1)[-1]
    for cand in dest.glob(f"{pkg}_*.deb"):
        # apt escapes ':' in the epoch as %3a
        v = cand.name[len(pkg) + 1:].rsplit("_", 1)[0].replace("%3a", ":").split(":", 1)[-1]
        if v == ver:
            return cand
    return None


def resolve_packages(apt: Apt) -> dict[str, str]:
    """Resolve the package set: name -> version (the candidates in bookworm right now)."""
    apt.update()
    meta = apt.show("linux-image-amd64")
    m = re.search(r"linux-image-(\d+\.\d+\.\d+-\d+-amd64)\b", meta.get("Depends", ""))
    if not m:
        raise SystemExit(f"cannot find the kernel ABI in linux-image-amd64 Depends: {meta}")
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
    return {n: apt.show(n)["Version"] for n in names}


# ---------------------------------------------------------------- kernel + module


def kernel_abi(pkgs: dict[str, str]) -> str:
    for name in pkgs:
        m = re.fullmatch(r"linux-image-(.+)-unsigned", name)
        if m:
            return m.group(1)
    raise SystemExit("no kernel image in the package lock")


def extract(debs: list[Path], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(dest)])


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
        raise SystemExit("module build failed")
    if "warning:" in res.stderr:
        raise SystemExit("module build produced warnings")
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


def stage_rootfs(pyroot: Path, bbroot: Path, module: Path, rootfs: Path) -> list[str]:
    """Lay out the guest root. Returns notes (modules dropped for missing libraries)."""
    notes: list[str] = []
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
    (rootfs / "bin/sh").symlink_to("busybox")

    py = rootfs / f"usr/bin/python{PYVER}"
    shutil.copy2(pyroot / f"usr/bin/python{PYVER}", py)
    (rootfs / "usr/bin/python3").symlink_to(f"python{PYVER}")
    shutil.copytree(pyroot / f"usr/lib/python{PYVER}", rootfs / f"usr/lib/python{PYVER}",
                    symlinks=True)
    pylib = rootfs / f"usr/lib/python{PYVER}"
    for name in PY_PRUNE:
        if (pylib / name).exists():
            shutil.rmtree(pylib / name)
    for cache in list(pylib.rglob("__pycache__")):
        shutil.rmtree(cache)

    libdir = rootfs / f"usr/lib/{TRIPLET}"
    ldso = find_lib(pyroot, "ld-linux-x86-64.so.2")
    if not ldso:
        raise SystemExit("ld-linux-x86-64.so.2 not found in libc6")
    shutil.copy2(ldso, libdir / "ld-linux-x86-64.so.2")
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
            have.add(need)
            todo.append(dst)
        if missing:
            if elf == py:
                raise SystemExit(f"python needs missing libraries {missing}")
            notes.append(f"dropped {elf.name}: missing {missing}")
            elf.unlink()

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


def input_digest(lock: dict[str, str], cc: str | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(lock, sort_keys=True).encode())
    h.update(repr(cc).encode())
    files = [Path(__file__).resolve(), HERE / "init.sh", *(HERE / n for n in AGENT_SOURCES)]
    files += sorted(p for p in (HERE / "scenarios").iterdir() if p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def build(out: Path, update: bool = False, force: bool = False, cc: str | None = None) -> dict:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    apt = Apt(out / "apt")
    lockf = out / "packages.lock.json"
    if update or not lockf.exists():
        lock = resolve_packages(apt)
        lockf.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    else:
        lock = json.loads(lockf.read_text())

    digest = input_digest(lock, cc)
    manifest_f = out / "manifest.json"
    outputs = [out / "bzImage", out / "initramfs.cpio", out / "memtrace_agent.ko", manifest_f]
    if not force and all(p.exists() for p in outputs):
        old = json.loads(manifest_f.read_text())
        if old.get("input_digest") == digest:
            log(f"up to date: {out}")
            return old

    debdir = out / "debs"
    debs: dict[str, Path] = {}
    for name, ver in lock.items():
        if not deb_path(debdir, name, ver):
            # lists may be missing (fresh out dir with an existing lock): fetch them once
            if not any((apt.root / "state/lists").glob("*Packages*")):
                apt.update()
        debs[name] = apt.download(name, ver, debdir)

    abi = kernel_abi(lock)
    base = abi.rsplit("-", 1)[0]
    kroot = out / "kroot"
    kernel_debs = [
        debs[f"linux-image-{abi}-unsigned"],
        debs[f"linux-headers-{abi}"],
        debs[f"linux-headers-{base}-common"],
        debs[KBUILD_PKG],
    ]
    log("extracting kernel packages")
    extract(kernel_debs, kroot)
    hdr = fixup_headers(kroot, abi)
    release = (hdr / "include/config/kernel.release").read_text().strip()
    uts = (hdr / "include/generated/utsrelease.h").read_text()
    m = re.search(r'UTS_RELEASE "([^"]+)"', uts)
    uts_release = m.group(1) if m else release
    module = build_module(hdr, out / "module", cc)

    log("extracting userland packages")
    pyroot = out / "pyroot"
    extract([debs[n] for n in PYTHON_PKGS], pyroot)
    bbroot = out / "bbroot"
    extract([debs[BUSYBOX_PKG]], bbroot)

    rootfs = out / "rootfs"
    notes = stage_rootfs(pyroot, bbroot, module, rootfs)
    for n in notes:
        log(n)
    compile_pyc(rootfs)
    log("writing initramfs.cpio")
    write_cpio(rootfs, out / "initramfs.cpio")
    shutil.copy2(kroot / "boot" / f"vmlinuz-{abi}", out / "bzImage")
    shutil.copy2(module, out / "memtrace_agent.ko")
    # keep the heavy intermediate trees out of the way but reusable for debugging
    shutil.rmtree(kroot / "lib", ignore_errors=True)  # 400 MB of modules we never load

    manifest = {
        "suite": SUITE,
        "arch": ARCH,
        "packages": dict(sorted(lock.items())),
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
        "notes": notes,
        "input_digest": digest,
    }
    manifest_f.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"done: {out}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "build/guest")
    ap.add_argument("--update", action="store_true",
                    help="re-resolve package versions from the archive (refreshes the lock)")
    ap.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    ap.add_argument("--cc", default=None, help="module compiler (default: the kernel's gcc-12)")
    args = ap.parse_args(argv)
    manifest = build(args.out, update=args.update, force=args.force, cc=args.cc)
    print(json.dumps({k: manifest[k] for k in ("suite", "kernel_release", "files")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
