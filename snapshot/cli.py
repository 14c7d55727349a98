"""trace-snapshot: the command line, the signals, the series of snapshots written to one trace."""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import signal
import sys
import time
from typing import Any

import xxhash

from memtrace.snapshot import procfs
from memtrace.snapshot.errors import Interrupted, SnapshotError
from memtrace.snapshot.procfs import PAGE_SIZE as PAGE
from memtrace.snapshot.selection import select
from memtrace.snapshot.stop import LINGERING, Stopper
from memtrace.snapshot.take import Options, Snapshot, check_kpageflags, take
from memtrace.snapshot.write import write_snapshot
from memtrace.traces.private import UnsafePath, check_output
from memtrace.traces.writer import TraceWriter

VERSION = "0.1.0"
PROG = "trace-snapshot"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dump the memory of live processes (page contents, frames, page cache\n"
                    "membership) into a memory trace that trace-analyze reads.",
        epilog="Needs root (frame numbers, page flags, ptrace). Processes are stopped with\n"
               "ptrace while their memory is read, and always resumed: also on errors, Ctrl-C\n"
               "and if trace-snapshot is killed.\n\n"
               "example: trace-snapshot --name python3 -o py.mtr && trace-analyze py.mtr")
    sel = ap.add_argument_group("which processes (at least one; --name and --user combine)")
    sel.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                     help="this process (repeatable)")
    sel.add_argument("--name", metavar="REGEX", help="processes whose comm or command line "
                     "matches REGEX (re.search)")
    sel.add_argument("--user", metavar="USER", help="processes of this user (name or uid)")
    sel.add_argument("--all", action="store_true", dest="everything",
                     help="every process (not trace-snapshot and its ancestors)")
    ap.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write")
    ap.add_argument("--every", type=float, metavar="SECONDS",
                    help="take a snapshot every SECONDS (a series in one trace)")
    ap.add_argument("--count", type=int, metavar="K",
                    help="number of snapshots (default 1; with --every: until Ctrl-C)")
    ap.add_argument("--store-contents", action="store_true",
                    help="also store the bytes of every distinct page in the trace's content "
                         "store")
    ap.add_argument("--no-contents", action="store_true",
                    help="do not read page contents (frames and page cache only; the figures "
                         "then count every frame as a distinct content)")
    ap.add_argument("--no-stop", action="store_true",
                    help="do not stop the processes: a fuzzy snapshot of running processes")
    ap.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="skip a process whose threads do not all stop within this time "
                         "(default 10)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    ap.add_argument("--debug-hold", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap


class _Signals:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread; restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> _Signals:
        self.old = {}
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                self.old[s] = signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _header(a: argparse.Namespace, argv: list[str], ram_size: int) -> dict[str, Any]:
    return {
        "ram_size": ram_size,
        "source": "snapshot",
        "tracking": "proc",
        "clock_unit": "ns",
        "clock_hz": 1_000_000_000,
        "command": shlex.join([PROG, *argv]),
        "tool_versions": {"trace-snapshot": VERSION, "python": platform.python_version(),
                          "xxhash": xxhash.VERSION, "kernel": platform.release()},
        "snapshot": {"stop": "none" if a.no_stop else "ptrace",
                     "contents": not a.no_contents, "every": a.every, "count": a.count,
                     "host": platform.node()},
    }


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if not (a.pid or a.name is not None or a.user is not None or a.everything):
        raise SnapshotError("say which processes: --pid, --name, --user or --all")
    if a.count is not None and a.count < 1:
        raise SnapshotError("--count needs K >= 1")
    if a.every is not None and a.every <= 0:
        raise SnapshotError("--every needs a positive number of seconds")
    if a.no_contents and a.store_contents:
        raise SnapshotError("--store-contents and --no-contents exclude each other")
    count = a.count if a.count is not None else (None if a.every else 1)
    try:
        check_output(a.output)  # before any process is stopped
    except UnsafePath as e:
        raise SnapshotError(f"-o {a.output}: {e.strerror}") from None
    check_kpageflags()
    progress = not a.quiet and sys.stderr.isatty()
    opts = Options(contents=not a.no_contents, store=a.store_contents, stop=not a.no_stop,
                   stop_timeout=a.stop_timeout, progress=progress, hold=a.debug_hold)
    t0 = time.monotonic_ns()
    w: TraceWriter | None = None
    taken = 0
    series = count != 1
    incomplete: str | None = None
    writing = False   # between a snapshot's STATE_BEGIN and STATE_END
    failure: str | None = None  # an error to say after the trace is finished (one line)
    code = 0

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    def writer(first: Snapshot | None) -> TraceWriter:
        # the header's ram_size: 1 + the highest frame seen (FORMAT.md); a series cannot know
        # later frames when it writes the header, so it uses the end of physical memory
        top = first.max_frame() + 1 if first is not None else 0
        if series or top == 0:
            top = max(top, procfs.end_pfn())
        try:
            # page contents are the snapshotted processes' secrets: owner-only from the start
            return TraceWriter(a.output, _header(a, argv, top * PAGE),
                               private=a.store_contents)
        except OSError as e:
            raise SnapshotError(f"cannot write {a.output}: {e.strerror}") from None

    with _Signals():
        try:
            k = 0
            next_t = time.monotonic()
            while count is None or k < count:
                targets = select(a.pid, a.name, a.user, a.everything, opts.stop,
                                 strict=k == 0, warn=warn)
                if k == 0 and not targets:
                    raise SnapshotError("no process matches the selection")
                if not targets and not (a.name or a.user or a.everything):
                    # only --pid: none of them can come back
                    if count is not None:
                        incomplete = f"every selected process exited after {taken} of " \
                                     f"{count} snapshots"
                        print(f"{PROG}: error: {incomplete} (the trace keeps them, marked "
                              "incomplete)", file=sys.stderr)
                        code = 1
                    break
                snap = take(targets, opts, t0) if targets else None
                if snap is None or not snap.dumps:
                    why = "; ".join(snap.notes) if snap is not None and snap.notes else \
                        "no selected process left"
                    if k == 0 or not series:
                        raise SnapshotError(f"no selected process could be read: {why}")
                    warn(f"snapshot {k}: {why}")
                    snap = None
                else:
                    for n in snap.notes:
                        warn(n)
                if w is None:
                    w = writer(snap)
                if snap is not None:
                    writing = True
                    c = write_snapshot(w, snap, k)
                    w.flush()
                    writing = False
                    taken += 1
                    if not a.quiet:
                        print(f"{PROG}: snapshot {k}: {c['snapshot.processes']} processes, "
                              f"{c['snapshot.present_pages']:,} present pages, "
                              f"{c['snapshot.frames']:,} frames, stopped "
                              f"{c['snapshot.stopped_ns'] / 1e6:,.0f} ms", file=sys.stderr)
                k += 1
                if count is not None and k >= count:
                    break
                next_t += a.every or 0
                while time.monotonic() < next_t:
                    if LINGERING:
                        Stopper().release_lingering()
                    time.sleep(min(0.05, max(0.0, next_t - time.monotonic())))
        except Interrupted as e:
            code = 130
            if count is None and taken > 0 and not writing:
                code = 0  # an open-ended series ends with Ctrl-C; its snapshots are whole
            else:
                incomplete = (f"{e} after {taken} of {count} snapshots" if count
                              else f"{e} before the first snapshot")
                print(f"{PROG}: {e}; processes resumed", file=sys.stderr)
        except SnapshotError as e:
            if w is None:
                raise
            incomplete = str(e)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            code = 1
        except OSError as e:
            # Writing the trace (a full disk, a quota, an I/O error). Nothing is written while
            # processes are stopped: take() resumed them before the first byte. Said once, below,
            # with what became of the trace.
            incomplete = f"{type(e).__name__}: {e}"
            failure = (f"cannot write {a.output}: {e.strerror or e}"
                       if e.filename is None else f"{e.strerror or e} ({e.filename})")
            code = 1
        finally:
            try:
                if incomplete is not None:
                    if w is None:
                        w = writer(None)
                    w.abort(incomplete)
                elif w is not None:
                    w.close()
                if failure is not None:
                    failure += "; processes resumed, the trace keeps what was written before, " \
                               "marked incomplete"
            except OSError as e:
                if failure is None:
                    failure = f"cannot finish {a.output}: {e.strerror}"
                else:
                    failure += "; processes resumed, the trace is readable up to its last " \
                               "complete chunk (no room to mark it incomplete)"
                code = code or 1
    if failure is not None:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
    if code == 0 and not a.quiet:
        print(f"{PROG}: wrote {a.output} ({taken} snapshot{'s' if taken != 1 else ''})",
              file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SnapshotError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 1
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code)
