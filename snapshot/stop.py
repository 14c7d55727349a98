"""Stopping thread groups with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT) and always letting them go
(the package docstring says why ptrace and not SIGSTOP)."""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memtrace.snapshot import procfs

# ptrace requests and wait flags (include/uapi/linux/ptrace.h, wait.h): the same on all arches
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for threads (clone children) too


class _Ptrace:
    """ptrace(2) through ctypes; errors come back as errno values, not exceptions."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._ptrace = libc.ptrace
        self._ptrace.restype = ctypes.c_long
        self._ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def call(self, req: int, tid: int, data: int = 0) -> int:
        """0 on success, else the errno."""
        ctypes.set_errno(0)
        r = self._ptrace(req, tid, None, ctypes.c_void_p(data) if data else None)
        return ctypes.get_errno() if r == -1 else 0


@dataclass
class Target:
    """One selected thread group."""

    tgid: int
    comm: str
    ppid: int
    threads: dict[int, str] = field(default_factory=dict)   # tid -> comm
    gone: str | None = None                                  # why it was dropped
    leader_dead: bool = False

    @property
    def proc(self) -> str:
        """Where /proc shows its memory: /proc/TGID, or, once the thread group leader has
        exited while other threads live on (its maps are empty then), a live thread's
        /proc/TGID/task/TID."""
        if self.leader_dead:
            for tid in self.threads:
                if tid != self.tgid:
                    return f"/proc/{self.tgid}/task/{tid}"
        return f"/proc/{self.tgid}"


LINGERING: set[int] = set()


class Stopper:
    """Stops thread groups with PTRACE_SEIZE + PTRACE_INTERRUPT and always lets them go.

    ``stop()`` returns when every thread of every target is in a ptrace stop (waitpid said so
    and /proc/PID/task/TID/stat shows 't'), or has dropped the targets it could not stop.
    ``release()`` detaches every thread, handing back signals that arrived meanwhile.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.pt = _Ptrace()
        self.timeout = timeout
        self.seized: dict[int, int] = {}      # tid -> tgid
        self.stopped: set[int] = set()         # tids reported stopped by waitpid
        self.resignal: dict[int, int] = {}     # tid -> signal to deliver at detach
        self.lingering = LINGERING              # seized but never stopped: detach when they do
        self._warn: Callable[[str], None] = lambda _msg: None

    def _seize(self, tid: int, tgid: int) -> int:
        # recorded first, so that a signal arriving between the two cannot leave a thread
        # seized but unknown to release()
        self.seized[tid] = tgid
        e = self.pt.call(PTRACE_SEIZE, tid)
        if e == 0:
            self.pt.call(PTRACE_INTERRUPT, tid)
        else:
            del self.seized[tid]
        return e

    def _reap(self, tid: int, block: bool = False) -> str | None:
        """Collect one wait status of ``tid``: 'stopped', 'gone' or None (nothing yet)."""
        try:
            pid, status = os.waitpid(tid, WALL | (0 if block else os.WNOHANG))
        except ChildProcessError:
            return "gone"
        if pid == 0:
            return None
        if os.WIFSTOPPED(status):
            if (status >> 16) == 0:
                # not our PTRACE_INTERRUPT (nor a group stop: both report PTRACE_EVENT_STOP)
                # but a signal-delivery stop: the signal is lost unless handed back at detach
                self.resignal[tid] = os.WSTOPSIG(status)
            self.stopped.add(tid)
            return "stopped"
        return "gone"  # exited or killed

    def _forget(self, tid: int) -> None:
        self.seized.pop(tid, None)
        self.stopped.discard(tid)
        self.resignal.pop(tid, None)

    def stop(self, targets: list[Target], warn: Callable[[str], None]) -> None:
        self._warn = warn
        deadline = time.monotonic() + self.timeout
        live = {t.tgid: t for t in targets if t.gone is None}
        dead: set[int] = set()
        while True:
            # seize every thread not seized yet (new threads appear until all are stopped)
            fresh = 0
            for t in list(live.values()):
                try:
                    tids = procfs.thread_ids(t.tgid)
                except OSError:
                    tids = []
                if not tids:
                    self._drop(t, "exited before it could be stopped", live)
                    continue
                for tid in tids:
                    if tid in self.seized or tid in dead:
                        continue
                    if thread_state(t.tgid, tid) in ("Z", "X", "?"):
                        dead.add(tid)  # an exited thread (a zombie leader): nothing to stop
                        continue
                    e = self._seize(tid, t.tgid)
                    if e == errno.ESRCH:
                        continue  # the thread just exited
                    if e:
                        why = (f"cannot ptrace it ({os.strerror(e)}"
                               + ("; already traced by a debugger or strace?" if e == errno.EPERM
                                  else "") + ")")
                        self._drop(t, why, live)
                        break
                    fresh += 1
            if not live:
                return
            # wait until every seized thread of the live targets reports its stop
            while True:
                pending = [tid for tid, g in self.seized.items()
                           if g in live and tid not in self.stopped]
                if not pending:
                    break
                progressed = False
                for tid in pending:
                    r = self._reap(tid)
                    if r == "gone":
                        self._forget(tid)
                    if r is not None:
                        progressed = True
                if time.monotonic() > deadline:
                    for tgid in {self.seized[tid] for tid in pending if tid in self.seized}:
                        slow = [tid for tid in pending if self.seized.get(tid) == tgid]
                        states = ",".join(f"{tid}:{thread_state(tgid, tid)}" for tid in slow[:4])
                        self._drop(live[tgid], f"did not stop within {self.timeout:g} s "
                                   f"(threads {states})", live)
                    break
                if not progressed:
                    time.sleep(0.0005)
            if fresh == 0:
                break
        # confirm with /proc that every thread is in a stop, and record the threads
        for t in list(live.values()):
            tids = [tid for tid, g in self.seized.items() if g == t.tgid]
            t.threads = {}
            for tid in tids:
                try:
                    st = procfs.read_stat(t.tgid, tid)
                except (OSError, ValueError):
                    self._forget(tid)
                    continue
                if st.state not in ("t", "T"):
                    if st.state in ("Z", "X"):
                        continue
                    self._drop(t, f"thread {tid} is in state {st.state!r} after its stop "
                               "was reported", live)
                    break
                t.threads[tid] = st.comm
            if t.tgid in live and not t.threads:
                self._drop(t, "exited while being stopped", live)
            t.leader_dead = t.tgid not in t.threads

    def _drop(self, t: Target, why: str, live: dict[int, Target]) -> None:
        if t.gone is None:
            t.gone = why
            self._warn(f"pid {t.tgid} ({t.comm}) skipped: {why}")
        live.pop(t.tgid, None)
        self.release(t.tgid)

    def release(self, tgid: int | None = None) -> None:
        """Detach the threads of ``tgid`` (all threads when None). Never raises."""
        for tid in [tid for tid, g in self.seized.items() if tgid is None or g == tgid]:
            sig = self.resignal.get(tid, 0)
            if tid not in self.stopped:
                # seized but not stopped yet: its stop is imminent unless it sleeps in D
                for _ in range(200):
                    r = self._reap(tid)
                    if r is not None:
                        break
                    time.sleep(0.0005)
                sig = self.resignal.get(tid, 0)
            e = self.pt.call(PTRACE_DETACH, tid, sig)
            if e == errno.ESRCH and tid in self.stopped:
                # it died while stopped (SIGKILL): collect the tracer's notification, which
                # hands the zombie back to its real parent
                self._reap(tid)
            elif e == errno.ESRCH and os.path.exists(f"/proc/{tid}"):
                # still running towards its stop (e.g. in D state): the kernel detaches it when
                # we exit; try again at the next release
                self.lingering.add(tid)
            else:
                self.lingering.discard(tid)
            self._forget(tid)
        if tgid is None:
            self.release_lingering()

    def release_lingering(self) -> None:
        """Detach threads that were seized but had not stopped when their process was let go
        (they sleep uninterruptibly and stop when they wake). Called again between snapshots;
        when trace-snapshot exits the kernel detaches whatever is left."""
        for tid in list(self.lingering):
            if not os.path.exists(f"/proc/{tid}"):
                self.lingering.discard(tid)
            elif self._reap(tid) is not None:
                self.pt.call(PTRACE_DETACH, tid, self.resignal.pop(tid, 0))
                self.lingering.discard(tid)


def thread_state(tgid: int, tid: int) -> str:
    try:
        return procfs.read_stat(tgid, tid).state
    except (OSError, ValueError):
        return "?"
