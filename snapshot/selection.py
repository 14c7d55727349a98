"""Which processes a snapshot dumps: the given pids, or those matching a name and a user."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
from collections.abc import Callable

from memtrace.snapshot import procfs
from memtrace.snapshot.errors import SnapshotError
from memtrace.snapshot.stop import Target, thread_state


def _proc_stat(pid: int) -> procfs.Stat | None:
    try:
        return procfs.read_stat(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int, st: procfs.Stat) -> bool:
    """Not a zombie. A thread group whose leader has exited shows the leader as a zombie
    while its other threads run on; it is alive."""
    if st.state not in ("Z", "X"):
        return True
    try:
        return any(thread_state(pid, tid) not in ("Z", "X", "?") for tid in procfs.thread_ids(pid))
    except OSError:
        return False


def select(pids: list[int], name: str | None, user: str | None, everything: bool,
           stop: bool, strict: bool = True, warn: Callable[[str], None] | None = None
           ) -> list[Target]:
    """The thread groups to dump: the given pids, plus every process matching all of
    ``name`` (regex on comm or cmdline) and ``user`` (or every process, with ``everything``).

    trace-snapshot itself is never selected, nor its ancestors when processes are stopped.
    Kernel threads and zombies have no memory and are left out. A given pid that does not
    exist is an error when ``strict`` (the first snapshot), a warning later in a series.
    """
    me = os.getpid()
    excluded = set(procfs.ancestors(me)) if stop else {me}
    chosen: dict[int, Target] = {}
    for pid in pids:
        st = _proc_stat(pid)
        if st is None or (not strict and not _alive(pid, st)):
            if strict:
                raise SnapshotError(f"no process with pid {pid}")
            if warn is not None:
                warn(f"pid {pid} has exited; the series goes on without it")
            continue
        if pid == me or pid in excluded:
            raise SnapshotError(f"pid {pid} is trace-snapshot itself or one of its ancestors; "
                                "stopping it would deadlock (use --no-stop to read it anyway)"
                                if pid != me else f"pid {pid} is trace-snapshot itself")
        if st.flags & procfs.PF_KTHREAD:
            raise SnapshotError(f"pid {pid} ({st.comm}) is a kernel thread: it has no user memory")
        if not _alive(pid, st):
            raise SnapshotError(f"pid {pid} ({st.comm}) is a zombie: it has no memory left")
        with contextlib.suppress(OSError, KeyError, ValueError):
            tgid = int(procfs.read_status(pid)["Tgid"])
            if tgid != pid:
                raise SnapshotError(f"pid {pid} is a thread of process {tgid}; give the "
                                    "process id")
        chosen[pid] = Target(pid, st.comm, st.ppid)
    if name is None and user is None and not everything:
        return list(chosen.values())
    try:
        pattern = re.compile(name) if name is not None else None
    except re.error as e:
        raise SnapshotError(f"--name {name!r} is not a regular expression: {e}") from None
    uid = None
    if user is not None:
        try:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        except KeyError:
            raise SnapshotError(f"no user named {user!r}") from None
    for pid in procfs.all_pids():
        if pid in chosen or pid in excluded:
            continue
        st = _proc_stat(pid)
        if st is None or st.flags & procfs.PF_KTHREAD or not _alive(pid, st):
            continue
        try:
            if uid is not None and procfs.effective_uid(pid) != uid:
                continue
            if pattern is not None and not (pattern.search(st.comm)
                                            or pattern.search(procfs.read_cmdline(pid))):
                continue
        except (OSError, KeyError, ValueError, IndexError):
            continue
        chosen[pid] = Target(pid, st.comm, st.ppid)
    return sorted(chosen.values(), key=lambda t: t.tgid)
