"""Boot the memtrace guest under real QEMU (TCG) with guest RAM in a shared /dev/shm file."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from memtrace.guest import mailbox

QEMU = os.environ.get("MEMTRACE_QEMU", "qemu-system-x86_64")
RAM = 512 << 20
BOOT_TIMEOUT = float(os.environ.get("MEMTRACE_BOOT_TIMEOUT", "600"))


@dataclass
class GuestRun:
    log: str
    returncode: int
    seconds: float
    ctrl: mailbox.Control | None
    events: list[mailbox.Event] = field(default_factory=list)
    consumed_live: int = 0

    def lines_between(self, begin: str, end: str) -> list[str]:
        lines = self.log.replace("\r", "").splitlines()
        out: list[str] = []
        inside = False
        for ln in lines:
            if ln.startswith(begin):
                inside = True
                continue
            if inside and ln.startswith(end):
                return out
            if inside and not ln.startswith("["):
                out.append(ln)
        return out


def boot(image: Path, scenario: str, n: int = 2, mailbox_size: str = "16M",
         phys: int = 0x1E000000, consume: bool = False, extra: str = "",
         log_path: Path | None = None) -> GuestRun:
    """Run one scenario to poweroff; decode the mailbox (live consumer and/or leftovers)."""
    size = mailbox.parse_size(mailbox_size)
    shm = Path(f"/dev/shm/memtrace-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    log_path = log_path or shm.with_suffix(".log")
    append = (f"console=ttyS0 memmap={mailbox_size}${phys:#x} nokaslr "
              f"memtrace.scenario={scenario} memtrace.n={n} {extra}").strip()
    cmd = [
        QEMU, "-accel", "tcg", "-m", "512M", "-nodefaults", "-nographic", "-no-reboot",
        "-object", f"memory-backend-file,id=ram,size=512M,mem-path={shm},share=on",
        "-machine", "memory-backend=ram",
        "-serial", f"file:{log_path}",
        "-kernel", str(image / "bzImage"), "-initrd", str(image / "initramfs.cpio"),
        "-append", append,
    ]
    events: list[mailbox.Event] = []
    live = 0
    stop = threading.Event()
    consumer: mailbox.Consumer | None = None
    errors: list[BaseException] = []

    def pump() -> None:
        nonlocal live
        try:
            while not stop.is_set():
                assert consumer is not None
                got = consumer.poll()
                events.extend(got)
                live += len(got)
                if not got:
                    time.sleep(0.002)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    thread = None
    try:
        if consume:
            while not shm.exists() or shm.stat().st_size < RAM:
                if proc.poll() is not None:
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                consumer = mailbox.Consumer(str(shm), phys, size)
                thread = threading.Thread(target=pump, daemon=True)
                thread.start()
        try:
            _, err = proc.communicate(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        seconds = time.monotonic() - t0
        stop.set()
        if thread:
            thread.join()
        if errors:
            raise errors[0]
        ctrl = None
        if consumer:
            events.extend(consumer.poll())
            ctrl = consumer.ctrl
            consumer.close()
            consumer = None
        else:
            try:
                ctrl, events = mailbox.read_file(str(shm), phys, size)
            except mailbox.MailboxError:
                ctrl = None
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if proc.returncode != 0:
            log += "\nQEMU STDERR:\n" + err.decode(errors="replace")
        return GuestRun(log, proc.returncode, seconds, ctrl, events, live)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if consumer:
            consumer.close()
        shm.unlink(missing_ok=True)
        if log_path.parent == Path("/dev/shm"):
            log_path.unlink(missing_ok=True)
