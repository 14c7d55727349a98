"""End to end: the KSM model against the guest's own KSM (issue #6's validation).

trace-record runs the ``ksm`` scenario under real QEMU with the real guest agent: two processes
with 2 x 256 identical pages marked MADV_MERGEABLE, the guest's ksmd switched on at phase
``merge`` (pages_to_scan 100, sleep_millisecs 50), its counters sampled every 0.1 s of guest
time, the guest's clock every 10 ms. trace-analyze then replays the same trace through the model
with the same parameters, in the madvised scope (the agent reports madvise as VMA PROTECT), in
guest time (the guest's clock counters and HZ from the trace).

Generous timeouts; nothing depends on wall-clock speed: every time is the guest's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.traces.format import Kind, VmaOp
from memtrace.traces.reader import open_trace
from tests.paths import REPO

pytestmark = pytest.mark.e2e
ROOT = REPO
MERGEABLE = 0x80000000
KSM_ARGS = ["--ksm", "--ksm-pages-to-scan", "100", "--ksm-sleep-ms", "50",
            "--ksm-start", "phase:merge", "--ksm-no-hints"]


def record(*args: str, timeout: float = 3000) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memtrace.tracer.record", "-q", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def analyze(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", "-q", "--format", "json",
                        *args], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)["results"]["ksm"]


@pytest.fixture(scope="module")
def ksm_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ksm") / "ksm.mtr"
    p = record("--scenario", "ksm", "-n", "2", "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    # KSM merging in the guest rewrites page tables and frees frames: every frame still
    # matches the replayed trace (tests/e2e/record/test_scenarios_verify.py lists who verifies)
    assert " 0 differ, 0 never described" in p.stderr, p.stderr[-2000:]
    return out


def test_trace_has_madvise_and_guest_clock(ksm_trace):
    tr = open_trace(ksm_trace)
    protect_mergeable = 0
    counters: dict[str, int] = {}
    for chunk in tr.iter_chunks():
        for kind, rec in chunk.blocks:
            if kind == Kind.VMA:
                protect_mergeable += int(((rec["op"] == VmaOp.PROTECT)
                                          & ((rec["vm_flags"] & MERGEABLE) != 0)).sum())
            elif kind == Kind.COUNTER:
                for r in rec:
                    name = chunk.string(int(r["name"])) or "?"
                    counters[name] = counters.get(name, 0) + 1
    # 2 processes x 2 buffers, each madvised once
    assert protect_mergeable >= 4
    assert counters.get("guest.clock_ns", 0) >= 100  # >= 2 s of guest time at 10 ms
    assert counters.get("guest.hz", 0) >= 1  # at start (the clock runs from boot) and at 'clock'

    assert counters.get("ksm.pages_sharing", 0) >= 20  # sampled every 0.1 s for 4 s


def test_model_tracks_the_kernel(ksm_trace):
    res = analyze(str(ksm_trace), *KSM_ARGS)
    s = res["summary"]
    assert s["scope"] == "madvised" and s["guest_clock_knots"] >= 100
    assert s["guest_hz"] == 250 and s["batch_cycle_ms"] == 56
    assert s["final_sample_phase"] == "merge"
    # 1024 identical pages, max_page_sharing 256: 4 KSM pages, 1020 sharing
    kernel, model = s["kernel_final_pages_sharing"], s["model_at_kernel_final_pages_sharing"]
    assert kernel == 1020
    assert abs(model - kernel) <= 0.1 * kernel
    # over time: the ramp (0 -> 1020 in about 0.6 s of guest time) is where errors show;
    # measured 3-4 pages mean over ~35 samples, allowed 60
    assert s["pages_sharing_samples"] >= 20
    assert s["pages_sharing_mean_abs_error"] <= 60
    kfs, mfs = s["kernel_final_full_scans"], s["model_at_kernel_final_full_scans"]
    assert kfs >= 4 and abs(mfs - kfs) <= 2
    # the instruction clock alone (clock_hz, the mean rate of the whole trace) runs ksmd far
    # too slowly in phase merge, where the guest mostly idles: measured 3-4 full scans for the
    # kernel's 6 (this is what the guest clock is for); asserted: fewer than the kernel
    plain = analyze(str(ksm_trace), *KSM_ARGS, "--ksm-no-guest-clock", "--ksm-hz", "0")
    assert plain["summary"]["guest_clock_knots"] == 0
    assert plain["summary"]["model_at_kernel_final_full_scans"] < kfs
