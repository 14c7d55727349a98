"""trace-study's machinery on a real Dask cluster, with command workloads that write synthetic
traces in a second: results, the Parquet dataset against trace-analyze's JSON, resumption,
failures, Ctrl-C, bad input. Most tests run ``trace-study`` in this process against the
session's shared cluster (``--scheduler``, conftest.py); one starts ``dask scheduler`` and
``dask worker`` processes and kills a worker mid-run. trace-study's own local cluster of worker
processes, and Ctrl-C to the whole process group, are tested with real recordings
(tests/e2e/studies)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from memtrace.studies import cli, cluster
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


def study(capsys, *args: str) -> tuple[int, str]:
    """trace-study in this process (``-q``): its exit status and what it wrote to stderr."""
    capsys.readouterr()
    rc = cli.run([*args, "-q"])
    return rc, capsys.readouterr().err


def runs_table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results" / "runs.parquet").set_index("run")


def test_study_on_two_workers_and_parquet_equals_json(tmp_path, capsys, scheduler):
    """The issue's "study of tiny runs on 2 workers": every summary, series and table in the
    dataset, read back with pandas, is what trace-analyze --format json says of the trace."""
    out = tmp_path / "out"
    rc, err = study(capsys, str(study_file(tmp_path)), "-o", str(out), "--scheduler", scheduler)
    assert rc == 0, err
    runs = runs_table(out)
    assert sorted(runs["n"].tolist()) == [2, 3] and set(runs["status"]) == {"done"}
    assert runs["trace"].str.startswith(str(out / "traces")).all()
    series = pd.read_parquet(out / "results" / "series.parquet")
    peaks = pd.read_parquet(out / "results" / "tables" / "sharing.figures_at_peak.parquet")
    for name, row in runs.iterrows():
        j = subprocess.run([str(BIN / "trace-analyze"), row["trace"], "--sharing", "--oracle",
                            "--format", "json", "-q"], capture_output=True, text=True,
                           check=True)
        doc = json.loads(j.stdout)
        for an, res in doc["results"].items():
            for k, v in res["summary"].items():
                got = row[f"{an}.{k}"]
                assert (got == v) or (v is None and pd.isna(got)), (an, k, got, v)
        mine = series[(series.run == name) & (series.analysis == "oracle")
                      & (series.table == "series")]
        js = doc["results"]["oracle"]["tables"]["series"]
        for fig in ("oracle", "mmap_fork", "no_sharing"):
            col = js["columns"].index(fig)
            assert mine[mine.figure == fig]["value"].tolist() == [
                float(x[col]) for x in js["rows"]]
            assert mine[mine.figure == fig]["t"].tolist() == [x[0] for x in js["rows"]]
        peak = peaks[peaks.run == name]
        assert peak.drop(columns="run").values.tolist() == \
            doc["results"]["sharing"]["tables"]["figures_at_peak"]["rows"]


def test_failing_run_is_reported_and_the_rest_go_on(tmp_path, capsys, scheduler):
    out = tmp_path / "out"
    rc, err = study(capsys, str(study_file(tmp_path, ["ok", "fail"], n="2")), "-o", str(out),
                    "--scheduler", scheduler)
    assert rc == 1
    assert "1 of 2 runs done, 1 failed" in err
    line = [ln for ln in err.splitlines() if ln.startswith("trace-study: failed:")]
    assert len(line) == 1 and "status 3" in line[0] and ".log" in line[0]
    runs = runs_table(out)
    assert sorted(runs["status"]) == ["done", "failed"]
    failed = runs[runs.status == "failed"].iloc[0]
    assert "told to fail" in failed["error"]
    assert pd.isna(failed["sharing.peak_mmap_fork"])
    assert runs[runs.status == "done"].iloc[0]["sharing.peak_mmap_fork"] > 0


def test_interrupted_study_resumes_and_skips_finished_runs(tmp_path, capsys, scheduler):
    """Ctrl-C (SIGINT to trace-study) while a run is midway: its command is stopped on the
    worker, the finished run is kept (dataset written); run again: the interrupted run is
    recorded again, the finished one not; a run whose recording finished but not its
    analysis is only analyzed."""
    out = tmp_path / "out"
    sf = study_file(tmp_path, "slow-once-3")
    state = tmp_path / "state-3"
    main = threading.main_thread().ident
    assert main is not None
    midway: list[bool] = []

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not midway:
            if state.exists() and list(out.glob("runs/syn-n2-*/analysis-*.json")):
                midway.append(True)
            time.sleep(0.1)
        signal.pthread_kill(main, signal.SIGINT)  # as Ctrl-C (also if it never got there)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    rc, err = study(capsys, str(sf), "-o", str(out), "--scheduler", scheduler)
    t.join()
    assert midway, "the runs did not start"
    assert rc == 130, err
    assert "1 of 2 runs done, interrupted" in err and "stopped 1 running command" in err
    with pytest.raises(ProcessLookupError):
        os.kill(int(state.read_text()), 0)  # the command the run was running is gone
    assert runs_table(out)["status"].tolist() == ["done"]
    trace2 = next((out / "traces").glob("syn-n2-*.mtr"))
    before = trace2.stat().st_mtime_ns
    rc, err = study(capsys, str(sf), "-o", str(out), "--scheduler", scheduler)
    assert rc == 0, err
    assert "2 runs, 1 already done, 1 to run" in err
    assert trace2.stat().st_mtime_ns == before
    runs = runs_table(out)
    assert sorted(runs["n"].tolist()) == [2, 3] and set(runs["status"]) == {"done"}
    next(out.glob("runs/syn-n3-*/analysis-*.json")).unlink()
    trace3 = next((out / "traces").glob("syn-n3-*.mtr"))
    before3 = trace3.stat().st_mtime_ns
    rc, err = study(capsys, str(sf), "-o", str(out), "--scheduler", scheduler)
    assert rc == 0 and "1 already done, 1 to run" in err, err
    assert trace3.stat().st_mtime_ns == before3
    assert runs_table(out).loc[runs.index, "oracle.oracle_min"].tolist() == \
        runs["oracle.oracle_min"].tolist()


def test_scheduler_and_worker_processes_and_a_worker_killed_mid_run(tmp_path, capsys):
    """The --scheduler path as on a cluster: `dask scheduler` and two `dask worker` processes,
    traces in a shared folder. One run's command kills its worker the first time: the
    worker's nanny starts a new one, the scheduler gives the run to a worker again, and the
    study finishes."""
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
        rc, err = study(capsys, str(study_file(tmp_path, ["ok", "die-once"], n="2")), "-o",
                        str(out), "--scheduler", address, "--traces", str(tmp_path / "shared"))
        assert rc == 0, err
        assert (tmp_path / "state-2").read_text() == "died\n"  # it did die once
        runs = runs_table(out)
        assert set(runs["status"]) == {"done"} and len(runs) == 2
        assert all(t.startswith(str(tmp_path / "shared")) for t in runs["trace"])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster.connect, "__defaults__", (1.0,))  # not 10 s in a test
    rc, err = study(capsys, str(study_file(tmp_path)), "-o", str(tmp_path / "o"),
                    "--scheduler", "127.0.0.1:9")
    assert rc == 1
    assert err.startswith("trace-study: error: cannot reach the Dask scheduler at "
                          "127.0.0.1:9"), err
    assert len(err.strip().splitlines()) == 1


def test_bad_study_file_is_one_line_and_status_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[workload]]\nscenario = "single"\nn = [1, 2]\nepochs = 3\n')
    r = trace_study(str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"trace-study: error: {p}:4: workload[1].epochs: unknown key: "
                                "not a trace-record option (see trace-record --help)")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_keeps_finished_runs(tmp_path, capsys, scheduler):
    """A study folder on a file system that fills up: a clear error, the finished runs' reports
    kept; with room again, the dataset is written without recording anything again."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "out"
        sf = study_file(tmp_path, analyses="[analyses.oracle]\n")
        rc, err = study(capsys, str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"),
                        "--scheduler", scheduler)
        assert rc == 0, err
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
        rc, err = study(capsys, str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"),
                        "--scheduler", scheduler)
        assert rc == 1
        said = [ln for ln in err.splitlines() if "error" in ln]
        assert len(said) == 1 and "No space left on device" in said[0], err
        assert sorted(out.glob("runs/*/analysis-*.json")) == reports
        filler.unlink()
        rc, err = study(capsys, str(sf), "-o", str(out), "--traces", str(tmp_path / "traces"),
                        "--scheduler", scheduler)
        assert rc == 0 and "2 already done, 0 to run" in err, err
        assert len(runs_table(out)) == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
