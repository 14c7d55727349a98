"""A supervisor between a Dask worker and the command it runs (trace-record, trace-analyze).

    python -m memtrace.studies.guard COMMAND [ARG...]

Why: a worker can die (killed, out of memory, its host's nanny restarting it), a study can be
cancelled or interrupted, and then a recording's QEMU must not be left running nor its RAM
file left in /dev/shm. A thread of the worker cannot promise that (``PR_SET_PDEATHSIG`` follows
the thread that forked, and a worker's threads come and go), so the worker starts this small
process in a session of its own; it starts the command, and

- on SIGTERM or SIGINT passes SIGTERM on (trace-record then stops QEMU and cleans up);
- when its parent, the worker, is gone (it is re-parented), does the same;
- if the command has not ended ``GRACE`` seconds after that, removes the RAM files the
  command's trace-record left in /dev/shm (``memtrace-PID-*``) and kills the whole session
  (the command, QEMU, itself) with SIGKILL.

It exits with the command's status (128 + signal number if the command was killed).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

GRACE = 90.0  # trace-record gives QEMU 60 s to quit over QMP before killing it
POLL = 0.5


def main(argv: list[str] | None = None) -> int:
    cmd = sys.argv[1:] if argv is None else argv
    if not cmd:
        print("usage: python -m memtrace.studies.guard COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    child = subprocess.Popen(cmd)
    stopping: list[float] = []

    def stop(*_: object) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        try:
            rc = child.wait(timeout=POLL)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            stop()
        if stopping and time.monotonic() - stopping[0] > GRACE:
            for p in glob.glob(f"/dev/shm/memtrace-{child.pid}-*"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if os.getpgrp() == os.getpid():  # our own session: the command and its children
                os.killpg(os.getpgrp(), signal.SIGKILL)
            child.kill()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
