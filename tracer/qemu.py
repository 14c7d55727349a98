"""Find and start QEMU for tracing: paths, versions, the command line, the QMP session.

One place that knows how our guest is booted: TCG (multi-threaded with several vCPUs), no
default devices, RAM in a shared file under /dev/shm that the plugin maps too (the machine puts
RAM_BELOW_4G of it below the PCI hole, the rest at 4 GiB), kernel and initramfs from the guest
image, serial console to a log file, QMP on a unix socket. A disk-root guest
(guest-agent/initdisk.sh) also gets virtio disks (DMA into guest RAM, which pages mode sees
through its tracking) and a second serial port for the workload's own output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient

from memtrace.tracer import cache
from memtrace.traces import private

# the tracer's own files (C sources, build.sh, locks), found through the package, not the
# current folder: tracer/ in a clone, site-packages/memtrace/tracer/ when installed
TRACER = Path(__file__).resolve().parent
MAILBOX_PHYS = 0x1F000000
MAILBOX_SIZE = 1 << 20
# The machine's max-ram-below-4g: RAM beyond it is mapped at 4 GiB (tracer/ram_layout.h). Fixed
# here, not left to QEMU's default (3.5G / 3G), so that launcher and plugin agree.
RAM_BELOW_4G = 2 << 30
MAX_RAM = 64 << 30


def plugin_path() -> Path:
    """The plugin build for the host's QEMU, in the cache (item ``tracer``)."""
    return cache.path("tracer") / "libmemtrace.so"


def guest_dir() -> Path:
    """The guest image, in the cache (item ``guest``)."""
    return cache.path("guest")


class SetupError(Exception):
    """Something needed to run QEMU is missing; the message says what to install or build."""


def qemu_binary() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise SetupError("qemu-system-x86_64 not found: install the Debian package "
                         "qemu-system-x86 (bash scripts/setup.sh does it)")
    return exe


def qemu_version(exe: str | None = None) -> str:
    out = subprocess.run([exe or qemu_binary(), "--version"], capture_output=True, text=True,
                         timeout=60).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0]


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise ValueError(f"not a size: {s!r} (e.g. 512M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


@dataclass
class Drive:
    """A virtio-blk disk of the guest (vda, vdb, ... in the order given)."""

    path: Path
    format: str = "raw"  # qemu image format: raw or qcow2
    readonly: bool = False


@dataclass
class GuestRun:
    """One boot of the guest under QEMU."""

    kernel: Path
    initrd: Path
    append: str
    ram_size: int = 512 << 20
    plugin_args: dict[str, str] | None = None  # None: plain TCG, no plugin
    workdir: Path = field(default_factory=lambda: Path("/tmp"))
    smp: int = 1
    qemu: list[str] | None = None  # the binary and its leading arguments (-L); None: the system's
    plugin: Path = field(default_factory=lambda: plugin_path())
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ram_created: bool = field(default=False, init=False)  # the RAM file is ours to remove
    drives: list[Drive] = field(default_factory=list)
    console_path: Path | None = None  # second serial port (ttyS1): the workload's output

    @property
    def ram_below_4g(self) -> int:
        return min(self.ram_size, RAM_BELOW_4G)

    @property
    def ram_path(self) -> Path:
        return Path("/dev/shm") / f"memtrace-{os.getpid()}-{self.tag}.ram"

    @property
    def stop_image_path(self) -> Path:
        """Guest RAM as it was when tracing stopped (written by the plugin for --verify, sparse,
        in the work directory: /dev/shm counts against the host's RAM)."""
        return self.workdir / f"stop-{self.tag}.ram"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"qmp-{self.tag}.sock"

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"serial-{self.tag}.log"

    def command(self) -> list[str]:
        mib = self.ram_size >> 20
        accel = "tcg,thread=multi" if self.smp > 1 else "tcg"
        cmd = [
            *(self.qemu or [qemu_binary()]), "-accel", accel, "-smp", str(self.smp),
            "-m", f"{mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-object", f"memory-backend-file,id=ram,size={mib}M,mem-path={self.ram_path},"
                       "share=on",
            "-machine", f"pc,memory-backend=ram,max-ram-below-4g={RAM_BELOW_4G}",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append,
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.console_path is not None:
            cmd += ["-serial", f"file:{self.console_path}"]
        for i, d in enumerate(self.drives):
            # cache=unsafe: the disks are throwaway copies or overlays, flushes are wasted time
            cmd += ["-drive", f"file={d.path},format={d.format},if=none,id=disk{i},"
                              f"cache=unsafe,readonly={'on' if d.readonly else 'off'}",
                    "-device", f"virtio-blk-pci,drive=disk{i}"]
        if self.plugin_args is not None:
            if not self.plugin.exists():
                raise SetupError(f"tracer plugin {self.plugin} is not built: run bash "
                                 "tracer/build.sh")
            args = ",".join(f"{k}={v}" for k, v in self.plugin_args.items())
            cmd += ["-plugin", f"{self.plugin},{args}"]
        return cmd

    def create_ram_file(self) -> None:
        """Create the guest RAM file before QEMU opens it: owner-only (0600 whatever the umask),
        O_EXCL and never through a symlink planted at its name in /dev/shm, sized so QEMU only
        maps it. (QEMU would create it with 0644 under the usual umask: all of guest RAM
        readable by every account on the machine.) SetupError in one line if the name is
        taken."""
        try:
            fd = private.create_private(self.ram_path, exclusive=True)
        except OSError as e:
            raise SetupError(f"cannot create the guest RAM file {self.ram_path}: "
                             f"{e.strerror or e}; is another process using this name?") from None
        self.ram_created = True
        try:
            os.ftruncate(fd, self.ram_size)
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        ours = (self.ram_path,) if self.ram_created else ()
        for p in (*ours, self.stop_image_path, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class QemuProcess:
    """A running QEMU with its QMP client (qemu.qmp). Always stopped by ``stop()``."""

    def __init__(self, run: GuestRun, stderr_path: Path) -> None:
        self.run = run
        self.stderr_path = stderr_path
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("trace-record")

    async def start(self, connect_timeout: float = 120.0) -> None:
        self.run.create_ram_file()
        with open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.run.command(), stdin=asyncio.subprocess.DEVNULL,
                stdout=err, stderr=err)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        while True:
            if self.proc.returncode is not None:
                return  # exited at once (bad plugin argument...): the caller reads stderr
            try:
                await self.qmp.connect(str(self.run.qmp_path))
                return
            except Exception:  # noqa: BLE001 - socket not there yet; QEMU still starting
                if loop.time() > deadline:
                    raise
                try:
                    await asyncio.wait_for(self.proc.wait(), 0.1)
                except TimeoutError:
                    pass

    async def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def stop(self, grace: float = 60.0) -> int:
        """Ask QEMU to quit over QMP (the plugin's exit hook closes the trace), then kill it."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            if await self.wait(grace) is None:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        return self.proc.returncode if self.proc.returncode is not None else -1

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
