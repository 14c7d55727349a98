"""The guest's root disk for a workload, from whatever root the user names; the original is never
written.

A root is one of
  - ``debian[:NAME]`` (the default): a Debian root built by the project from locked packages
    (guest-agent/roots.py), plus ``--packages``; the guest runs on a throwaway qcow2 overlay of
    its cached ext4 image;
  - a directory holding a Linux root: copied into a fresh ext4 image (``mke2fs -d``, no mount);
  - a tar archive of one (what ``docker export`` / ``podman export`` write; gzip, bzip2 or xz
    compressed too): unpacked with GNU tar, then as a directory;
  - a disk image, raw or qcow2, whose whole disk or one of whose MBR/GPT partitions holds an
    ext2/3/4, XFS or Btrfs file system with the root: the guest runs on a throwaway qcow2 overlay
    backed by it (QEMU opens a backing file read-only).
A Linux root has ``etc/`` and ``bin/`` or ``usr/bin/``; nothing else is needed in it (the init of
guest-agent/initdisk.sh brings its own tools). Throwaway files live in the run's work directory
(on disk: /dev/shm counts against the host's RAM) and go with it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrace.guest.build_image import sha256_file
from memtrace.tracer.qemu import Drive, SetupError

QCOW2_MAGIC = b"QFI\xfb"
EXT_MAGIC_OFFSET = 1080  # superblock at 1024, s_magic at +56
FS_MAGICS = (  # (offset, bytes, name) of the file systems the guest's init can mount
    (EXT_MAGIC_OFFSET, b"\x53\xef", "ext2/3/4"),
    (0, b"XFSB", "XFS"),
    (65536 + 64, b"_BHRfS_M", "Btrfs"),
)


@dataclass
class RootDisk:
    """The root the guest will boot into, as one disk."""

    kind: str  # debian, directory, tar, image
    drive: Drive
    header: dict[str, Any]  # what the trace header says about the root
    guest_root: Path | None = None  # a host tree with the root's files, if there is one
    notes: list[str] = field(default_factory=list)


def is_linux_root(names: set[str]) -> bool:
    """A tree with etc/ and bin/ or usr/bin/ (names: its top-level and second-level paths,
    without a leading ./ or /)."""
    return "etc" in names and ("bin" in names or "usr/bin" in names)


def prepare_root(spec: str | None, packages: list[str], work: Path) -> RootDisk:
    """The root disk for ``--root SPEC`` (None: the project's Debian base root)."""
    spec = spec or "debian"
    if spec == "debian" or spec.startswith("debian:"):
        return debian_root(spec.partition(":")[2] or "base", packages, work)
    path = Path(spec).expanduser()
    if packages:
        raise SetupError("--packages builds a Debian root; it cannot add packages to a root "
                         f"you give ({spec}): install them there, or drop --root")
    if not path.exists():
        raise SetupError(f"--root {spec}: no such file or directory (expected a directory, a "
                         "tar archive, a raw or qcow2 disk image, or debian[:NAME])")
    path = path.resolve()
    if path.is_dir():
        return directory_root(path, work)
    if not path.is_file():
        raise SetupError(f"--root {spec}: not a directory nor a regular file")
    with path.open("rb") as f:
        head = f.read(4)
    if head == QCOW2_MAGIC:
        return image_root(path, "qcow2", work)
    if is_tar(path):
        return tar_root(path, work)
    return image_root(path, "raw", work)


def is_tar(path: Path) -> bool:
    """A tar archive (POSIX/GNU header magic), or a gzip, bzip2 or xz compressed file that
    tarfile can open as one (tarfile.is_tarfile alone takes zeros for an empty archive)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head[257:262] == b"ustar":
        return True
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        try:
            with tarfile.open(path) as tar:
                return tar.next() is not None
        except (tarfile.TarError, OSError, EOFError):
            return False
    return False


def debian_root(name: str, packages: list[str], work: Path) -> RootDisk:
    from memtrace.guest.build_image import BuildError
    from memtrace.guest.roots import build

    try:
        m = build(name, packages)
    except BuildError as e:
        raise SetupError(str(e).removeprefix("build_image: error: ")) from None
    base = Path(m["dir"]) / m["image"]["path"]
    overlay = work / "root.qcow2"
    qcow2_overlay(base, "raw", overlay)
    header = {"kind": "debian", "name": name, "extra": m["extra"], "lock": m["lock"],
              "key": m["key"], "packages": m["packages"]}
    return RootDisk("debian", Drive(overlay, "qcow2"), header, Path(m["dir"]) / "rootfs")


def directory_root(path: Path, work: Path) -> RootDisk:
    names = {p.relative_to(path).as_posix() for p in path.iterdir()}
    if (path / "usr").is_dir():
        names |= {f"usr/{p.name}" for p in (path / "usr").iterdir()}
    if not is_linux_root(names):
        raise SetupError(f"--root {path}: not a Linux root (it has no etc/ and bin/ or usr/bin/)")
    image = work / "root.ext4"
    ext4_from_tree(path, image)
    return RootDisk("directory", Drive(image, "raw"), {"kind": "directory", "path": str(path)},
                    path)


def tar_root(path: Path, work: Path) -> RootDisk:
    names: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                parts = member.name.lstrip("./").lstrip("/").split("/")
                names.add(parts[0])
                if len(parts) > 1:
                    names.add("/".join(parts[:2]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SetupError(f"--root {path}: cannot read the tar archive ({e})") from None
    if not is_linux_root(names):
        raise SetupError(f"--root {path}: the archive holds no Linux root (no etc/ and bin/ or "
                         "usr/bin/ at its top)")
    tree = work / "root-tree"
    tree.mkdir()
    r = subprocess.run(["tar", "-x", "-f", str(path), "-C", str(tree), "--numeric-owner",
                        "--same-permissions", "--same-owner", "--xattrs",
                        "--exclude=./dev/*", "--exclude=dev/*"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"--root {path}: tar could not unpack it: "
                         + (r.stderr.strip().splitlines() or ["no message"])[-1])
    image = work / "root.ext4"
    ext4_from_tree(tree, image)
    shutil.rmtree(tree)
    return RootDisk("tar", Drive(image, "raw"),
                    {"kind": "tar", "path": str(path), "sha256": sha256_file(path)})


def ext4_from_tree(tree: Path, image: Path) -> None:
    from memtrace.guest.build_image import BuildError
    from memtrace.guest.roots import make_ext4

    try:
        make_ext4(tree, image)
    except BuildError as e:
        raise SetupError(str(e).removeprefix("build_image: error: ")) from None


def image_root(path: Path, fmt: str, work: Path) -> RootDisk:
    check_not_in_use(path)
    if fmt == "raw":
        found = find_file_systems(path)
        if not found:
            raise SetupError(f"--root {path}: not a directory, a tar archive nor a disk image "
                             "with an ext2/3/4, XFS or Btrfs file system (whole disk or MBR/GPT "
                             "partition)")
    overlay = work / "root.qcow2"
    qcow2_overlay(path, fmt, overlay)
    st = path.stat()
    return RootDisk("image", Drive(overlay, "qcow2"),
                    {"kind": "image", "path": str(path), "format": fmt, "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns})


def qcow2_overlay(base: Path, fmt: str, overlay: Path) -> None:
    """A qcow2 file that reads through to base and takes every write itself."""
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt,
                        str(overlay)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["no message"])[-1]
        if "lock" in msg:
            raise SetupError(f"{base} is in use by another process (QEMU could not lock it: "
                             f"{msg}); stop that process or copy the image")
        raise SetupError(f"qemu-img create (overlay of {base}) failed: {msg}")


def find_file_systems(path: Path) -> list[tuple[int, str]]:
    """(byte offset, file system) of the mountable file systems on a raw disk image: at 0 and
    at each MBR or GPT partition."""
    starts = [0]
    with path.open("rb") as f:
        mbr = f.read(512)
        if len(mbr) == 512 and mbr[510:512] == b"\x55\xaa":
            for i in range(4):
                e = mbr[446 + 16 * i: 462 + 16 * i]
                ptype, lba = e[4], struct.unpack_from("<I", e, 8)[0]
                if ptype == 0xEE:  # protective MBR: GPT
                    starts += gpt_starts(f)
                elif ptype and lba:
                    starts.append(lba * 512)
        found = []
        for start in starts:
            for off, magic, name in FS_MAGICS:
                f.seek(start + off)
                if f.read(len(magic)) == magic:
                    found.append((start, name))
                    break
    return found


def gpt_starts(f: Any) -> list[int]:
    f.seek(512)
    hdr = f.read(92)
    if hdr[:8] != b"EFI PART":
        return []
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    f.seek(entries_lba * 512)
    table = f.read(min(count, 256) * size)
    out = []
    for i in range(len(table) // size):
        e = table[i * size:(i + 1) * size]
        if e[:16] != b"\0" * 16:
            out.append(struct.unpack_from("<Q", e, 32)[0] * 512)
    return out


def check_not_in_use(path: Path) -> None:
    """Refuse an image another process has open for writing, or that backs a loop device:
    its contents may change under the guest."""
    st = path.stat()
    for loop in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = loop.read_text().strip().removesuffix(" (deleted)")
            bst = os.stat(backing)
        except OSError:
            continue
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            raise SetupError(f"--root {path} is in use: it backs /dev/{loop.parts[3]} (losetup "
                             f"-d /dev/{loop.parts[3]} when it is no longer mounted)")
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                fst = fd.stat()
                if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev,
                                                                                   st.st_ino):
                    continue
                flags = (proc / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            m = re.search(r"^flags:\s*([0-7]+)", flags, re.M)
            if m and int(m.group(1), 8) & os.O_ACCMODE != os.O_RDONLY:
                try:
                    comm = (proc / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                raise SetupError(f"--root {path} is in use: process {proc.name} ({comm}) has it "
                                 "open for writing; stop it, or copy the image")


