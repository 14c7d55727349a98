"""A user's workload for trace-record: the job disk the guest runs it from, and what comes back.

The job (``--run CMD`` or ``--script FILE``, ``--copy``, ``--env``, ``--workdir``, ``--settle``,
``--marks``) becomes a small read-only ext4 disk (the guest's /dev/vdb):

  files/...            the --copy files and folders, at their guest paths (copied into the root
                       by the guest's init before the job starts)
  memtrace/job.sh      the job, run by busybox sh chrooted into the root (guest-agent/initdisk.sh)
  memtrace/command.sh  the --run command line, run by the root's /bin/sh (busybox sh if the root
                       has none), or memtrace/script, the --script file, executed as it is
                       (its #! line picks the interpreter)
  memtrace/marks       ``command`` or ``workload``: who marks the traced region

Marks: by default (``--marks command``) job.sh writes MARK START right before the command and,
after it (and the --settle time), the exit status as COUNTER ``workload.exit_status`` and MARK
STOP: the trace spans the command. The workload adds phases and counters with
``memtrace-mark phase NAME`` / ``counter NAME VALUE``. With ``--marks workload`` the workload
brackets itself with ``memtrace-mark start`` / ``stop`` (job.sh writes the STOP if it exits
while tracing). The command's output goes to the guest's second serial port (a file on the host
that trace-record shows as it grows) and its exit status to the console (``MEMTRACE-WORKLOAD-DONE
rc=N``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from memtrace.tracer.qemu import Drive, SetupError

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/memtrace/bin"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DONE = re.compile(rb"MEMTRACE-WORKLOAD-DONE rc=(-?\d+)")
ROOT_ERROR = re.compile(rb"MEMTRACE-ROOT-ERROR ([^\r\n]*)")
JOB_ERROR = re.compile(rb"MEMTRACE-JOB-ERROR ([^\r\n]*)")


@dataclass
class Job:
    run: str | None = None
    script: Path | None = None
    copies: list[tuple[Path, str]] = field(default_factory=list)  # host path, guest path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/root"
    settle: float = 0.0
    marks: str = "command"

    def header(self) -> dict[str, Any]:
        """What the trace header says about the job (``workload``)."""
        h: dict[str, Any] = {"workdir": self.workdir, "settle": self.settle, "marks": self.marks,
                             "env": self.env,
                             "copies": [{"host": str(h), "guest": g} for h, g in self.copies]}
        if self.run is not None:
            h["run"] = self.run
        if self.script is not None:
            h["script"] = str(self.script)
            h["script_text"] = self.script.read_text(errors="replace")[:4096]
        return h


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not ENV_NAME.fullmatch(name):
            raise SetupError(f"--env {item!r}: expected NAME=VALUE with a shell variable name")
        env[name] = value
    return env


def parse_copies(items: list[str], workdir: str) -> list[tuple[Path, str]]:
    """HOST[:GUEST] -> (host path, absolute guest path); GUEST defaults to WORKDIR/NAME, a
    relative GUEST is under WORKDIR, a GUEST ending in / is a folder to copy into."""
    out = []
    for item in items:
        host_s, sep, guest = item.partition(":")
        host = Path(host_s).expanduser()
        if not host.exists() and not host.is_symlink():
            raise SetupError(f"--copy {item}: {host} does not exist")
        if not sep or not guest:
            guest = f"{workdir.rstrip('/')}/{host.name}"
        elif guest.endswith("/"):
            guest = guest + host.name
        if not guest.startswith("/"):
            guest = f"{workdir.rstrip('/')}/{guest}"
        norm = PurePosixPath(guest)
        if ".." in norm.parts or norm == PurePosixPath("/"):
            raise SetupError(f"--copy {item}: the guest path {guest} must name a place below /")
        if norm.parts[1] in ("proc", "sys", "dev", "run"):
            raise SetupError(f"--copy {item}: /{norm.parts[1]} is mounted over in the guest")
        out.append((host.resolve(), str(norm)))
    return out


def job_script(job: Job, has_script: bool) -> str:
    """job.sh: run by /run/memtrace/busybox sh inside the root."""
    q = shlex.quote
    lines = [
        "# the job of a trace-record workload (tracer/workload.py); busybox sh in the root",
        "bb=/run/memtrace/busybox",
        "mark() { [ -w /proc/memtrace ] && echo \"$*\" > /proc/memtrace; }",
        "job_error() { echo \"MEMTRACE-JOB-ERROR $*\" > /dev/ttyS0; exit 125; }",
        f"export PATH={q(GUEST_PATH)} HOME=/root USER=root LOGNAME=root SHELL=/bin/sh "
        "TERM=dumb",
    ]
    for name, value in job.env.items():
        lines.append(f"export {name}={q(value)}")
    if job.workdir == "/root":
        lines.append("$bb mkdir -p /root")
    no_dir = f"--workdir {job.workdir}: no such directory in the guest"
    lines.append(f"cd {q(job.workdir)} 2>/dev/null || job_error {q(no_dir)}")
    if has_script:
        run = "/run/memtrace/script"
    else:
        lines.append("if [ -x /bin/sh ]; then sh=/bin/sh; else sh=\"$bb sh\"; fi")
        run = "$sh /run/memtrace/command.sh"
    if job.marks == "command":
        lines += ["mark start", ": > /run/memtrace/tracing"]
    lines += [f"{run} </dev/null", "rc=$?"]
    lines += ["if [ -e /run/memtrace/tracing ]; then"]
    if job.settle > 0:
        lines += ["\tmark \"phase settle\"", f"\t$bb sleep {job.settle:g}"]
    lines += ["\tmark \"counter workload.exit_status $rc\"", "\tmark stop",
              "\t$bb rm -f /run/memtrace/tracing", "fi", "exit $rc"]
    return "\n".join(lines) + "\n"


def job_disk(job: Job, work: Path) -> Drive:
    """Stage the job and write it as an ext4 image (read-only for the guest)."""
    stage = work / "job"
    (stage / "memtrace").mkdir(parents=True)
    for host, guest in job.copies:
        dst = stage / "files" / guest.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            if host.is_dir():
                shutil.copytree(host, dst, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(host, dst, follow_symlinks=False)
        except OSError as e:
            raise SetupError(f"--copy {host}: {e.strerror or e}") from None
    has_script = job.script is not None
    if job.script is not None:
        if not job.script.is_file():
            raise SetupError(f"--script {job.script}: no such file")
        shutil.copy2(job.script, stage / "memtrace/script")
        (stage / "memtrace/script").chmod(0o755)
    else:
        (stage / "memtrace/command.sh").write_text((job.run or "") + "\n")
    (stage / "memtrace/marks").write_text(job.marks + "\n")
    (stage / "memtrace/job.sh").write_text(job_script(job, has_script))
    used = int(subprocess.run(["du", "-s", "-B1", "--apparent-size", str(stage)],
                              capture_output=True, text=True, check=True).stdout.split()[0])
    files = sum(1 for _ in stage.rglob("*"))
    image = work / "job.ext4"
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal",
                        "-L", "memtrace-job", "-N", str(files + 1024), "-d", str(stage), str(image),
                        f"{(used + used // 4 + (16 << 20)) >> 20}M"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError("mke2fs of the job disk failed: "
                         + (r.stderr.strip().splitlines() or ["no message"])[-1])
    shutil.rmtree(stage)
    return Drive(image, "raw", readonly=True)


@dataclass
class Outcome:
    """What the guest's console says about the job."""

    exit_status: int | None  # None: the job never finished
    root_error: str | None
    job_error: str | None

    @classmethod
    def from_serial(cls, serial: bytes) -> Outcome:
        def text(m: re.Match[bytes] | None) -> str | None:
            return m.group(1).decode(errors="replace").strip() if m else None

        done = DONE.search(serial)
        return cls(int(done.group(1)) if done else None, text(ROOT_ERROR.search(serial)),
                   text(JOB_ERROR.search(serial)))


class ConsoleFollower:
    """Shows the workload's output (the second serial port's file) as it grows."""

    def __init__(self, path: Path, sink: Any) -> None:
        self.path, self.sink, self.offset = path, sink, 0
        self.tail = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.tail = (self.tail + data)[-4096:]
            self.sink.write(data.replace(b"\r\n", b"\n").decode(errors="replace"))
            self.sink.flush()

    def last_line(self) -> str:
        lines = [ln for ln in self.tail.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""


def add_arguments(ap: Any) -> None:
    """trace-record's options for a workload of the user's (README, "Your own workload")."""
    g = ap.add_argument_group(
        "your own workload (runs in a Linux root on a disk; see README)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--run", metavar="CMD",
                      help="shell command line to run in the guest (by the root's /bin/sh)")
    what.add_argument("--script", type=Path, metavar="FILE",
                      help="a script (or program) to copy into the guest and run")
    g.add_argument("--root", metavar="ROOT",
                   help="the root file system: debian[:NAME] (default: the project's locked "
                        "Debian base), a directory, a tar archive (docker export) or a raw/qcow2 "
                        "disk image; never modified")
    g.add_argument("--packages", default="", metavar="P1,P2",
                   help="Debian packages to add to the debian root (cached by content)")
    g.add_argument("--copy", action="append", default=[], metavar="HOST[:GUEST]",
                   help="copy a file or folder into the guest (default: into --workdir); "
                        "repeatable")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the command; repeatable")
    g.add_argument("--workdir", default="/root", metavar="DIR",
                   help="directory the command starts in (default /root)")
    g.add_argument("--settle", type=float, default=0.0, metavar="S",
                   help="guest seconds to keep tracing after the command exits, for what it "
                        "left running (phase 'settle'; default 0)")
    g.add_argument("--marks", choices=("command", "workload"), default="command",
                   help="command (default): the trace spans the command; workload: the "
                        "workload brackets it with memtrace-mark start/stop")


class Workload:
    """One run of a user's workload: its disks, then what the guest said about it."""

    def __init__(self, a: Any) -> None:
        if a.workdir and not a.workdir.startswith("/"):
            raise SetupError(f"--workdir {a.workdir}: must be an absolute guest path")
        if a.settle < 0:
            raise SetupError("--settle must be 0 or more seconds")
        self.job = Job(run=a.run, script=a.script.resolve() if a.script else None,
                       copies=parse_copies(a.copy, a.workdir), env=parse_env(a.env),
                       workdir=a.workdir, settle=a.settle, marks=a.marks)
        if self.job.script is not None and not self.job.script.is_file():
            raise SetupError(f"--script {a.script}: no such file")
        self.root_spec: str | None = a.root
        self.packages = [p.strip() for p in a.packages.split(",") if p.strip()]
        self.console: ConsoleFollower | None = None
        self.root_header: dict[str, Any] = {}
        self.guest_root: Path | None = None
        self.initdisk: dict | None = None

    @property
    def name(self) -> str:
        return "workload"

    def build_initdisk(self, guest_dir: Path) -> dict:
        """The disk-root initramfs beside the guest image, built if stale (under the guest
        image's lock, so before trace-record read-locks the image for the run)."""
        from memtrace.guest.build_image import BuildError
        from memtrace.guest.initdisk import build as build_initdisk

        try:
            self.initdisk = build_initdisk(guest_dir)
        except BuildError as e:
            raise SetupError(str(e).removeprefix("build_image: error: ")) from None
        return self.initdisk

    def prepare(self, guest_dir: Path, work: Path) -> tuple[Path, list[Drive], Path, dict]:
        """Build what the run needs: (initramfs, disks, console file, header additions)."""
        from memtrace.tracer.disks import prepare_root

        initdisk = self.initdisk or self.build_initdisk(guest_dir)
        root = prepare_root(self.root_spec, self.packages, work)
        self.root_header, self.guest_root = root.header, root.guest_root
        job = job_disk(self.job, work)
        console = work / "workload-console.log"
        self.console = ConsoleFollower(console, _stdout())
        header = {
            "workload": {**self.job.header(), "root": root.header, "exit_status": None},
            # room to fill in the exit status afterwards (traces.writer.update_header)
            "header_reserve": " " * 256,
            "initdisk": initdisk,
        }
        return guest_dir / initdisk["path"], [root.drive, job], console, header


def _stdout() -> Any:
    import sys

    return sys.stdout


# The thesis's scenarios on real software (guest-agent/workloads/): scripts run like --script in
# their locked Debian root, bracketing themselves (their set-up is not traced).
WORKLOADS = Path(__file__).resolve().parent.parent / "guest-agent" / "workloads"
DISK_SCENARIOS = {"desktop": "debian:desktop", "game-server": "debian:game-server"}


def default_ram(scenario: str | None, n: int) -> str:
    """Guest RAM when --ram is not given: room for N users or servers."""
    if scenario == "desktop":
        return f"{1024 + 1024 * n}M"
    if scenario == "game-server":
        return f"{1024 + 512 * n}M"
    return "512M"


def scenario_as_workload(a: Any) -> None:
    """Fill in the workload options of a disk scenario (--scenario desktop / game-server)."""
    if a.run is not None or a.script is not None:
        raise SetupError(f"--scenario {a.scenario} runs its own script; drop --run/--script")
    if a.marks != "command":
        raise SetupError(f"--scenario {a.scenario} marks its own phases; drop --marks")
    if a.layout is not None and a.scenario != "desktop":
        raise SetupError("--layout is a choice of the desktop scenario")
    a.script = WORKLOADS / f"{a.scenario}.sh"
    a.root = a.root or DISK_SCENARIOS[a.scenario]
    a.copy = [f"{WORKLOADS}:/usr/share/memtrace", *a.copy]
    env = [f"N={a.n}"]
    if a.scenario == "desktop":
        a.layout = a.layout or "terminal-server"
        env.append(f"LAYOUT={a.layout}")
    if a.settle:
        env.append(f"SETTLE={a.settle:g}")
    a.env = [*env, *a.env]
    a.settle = 0.0  # the script settles inside its bracket
    a.marks = "workload"
