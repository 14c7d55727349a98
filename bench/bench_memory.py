"""Replay memory (issue 18): peak resident size next to speed, for long traces.

Page-update traces from the replay benchmark's generator (``memtrace.traces.synthetic.
page_updates``: 128k frames, epochs of 5,000 updates; contents drawn from a pool, or never
repeating) of 5 M, 50 M and 200 M updates, and recorded traces. Each measure runs in a process
of its own, so that its peak resident size (``ru_maxrss``, read with ``os.wait4``) is that of
one replay: the engine alone (best of ``--runs`` replays after a warm-up, as bench_replay
times it), ``trace-analyze --oracle`` and ``trace-analyze`` with the default analyses (as a user
runs them: imports and loading the compiled loops included). Targets: the two trace-analyze runs
at most 600 MB on 50 M updates, and at most 10 % more on 200 M than on 50 M.

    python bench/bench_memory.py [--updates 5M,50M,200M] [--fresh 50M,200M] [--traces DIR]
                                 [--recorded TRACE ...] [--per-frame] [--runs 2]

The traces are written to ``--traces`` (kept, and reused when there) or to a temporary folder
(a 200 M-update trace takes 3.8 GB and about three minutes to write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parent.parent / "traces" / "samples" / "default.mtr"


def count(s: str) -> int:
    """5M, 200k, 1G or a plain number."""
    mult = {"k": 10**3, "M": 10**6, "G": 10**9}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; its wall time (s), peak resident size (MB) and standard output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"bench_memory: {' '.join(cmd)} failed with status {p.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def engine_child(path: str, runs: int) -> None:
    """(In the child) best of ``runs`` engine-only replays after a warm-up; prints JSON."""
    from memtrace.analyses.engine import Replay
    from memtrace.traces.format import Kind
    from memtrace.traces.reader import open_trace

    Replay(open_trace(SAMPLE), [], progress=False).run()  # loads the compiled loops
    best, st = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        st = Replay(open_trace(path), [], progress=False).run()
        best = min(best, time.perf_counter() - t0)
    updates = sum(len(r) for c in open_trace(path).iter_chunks() for k, r in c.blocks
                  if k == Kind.PAGE)
    assert st is not None
    print(json.dumps({"seconds": best, "updates": updates, "forgotten": st.forgotten,
                      "ids": st.contents.capacity, "frames": st.nframes}))


def measure(path: str, runs: int) -> dict[str, float]:
    """Engine alone, --oracle and the default analyses on one trace, each in its own process."""
    wall, rss, out = run_child([sys.executable, __file__, "--child", path, "--runs", str(runs)])
    r = json.loads(out)
    r["engine_rss"] = rss
    for name, args in (("oracle", ["--oracle"]), ("default", [])):
        wall, rss, _ = run_child([sys.executable, "-m", "memtrace.analyses.cli", path, *args,
                                  "-q", "-o", os.devnull])
        r[f"{name}_rss"], r[f"{name}_wall"] = rss, wall
    r["trace_MB"] = os.path.getsize(path) / 1e6
    return r


def generated(folder: Path, updates: int, repeat: bool, nframes: int | None = None) -> str:
    """The generator's trace of ``updates`` updates in ``folder``, written if not there."""
    from memtrace.traces.reader import open_trace
    from memtrace.traces.synthetic import BENCH_FRAMES

    nframes = nframes or BENCH_FRAMES
    name = f"updates-{updates}-{'pool' if repeat else 'fresh'}"
    path = folder / (name + ("" if nframes == BENCH_FRAMES else f"-{nframes}f") + ".mtr")
    want = {"updates": updates, "repeat": repeat}
    if path.exists():
        try:
            tr = open_trace(path)
            gen = tr.header.get("generator", {})
            if all(gen.get(k) == v for k, v in want.items()) and \
                    tr.ram_size == nframes * 4096 and tr.complete_index:
                return str(path)
        except Exception:  # noqa: BLE001 - any unreadable leftover is written again
            pass
    print(f"  writing {path.name} ...", file=sys.stderr, flush=True)
    # in a process of its own: the pool of a 200 M-update trace takes 800 MB, and a child
    # reports at least the resident size its parent ever had (Linux counts the memory a child
    # starts from in its peak: fork, vfork and exec keep the high-water mark)
    run_child([sys.executable, "-m", "memtrace.traces.synthetic", str(path), "--page-updates",
               str(updates), "--frames", str(nframes)] + ([] if repeat else ["--fresh"]))
    return str(path)


def row(label: str, r: dict[str, float]) -> str:
    return (f"| {label} | {r['updates'] / 1e6:,.1f} M | {r['trace_MB']:,.0f} MB | "
            f"{r['updates'] / r['seconds'] / 1e6:.2f} M/s | {r['engine_rss']:.0f} MB | "
            f"{r['oracle_rss']:.0f} MB ({r['oracle_wall']:.1f} s) | "
            f"{r['default_rss']:.0f} MB ({r['default_wall']:.1f} s) | "
            f"{r['forgotten'] / 1e6:,.2f} M | {r['ids']:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", default="5M,50M,200M",
                    help="sizes of the pool traces (comma-separated; empty: none)")
    ap.add_argument("--fresh", default="50M,200M",
                    help="sizes of the never-repeating traces (comma-separated; empty: none)")
    ap.add_argument("--recorded", action="append", default=None, metavar="TRACE",
                    help="a recorded trace to measure as well (repeatable; default: the "
                         "shipped sample)")
    ap.add_argument("--traces", default=None, metavar="DIR",
                    help="keep the generated traces here (and reuse them)")
    ap.add_argument("--per-frame", action="store_true",
                    help="also measure the memory per frame: never-repeating traces of 5 M "
                         "updates over 128k and 512k frames, engine alone")
    ap.add_argument("--runs", type=int, default=2, help="engine-only replays per trace")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        engine_child(a.child, a.runs)
        return
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print("| trace | page updates | size | engine alone | peak RSS engine | peak RSS --oracle "
          "(wall) | peak RSS default analyses (wall) | contents forgotten | content ids |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.traces) if a.traces else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for sizes, repeat in ((a.updates, True), (a.fresh, False)):
            for s in filter(None, sizes.split(",")):
                path = generated(folder, count(s), repeat)
                label = f"{s} updates, {'contents from a pool' if repeat else 'never repeating'}"
                print(row(label, measure(path, a.runs)), flush=True)
        for path in a.recorded or [str(SAMPLE)]:
            print(row(Path(path).name, measure(path, a.runs)), flush=True)
        if a.per_frame:
            small, large = (measure(generated(folder, 5_000_000, False, n), 1)
                            for n in (1 << 17, 1 << 19))
            per = (large["engine_rss"] - small["engine_rss"]) * 1e6 / (
                large["frames"] - small["frames"])
            print(f"per frame (each holding a content of its own, three quarters of them mapped "
                  f"once): {per:.0f} bytes ({small['engine_rss']:.0f} MB with "
                  f"{small['frames']:,} frames, {large['engine_rss']:.0f} MB with "
                  f"{large['frames']:,})")
    # the figures above are at least this (see generated)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"this process's own peak: {own:.0f} MB")


if __name__ == "__main__":
    main()
