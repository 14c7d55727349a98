"""trace-record: boot the guest image under QEMU with the tracer plugin and record a scenario.

Guest RAM lives in a shared file under /dev/shm (the plugin maps it too; always removed at the
end), QEMU is driven over QMP (qemu.qmp), the trace starts and stops on the guest agent's markers
so it holds the workload, not the boot. ``--verify`` replays the finished trace and compares every
frame with the real RAM file (and, in writes mode, every byte the raw write records touched).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memtrace.tracer import cache, qemus
from memtrace.tracer.qemu import (
    MAILBOX_PHYS,
    MAILBOX_SIZE,
    MAX_RAM,
    GuestRun,
    QemuProcess,
    SetupError,
    guest_dir,
    parse_size,
)
from memtrace.tracer.workload import (
    DISK_SCENARIOS,
    Outcome,
    Workload,
    add_arguments,
    default_ram,
    scenario_as_workload,
)
from memtrace.traces.reader import TraceError, follow, open_trace
from memtrace.traces.writer import mark_incomplete, update_header

SCENARIOS = ("single", "terminal-server", "zero-install", "server-heap", "ksm", "idle", "storm",
             "interleave", *DISK_SCENARIOS)
DONE = re.compile(rb"MEMTRACE-SCENARIO-DONE rc=(-?\d+)")
VERSION = "0.1.0"


def guest_image(build: bool = True) -> dict[str, Any]:
    """The guest image's manifest (kernel, initramfs, identity), building it if missing or if
    its inputs (agent sources, init, scenarios) changed: build_image.py checks that in a few ms."""
    guest = guest_dir()
    manifest = guest / "manifest.json"
    if build:
        if not manifest.exists():
            print(f"trace-record: building the guest image (cached in {guest})",
                  file=sys.stderr)
        # the builder of the installed package (python -m), locking the cache item itself
        r = subprocess.run([sys.executable, "-m", "memtrace.guest.build_image",
                            "--out", str(guest)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=3600)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            said = [ln for ln in r.stderr.splitlines() if ln.startswith("build_image: error:")]
            raise SetupError("building the guest image failed: " + (
                said[-1].removeprefix("build_image: error: ") if said else
                f"see above; rerun {sys.executable} -m memtrace.guest.build_image --out {guest}"))
    if not manifest.exists():
        raise SetupError(f"no guest image in {guest}: run {sys.executable} -m "
                         f"memtrace.guest.build_image --out {guest}")
    return json.loads(manifest.read_text())


def ensure_plugin() -> None:
    """The plugin for the system's QEMU, built when missing or stale."""
    qemus.ensure_plugin(qemus.system_qemu())


def kernel_cmdline(scenario: str, n: int, extra: str = "") -> str:
    return (f"console=ttyS0 panic=-1 nokaslr memmap={MAILBOX_SIZE >> 10}K${MAILBOX_PHYS:#x} "
            f"memtrace.mailbox_phys={MAILBOX_PHYS:#x} memtrace.mailbox_size={MAILBOX_SIZE} "
            f"memtrace.scenario={scenario} memtrace.n={n} {extra}").strip()


def parse_count(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMG]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {s!r} (e.g. 10M)")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {s!r}")
    return v


MIN_EPOCH = 10_000  # the plugin looks at the clock at least every block; shorter is noise


def parse_epoch(s: str) -> int:
    v = parse_count(s)
    if v < MIN_EPOCH:
        raise argparse.ArgumentTypeError(f"{s!r}: an epoch is at least {MIN_EPOCH:,} guest "
                                         "instructions (default 10M)")
    return v


def output_path(a: argparse.Namespace) -> Path:
    """The trace's path, its folder created and writable, checked before QEMU starts."""
    out = Path(a.output or (f"out/{a.scenario}-{a.n}-{a.mode}.mtr" if a.scenario
                            else f"out/workload-{a.mode}.mtr"))
    if out.is_dir():
        raise SetupError(f"-o {out}: is a folder; give the trace file's path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"-o {out}: cannot create the folder {out.parent}: "
                         f"{e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SetupError(f"-o {out}: the folder {out.parent} is not writable")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trace-record", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=None, choices=SCENARIOS,
                    help="built-in guest workload (default: single, unless --run or --script "
                         "names your own)")
    ap.add_argument("-n", type=positive_int, default=2,
                    help="instances for the scenario (default: 2)")
    ap.add_argument("-o", "--output", help="trace file (default: out/SCENARIO-N-MODE.mtr)")
    ap.add_argument("--mode", choices=("pages", "writes"), default="pages",
                    help="pages: content hashes of changed frames per epoch (default); "
                         "writes: every store with its value as well")
    ap.add_argument("--epoch", type=parse_epoch, default=10_000_000,
                    help="epoch length in guest instructions (default 10M)")
    ap.add_argument("--ram", default=None,
                    help="guest RAM (default 512M; desktop 1G + 1G per user, game-server 1G + "
                         "512M per server; beyond 2G the machine maps the rest at 4G)")
    ap.add_argument("--layout", choices=("terminal-server", "zero-install"), default=None,
                    help="desktop scenario: all users run the installed applications "
                         "(terminal-server, default) or each their own copy (zero-install)")
    ap.add_argument("--cache", metavar="DIR",
                    help="where built things live: guest image, plugin builds, QEMU 10 (default "
                         "$MEMTRACE_CACHE, else $XDG_CACHE_HOME/memtrace, ~/.cache/memtrace; "
                         "trace-cache shows and cleans it)")
    ap.add_argument("--smp", type=positive_int, default=1, metavar="N",
                    help="guest vCPUs (default 1; multi-threaded TCG, one host thread each; "
                         "the plugin takes up to 64)")
    ap.add_argument("--qemu", default="system", metavar="PATH|system|10",
                    help="the QEMU to run: the host's qemu-system-x86_64 (default), 10 (QEMU "
                         "10: the host's on Debian 13, else the locked bookworm-backports one, "
                         "unpacked in the cache on first use), or a path")
    ap.add_argument("--plugin", metavar="SO",
                    help="tracer plugin to load (default: the build for that QEMU, built "
                         "when missing)")
    ap.add_argument("--track", choices=("auto", "pagemap", "callbacks"), default="auto",
                    help="how pages mode finds written frames (default: auto)")
    ap.add_argument("--start", choices=("marker", "now"), default="marker",
                    help="start tracing at the agent's start marker (default) or at boot")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="stop QEMU after this many seconds (default 1800); the trace is kept "
                         "and marked incomplete")
    ap.add_argument("--verify", action="store_true",
                    help="after the run, compare every frame of guest RAM, as it was when "
                         "tracing stopped, with the trace's final state (with --mode writes, "
                         "also every byte the WRITE and UNSEEN records touched)")
    ap.add_argument("--no-plugin", action="store_true",
                    help="run the scenario under plain TCG without tracing and without the "
                         "guest agent (the baseline for benchmarks)")
    ap.add_argument("--agent", choices=("auto", "on", "off"), default="auto",
                    help="load the guest agent (auto: with the plugin only). For telling costs "
                         "apart: --no-plugin --agent on runs the agent with nothing reading "
                         "its ring (events dropped once it is full, dumps do not wait); "
                         "--agent off with the plugin leaves only the plugin's clock (no START "
                         "comes: the trace holds no records)")
    ap.add_argument("--serial-log", help="keep the guest's serial console here")
    ap.add_argument("--stats", metavar="FILE",
                    help="write the plugin's run statistics here (JSON: records, time spent "
                         "scanning, hashing and walking, stops of the vCPUs, writer waits)")
    ap.add_argument("--append", default="", metavar="PARAMS",
                    help="extra guest kernel command-line parameters (guest-agent/README.md "
                         "lists the memtrace.* ones)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_arguments(ap)
    return ap


class Recorder:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.stop_reason: str | None = None
        self.stop_event = asyncio.Event()
        self.workload: Workload | None = None
        a.ram = a.ram or default_ram(a.scenario, a.n)
        if a.scenario in DISK_SCENARIOS:
            scenario_as_workload(a)
            self.workload = Workload(a)
        elif a.layout is not None:
            raise SetupError("--layout is a choice of the desktop scenario")
        elif a.run is not None or a.script is not None:
            if a.scenario is not None:
                raise SetupError("--scenario runs a built-in workload; --run/--script run your "
                                 "own: give one of them")
            self.workload = Workload(a)
        elif a.root or a.packages or a.copy or a.env or a.settle or a.marks != "command" \
                or a.workdir != "/root":
            raise SetupError("--root, --packages, --copy, --env, --workdir, --settle and --marks "
                             "describe your own workload: add --run CMD or --script FILE")
        else:
            a.scenario = a.scenario or "single"
        self.label = a.scenario or "workload"

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_event.set()

    async def run(self) -> int:
        a = self.a
        out = output_path(a)
        if a.timeout <= 0:
            raise SetupError(f"--timeout {a.timeout:g}: give a positive number of seconds")
        ram_size = parse_size(a.ram)
        if not 64 << 20 <= ram_size <= MAX_RAM:
            raise SetupError(f"--ram {a.ram}: between 64M and {MAX_RAM >> 30}G")
        q = qemus.resolve(a.qemu)
        plugin = None
        if not a.no_plugin:
            plugin = Path(a.plugin).resolve() if a.plugin else qemus.ensure_plugin(q)
            qemus.preflight(q, plugin, a.smp)  # before the guest: one line if anything is off
        guest_image()
        if self.workload:
            self.workload.build_initdisk(guest_dir())
        agent = a.agent == "on" or (a.agent == "auto" and not a.no_plugin)
        if self.workload and a.track == "callbacks":
            raise SetupError("--track callbacks cannot see disk DMA into guest RAM: a workload on "
                             "a disk needs write-protect tracking (--track pagemap)")
        with contextlib.ExitStack() as held:
            # the guest image and the plugin are read-locked until QEMU exits: a rebuild (other
            # sources sharing this cache) waits instead of replacing the files between the
            # manifest read here and QEMU opening them
            held.enter_context(cache.lock_at(guest_dir(), shared=True))
            if plugin is not None and not a.plugin:
                held.enter_context(cache.lock_at(plugin.parent, shared=True))
            manifest = guest_image(build=False)
            work = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="trace-record-")))
            files = manifest.get("files", {})
            run = GuestRun(kernel=guest_dir() / files.get("bzImage", {}).get("path", "bzImage"),
                           initrd=guest_dir() / files.get("initramfs", {}).get("path",
                                                                        "initramfs.cpio"),
                           append=kernel_cmdline(self.label, a.n, a.append + (
                               " memtrace.agent=0" if not agent else
                               " memtrace.dump_wait_ms=0" if a.no_plugin else "")),
                           ram_size=ram_size,
                           workdir=work, smp=a.smp, qemu=[str(q.path), *q.args()])
            if plugin is not None:
                run.plugin = plugin
            extra: dict[str, Any] = {}
            if self.workload:
                run.initrd, run.drives, run.console_path, extra = self.workload.prepare(guest_dir(),
                                                                                        work)
            header_path = work / "header.json"
            header = {
                "source": "recorded", "mode": a.mode, "epoch_length": a.epoch,
                "ram_size": ram_size, "clock_unit": "instructions",
                "command": " ".join(["trace-record", *sys.argv[1:]]),
                "guest_image": {k: v for k, v in manifest.items() if k != "notes"},
                "tool_versions": {"qemu": q.version + (f" ({q.debian})" if q.debian else ""),
                                  "memtrace": VERSION},
                "kernel_cmdline": run.append,
            }
            if self.workload:
                header["guest_image"]["initdisk"] = extra.pop("initdisk")
                header.update(extra)
            if a.scenario:
                header["scenario"] = {"name": a.scenario, "n": a.n, "smp": a.smp}
                if a.layout:
                    header["scenario"]["layout"] = a.layout
            header_path.write_text(json.dumps(header))
            if not a.no_plugin:
                run.plugin_args = {
                    "out": str(out.resolve()), "ram": str(run.ram_path),
                    "ram_size": str(ram_size), "ram_below_4g": str(run.ram_below_4g),
                    "mode": a.mode, "epoch": str(a.epoch),
                    "mailbox": hex(MAILBOX_PHYS) if agent else "none",
                    "mailbox_size": str(MAILBOX_SIZE),
                    "track": "pagemap" if self.workload and a.track == "auto" else a.track,
                    "header": str(header_path), "start": a.start,
                }
                if a.verify:
                    run.plugin_args["stop_image"] = str(run.stop_image_path)
                if a.stats:
                    run.plugin_args["stats"] = str(Path(a.stats).resolve())
            try:
                return await self._boot(run, out, work)
            finally:
                run.cleanup()
                if run.ram_created and run.ram_path.exists():  # pragma: no cover
                    print(f"trace-record: warning: could not remove {run.ram_path}",
                          file=sys.stderr)

    async def _boot(self, run: GuestRun, out: Path, work: Path) -> int:
        a = self.a
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, "interrupted by signal")
        q = QemuProcess(run, work / "qemu.stderr")
        t0 = time.monotonic()
        await q.start()
        assert q.proc is not None
        if q.proc.returncode is not None:
            err = q.stderr_text().strip().splitlines()
            mine = [ln for ln in err if ln.startswith("memtrace: ")]
            raise SetupError("QEMU refused to start: " + (
                mine[0] if mine else err[-1] if err else f"exit code {q.proc.returncode}"))
        wl = self.workload
        bar = tqdm(total=None, unit="", desc=self.label,
                   disable=a.quiet or not sys.stderr.isatty(),
                   file=sys.stderr, bar_format="{desc}: {elapsed} {postfix}")
        offset = 0
        t_guest, chunks = 0, 0
        try:
            while True:
                stop = asyncio.create_task(self.stop_event.wait())
                done = asyncio.create_task(q.proc.wait())
                finished, _ = await asyncio.wait({stop, done}, timeout=1.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if done not in finished:
                    done.cancel()
                if not a.no_plugin:
                    offset, t, n = follow(out, offset)
                    t_guest, chunks = max(t_guest, t), chunks + n
                if wl and wl.console:
                    wl.console.poll()
                size = out.stat().st_size if out.exists() else 0
                bar.set_postfix_str(f"guest instructions {t_guest / 1e9:.2f} G, trace "
                                    f"{size / 1e6:.1f} MB, {chunks} chunks", refresh=True)
                if q.proc.returncode is not None or self.stop_event.is_set():
                    break
                if time.monotonic() - t0 > a.timeout:
                    self.request_stop(
                        f"timeout after {a.timeout:g} s: the workload did not exit" if wl
                        else f"timeout after {a.timeout:g} s (guest hung?)")
                    break
        finally:
            bar.close()
            rc = await q.stop()
        wall = time.monotonic() - t0
        serial = run.serial_path.read_bytes() if run.serial_path.exists() else b""
        if a.serial_log:
            Path(a.serial_log).write_bytes(serial)
        m = DONE.search(serial)
        outcome = Outcome.from_serial(serial) if wl else None
        if wl and wl.console:
            wl.console.poll()
        finished = m is not None if outcome is None else outcome.exit_status is not None
        # the plugin's own failures (e.g. the disk filled up): say them, mark the trace
        plugin_errors = [ln.split("memtrace: ", 1)[1] for ln in q.stderr_text().splitlines()
                         if ln.startswith("memtrace: ") and ("fatal:" in ln
                                                              or "incomplete:" in ln)]
        for e in plugin_errors:
            print(f"trace-record: tracer: {e}", file=sys.stderr)
        if self.stop_reason is None and plugin_errors:
            self.stop_reason = plugin_errors[0]
        if outcome is not None and (outcome.root_error or outcome.job_error):
            # nothing was traced: the guest stopped before the command (one line, no trace)
            out.unlink(missing_ok=True)
            raise SetupError(outcome.root_error or outcome.job_error or "")
        if self.stop_reason is None and not finished:
            self.stop_reason = f"QEMU exited (code {rc}) before the {self.label} finished"
        if (a.scenario and outcome is not None and outcome.exit_status not in (None, 0)
                and self.stop_reason is None):
            # a scenario script that fails says why on its last line
            last = wl.console.last_line() if wl and wl.console else ""
            self.stop_reason = (f"the {a.scenario} scenario failed (exit status "
                                f"{outcome.exit_status}" + (f": {last}" if last else "") + ")")
        if outcome is not None and outcome.exit_status == 127 and self.stop_reason is None:
            last = wl.console.last_line() if wl and wl.console else ""
            self.stop_reason = ("the command was not found in the guest (exit status 127"
                                + (f": {last}" if last else "") + ")")
        if not a.no_plugin:
            if not out.exists():
                raise SetupError("the plugin wrote no trace: " +
                                 (q.stderr_text().strip().splitlines() or ["no message"])[-1])
            if wl and not self.stop_reason and not traced(out):
                out.unlink()
                raise SetupError("the workload marked no start, so nothing was traced: call "
                                 "memtrace-mark start (or record without --marks workload)")
            if self.stop_reason:
                try:
                    mark_incomplete(out, self.stop_reason)
                except OSError as e:
                    print(f"trace-record: warning: could not mark {out} incomplete: "
                          f"{e.strerror}; it stays readable up to its last complete chunk",
                          file=sys.stderr)
            if outcome is not None and out.exists():
                self._header_exit_status(out, outcome.exit_status)
        status = "ok" if not self.stop_reason else f"INCOMPLETE: {self.stop_reason}"
        what = f"{a.scenario} n={a.n}" if a.scenario else "workload"
        if outcome is not None and outcome.exit_status is not None:
            what += f" (exit status {outcome.exit_status})"
        print(f"trace-record: {what}: {status}; wall {wall:.1f} s"
              + ("" if a.no_plugin else f"; trace {out} ({out.stat().st_size / 1e6:.1f} MB)"),
              file=sys.stderr)
        if m is not None and int(m.group(1)) != 0:
            print(f"trace-record: warning: the scenario exited with rc={m.group(1)}",
                  file=sys.stderr)
        if outcome is not None and outcome.exit_status == 127:
            print(f"trace-record: error: {self.stop_reason}", file=sys.stderr)
            return 1
        if a.verify and not a.no_plugin:
            image = run.stop_image_path if run.stop_image_path.exists() else run.ram_path
            status = verification_status(out, image, a.mode, (MAILBOX_PHYS, MAILBOX_SIZE),
                                         quiet=a.quiet)
            if status:
                return status
        return 0 if not self.stop_reason else 4

    @staticmethod
    def _header_exit_status(out: Path, status: int | None) -> None:
        """The workload's exit status into the trace header (room was left for it)."""
        with open_trace(out) as t:
            workload = dict(t.header.get("workload") or {})
        workload["exit_status"] = status
        if not update_header(out, {"workload": workload}):
            print(f"trace-record: warning: no room left in {out}'s header for the exit status "
                  "(it is in the trace as COUNTER workload.exit_status)", file=sys.stderr)


def traced(path: Path) -> bool:
    """Whether a trace holds anything (with start=marker nothing is written before START)."""
    with open_trace(path) as t:
        return bool(t.chunks)


def verification_status(out: Path, image: Path, mode: str,
                        exclude: tuple[int, int] | None, quiet: bool = False) -> int:
    """--verify: compare the trace's final state (and in writes mode every byte its WRITE and
    UNSEEN records touched) with guest RAM as it was when tracing stopped; print what was
    found; 3 if anything differs, else 0."""
    from memtrace.tracer.verify import verify, verify_writes

    res = verify(out, image, exclude, progress=not quiet and sys.stderr.isatty())
    print(res.summary(), file=sys.stderr)
    if not res.ok:
        return 3
    if mode == "writes":
        wres = verify_writes(out, image, exclude)
        print(wres.summary(), file=sys.stderr)
        if not wres.ok:
            return 3
    return 0


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.cache:
        cache.set_root(a.cache)
    try:
        code = asyncio.run(Recorder(a).run())
    except (SetupError, TraceError, ValueError) as e:
        print(f"trace-record: error: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"trace-record: error: {e.strerror or e}{where}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("trace-record: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
