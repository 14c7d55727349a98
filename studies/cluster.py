"""The Dask cluster a study runs on: an embedded ``LocalCluster`` or an existing scheduler.

The embedded cluster is sized to the machine: a recording is one guest, and a TCG guest keeps
one core busy, so one single-threaded worker per core; fewer when memory or /dev/shm cannot
hold that many guests at once (each needs its guest RAM in /dev/shm, twice with ``verify``,
plus about ``OVERHEAD`` for QEMU, trace-record and a replay). ``--scheduler ADDRESS`` connects
to a cluster started elsewhere (``dask scheduler`` and ``dask worker`` on several hosts, or
dask-jobqueue on SLURM): its workers need memtrace installed and a folder for traces that they
all reach (``--traces``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Any

OVERHEAD = 1 << 30  # bytes per worker besides the guest's RAM (QEMU, trace-record, a replay)


class ClusterError(Exception):
    """The cluster cannot be had (unreachable scheduler, no workers): one line."""


@dataclass
class Sizing:
    workers: int
    memory_limit: int
    why: str


def size_local(guest_ram: int, copies: int = 1, workers: int | None = None) -> Sizing:
    """How many workers this machine holds: one per core, no more than memory and /dev/shm
    allow for guests of ``guest_ram`` bytes (``copies`` images each in /dev/shm)."""
    import psutil

    cores = len(os.sched_getaffinity(0))
    avail = psutil.virtual_memory().available
    try:
        shm = shutil.disk_usage("/dev/shm").free
    except OSError:
        shm = avail
    need = guest_ram * copies + OVERHEAD
    by_mem = max(1, avail // need)
    by_shm = max(1, shm // max(1, guest_ram * copies))
    n = min(cores, by_mem, by_shm)
    why = (f"{n} worker(s): {cores} cores, {avail / 2**30:.1f} GiB available memory "
           f"({need / 2**30:.1f} GiB per guest), {shm / 2**30:.1f} GiB free in /dev/shm")
    if workers is not None:
        n, why = workers, f"{workers} worker(s) as asked (the machine holds {n})"
    return Sizing(n, max(need, avail // max(1, n)), why)


def local_cluster(sizing: Sizing) -> Any:
    """A LocalCluster of single-threaded worker processes; its dashboard (bokeh) on a free
    port, so that studies of several users on one host do not collide."""
    from dask.distributed import LocalCluster

    return LocalCluster(n_workers=sizing.workers, threads_per_worker=1, processes=True,
                        memory_limit=sizing.memory_limit, dashboard_address="127.0.0.1:0",
                        host="127.0.0.1", silence_logs=logging.CRITICAL)


def ignore_interrupts(client: Any) -> None:
    """Local workers share the terminal's process group, so a Ctrl-C reaches them too and
    would kill them mid-run; they ignore it (every worker, also one the nanny restarts) and
    the client stops their commands in order instead (``tasks.stop_commands``)."""
    from dask.distributed import WorkerPlugin

    class IgnoreInterrupt(WorkerPlugin):
        name = "memtrace-ignore-sigint"

        def setup(self, worker: Any) -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    client.register_plugin(IgnoreInterrupt())


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the one that inherits the commands of a local worker that dies
    (Linux ``PR_SET_CHILD_SUBREAPER``), so that ``reap`` can wait for them to stop."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0,
                                                        0) == 0
    except (OSError, AttributeError):
        return False


def reap(timeout: float) -> int:
    """Wait (up to ``timeout`` s) for the guards of commands whose local worker died, which
    ``become_subreaper`` made this process's children: none outlives the study. Only guards:
    other children (multiprocessing's resource tracker) live until this process exits. How
    many were waited for."""
    import psutil

    guards = []
    for p in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "memtrace.studies.guard" in p.cmdline():
                guards.append(p)
    psutil.wait_procs(guards, timeout=timeout)
    return len(guards)


def connect(address: str, timeout: float = 10.0) -> Any:
    """A client of the scheduler at ``address`` (``ClusterError`` if it cannot be reached or
    has no workers)."""
    from dask.distributed import Client

    addr = address if "://" in address else f"tcp://{address}"
    try:
        client = Client(addr, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as e:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({first_line(e)}); "
                           "start one with 'dask scheduler' and workers with 'dask worker "
                           "ADDRESS', or leave --scheduler out for a local cluster") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise ClusterError(f"the Dask scheduler at {address} has no workers (waited "
                           f"{timeout:g} s): start some with 'dask worker {address}'") from None
    return client


def dashboard(client: Any) -> str | None:
    """The dashboard's address, when the scheduler serves one."""
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a dashboard is a courtesy, never a failure
        return None


def first_line(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0]
