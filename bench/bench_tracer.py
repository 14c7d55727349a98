"""Tracing cost: the same scenario under plain TCG, with the plugin in pages mode and in writes
mode, for each QEMU and vCPU count asked for (issue 16's targets, whole run: pages <= 1.3x plain
TCG on QEMU 7.2 and <= 1.15x on QEMU 10.0, writes <= 5x), plus trace bytes per billion guest
instructions and stores recorded per second.

    python bench/bench_tracer.py [--scenario single] [-n 1] [--qemu system 10] [--smp 1 2 4]
                                 [--modes pages writes] [--parts] [--repeat 1]

Wall times include boot (identical in every run of one QEMU and vCPU count); the traced region
is what differs. ``--parts`` tells the costs apart (``--no-plugin`` alone also leaves the guest
agent out): the agent alone (its hooks and ring, nobody reading it), the plugin's clock alone
(no agent, so no START: nothing traced), and the plugin's own seconds from its statistics
(scanning for written frames, hashing, walking page tables, stopping the vCPUs).
Run it under the QEMU lock: flock /tmp/memtrace-qemu.lock python bench/bench_tracer.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memtrace.analyses.engine import Replay
from memtrace.traces.format import Kind, MarkOp
from memtrace.traces.reader import open_trace

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "memtrace.tracer.record", "-q", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=7200)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"bench_tracer: trace-record failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt


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
            "tracking": tr.header.get("tracking", "?"),
            "api": tr.header.get("tool_versions", {}).get("qemu_plugin_api_running", "?")}


def qemu_name(spec: str) -> str:
    from memtrace.tracer import qemus

    return f"QEMU {qemus.resolve(spec).version}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="single")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--qemu", nargs="+", default=["system"], help="system, 10 or paths")
    ap.add_argument("--smp", nargs="+", type=int, default=[1])
    ap.add_argument("--modes", nargs="+", default=["pages", "writes"],
                    choices=("pages", "writes"))
    ap.add_argument("--parts", action="store_true",
                    help="also run the agent alone and the plugin's clock alone")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (best kept)")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"{platform.platform()}; scenario {a.scenario} -n {a.n}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for q in a.qemu:
            name = qemu_name(q)
            for smp in a.smp:
                base = ["--scenario", a.scenario, "-n", str(a.n), "--qemu", q, "--smp",
                        str(smp)]

                def best(args: list[str], base: list[str] = base) -> float:
                    return min(run([*base, *args]) for _ in range(a.repeat))

                plain = best(["--no-plugin"])
                print(f"{name} --smp {smp}: plain TCG {plain:7.1f} s wall", flush=True)
                rows.append((name, smp, "plain TCG", plain, 1.0, ""))
                if a.parts:
                    agent = best(["--no-plugin", "--agent", "on"])
                    clock = best(["--agent", "off", "-o", str(Path(d) / "clock.mtr")])
                    for what, wall in (("agent alone", agent), ("plugin clock alone", clock)):
                        print(f"{name} --smp {smp}: {what}: {wall:7.1f} s wall = "
                              f"{wall / plain:.2f}x plain TCG", flush=True)
                        rows.append((name, smp, what, wall, wall / plain, ""))
                for mode in a.modes:
                    out, stats = Path(d) / f"{mode}.mtr", Path(d) / f"{mode}.json"
                    wall = best(["--mode", mode, "-o", str(out), "--stats", str(stats)])
                    s = trace_stats(out)
                    ps = json.loads(stats.read_text())
                    gi = s["instructions"] / 1e9
                    note = (f"trace {s['bytes'] / 1e6:.1f} MB = {s['bytes'] / 1e6 / gi:.1f} MB "
                            f"per G instructions ({gi:.2f} G traced, API {s['api']}, "
                            f"{s['tracking']}); plugin: scan {ps['scan_seconds']:.2f} s, hash "
                            f"{ps['hash_seconds']:.2f} s, walk {ps['walk_seconds']:.2f} s, "
                            f"{ps['stops']} stops gathering {ps['stop_gather_seconds']:.2f} s "
                            f"({ps['stop_aborts']} gave way)")
                    if mode == "writes":
                        note += (f"; {s['writes']:,} stores = {s['writes'] / wall / 1e6:.1f} M "
                                 f"stores/s, {s['unseen']:,} UNSEEN words")
                    else:
                        note += f"; {s['pages']:,} page updates"
                    print(f"{name} --smp {smp}: {mode:6s} mode: {wall:7.1f} s wall = "
                          f"{wall / plain:.2f}x plain TCG; {note}", flush=True)
                    rows.append((name, smp, f"{mode} mode", wall, wall / plain, note))
    print("\n| QEMU | vCPUs | run | wall | vs plain TCG |\n|---|---|---|---|---|")
    for name, smp, what, wall, ratio, _ in rows:
        print(f"| {name} | {smp} | {what} | {wall:.1f} s | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
