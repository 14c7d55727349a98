"""trace-study with real recordings: real QEMU, the real guest kernel and agent, on trace-study's
own Dask LocalCluster of 2 worker processes; Ctrl-C in the middle of the recordings and resume;
the thesis study, quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.paths import REPO

BIN = Path(sys.executable).parent
TINY = """\
[study]
name = "tiny"
repeats = 2

[[workload]]
scenario = "single"
n = 1

[analyses.sharing]
[analyses.oracle]
"""


def shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("memtrace-*")}


def qemu_writing(folder: Path) -> list[str]:
    """QEMU processes whose command line names a trace in ``folder``."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and str(folder) in cmd:
            out.append(p.name)
    return out


def test_tiny_real_study_on_two_workers_interrupted_and_resumed(tmp_path, say):
    """trace-study's own LocalCluster of 2 worker processes, real recordings: Ctrl-C to the
    whole process group while both guests run leaves no QEMU and nothing in /dev/shm; run
    again, the interrupted runs are recorded again and the dataset equals trace-analyze's
    JSON of the traces."""
    before = shm()
    sf = tmp_path / "tiny.toml"
    sf.write_text(TINY)
    out = tmp_path / "out"
    p = subprocess.Popen([str(BIN / "trace-study"), str(sf), "-o", str(out), "--workers", "2",
                          "-q"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(qemu_writing(out)) < 2:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.2)
    assert len(qemu_writing(out)) == 2, "the recordings did not start"
    time.sleep(3)  # midway: the guests are booting or running the scenario
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "local Dask cluster: 2 worker(s)" in err  # trace-study's own LocalCluster
    assert "Dask dashboard: http://127.0.0.1:" in err
    assert "0 of 2 runs done, interrupted" in err
    assert not qemu_writing(out) and shm() <= before
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "trace-study"), str(sf), "-o", str(out), "--workers", "2",
                        "-q"], capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "2 runs, 0 already done, 2 to run" in r.stderr
    runs = pd.read_parquet(out / "results" / "runs.parquet")
    assert runs["status"].tolist() == ["done", "done"]
    assert (runs["guest_seconds"] > 0).all() and (runs["scenario"] == "single").all()
    assert sorted(runs["repeat"]) == [0, 1] and len(set(runs["key"])) == 2
    row = runs.iloc[0]
    doc = json.loads(subprocess.run(
        [str(BIN / "trace-analyze"), row["trace"], "--sharing", "--oracle", "--format",
         "json", "-q"], capture_output=True, text=True, check=True).stdout)
    assert doc["header"]["scenario"] == {"name": "single", "n": 1, "smp": 1}
    for an, res in doc["results"].items():
        for k, v in res["summary"].items():
            assert row[f"{an}.{k}"] == v, (an, k)
    assert shm() <= before and not qemu_writing(out)
    say(f"2 real recordings of single -n 1 on 2 workers in {time.monotonic() - t0:.0f} s "
        f"after an interrupted start, peak mmap/fork {int(row['sharing.peak_mmap_fork'])} "
        "pages")


def test_thesis_quick(tmp_path, say):
    """trace-study thesis --quick --miniatures: every configuration once, the report with its
    tables; the thesis's qualitative findings hold on the miniatures."""
    out = tmp_path / "thesis"
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "trace-study"), "thesis", "--quick", "--miniatures",
                        "-o", str(out),
                        "--workers", "2", "-q"], capture_output=True, text=True,
                       timeout=3600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    wall = time.monotonic() - t0
    runs = pd.read_parquet(out / "results" / "runs.parquet")
    assert len(runs) == 9 and set(runs["status"]) == {"done"}
    figs = ["no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps"]
    for _, row in runs.iterrows():
        v = [row[f"sharing.peak_{f}"] for f in figs]
        assert v[0] >= v[1] >= v[2] >= v[3] > 0, (row["run"], v)
        assert row["oracle.oracle_mean"] <= row["oracle.mmap_fork_mean"]
    for w in ("terminal-server", "zero-install", "game-server"):
        mf = runs[runs.workload == w].sort_values("n")["sharing.peak_mmap_fork"].tolist()
        assert mf[0] < mf[1] < mf[2], (w, mf)
    md = (out / "report" / "thesis.md").read_text()
    for head in ("## Table 5.1", "## Table 5.2", "## Table 5.3"):
        assert head in md
    assert "| mmap/fork | 1.00 (1.00) |" in md and "server-heap" in md
    for png in ("fig-5.3-terminal-server.png", "fig-5.4-zero-install.png",
                "fig-5.5-game-server.png", "fig-over-time.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    say(f"thesis --quick: 9 runs on 2 workers in {wall:.0f} s "
        f"({9 * 3600 / wall:.0f} runs per hour)")
