"""Replay speed: page-update records per second, raw writes per second, and replay cost as a
ratio to plain zstd decompression of the same trace (issue 2's targets: >= 5 M page updates/s,
>= 20 M raw writes/s, replay <= 3x decompression).

    python bench/bench_replay.py [--updates 5000000] [--writes 20000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memtrace.analyses.engine import Replay  # noqa: E402
from memtrace.analyses.memimage import MemoryImage  # noqa: E402
from memtrace.analyses.registry import ANALYSES  # noqa: E402
from memtrace.traces.format import DTYPES, Kind  # noqa: E402
from memtrace.traces.reader import open_trace  # noqa: E402
from memtrace.traces.synthetic import BENCH_FRAMES, page_updates  # noqa: E402

NFRAMES = BENCH_FRAMES  # 512 MiB guest


def best_of(fn: Callable[[], object], runs: int = 3) -> float:
    """The shortest of ``runs`` timings of ``fn()`` (this machine is shared and noisy)."""
    return alternated([fn], runs)[0]


def alternated(fns: list[Callable[[], object]], runs: int = 3) -> list[float]:
    """The shortest of ``runs`` timings of each function, the functions taking turns, so that
    a ratio of two compares them under the same load and with the same memory already
    faulted in (timed one after the other, the first measured paid for the second's page
    faults, which on this VM made decompression look twice as slow as it is)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def replay(path: str, analyses: bool = False) -> None:
    an = [cls() for cls in ANALYSES if cls.default] if analyses else []
    Replay(open_trace(path), an, progress=False).run()


def make_trace(path: str, updates: int, per_epoch: int, seed: int = 1) -> None:
    """A pages-mode-like trace: 16 address spaces over 96k frames, then epochs of page updates
    whose contents come from a pool with many duplicates (so counters really move)."""
    page_updates(path, updates, per_epoch, NFRAMES, seed)


def bench_pages(updates: int, per_epoch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.mtr")
        make_trace(path, updates, per_epoch)
        tr = open_trace(path)
        size = os.path.getsize(path)
        raw = sum(len(tr._payload(c)) for c in tr.chunks)
        replay(path)
        t_dec, t_engine = alternated([lambda: [tr._payload(c) for c in tr.chunks],
                                      lambda: replay(path)])
        t_all = best_of(lambda: replay(path, analyses=True), runs=1)
    return {"updates": updates, "per_epoch": per_epoch, "trace_MB": size / 1e6,
            "raw_MB": raw / 1e6, "decompress_s": t_dec, "replay_s": t_engine,
            "replay_with_default_analyses_s": t_all,
            "updates_per_s": updates / t_engine, "ratio_to_decompress": t_engine / t_dec,
            "ratio_all_to_decompress": t_all / t_dec}


def bench_real(path: str) -> None:
    """Replay of a recorded trace (the shipped sample by default) against its decompression."""
    tr = open_trace(path)
    counts = {Kind.PAGE: 0, Kind.MAP: 0}
    for chunk in tr.iter_chunks():
        for k, r in chunk.blocks:
            if k in counts:
                counts[k] += len(r)
    t0 = time.perf_counter()
    replay(path)  # the first replay of a process loads (or, once per machine, compiles) kernels
    t_first = time.perf_counter() - t0
    t_dec, t_engine = alternated([lambda: [tr._payload(c) for c in tr.chunks],
                                  lambda: replay(path)], runs=7)
    t_pages = min(time_page_updates(path) for _ in range(3))
    t_all = best_of(lambda: replay(path, analyses=True))
    print(f"recorded trace {Path(path).name}: {os.path.getsize(path) / 1e6:.1f} MB, "
          f"{counts[Kind.PAGE]:,} page updates, {counts[Kind.MAP]:,} mapping updates")
    print(f"  zstd decompression {t_dec:.3f} s; replay {t_engine:.3f} s = "
          f"{t_engine / t_dec:.1f}x decompression ({counts[Kind.PAGE] / t_engine / 1e6:.1f} M "
          f"page updates/s with everything else); first replay in a process {t_first:.2f} s")
    print(f"  page updates alone (content ids and counters): {t_pages:.3f} s = "
          f"{counts[Kind.PAGE] / t_pages / 1e6:.1f} M/s")
    print(f"  with default analyses {t_all:.2f} s = {t_all / t_dec:.1f}x decompression")


def time_page_updates(path: str) -> float:
    """Host time the replay spends applying PAGE records (content ids and counters)."""
    rp = Replay(open_trace(path), [], progress=False)
    st = rp.state
    apply_pages = st.apply_pages
    spent = [0.0]

    def timed(*args: np.ndarray) -> None:
        t0 = time.perf_counter()
        apply_pages(*args)
        spent[0] += time.perf_counter() - t0

    st.apply_pages = timed  # type: ignore[method-assign]
    rp.run()
    return spent[0]


def warm_image(nframes: int) -> MemoryImage:
    """A memory image whose pages are already faulted in: this VM pays 1-10 ms per MB the first
    time memory is touched (host side), which would swamp the rate of the writes themselves; a
    replay pays it once per frame, not once per write."""
    img = MemoryImage(nframes)
    img.mem.reshape(nframes, -1)[:, 0] = 0  # a write, so each page is faulted in
    return img


def bench_writes(n: int, per_epoch: int = 1_000_000) -> dict[str, float]:
    """Stores with kernel-like locality: runs of rep-stos bytes and 8-byte stores, 1 M per epoch;
    each epoch's touched frames are hashed to find the changed pages."""
    rng = np.random.default_rng(2)
    img = warm_image(NFRAMES)
    base = rng.integers(0, NFRAMES * 4096 - 64, size=n // 16).astype(np.uint64) & ~np.uint64(7)
    addr = (np.repeat(base, 16) + np.tile(np.arange(16, dtype=np.uint64) * 8, len(base)))[:n]
    size = rng.choice(np.array([1, 2, 4, 8], dtype=np.uint64), n, p=[0.3, 0.1, 0.2, 0.4])
    rec = np.zeros(n, dtype=DTYPES[Kind.WRITE])
    rec["addr"] = addr | (size << np.uint64(56))
    rec["value"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    t0 = time.perf_counter()
    changed = 0
    for i in range(0, n, per_epoch):
        img.apply_writes(rec[i:i + per_epoch])
        changed += len(img.take_touched())
    t_apply = time.perf_counter() - t0
    return {"writes": n, "writes_per_s": n / t_apply, "frames_touched_per_epoch":
            changed / max(1, n // per_epoch)}


def bench_writes_with_hash(n: int, per_epoch: int = 1_000_000) -> dict[str, float]:
    """Same, plus hashing each epoch's touched frames (the 'finding changed pages' step) with
    realistic locality: stores concentrated in 2,000 hot frames."""
    rng = np.random.default_rng(3)
    img = warm_image(NFRAMES)
    hot = rng.choice(NFRAMES, 2000, replace=False).astype(np.uint64)
    addr = hot[rng.integers(0, 2000, n)] * np.uint64(4096) + \
        (rng.integers(0, 511, n).astype(np.uint64) * np.uint64(8))
    rec = np.zeros(n, dtype=DTYPES[Kind.WRITE])
    rec["addr"] = addr | (np.uint64(8) << np.uint64(56))
    rec["value"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    t0 = time.perf_counter()
    for i in range(0, n, per_epoch):
        img.apply_writes(rec[i:i + per_epoch])
        img.hashes(img.take_touched())
    dt = time.perf_counter() - t0
    return {"writes": n, "writes_per_s_incl_hashing": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=5_000_000)
    ap.add_argument("--per-epoch", type=int, default=5000)
    ap.add_argument("--writes", type=int, default=20_000_000)
    ap.add_argument("--trace", default=str(Path(__file__).resolve().parent.parent / "traces"
                                           / "samples" / "default.mtr"),
                    help="a recorded trace to replay (default: the shipped sample)")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    bench_real(a.trace)
    p = bench_pages(a.updates, a.per_epoch)
    print(f"page updates: {p['updates']:,} in epochs of {p['per_epoch']:,}; trace "
          f"{p['trace_MB']:.1f} MB ({p['raw_MB']:.1f} MB raw)")
    print(f"  zstd decompression      {p['decompress_s']:.2f} s")
    print(f"  replay (engine only)    {p['replay_s']:.2f} s = {p['updates_per_s'] / 1e6:.2f} M "
          f"updates/s, {p['ratio_to_decompress']:.2f}x decompression")
    print(f"  replay + default analyses {p['replay_with_default_analyses_s']:.2f} s = "
          f"{p['ratio_all_to_decompress']:.2f}x decompression")
    w = bench_writes(a.writes)
    print(f"raw writes: {w['writes']:,} applied at {w['writes_per_s'] / 1e6:.1f} M/s "
          f"({w['frames_touched_per_epoch']:.0f} frames touched per 1 M-write epoch)")
    h = bench_writes_with_hash(a.writes)
    print(f"raw writes + hashing touched frames (2,000 hot frames): "
          f"{h['writes_per_s_incl_hashing'] / 1e6:.1f} M/s")


if __name__ == "__main__":
    main()
