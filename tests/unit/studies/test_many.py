"""trace-analyze over several traces (Dask) and --format parquet: the combined table is each
trace's own, with a column naming the trace. One test runs trace-analyze as a command with its
own local cluster of worker processes; the others run it in this process against the
session's shared cluster (--scheduler, conftest.py)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from memtrace.analyses import cli
from memtrace.analyses.many import per_trace_argv
from tests.paths import SAMPLES

BIN = Path(sys.executable).parent
A = str(SAMPLES / "default.mtr")
B = str(SAMPLES / "synthetic-zero-install.mtr")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "trace-analyze"), *args, "-q"], capture_output=True,
                          text=True, timeout=300)


def analyze_here(capsys, *args: str) -> tuple[int, str, str]:
    """trace-analyze in this process (-q): status, stdout, stderr."""
    capsys.readouterr()
    rc = cli.run([*args, "-q"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_per_trace_argv_keeps_the_analysis_options():
    argv = ["a.mtr", "--sharing", "--format=csv", "--table", "sharing.series", "b.mtr",
            "--interval", "1s", "-o", "x.csv", "--scheduler", "h:1", "--workers", "2"]
    assert per_trace_argv(argv, ["a.mtr", "b.mtr"]) == ["--sharing", "--interval", "1s"]


def test_two_traces_one_table_with_the_trace_column(capsys):
    both = analyze(A, B, "--sharing", "--format", "csv", "--table", "figures_at_peak",
                   "--workers", "2")
    assert both.returncode == 0, both.stderr
    rows = list(csv.reader(io.StringIO(both.stdout)))
    assert rows[0] == ["trace", "figure", "pages", "MiB", "relative_to_mmap_fork"]
    for t in (A, B):
        rc, one, _ = analyze_here(capsys, t, "--sharing", "--format", "csv", "--table",
                                  "figures_at_peak")
        own = list(csv.reader(io.StringIO(one)))[1:]
        assert [r[1:] for r in rows[1:] if r[0] == t] == own


def test_quoted_glob_and_text_summary(capsys, scheduler):
    rc, out, err = analyze_here(capsys, str(SAMPLES / "*.mtr"), "--oracle", "--scheduler",
                                scheduler)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "== oracle =="
    assert lines[1].split()[:2] == ["trace", "oracle_min"]
    assert any(ln.strip().startswith(A) and " 447 " in ln for ln in lines)


def test_parquet_of_one_trace_equals_its_json(tmp_path, capsys):
    rc, _, err = analyze_here(capsys, A, "--format", "parquet", "-o", str(tmp_path / "ds"))
    assert rc == 0, err
    doc = json.loads(analyze_here(capsys, A, "--format", "json")[1])
    runs = pd.read_parquet(tmp_path / "ds" / "runs.parquet")
    assert runs["trace"].tolist() == [A]
    for an, res in doc["results"].items():
        for k, v in res["summary"].items():
            assert runs.iloc[0][f"{an}.{k}"] == v, (an, k)
    lifetimes = pd.read_parquet(tmp_path / "ds" / "tables" /
                                "snapshot_vs_continuous.lifetimes.parquet")
    js = doc["results"]["snapshot_vs_continuous"]["tables"]["lifetimes"]
    assert lifetimes.columns.tolist() == ["run", *js["columns"]]
    assert lifetimes.drop(columns="run").values.tolist() == js["rows"]


def test_bad_input(tmp_path, capsys, scheduler):
    rc, _, err = analyze_here(capsys, A, B, "--plot", str(tmp_path / "p.png"))
    assert rc == 2 and "--plot draws one trace" in err
    rc, _, err = analyze_here(capsys, A, "--format", "parquet")
    assert rc == 2 and "give its folder with -o DIR" in err
    rc, _, err = analyze_here(capsys, str(tmp_path / "none-*.mtr"), "--oracle")
    assert rc == 2 and "no trace matches" in err
    bad = tmp_path / "bad.mtr"
    bad.write_bytes(b"not a trace")
    rc, out, err = analyze_here(capsys, A, str(bad), "--oracle", "--scheduler", scheduler)
    assert rc == 1
    said = err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"trace-analyze: error: {bad}: "), err
    assert out.splitlines()[0] == "== oracle ==" and A in out
