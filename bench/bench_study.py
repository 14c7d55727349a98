"""Study throughput: runs per hour of the quick thesis study (9 recordings and their analyses)
with 1 and 2 Dask workers, and the study machinery's overhead against running the same
commands (trace-record, then trace-analyze --format json) one after another.

    flock /tmp/memtrace-qemu.lock python bench/bench_study.py [--repeats K] [--skip-sequential]

Target (issue 17): 2 workers give at least 1.8x the throughput of 1, since each guest is one
core. Every mode starts from an empty folder (nothing is skipped); the guest image and the
plugin are built first, outside the timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def study(out: Path, workers: int, repeats: int) -> tuple[float, pd.DataFrame]:
    t0 = time.monotonic()
    p = subprocess.run([str(BIN / "trace-study"), "thesis", "--miniatures", "--repeats",
                        str(repeats),
                        "--workers", str(workers), "-o", str(out), "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=7200)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"bench_study: trace-study failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, pd.read_parquet(out / "results" / "runs.parquet")


def sequential(out: Path, repeats: int) -> float:
    """The study's commands, one after another, no Dask."""
    from memtrace.studies.thesis import thesis_study

    st = thesis_study(repeats=repeats, miniatures=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for s in st.runs():
        trace = out / f"{s.label()}.mtr"
        subprocess.run([str(BIN / "trace-record"), *s.argv, "-o", str(trace), "-q"], cwd=ROOT,
                       check=True, capture_output=True, timeout=7200)
        subprocess.run([str(BIN / "trace-analyze"), str(trace), *st.analyze_argv, "--format",
                        "json", "-q", "-o", str(out / f"{s.label()}.json")], cwd=ROOT,
                       check=True, capture_output=True, timeout=7200)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (1: quick)")
    ap.add_argument("--skip-sequential", action="store_true")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus")
    from memtrace.studies.tasks import prepare

    prepare()
    runs = 9 * a.repeats
    with tempfile.TemporaryDirectory(prefix="bench-study-", dir=ROOT / "out"
                                     if (ROOT / "out").is_dir() else None) as tmp:
        res = {}
        for w in (1, 2):
            wall, df = study(Path(tmp) / f"w{w}", w, a.repeats)
            res[w] = wall
            print(f"{w} worker(s): {wall:7.1f} s wall, {runs * 3600 / wall:6.1f} runs/hour; "
                  f"per run: record {df['record_seconds'].mean():.1f} s, analyze "
                  f"{df['analyze_seconds'].mean():.1f} s (mean)")
        print(f"speed-up with 2 workers: {res[1] / res[2]:.2f}x (target 1.8x)")
        if not a.skip_sequential:
            seq = sequential(Path(tmp) / "seq", a.repeats)
            print(f"sequential commands: {seq:7.1f} s wall; study machinery with 1 worker: "
                  f"{res[1] - seq:+.1f} s ({(res[1] / seq - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
