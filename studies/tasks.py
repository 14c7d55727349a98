"""What runs on the Dask workers: prepare the guest, record a run, analyze a trace, stop.

Every command runs in a subprocess under ``memtrace.studies.guard`` (so that no QEMU outlives
its worker), with its output in a log file next to the trace. A failure raises ``RunFailed``
with the command's last lines and the log's path; Dask carries it to the client, which reports
the run and goes on with the others. A worker that dies mid-run is Dask's to handle: the
scheduler gives the task to another worker, and after ``distributed.scheduler.allowed-failures``
deaths reports it as failed (``KilledWorker``).

Thread-safety: a worker may run several tasks in threads; the set of running commands is
guarded by a lock, and ``prepare`` serialises builds on one host with a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LOG_TAIL = 12  # lines of a failed command's log in its error
_running: set[subprocess.Popen[bytes]] = set()
_lock = threading.Lock()


class RunFailed(Exception):
    """A run's command failed: what, its status, its log's last lines."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # progress bars redraw with carriage returns: keep what was last shown on each line
    rows = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])


def run_command(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run ``argv`` under the guard, its output appended to ``log``; its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "memtrace.studies.guard", *argv],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, **(env or {})})
        with _lock:
            _running.add(p)
        try:
            return p.wait()
        finally:
            with _lock:
                _running.discard(p)


def stop_commands(grace: float = 120.0) -> int:
    """Stop every command this worker runs (SIGTERM to each guard, which passes it on and
    escalates after its own grace) and wait for them; how many there were. Called on every
    worker by the client when a study is interrupted."""
    with _lock:
        procs = list(_running)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    return len(procs)


def prepare() -> dict[str, Any]:
    """Build the guest image and the tracer plugin if missing (once per host: a file lock),
    and say what a recording on this worker depends on: the guest manifest's digest, the QEMU
    version, the plugin's sha256."""
    from memtrace.tracer import cache
    from memtrace.tracer.qemu import plugin_path, qemu_version
    from memtrace.tracer.record import ensure_plugin, guest_image

    lock = cache.root() / ".study-prepare.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        manifest = guest_image(build=True)
        ensure_plugin()
    ident = {k: v for k, v in manifest.items() if k != "notes"}
    return {"guest": hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(),
            "qemu": qemu_version(), "plugin": _sha256(plugin_path()), "host": socket.gethostname()}


def _write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` atomically: a run is finished only once its record is whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def record(label: str, kind: str, argv: list[str], trace: str,
           inputs: dict[str, Any]) -> dict[str, Any]:
    """Record one run into ``trace`` (skipped if a finished recording with the same inputs is
    there); its record: inputs, wall time, trace size, host, log."""
    path = Path(trace)
    done = path.with_suffix(".record.json")
    log = path.with_suffix(".log")
    if done.exists() and path.exists():
        try:
            rec = json.loads(done.read_text())
        except (OSError, ValueError):
            rec = {}
        if rec.get("inputs") == inputs and rec.get("bytes") == path.stat().st_size:
            return rec | {"skipped": True}
    for p in (done, path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if kind == "record":
        cmd = [sys.executable, "-m", "memtrace.tracer.record", *argv, "-o", str(path), "-q"]
    else:
        cmd = [c.replace("{trace}", str(path)).replace("{python}", sys.executable)
               for c in argv]
    t0 = time.time()
    rc = run_command(cmd, log)
    wall = time.time() - t0
    if rc != 0 or not path.exists():
        what = "trace-record" if kind == "record" else Path(cmd[0]).name
        why = f"exited with status {rc}" if rc else "wrote no trace"
        raise RunFailed(f"{label}: {what} {why} (log {log}):\n{tail(log)}")
    rec = {"inputs": inputs, "label": label, "trace": str(path), "bytes": path.stat().st_size,
           "record_seconds": round(wall, 3), "host": socket.gethostname(), "log": str(log),
           "command": cmd, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(done, rec)
    return rec


def analyze(rec: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """``trace-analyze --format json`` on a recording's trace: the report as a dict, with
    ``analyze_seconds``. All the study's analyses share one replay."""
    trace = rec["trace"]
    with tempfile.TemporaryDirectory(prefix="trace-study-") as tmp:
        out = Path(tmp) / "report.json"
        log = Path(tmp) / "analyze.log"
        t0 = time.time()
        rc = run_command([sys.executable, "-m", "memtrace.analyses.cli", trace, *argv,
                          "--format", "json", "-q", "-o", str(out)], log)
        wall = time.time() - t0
        if rc != 0 or not out.exists():
            raise RunFailed(f"{rec.get('label', trace)}: trace-analyze exited with status "
                            f"{rc}:\n{tail(log)}")
        doc = json.loads(out.read_text())
        warnings = [ln for ln in log.read_text(errors="replace").splitlines()
                    if ln.startswith("warning:")]
    doc["analyze_seconds"] = round(wall, 3)
    doc["analyze_warnings"] = warnings
    return doc
