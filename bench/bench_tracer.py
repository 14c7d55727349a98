"""Tracing cost: the same scenario under plain TCG, with the plugin in pages mode and in writes
mode, in one run (issue 3's targets: pages <= 1.3x plain TCG, writes <= 6x), plus trace bytes per
billion guest instructions and records per second.

    python bench/bench_tracer.py [--scenario single] [-n 1]

Wall times include boot (identical in all three runs); the traced region is what differs.
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

from memtrace.analyses.engine import Replay  # noqa: E402
from memtrace.traces.format import Kind, MarkOp  # noqa: E402
from memtrace.traces.reader import open_trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> tuple[float, str]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "memtrace.tracer.record", "-q", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=7200)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"bench_tracer: trace-record failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stderr


def trace_stats(path: Path) -> dict[str, float]:
    tr = open_trace(path)
    counts: dict[int, int] = {}
    for chunk in tr.iter_chunks():
        for kind, rec in chunk.blocks:
            counts[kind] = counts.get(kind, 0) + len(rec)
    st = Replay(open_trace(path), progress=False).run()
    starts = [t for t, op, _ in st.marks if op == MarkOp.START]
    stops = [t for t, op, _ in st.marks if op == MarkOp.STOP]
    t0 = starts[0] if starts else 0
    instr = max(1, (stops[-1] if stops else tr.t_end) - t0)  # the traced region
    return {"bytes": os.path.getsize(path), "instructions": instr,
            "writes": counts.get(Kind.WRITE, 0), "unseen": counts.get(Kind.UNSEEN, 0),
            "pages": counts.get(Kind.PAGE, 0),
            "tracking": tr.header.get("tracking", "?")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="single")
    ap.add_argument("-n", type=int, default=1)
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"{platform.platform()}")
    base = ["--scenario", a.scenario, "-n", str(a.n)]
    with tempfile.TemporaryDirectory() as d:
        plain, _ = run([*base, "--no-plugin"])
        print(f"plain TCG:   {plain:7.1f} s wall")
        for mode in ("pages", "writes"):
            out = Path(d) / f"{mode}.mtr"
            wall, _ = run([*base, "--mode", mode, "-o", str(out)])
            s = trace_stats(out)
            gi = s["instructions"] / 1e9
            line = (f"{mode:6s} mode: {wall:7.1f} s wall = {wall / plain:.2f}x plain TCG; "
                    f"trace {s['bytes'] / 1e6:.1f} MB = {s['bytes'] / 1e6 / gi:.1f} MB per G "
                    f"instructions ({gi:.2f} G traced, tracking {s['tracking']})")
            if mode == "writes":
                line += (f"; {s['writes']:,} stores = {s['writes'] / wall / 1e6:.1f} M stores/s, "
                         f"{s['unseen']:,} UNSEEN words")
            else:
                line += f"; {s['pages']:,} page updates"
            print(line)


if __name__ == "__main__":
    main()
