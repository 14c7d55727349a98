"""Measurements (printed, never asserted): the same guest run under plain TCG, pages mode and
writes mode; wall time of the whole run and of the traced workload, trace bytes per billion
guest instructions. Run with `pytest -s -m e2e tests/e2e_tracer/test_measure.py`.

The workload is timed on the host from the serial console: from the fake agent's START line
to the guest's "E2E: done" line (the same lines appear without the plugin).
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.tracer.tracer_checks import summarize
from tests.e2e.tracer.tracer_qemu import run_guest

pytestmark = pytest.mark.e2e

WORKLOAD = os.environ.get("MEMTRACE_MEASURE_WORKLOAD", "default")


def test_measure_overhead_and_size(tmp_path, plugin, guest):
    configs = [
        ("plain TCG", None),
        ("pages (pagemap-scan)", "start=marker"),
        ("pages (store callbacks)", "start=marker,track=callbacks"),
        ("writes (zstd 1, default)", "start=marker,mode=writes"),
        ("writes zstd=3", "start=marker,mode=writes,zstd=3"),
    ]
    rows = []
    for name, args in configs:
        run = run_guest(tmp_path, guest, args, workload=WORKLOAD)
        assert run.returncode == 0, run.stderr
        row = {"config": name, "wall": run.wall, "workload": run.workload_seconds()}
        if run.trace:
            s = summarize(run.trace, layout_limit=0)
            traced = s.t_last - s.t_first
            size = os.path.getsize(run.trace)
            row.update(traced_insns=traced, bytes=size,
                       bytes_per_g=size / (traced / 1e9) if traced else float("nan"),
                       records=sum(s.counts.values()),
                       stalls=run.stats.get("writer_stalls"),
                       raw=run.stats.get("raw_bytes"))
            os.unlink(run.trace)
        rows.append(row)
    base = rows[0]
    print(f"\nworkload '{WORKLOAD}', guest boot untraced (start=marker), 1 vCPU, epoch 10M")
    print(f"{'config':26} {'run s':>7} {'workload s':>10} {'x plain':>8} {'traced insns':>13} "
          f"{'trace bytes':>12} {'bytes/G insns':>14} {'raw bytes':>12} {'stalls':>6}")
    for r in rows:
        slow = r["workload"] / base["workload"] if r["workload"] and base["workload"] else 0
        print(f"{r['config']:26} {r['wall']:7.1f} {r['workload'] or 0:10.2f} {slow:8.2f} "
              f"{r.get('traced_insns', 0):13d} {r.get('bytes', 0):12d} "
              f"{r.get('bytes_per_g', 0):14.0f} {r.get('raw') or 0:12d} "
              f"{r.get('stalls') or 0:6d}")
