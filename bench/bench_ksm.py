"""KSM model speed: simulated pages scanned per second of host time, and what a sweep costs
against one plain replay (issue 6's target: >= 1 M scanned pages/s on one core).

Times are CPU seconds of this process. The trace: 16 address spaces with MADV_MERGEABLE heaps
(``--pages`` pages in all, contents drawn from a pool so that about half are duplicates), then
epochs of page rewrites every 10 ms of guest time (1e9 instructions/s) for ``--seconds`` guest
seconds, so that every scan batch sees a changed state and nothing is skipped. With
``--map-churn N`` every epoch also maps N new pages into one address space (recorded traces change
some mappings in most epochs), which makes the model rebuild that address space's items each time.

    python bench/bench_ksm.py [--pages 200000] [--seconds 20] [--pages-to-scan 4000]
                              [--map-churn 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from memtrace.analyses.engine import Replay  # noqa: E402
from memtrace.analyses.ksm.analysis import KsmAnalysis  # noqa: E402
from memtrace.traces.format import MAP_PRESENT, VM_MERGEABLE, VmaOp  # noqa: E402
from memtrace.traces.reader import open_trace  # noqa: E402
from memtrace.traces.writer import TraceWriter  # noqa: E402

HZ = 1_000_000_000
EPOCH = 10_000_000  # 10 ms of guest time


def make_trace(path: str, pages: int, seconds: float, per_epoch: int, map_churn: int = 0,
               seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    nmm = 16
    epochs = int(seconds * HZ / EPOCH)
    nframes = pages + 4096 + epochs * map_churn
    pool = rng.integers(1, 2**63, size=(pages // 2, 2), dtype=np.uint64)
    with TraceWriter(path, {"ram_size": nframes * 4096, "source": "synthetic", "clock_hz": HZ,
                            "generator": {"name": "bench_ksm"}}) as w:
        w.time(0)
        per = pages // nmm
        frame = 0
        frames = np.arange(pages, dtype=np.uint64)
        c = pool[rng.integers(0, len(pool), pages)]
        w.page(frames, c[:, 0], c[:, 1])
        for mm in range(nmm):
            base = 0x10000
            w.vma(VmaOp.MAP, 0, mm + 1, base * 4096, (base + 2 * per) * 4096,
                  0x3 | VM_MERGEABLE)
            w.map(np.full(per, mm + 1, np.uint64), np.arange(per, dtype=np.uint64) + base,
                  frames[frame:frame + per], np.full(per, MAP_PRESENT, np.uint64))
            frame += per
        t = 0
        nxt = pages
        for e in range(epochs):
            t += EPOCH
            w.time(t, t // EPOCH)
            fr = rng.choice(frame, per_epoch, replace=False).astype(np.uint64)
            c = pool[rng.integers(0, len(pool), per_epoch)]
            w.page(fr, c[:, 0], c[:, 1])
            if map_churn:
                mm = int(rng.integers(1, nmm + 1))
                v = np.arange(map_churn, dtype=np.uint64) + np.uint64(
                    0x10000 + per + (e * map_churn) % per)
                f = np.arange(nxt, nxt + map_churn, dtype=np.uint64)
                nxt += map_churn
                c = pool[rng.integers(0, len(pool), map_churn)]
                w.page(f, c[:, 0], c[:, 1])
                w.map(np.full(map_churn, mm, np.uint64), v, f,
                      np.full(map_churn, MAP_PRESENT, np.uint64))


def timed(path: str, analyses: list) -> float:
    """CPU seconds of one replay (steadier than wall time on a shared machine)."""
    t = time.process_time()
    Replay(open_trace(path), analyses, progress=False).run()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=200_000, help="in-scope pages (default 200k)")
    ap.add_argument("--seconds", type=float, default=20.0, help="guest seconds (default 20)")
    ap.add_argument("--per-epoch", type=int, default=200, help="page rewrites per 10 ms")
    ap.add_argument("--map-churn", type=int, default=0,
                    help="pages newly mapped per 10 ms epoch (default 0)")
    ap.add_argument("--pages-to-scan", type=int, default=4000)
    ap.add_argument("--sleep-ms", type=float, default=20.0)
    ap.add_argument("--sweep", default="100:20,1000:20,4000:20,4000:5,100:200")
    a = ap.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench_ksm.mtr")
        make_trace(path, a.pages, a.seconds, a.per_epoch, a.map_churn)
        print(f"trace: {a.pages:,} mergeable pages, {a.seconds:g} guest s, "
              f"{a.per_epoch} rewrites and {a.map_churn} new mappings per 10 ms epoch, "
              f"{os.path.getsize(path) / 1e6:.1f} MB")
        plain = min(timed(path, []) for _ in range(3))
        print(f"plain replay (no analysis):           {plain:7.2f} s CPU")
        one = float("inf")
        for _ in range(2):  # the first run also pays for first-touch allocations
            k = KsmAnalysis(pages_to_scan=a.pages_to_scan, sleep_ms=a.sleep_ms, hints=False)
            one = min(one, timed(path, [k]))
        m = k.models[0]
        extra = max(one - plain, 1e-9)
        print(f"--ksm {a.pages_to_scan}:{a.sleep_ms:g} (one model):         {one:7.2f} s  "
              f"({one / plain:.2f}x plain)")
        print(f"  pages scanned {m.pages_scanned:,} in {m.full_scans} full scans, "
              f"{m.merges:,} merges, pages_sharing {m.sharing:,}")
        print(f"  simulated scanning: {m.pages_scanned / one / 1e6:.2f} M pages/s of host time "
              f"overall, {m.pages_scanned / extra / 1e6:.2f} M pages/s counting only the model's "
              "own time")
        kh = KsmAnalysis(pages_to_scan=a.pages_to_scan, sleep_ms=a.sleep_ms, hints=True)
        both = timed(path, [kh])
        print(f"--ksm with the hinted twin (2 models): {both:7.2f} s  ({both / plain:.2f}x plain)")
        from memtrace.analyses.ksm.params import parse_sweep

        sweep = parse_sweep(a.sweep)
        ks = KsmAnalysis(pages_to_scan=a.pages_to_scan, sleep_ms=a.sleep_ms, sweep=sweep,
                         hints=True)
        sw = timed(path, [ks])
        scanned = sum(x.pages_scanned for x in ks.models)
        print(f"--ksm-sweep {a.sweep} with hints ({len(ks.models)} models): {sw:7.2f} s  "
              f"({sw / plain:.2f}x one plain replay, {sw / one:.2f}x one --ksm run); "
              f"{scanned:,} pages scanned, {scanned / sw / 1e6:.2f} M pages/s overall")
        r = ks.result().tables["sweep"]
        j = r.columns.index
        for row in r.rows:
            frac = row[j("fraction_of_scope_oracle")]
            print(f"    {row[0]:>16}  saved_mean {row[j('saved_mean')]:>10,.1f}  "
                  f"fraction {frac if frac is not None else '-'}")


if __name__ == "__main__":
    main()
