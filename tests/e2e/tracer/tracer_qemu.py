"""Run the test guest under QEMU with the tracer plugin; hash the final RAM; clean up.

Every guest run backs RAM with a fresh /dev/shm file that is removed in a finally clause,
whatever happens. No test depends on wall-clock speed: timeouts are generous (QEMU_TIMEOUT)
and timings are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import xxhash

from tests.e2e.tracer import tracer_guest as guest_mod
from tests.paths import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = str(REPO)
BUILD = os.path.join(ROOT, "build")
PLUGIN = os.path.join(BUILD, "tracer", "libmemtrace.so")
QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
QEMU_TIMEOUT = int(os.environ.get("MEMTRACE_E2E_TIMEOUT", "1800"))
RAM_SIZE = 512 << 20
PAGE = 4096


def _newest_mtime(paths: list[str]) -> float:
    return max(os.path.getmtime(p) for p in paths)


@dataclass
class Run:
    """One finished QEMU run."""

    returncode: int
    wall: float                     # seconds, whole QEMU process
    console: list[tuple[float, str]]  # (seconds since start, line) of the serial console
    stderr: str
    trace: str | None
    stats: dict = field(default_factory=dict)
    frame_hashes: np.ndarray | None = None  # (frames, 2) uint64: lo, hi of the final RAM
    stop_hashes: np.ndarray | None = None  # the same of the stop image (stop_image=True)

    def console_time(self, text: str) -> float | None:
        for t, line in self.console:
            if text in line:
                return t
        return None

    def workload_seconds(self) -> float | None:
        """Host wall time from the fake agent's START to the end of the workload."""
        t0 = self.console_time("E2E: agent start written")
        t1 = self.console_time("E2E: done")
        return None if t0 is None or t1 is None else t1 - t0


def frame_hashes(path: str) -> np.ndarray:
    """xxh3_128 of every 4 KiB frame of a RAM file, as (frames, 2) uint64 (lo, hi)."""
    size = os.path.getsize(path)
    out = np.zeros((size // PAGE, 2), dtype=np.uint64)
    with open(path, "rb") as f:
        f_no = 0
        while True:
            buf = f.read(PAGE * 4096)
            if not buf:
                break
            for off in range(0, len(buf), PAGE):
                h = xxhash.xxh3_128_intdigest(buf[off:off + PAGE])  # hash_hi << 64 | hash_lo
                out[f_no, 0] = h & 0xFFFFFFFFFFFFFFFF
                out[f_no, 1] = h >> 64
                f_no += 1
    return out


def run_guest(tmp_path, guest: dict[str, str], plugin_args: str | None, *,
              agent: str = "1", workload: str = "default", plugin: str = PLUGIN,
              ram_size: int = RAM_SIZE,
              inspect_ram: Callable[[str, str | None], object] | None = None,
              kill_when: Callable[[str], bool] | None = None,
              extra_append: str = "", append: str | None = None,
              stop_image: bool = False) -> Run:
    """Boot the guest under TCG with the plugin (unless plugin_args is None), wait for it to
    power off, hash the final RAM file, remove it. plugin_args gets out=, ram=, ram_size= and
    stats= prepended. kill_when(trace_path) is polled; when true QEMU gets SIGKILL. append
    replaces the kernel command line of the test guest (for other guest images).
    inspect_ram(ram_path, trace_path) runs after QEMU exits, before the RAM file is removed.
    stop_image: the plugin also writes guest RAM as it was when tracing stopped (what
    trace-record --verify compares with), hashed into Run.stop_hashes and removed too."""
    name = f"memtrace-e2e-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ram = f"/dev/shm/{name}"
    trace = str(tmp_path / f"{name}.mtr") if plugin_args is not None else None
    stats_path = str(tmp_path / f"{name}.stats.json")
    stop = f"/dev/shm/{name}.stop" if stop_image else None
    mb = ram_size // (1 << 20)
    if append is None:
        append = (f"console=ttyS0 panic=-1 quiet memmap=1M${guest_mod.MAILBOX_PHYS:#x} "
                  f"memmap=4M${guest_mod.FAKE_PT_BASE:#x} "
                  f"e2e.agent={agent} e2e.workload={workload} {extra_append}").strip()
    cmd = [QEMU, "-accel", "tcg", "-m", f"{mb}M", "-smp", "1", "-nodefaults", "-nographic",
           "-no-reboot", "-serial", "stdio", "-monitor", "none",
           "-object", f"memory-backend-file,id=ram,size={mb}M,mem-path={ram},share=on",
           "-machine", "memory-backend=ram",
           "-kernel", guest["kernel"], "-initrd", guest["initrd"],
           "-append", append]
    if plugin_args is not None:
        args = f"out={trace},ram={ram},ram_size={ram_size},stats={stats_path}"
        if plugin_args:
            args += "," + plugin_args
        if stop is not None:
            args += f",stop_image={stop}"
        cmd += ["-plugin", f"{plugin},{args}"]
    console: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        err_chunks: list[bytes] = []
        errt = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()),
                                daemon=True)
        errt.start()

        def read_console() -> None:
            for raw in proc.stdout:
                console.append((time.monotonic() - t0, raw.decode("utf-8", "replace").rstrip()))

        outt = threading.Thread(target=read_console, daemon=True)
        outt.start()
        while proc.poll() is None:
            if time.monotonic() - t0 > QEMU_TIMEOUT:
                proc.kill()
                pytest.fail(f"QEMU did not finish in {QEMU_TIMEOUT} s; console tail: "
                            f"{[line for _, line in console[-10:]]}")
            if kill_when is not None and trace and kill_when(trace):
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.05)
        wall = time.monotonic() - t0
        outt.join(30)
        errt.join(30)
        stats = {}
        if os.path.exists(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
        hashes = frame_hashes(ram) if os.path.exists(ram) else None
        stop_hashes = frame_hashes(stop) if stop is not None and os.path.exists(stop) else None
        if inspect_ram is not None and os.path.exists(ram):
            inspect_ram(ram, trace)
        return Run(proc.returncode, wall, console, b"".join(err_chunks).decode("utf-8", "replace"),
                   trace, stats, hashes, stop_hashes)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for path in (ram, stop):
            if path is not None and os.path.exists(path):
                os.unlink(path)
