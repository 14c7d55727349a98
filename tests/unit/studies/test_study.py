"""trace-study's machinery on a real Dask LocalCluster (and a scheduler and workers started as
processes), with command workloads that write synthetic traces in a second: results, the
Parquet dataset against trace-analyze's JSON, resumption, failures, dying workers, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.paths import REPO

WORKLOAD = Path(__file__).with_name("workload.py")
BIN = Path(sys.executable).parent


def study_file(tmp: Path, how: str | list[str] = "ok", n: str = "[2, 3]",
               analyses: str = "[analyses.sharing]\n[analyses.oracle]\n") -> Path:
    hows = json.dumps(how)
    p = tmp / "s.toml"
    p.write_text(f"""\
[study]
name = "t"

[[workload]]
name = "syn"
command = ["{{python}}", "{WORKLOAD}", "{{trace}}", "{{n}}", "{{how}}", "{tmp}/state-{{n}}"]
n = {n}
how = {hows}

{analyses}""")
    return p


def trace_study(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "trace-study"), *args, "-q"], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, **kw)


def runs_table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results" / "runs.parquet").set_index("run")


def test_study_on_two_workers_and_parquet_equals_json(tmp_path):
    out = tmp_path / "out"
    r = trace_study(str(study_file(tmp_path)), "-o", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "local Dask cluster: 2 worker(s)" in r.stderr
    assert "Dask dashboard: http://127.0.0.1:" in r.stderr
    runs = runs_table(out)
    assert sorted(runs["n"].tolist()) == [2, 3] and set(runs["status"]) == {"done"}
    for name, row in runs.iterrows():
        j = subprocess.run([str(BIN / "trace-analyze"), row["trace"], "--sharing", "--oracle",
                            "--format", "json", "-q"], capture_output=True, text=True,
                           check=True)
        doc = json.loads(j.stdout)
        for an, res in doc["results"].items():
            for k, v in res["summary"].items():
                got = row[f"{an}.{k}"]
                assert (got == v) or (v is None and pd.isna(got)), (an, k, got, v)
        series = pd.read_parquet(out / "results" / "series.parquet")
        mine = series[(series.run == name) & (series.analysis == "oracle")
                      & (series.table == "series")]
        js = doc["results"]["oracle"]["tables"]["series"]
        for fig in ("oracle", "mmap_fork", "no_sharing"):
            col = js["columns"].index(fig)
            assert mine[mine.figure == fig]["value"].tolist() == [
                float(x[col]) for x in js["rows"]]
            assert mine[mine.figure == fig]["t"].tolist() == [x[0] for x in js["rows"]]
        peak = pd.read_parquet(out / "results" / "tables" / "sharing.figures_at_peak.parquet")
        peak = peak[peak.run == name]
        assert peak.drop(columns="run").values.tolist() == \
            doc["results"]["sharing"]["tables"]["figures_at_peak"]["rows"]


def test_failing_run_is_reported_and_the_rest_go_on(tmp_path):
    out = tmp_path / "out"
    r = trace_study(str(study_file(tmp_path, ["ok", "fail"], n="2")), "-o", str(out),
                    "--workers", "2")
    assert r.returncode == 1
    assert "1 of 2 runs done, 1 failed" in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("trace-study: failed:")]
    assert len(line) == 1 and "status 3" in line[0] and ".log" in line[0]
    runs = runs_table(out)
    assert sorted(runs["status"]) == ["done", "failed"]
    failed = runs[runs.status == "failed"].iloc[0]
    assert "told to fail" in failed["error"]
    assert pd.isna(failed["sharing.peak_mmap_fork"])
    assert runs[runs.status == "done"].iloc[0]["sharing.peak_mmap_fork"] > 0


def test_a_worker_that_dies_mid_run_is_replaced_and_its_run_retried(tmp_path):
    out = tmp_path / "out"
    r = trace_study(str(study_file(tmp_path, "die-once", n="2")), "-o", str(out),
                    "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "state-2").read_text() == "died\n"  # it did die once
    assert runs_table(out)["status"].tolist() == ["done"]


def test_interrupted_study_resumes_and_skips_finished_runs(tmp_path):
    """Ctrl-C while a run is midway: the finished run is kept (dataset written), nothing is
    left running; run again: the interrupted run is recorded again, the finished one not."""
    out = tmp_path / "out"
    sf = study_file(tmp_path, "slow-once-3")
    p = subprocess.Popen([str(BIN / "trace-study"), str(sf), "-o", str(out), "--workers", "2",
                          "-q"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    state = tmp_path / "state-3"
    deadline = time.monotonic() + 120
    done2 = list((out / "runs").glob("syn-n2-*/analysis-*.json")) if out.exists() else []
    while time.monotonic() < deadline and not (state.exists() and done2):
        time.sleep(0.2)
        done2 = list((out / "runs").glob("syn-n2-*/analysis-*.json"))
    assert state.exists() and done2, "the runs did not start"
    slow_pid = int(state.read_text())
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "1 of 2 runs done, interrupted" in err
    with pytest.raises(ProcessLookupError):
        os.kill(slow_pid, 0)  # the command the run was running is gone
    assert runs_table(out)["status"].tolist() == ["done"]
    trace2 = next((out / "traces").glob("syn-n2-*.mtr"))
    before = trace2.stat().st_mtime_ns
    r = trace_study(str(sf), "-o", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "2 runs, 1 already done, 1 to run" in r.stderr
    assert trace2.stat().st_mtime_ns == before
    runs = runs_table(out)
    assert sorted(runs["n"].tolist()) == [2, 3] and set(runs["status"]) == {"done"}
    # a recording that finished but whose analysis did not is only analyzed again
    (next((out / "runs").glob("syn-n3-*")) / next(
        (out / "runs").glob("syn-n3-*")).glob("analysis-*.json").__next__().name).unlink()
    trace3 = next((out / "traces").glob("syn-n3-*.mtr"))
    before3 = trace3.stat().st_mtime_ns
    r = trace_study(str(sf), "-o", str(out), "--workers", "1")
    assert r.returncode == 0 and "1 already done, 1 to run" in r.stderr
    assert trace3.stat().st_mtime_ns == before3


def test_scheduler_and_workers_started_as_processes(tmp_path):
    """The --scheduler path, as on a cluster: `dask scheduler` and `dask worker` processes."""
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file",
                               str(sched_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file),
                 "--nthreads", "1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        out = tmp_path / "out"
        r = trace_study(str(study_file(tmp_path)), "-o", str(out), "--scheduler", address,
                        "--traces", str(tmp_path / "shared"))
        assert r.returncode == 0, r.stderr
        runs = runs_table(out)
        assert set(runs["status"]) == {"done"} and len(runs) == 2
        assert all(t.startswith(str(tmp_path / "shared")) for t in runs["trace"])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_unreachable_scheduler_is_one_line(tmp_path):
    r = trace_study(str(study_file(tmp_path)), "-o", str(tmp_path / "o"), "--scheduler",
                    "127.0.0.1:9", timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("trace-study: error: cannot reach the Dask scheduler at "
                               "127.0.0.1:9"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_study_file_is_one_line_and_status_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[workload]]\nscenario = "single"\nn = [1, 2]\nepochs = 3\n')
    r = trace_study(str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"trace-study: error: {p}:4: workload[1].epochs: unknown key: "
                                "not a trace-record option (see trace-record --help)")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_keeps_finished_runs(tmp_path):
    """A study folder on a file system that fills up: a clear error, the finished runs' reports
    kept; with room again, the dataset is written without recording anything again."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "out"
        sf = study_file(tmp_path, analyses="[analyses.oracle]\n")
        r = trace_study(str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"),
                        "--workers", "2")
        assert r.returncode == 0, r.stderr
        (out / "results" / "runs.parquet").unlink()
        reports = sorted(out.glob("runs/*/analysis-*.json"))
        assert len(reports) == 2
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        os.close(fd)
        os.truncate(filler, filler.stat().st_size - 8192)  # room for study.json, not more
        r = trace_study(str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"))
        assert r.returncode == 1
        err = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(err) == 1 and "No space left on device" in err[0], r.stderr
        assert sorted(out.glob("runs/*/analysis-*.json")) == reports
        filler.unlink()
        r = trace_study(str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"))
        assert r.returncode == 0 and "2 already done, 0 to run" in r.stderr
        assert len(runs_table(out)) == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
