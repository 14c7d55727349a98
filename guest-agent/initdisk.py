#!/usr/bin/env python3
"""Build the initramfs that boots the guest with its root on a disk (``initdisk.cpio``).

Usage: python3 guest-agent/initdisk.py [--guest CACHE/guest] [--force]

The guest image (build_image.py, from the locked packages of guest-agent/packages.lock.json)
boots a root that lives in RAM. A workload of the user's (trace-record --run) runs in a real
root file system on a virtio disk instead, and Debian's 6.1 kernel builds what that needs as
modules (virtio_pci, virtio_blk, ext4, xfs, btrfs and what they depend on). This initramfs
holds just enough to get there, all of it from the same locked packages:

  /init                      initdisk.sh: load, find and mount the root, run the job, power off
  /memtrace/busybox          busybox-static (also /bin/busybox); bound into the root as
  /memtrace/bin/memtrace-mark  /run/memtrace, so the user's root needs nothing installed
  /lib/modules/<release>/... the kernel modules, from the locked linux-image package
  /lib/modules/load/GROUP    the modules of a group in load order (virtio, ext4, xfs, btrfs):
                             dependencies first (depmod's modules.dep and softdep "pre:")
  /lib/modules/memtrace_agent.ko  the agent, as built by build_image.py

Output: <guest>/initdisk.cpio and <guest>/initdisk.json (sha256, modules, input digest). Cached:
rebuilt only when this script, initdisk.sh, memtrace-mark or the guest image change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memtrace.guest.build_image import (
    BUSYBOX_PKG,
    LOCK,
    BuildError,
    kernel_abi,
    read_lock,
    sha256_file,
    write_cpio,
)
from memtrace.tracer import cache

HERE = Path(__file__).resolve().parent
# module groups: what each needs loaded (its dependencies are found by depmod)
GROUPS = {
    "virtio": ["virtio_pci", "virtio_blk"],
    "ext4": ["ext4"],
    "xfs": ["xfs"],
    "btrfs": ["btrfs"],
}
INPUTS = [Path(__file__).resolve(), HERE / "initdisk.sh", HERE / "memtrace-mark"]


def log(msg: str) -> None:
    print(f"[initdisk] {msg}", file=sys.stderr, flush=True)


class ModuleTree:
    """depmod's view of a kernel's module tree: files, dependencies, soft dependencies and
    aliases (a soft dependency names an alias such as crypto-crc32c)."""

    def __init__(self, moddir: Path) -> None:
        release = moddir.name
        subprocess.run(["depmod", "-b", str(moddir.parent.parent.parent), release], check=True)
        self.paths: dict[str, str] = {}  # module name -> path under moddir
        self.deps: dict[str, list[str]] = {}  # path -> paths it needs
        for line in (moddir / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            self.deps[mod] = rest.split()
            self.paths[modname(mod)] = mod
        self.pre: dict[str, list[str]] = {}  # module name -> aliases to load first
        for line in (moddir / "modules.softdep").read_text().splitlines():
            m = re.match(r"softdep\s+(\S+)\s+pre:\s*(.*?)(?:\s+post:.*)?$", line)
            if m:
                self.pre.setdefault(modname(m.group(1)), []).extend(m.group(2).split())
        self.aliases: dict[str, list[str]] = {}  # alias -> module names
        for line in (moddir / "modules.alias").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias":
                self.aliases.setdefault(parts[1], []).append(modname(parts[2]))
        # aliases the kernel itself provides (sha256 by the built-in sha256_generic)
        self.builtin: set[str] = set()
        info = (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0")
        for entry in info:
            key, _, val = entry.decode(errors="replace").partition("=")
            if key.endswith(".alias"):
                self.builtin.add(val)

    def provider(self, alias: str) -> str | None:
        """The module to load for an alias (None: built in). A generic implementation is
        preferred: accelerated ones (crc32c_intel, sha256_ssse3) refuse CPUs without their
        instructions, and TCG's default CPU lacks SSE4.2."""
        if alias in self.builtin:
            return None
        names = [n for n in self.aliases.get(alias, []) if n in self.paths]
        if not names and modname(alias) in self.paths:
            return modname(alias)
        if not names:
            raise BuildError(f"no kernel module provides {alias}")
        generic = [n for n in names if n.endswith("_generic")]
        return (generic or names)[0]

    def load_order(self, names: list[str]) -> list[str]:
        """The module files to insmod, dependencies and soft dependencies before dependents,
        each once."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(path: str) -> None:
            if path in seen:
                return
            seen.add(path)
            for alias in self.pre.get(modname(path), []):
                mod = self.provider(alias)
                if mod is not None:
                    visit(self.paths[mod])
            for d in self.deps.get(path, []):
                visit(d)
            order.append(path)

        for n in names:
            if n not in self.paths:
                raise BuildError(f"kernel module {n} is not in the locked kernel package")
            visit(self.paths[n])
        return order


def modname(path_or_name: str) -> str:
    return Path(path_or_name).name.removesuffix(".ko").replace("-", "_")


def input_digest(guest: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(guest["files"], sort_keys=True).encode())
    h.update(json.dumps(guest["packages"], sort_keys=True).encode())
    for p in INPUTS:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def build(guest_dir: Path, force: bool = False) -> dict:
    """Build (or find up to date) <guest_dir>/initdisk.cpio; returns its description."""
    guest_dir = guest_dir.resolve()
    manifest_f = guest_dir / "manifest.json"
    if not manifest_f.exists():
        raise BuildError(f"no guest image in {guest_dir}: run python3 guest-agent/build_image.py")
    guest = json.loads(manifest_f.read_text())
    out, desc_f = guest_dir / "initdisk.cpio", guest_dir / "initdisk.json"
    digest = input_digest(guest)
    if not force and out.exists() and desc_f.exists():
        old = json.loads(desc_f.read_text())
        if old.get("input_digest") == digest:
            return old
    # under the guest image's lock: concurrent runs build it once, and no guest rebuild swaps
    # the folder away meanwhile
    with cache.lock_at(guest_dir):
        if not force and out.exists() and desc_f.exists():
            old = json.loads(desc_f.read_text())
            if old.get("input_digest") == digest:
                return old
        return _build(guest_dir, guest, out, desc_f, digest)


def _build(guest_dir: Path, guest: dict, out: Path, desc_f: Path, digest: str) -> dict:

    lock = read_lock(LOCK) if guest.get("lock") == "guest-agent/packages.lock.json" else {}
    abi = kernel_abi(guest["packages"])
    debs = {}
    for pkg in (f"linux-image-{abi}-unsigned", BUSYBOX_PKG):
        ver = guest["packages"][pkg].split(":", 1)[-1]
        found = sorted((guest_dir / "debs").glob(f"{pkg}_*{ver}_*.deb"))
        if not found:
            raise BuildError(f"{pkg} {ver} is not in {guest_dir / 'debs'}: rebuild the guest "
                             "with python3 guest-agent/build_image.py --force")
        deb = found[0]
        want = lock.get(pkg, {}).get("sha256")
        if want and sha256_file(deb) != want:
            raise BuildError(f"{deb}: sha256 differs from the lock's")
        debs[pkg] = deb

    log("building initdisk.cpio (disk-root initramfs)")
    with tempfile.TemporaryDirectory(prefix="initdisk-", dir=guest_dir) as tmp:
        tmp_p = Path(tmp)
        kroot, bbroot, root = tmp_p / "kernel", tmp_p / "busybox", tmp_p / "root"
        for deb, dest in ((debs[f"linux-image-{abi}-unsigned"], kroot),
                          (debs[BUSYBOX_PKG], bbroot)):
            dest.mkdir()
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        mods = sorted((kroot / "lib/modules").iterdir())
        if len(mods) != 1:
            raise BuildError(f"expected one module tree in the kernel package, found {mods}")
        moddir = mods[0]
        tree = ModuleTree(moddir)
        groups = {g: tree.load_order(names) for g, names in GROUPS.items()}

        for d in ("bin", "proc", "sys", "dev", "newroot", "job", "memtrace/bin",
                  "lib/modules/load"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(bbroot / "bin/busybox", root / "memtrace/busybox")
        (root / "bin/busybox").symlink_to("../memtrace/busybox")
        (root / "bin/sh").symlink_to("busybox")
        shutil.copy2(HERE / "memtrace-mark", root / "memtrace/bin/memtrace-mark")
        (root / "memtrace/bin/memtrace-mark").chmod(0o755)
        shutil.copy2(HERE / "initdisk.sh", root / "init")
        (root / "init").chmod(0o755)
        shutil.copy2(guest_dir / guest["files"]["module"]["path"],
                     root / "lib/modules/memtrace_agent.ko")
        release = moddir.name
        for g, order in groups.items():
            for m in order:
                dst = root / "lib/modules" / release / m
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(moddir / m, dst)
            (root / "lib/modules/load" / g).write_text(
                "".join(f"{release}/{m}\n" for m in order))
        write_cpio(root, out)

    desc = {
        "path": out.name,
        "sha256": sha256_file(out),
        "kernel_release": guest.get("kernel_release"),
        "modules": {g: [Path(m).name for m in order] for g, order in groups.items()},
        "input_digest": digest,
    }
    desc_f.write_text(json.dumps(desc, indent=2) + "\n")
    log(f"done: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=None,
                    help="the guest image directory (default CACHE/guest, the build cache's)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        desc = build(args.guest or cache.path("guest"), args.force)
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(map(str, e.cmd[:2]))} ... failed with exit status "
                         f"{e.returncode}") from None
    print(json.dumps(desc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
