"""Documented synthetic trace generators, for unit tests, the built-in sample trace and the
replay benchmark.

It plays a miniature of the thesis's terminal-server scenario (chapter 5.1) straight into the trace
format, without QEMU: an init task forks N instances of a program; each maps the same shared library
(named frames shared by mmap/fork), reads a data file into its heap (anonymous duplicates across
instances: KSM's case), touches zero pages, keeps private state, and rewrites part of its heap over
time (breaking sharing), including short-lived identical buffers that a periodic snapshot misses.
With ``zero_install`` each instance maps its own copy of the library (same bytes, other inode:
named duplicates that only full CBPS can share).

Page contents are real 4 KiB pages (a token repeated), hashed with xxh3_128 like the tracer does,
and stored in the content store so that ``--show-page`` works on the sample.

``page_updates`` writes the replay benchmark's stress traces instead (``bench/bench_replay.py``):
address spaces that stay mapped, then millions of page updates whose contents come from a large
pool (``repeat``) or are all new (the worst case for any content table or cache).
"""

from __future__ import annotations

import argparse
import random
import struct
from pathlib import Path

import numpy as np

from memtrace.traces.format import MAP_PRESENT, MAP_WRITABLE, MarkOp, PageCacheOp, TaskOp, VmaOp
from memtrace.traces.pagehash import page_hash
from memtrace.traces.writer import TraceWriter

PAGE = 4096
LIB_PAGES = 48
DATA_PAGES = 32
HEAP_PRIVATE = 16
ZERO_READS = 8
LIB_BASE = 0x7F0000000
HEAP_BASE = 0x5000000
DEV = 0x800001


def page_bytes(token: int) -> bytes:
    if token == 0:
        return bytes(PAGE)
    return struct.pack("<Q", token) * (PAGE // 8)


class SyntheticGuest:
    """Emits a consistent trace: frames, page cache, address spaces and tasks."""

    def __init__(self, w: TraceWriter, nframes: int, store_contents: bool = True) -> None:
        self.w = w
        self.free = list(range(nframes - 1, 0, -1))  # frame 0 holds the zero page
        self.t = 0
        self.epoch = 0
        self.store = store_contents
        self.hashes: dict[int, tuple[int, int]] = {}

    def tick(self, dt: int) -> None:
        self.t += dt
        self.epoch += 1
        self.w.time(self.t, self.epoch)

    def fill(self, frame: int, token: int) -> None:
        if token not in self.hashes:
            data = page_bytes(token)
            self.hashes[token] = page_hash(data)
            if self.store:
                self.w.content(*self.hashes[token], data)
        lo, hi = self.hashes[token]
        self.w.page(frame, lo, hi)

    def alloc(self, token: int) -> int:
        f = self.free.pop()
        self.fill(f, token)
        return f


def generate(path: str | Path, instances: int = 3, seed: int = 1, zero_install: bool = False,
             epochs: int = 200, nframes: int = 4096, chunk_bytes: int = 256 << 10) -> None:
    """Write a synthetic trace to ``path`` (deterministic for a given seed)."""
    rng = random.Random(seed)
    header = {
        "source": "synthetic", "ram_size": nframes * PAGE, "clock_unit": "instructions",
        "clock_hz": 1_000_000_000, "mode": "pages", "tracking": "synthetic",
        "epoch_length": 1_000_000,
        "generator": {"name": "memtrace.traces.synthetic", "seed": seed, "instances": instances,
                      "zero_install": zero_install, "epochs": epochs},
        "scenario": {"name": "zero-install" if zero_install else "terminal-server",
                     "n": instances},
        "command": f"python -m memtrace.traces.synthetic --instances {instances} --seed {seed}"
                   + (" --zero-install" if zero_install else ""),
    }
    with TraceWriter(path, header, chunk_bytes=chunk_bytes) as w:
        g = SyntheticGuest(w, nframes)
        g.tick(0)
        w.mark(MarkOp.STATE_BEGIN, arg=1)
        g.fill(0, 0)  # the zero page
        w.task(TaskOp.EXISTING, 1, 1, 0, mm=0x1000, pgd=0x100000, name="init")
        w.mark(MarkOp.STATE_END)
        w.mark(MarkOp.START)

        def load_lib(ino: int) -> list[int]:
            frames = []
            for i in range(LIB_PAGES):
                f = g.alloc(1000 + i)  # library bytes: identical in every copy
                w.pagecache(PageCacheOp.ADD, DEV, ino, i, f)
                frames.append(f)
            return frames

        shared_lib = load_lib(100)
        data_file = []
        for i in range(DATA_PAGES):
            f = g.alloc(5000 + i)
            w.pagecache(PageCacheOp.ADD, DEV, 200, i, f)
            data_file.append(f)
        g.tick(1_000_000)

        workers = []
        for n in range(instances):
            pid = 100 + n
            mm = 0x10000 + n * 0x100
            w.task(TaskOp.NEW, pid, pid, 1, mm=mm, pgd=0x200000 + n * PAGE, name="sh")
            lib = load_lib(300 + n) if zero_install else shared_lib
            lib_ino = 300 + n if zero_install else 100
            w.task(TaskOp.EXEC, pid, pid, 1, mm=mm, pgd=0x200000 + n * PAGE,
                   name=f"/opt/app{n}/bin/app" if zero_install else "/usr/bin/app")
            w.vma(VmaOp.MAP, pid, mm, LIB_BASE, LIB_BASE + LIB_PAGES * PAGE, 0x5, 0, lib_ino,
                  DEV, f"/opt/app{n}/lib/libapp.so" if zero_install else "/usr/lib/libapp.so")
            w.vma(VmaOp.BRK, pid, mm, HEAP_BASE, HEAP_BASE + (DATA_PAGES + HEAP_PRIVATE
                                                               + ZERO_READS + 8) * PAGE)
            vpn_lib = LIB_BASE // PAGE
            w.map([mm] * LIB_PAGES, range(vpn_lib, vpn_lib + LIB_PAGES), lib,
                  [MAP_PRESENT] * LIB_PAGES)
            heap = []
            vpn = HEAP_BASE // PAGE
            for i in range(DATA_PAGES):  # read the data file into anonymous memory
                f = g.alloc(5000 + i)
                heap.append(f)
                w.map(mm, vpn + i, f, MAP_PRESENT | MAP_WRITABLE)
            for i in range(HEAP_PRIVATE):  # private state
                f = g.alloc(10_000 + 100 * n + i)
                w.map(mm, vpn + DATA_PAGES + i, f, MAP_PRESENT | MAP_WRITABLE)
                heap.append(f)
            for i in range(ZERO_READS):  # untouched pages read: the zero page
                w.map(mm, vpn + DATA_PAGES + HEAP_PRIVATE + i, 0, MAP_PRESENT)
            workers.append((pid, mm, heap))
            g.tick(rng.randrange(500_000, 2_000_000))

        tmp_vpn = (HEAP_BASE // PAGE) + DATA_PAGES + HEAP_PRIVATE + ZERO_READS
        tmp_frames: dict[int, int] = {}
        for e in range(epochs):
            pid, mm, heap = workers[rng.randrange(len(workers))]
            if rng.random() < 0.5:  # rewrite a data page: breaks its sharing for a while
                i = rng.randrange(DATA_PAGES)
                g.fill(heap[i], 50_000 + e)
            if rng.random() < 0.3:  # restore it (identical again)
                i = rng.randrange(DATA_PAGES)
                g.fill(heap[i], 5000 + i)
            if e % 10 == 0:  # a short-lived identical buffer in every instance
                for _, mm2, _ in workers:
                    f = g.alloc(77_000 + e)
                    tmp_frames[mm2] = f
                    w.map(mm2, tmp_vpn, f, MAP_PRESENT | MAP_WRITABLE)
            elif e % 10 == 1:
                for _, mm2, _ in workers:
                    f = tmp_frames.pop(mm2, None)
                    if f is not None:
                        w.map(mm2, tmp_vpn, 0, 0)
                        g.free.append(f)
            g.tick(rng.randrange(200_000, 1_500_000))
        w.mark(MarkOp.PHASE, "teardown")
        for pid, _, _ in workers:
            w.task(TaskOp.EXIT, pid, pid, 1)
            g.tick(100_000)
        w.mark(MarkOp.STOP)


BENCH_FRAMES = 131072  # 512 MiB guest
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of 64-bit words, so distinct inputs never collide."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class _FreshContents:
    """Hashes that never repeat: the n-th content is (mix(n), mix(n + 2**63)) for a counter n
    that only grows (``mix`` is a bijection)."""

    def __init__(self, seed: int) -> None:
        self.n = np.uint64(seed) << np.uint64(40)

    def take(self, k: int) -> np.ndarray:
        i = self.n + np.arange(k, dtype=np.uint64)
        self.n += np.uint64(k)
        return np.stack([_splitmix(i), _splitmix(i ^ np.uint64(1 << 63))], axis=1)


def page_updates(path: str | Path, updates: int, per_epoch: int = 5000,
                 nframes: int = BENCH_FRAMES, seed: int = 1, repeat: bool = True) -> None:
    """A pages-mode-like stress trace for the replay benchmark: 16 address spaces over about
    three quarters of the frames (6000 pages each with the default 128k frames, scaled with
    ``nframes``), then epochs of ``per_epoch`` page updates of distinct frames.

    With ``repeat`` the contents come from a pool of ``updates // 4`` plus 50,000 random
    hashes (scaled), drawn uniformly, so contents come back and counters really move (this is
    the benchmark's trace of issue 2: 5 M updates bring about 1.3 M distinct contents). Without
    it every content is new (never seen before in the trace, the zero page's included): the
    worst case for a content table, whose live contents are then only what the frames hold.
    Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    region = nframes * 96_000 // BENCH_FRAMES   # frames the address spaces map
    per_space = nframes * 6000 // BENCH_FRAMES  # pages each maps
    base = 50_000 * nframes // BENCH_FRAMES     # the first epoch's pool
    fresh = None if repeat else _FreshContents(seed)
    pool = rng.integers(1, 2**63, size=(updates // 4 + base, 2), dtype=np.uint64) if repeat \
        else None
    header = {"ram_size": nframes * 4096, "source": "synthetic",
              "generator": {"name": "memtrace.traces.synthetic.page_updates",
                            "updates": updates, "per_epoch": per_epoch, "seed": seed,
                            "repeat": repeat}}
    with TraceWriter(path, header) as w:
        w.time(0)
        frames = np.arange(nframes, dtype=np.uint64)
        c = pool[rng.integers(0, base, nframes)] if pool is not None else fresh.take(nframes)
        w.page(frames, c[:, 0], c[:, 1])
        for mm in range(16):
            fr = rng.choice(region, per_space, replace=False).astype(np.uint64)
            w.map(np.full(per_space, mm + 1, np.uint64),
                  np.arange(per_space, dtype=np.uint64) + 0x400,
                  fr, np.full(per_space, MAP_PRESENT, np.uint64))
        t, done = 0, 0
        while done < updates:
            t += 10_000_000
            w.time(t, t // 10_000_000)
            k = min(per_epoch, updates - done)
            fr = rng.choice(nframes, k, replace=False).astype(np.uint64)
            c = pool[rng.integers(0, len(pool), k)] if pool is not None else fresh.take(k)
            w.page(fr, c[:, 0], c[:, 1])
            done += k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--zero-install", action="store_true")
    ap.add_argument("--page-updates", type=int, metavar="N",
                    help="write the replay benchmark's stress trace of N page updates instead")
    ap.add_argument("--per-epoch", type=int, default=5000, help="with --page-updates")
    ap.add_argument("--frames", type=int, default=BENCH_FRAMES,
                    help="with --page-updates: guest frames (default 131072, 512 MiB)")
    ap.add_argument("--fresh", action="store_true",
                    help="with --page-updates: every content new (never repeats)")
    a = ap.parse_args()
    if a.page_updates is not None:
        page_updates(a.output, a.page_updates, a.per_epoch, a.frames, seed=a.seed,
                     repeat=not a.fresh)
    else:
        generate(a.output, a.instances, a.seed, a.zero_install, a.epochs)


if __name__ == "__main__":
    main()
