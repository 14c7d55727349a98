"""The thesis's scenarios on real software (issue 14, "Measure"): what tracing a desktop costs,
and the thesis's Tables 5.1 and 5.3 from our traces beside the published figures.

    python bench/bench_workloads.py cost   [--users 1 3]           # traced vs plain TCG
    python bench/bench_workloads.py table51 [--users 1 2 3]         # desktop, both layouts
    python bench/bench_workloads.py table53 [--servers 1 2 3]       # game servers
    ... [--keep DIR]   keep the traces (and reuse them: a trace already in DIR is not recorded
                       again, so the tables can be recomputed, or a long series resumed)

Each recording boots the guest under QEMU (take the shared lock when others use the machine:
flock /tmp/memtrace-qemu.lock python bench/bench_workloads.py ...). A desktop user takes several
guest minutes to come up under TCG (Xfce, Firefox ESR, LibreOffice Writer); zero-install also
copies the applications once per user before tracing starts. The figures are taken where the
thesis took its dumps: with every application up and settled, i.e. the state at the end of the
trace (its STOP, after the settle phase), in pages, relative to the 1-user (1-server) mmap/fork
figure as the thesis's tables are.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from memtrace.analyses.engine import Replay
from memtrace.traces.reader import open_trace

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps")
# DESIGN.md, "The thesis's published figures"
THESIS_51 = {  # column -> the four figures relative to the 1-user mmap/fork (480 MiB)
    (1, "terminal-server"): (1.10, 1.00, 0.48, 0.45),
    (2, "terminal-server"): (2.20, 1.83, 0.64, 0.60),
    (2, "zero-install"): (2.20, 1.99, 0.83, 0.61),
    (3, "terminal-server"): (3.32, 2.68, 0.81, 0.77),
    (3, "zero-install"): (3.33, 3.02, 1.20, 0.78),
}
THESIS_53 = {1: (1.00, 1.00, 0.97, 0.97), 2: (2.00, 1.99, 1.44, 1.34),
             3: (3.00, 2.97, 1.90, 1.70)}  # relative to one CS:GO server (147 MiB)


def record(args: list[str], out: Path | None) -> tuple[float, str]:
    """Run trace-record; the wall time and its stderr. Exits on failure."""
    cmd = [sys.executable, "-m", "memtrace.tracer.record", "-q", *args]
    if out is not None:
        cmd += ["-o", str(out)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=6 * 3600)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"bench_workloads: {' '.join(args)} failed ({p.returncode}): "
                 f"{p.stderr[-2000:]}")
    return wall, p.stderr


def final_figures(path: Path) -> dict[str, float]:
    """The four figures at the trace's end, the traced guest seconds and the trace's size."""
    st = Replay(open_trace(path), progress=False).run()
    fig = st.figures()
    with open_trace(path) as t:
        clock = [v for name, v in counter_series(t, "guest.clock_ns")]
    secs = (max(clock) - min(clock)) / 1e9 if len(clock) > 1 else 0.0
    return {**{k: float(fig[k]) for k in FIGURES}, "guest_seconds": secs,
            "bytes": float(path.stat().st_size)}


def counter_series(t, name: str) -> list[tuple[str, int]]:
    from memtrace.traces.format import Kind

    out = []
    for ch in t.iter_chunks():
        for kind, rec in ch.blocks:
            if kind == Kind.COUNTER:
                out += [(name, int(r["value"])) for r in rec if ch.string(r["name"]) == name]
    return out


def traced(args: list[str], keep: Path, name: str) -> tuple[Path, float | None]:
    """The trace of args, recorded unless keep already holds it; (path, wall or None)."""
    out = keep / f"{name}.mtr"
    if out.exists():
        return out, None
    wall, err = record(args, out)
    print(f"  {name}: {wall:.0f} s wall; {err.strip().splitlines()[-1]}", flush=True)
    return out, wall


def cost(a: argparse.Namespace, keep: Path) -> None:
    print("desktop (terminal-server layout): traced in pages mode vs plain TCG, same run")
    print("| users | plain TCG | traced | ratio | guest seconds traced | trace | per guest s |")
    print("|---|---|---|---|---|---|---|")
    for n in a.users:
        base = ["--scenario", "desktop", "-n", str(n)]
        plain, _ = record([*base, "--no-plugin"], None)
        out = keep / f"cost-desktop-{n}.mtr"
        out.unlink(missing_ok=True)
        wall, _ = record(base, out)
        f = final_figures(out)
        per = f["bytes"] / 1e6 / f["guest_seconds"] if f["guest_seconds"] else float("nan")
        print(f"| {n} | {plain:.0f} s | {wall:.0f} s | {wall / plain:.2f}x | "
              f"{f['guest_seconds']:.1f} | {f['bytes'] / 1e6:.0f} MB | {per:.1f} MB |",
              flush=True)


def table(rows: dict, thesis: dict, base_key, title: str) -> None:
    ref = rows[base_key]["mmap_fork"]
    print(f"\n{title} (relative to {base_key}'s mmap/fork = {ref:.0f} pages = "
          f"{ref * 4096 / 2**20:.0f} MiB; thesis figure in brackets)")
    print("| column | " + " | ".join(FIGURES) + " | MiB (mmap/fork) |")
    print("|---|" + "---|" * (len(FIGURES) + 1))
    for key, f in rows.items():
        th = thesis.get(key)
        cells = [f"{f[k] / ref:.2f}" + (f" ({th[i]:.2f})" if th else "")
                 for i, k in enumerate(FIGURES)]
        print(f"| {key} | " + " | ".join(cells) + f" | {f['mmap_fork'] * 4096 / 2**20:.0f} |")


def table51(a: argparse.Namespace, keep: Path) -> None:
    rows: dict = {}
    for n in a.users:
        for layout in (("terminal-server",) if n == 1 else ("terminal-server", "zero-install")):
            args = ["--scenario", "desktop", "-n", str(n), "--layout", layout]
            path, _ = traced(args, keep, f"desktop-{layout}-{n}")
            rows[(n, layout)] = final_figures(path)
    table(rows, THESIS_51, (min(a.users), "terminal-server"), "Table 5.1, desktop")


def table53(a: argparse.Namespace, keep: Path) -> None:
    rows: dict = {}
    for n in a.servers:
        path, _ = traced(["--scenario", "game-server", "-n", str(n)], keep, f"game-server-{n}")
        rows[n] = final_figures(path)
    table(rows, THESIS_53, min(a.servers), "Table 5.3, game servers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("cost", "table51", "table53"))
    ap.add_argument("--users", type=int, nargs="+", default=None)
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--keep", type=Path, default=ROOT / "out" / "bench-workloads")
    a = ap.parse_args()
    a.users = a.users or ([1, 3] if a.what == "cost" else [1, 2, 3])
    a.keep.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"{platform.platform()}")
    {"cost": cost, "table51": table51, "table53": table53}[a.what](a, a.keep)


if __name__ == "__main__":
    main()
