"""trace-analyze as a user runs it: outputs, bad input, exit codes, no tracebacks."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memtrace.traces.synthetic import generate
from memtrace.traces.writer import TraceWriter


def run(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "t.mtr"
    generate(p, instances=2, epochs=80)
    return p


def test_default_sample_runs():
    p = run("--oracle", "-q", check_rc=0)
    assert "oracle_mean" in p.stdout and "default.mtr" in p.stdout


def test_text_json_csv(trace):
    txt = run(trace, "-q", check_rc=0).stdout
    for word in ("== sharing ==", "== oracle ==", "== snapshot_vs_continuous ==", "full_cbps",
                 "shareable_by_type"):
        assert word in txt
    doc = json.loads(run(trace, "--format", "json", "-q", check_rc=0).stdout)
    assert set(doc["results"]) == {"sharing", "oracle", "snapshot_vs_continuous"}
    o = doc["results"]["oracle"]["summary"]
    assert o["oracle_min"] <= o["oracle_mean"] <= o["oracle_max"]
    rows = list(csv.DictReader(io.StringIO(
        run(trace, "--format", "csv", "--table", "sharing.series", "-q", check_rc=0).stdout)))
    assert rows and {"t", "no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps"} <= set(rows[0])
    assert all(int(r["no_sharing"]) >= int(r["full_cbps"]) for r in rows)


def test_interval_changes_samples(trace):
    a = json.loads(run(trace, "--sharing", "--interval", "1M", "--format", "json", "-q",
                       check_rc=0).stdout)
    b = json.loads(run(trace, "--sharing", "--interval", "10M", "--format", "json", "-q",
                       check_rc=0).stdout)
    assert a["results"]["sharing"]["summary"]["samples"] > \
        b["results"]["sharing"]["summary"]["samples"]


def test_plot(trace, tmp_path):
    png = tmp_path / "s.png"
    run(trace, "--plot", png, "-q", check_rc=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_one_line(tmp_path, trace):
    for args, rc, needle in [
        ((tmp_path / "missing.mtr",), 1, "no such file"),
        ((trace.parent,), 1, "directory"),
        (("--interval", "abc", trace), 2, "not a time"),
        ((trace, "--table", "x"), 2, "--table needs"),
        ((trace, "--format", "csv", "--table", "nope", "-q"), 2, "no table"),
        ((trace, "--add-checkpoints", "0"), 2, "--add-checkpoints needs N >= 1"),
        ((trace, "--format", "parquet"), 2, "give its folder with -o DIR"),  # many.py's usage
    ]:
        p = run(*args, check_rc=rc)
        assert needle in p.stderr
    junk = tmp_path / "junk.mtr"
    junk.write_bytes(b"\0" * 100)
    p = run(junk, check_rc=1)
    assert "at byte 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind,frame", [("page", 1 << 30), ("page", (1 << 63) + 5),
                                        ("map", (1 << 64) - 1), ("pagecache", 1 << 63)])
def test_frame_beyond_guest_ram_one_line(tmp_path, kind, frame):
    """A record naming a frame far beyond the header's RAM (bit 63 set included, which a signed
    index would turn negative): one line with the chunk's offset, exit 1 (the compiled loop
    stops there and the state refuses to grow that far)."""
    p = tmp_path / "far.mtr"
    frames = np.array([1, frame], dtype=np.uint64)
    two = np.array([5, 6], dtype=np.uint64)
    with TraceWriter(str(p), {"ram_size": 64 * 4096, "source": "synthetic"}) as w:
        w.time(0)
        if kind == "page":
            w.page(frames, two, two)
        elif kind == "map":
            w.task(1, 10, 10, 1, mm=7, name="p")
            w.map(np.array([7, 7], dtype=np.uint64), two, frames, np.array([1, 1], np.uint64))
        else:
            w.pagecache(np.array([1, 1], np.uint32), np.array([1, 1], np.uint32), two, two,
                        frames)
        w.time(10)
    err = run(p, "--oracle", check_rc=1).stderr
    assert f"frame {frame:#x} is beyond guest RAM" in err and "at byte" in err
    assert len(err.strip().splitlines()) == 1


def test_virtual_page_beyond_40_bits_one_line(tmp_path):
    """A mapping whose virtual page would spill into the address-space bits of the mapping
    table's key: one line, exit 1."""
    p = tmp_path / "vpn.mtr"
    with TraceWriter(str(p), {"ram_size": 64 * 4096, "source": "synthetic"}) as w:
        w.time(0)
        w.task(1, 10, 10, 1, mm=7, name="p")
        w.map(np.array([7, 7], np.uint64), np.array([3, 1 << 40], np.uint64),
              np.array([1, 2], np.uint64), np.array([1, 1], np.uint64))
        w.time(10)
    err = run(p, "--oracle", check_rc=1).stderr
    assert "virtual page 0x10000000000 of mm 0x7 is beyond 2**40" in err and "at byte" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_trace_warns_and_analyzes(trace, tmp_path):
    data = trace.read_bytes()
    cut = tmp_path / "cut.mtr"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    p = run(cut, "--oracle", "-q", check_rc=0)
    assert "cut short at byte" in p.stderr and "oracle_mean" in p.stdout


def test_help_explains_figures():
    out = run("--help", check_rc=0).stdout
    for fig in ("no sharing", "mmap/fork", "KSM hint all", "full CBPS", "oracle"):
        assert fig in out


def test_add_checkpoints_cli(tmp_path):
    p = tmp_path / "ck.mtr"
    generate(p, instances=2, epochs=80, chunk_bytes=2048)
    before = run(p, "--oracle", "--format", "json", "-q", check_rc=0).stdout
    out = run(p, "--add-checkpoints", "2", "-q", check_rc=0).stdout
    assert "added" in out and "added 0 " not in out
    after = run(p, "--oracle", "--format", "json", "-q", check_rc=0).stdout
    assert json.loads(before)["results"] == json.loads(after)["results"]
    assert "already has checkpoints" in run(p, "--add-checkpoints", "2", check_rc=1).stderr


def test_base_column(trace):
    doc = json.loads(run(trace, "--sharing", "--base", "1MiB", "--format", "json", "-q",
                         check_rc=0).stdout)
    t = doc["results"]["sharing"]["tables"]["figures_at_peak"]
    assert t["columns"][-1] == "relative_to_base_256_pages"
    assert all(abs(row[-1] - row[1] / 256) < 1e-3 for row in t["rows"])
    assert "not a base" in run(trace, "--base", "x", check_rc=2).stderr


def test_plot_without_matplotlib_fails_in_one_line_before_the_replay(trace, tmp_path):
    """matplotlib is optional: without it --plot is one line and status 1 before any replay (no
    report), and a run without --plot does not need it."""
    blocker = tmp_path / "site" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed, for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}

    def analyze(*args):
        return subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", str(trace),
                               "--oracle", "-q", *args], capture_output=True, text=True,
                              timeout=600, env=env)
    p = analyze("--plot", str(tmp_path / "o.png"))
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == ("trace-analyze: error: matplotlib is not installed; install it with pip "
                        "install 'memtrace[plot]'\n")
    assert not (tmp_path / "o.png").exists()
    p = analyze()
    assert p.returncode == 0 and "oracle_mean" in p.stdout, p.stderr
