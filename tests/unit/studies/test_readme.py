"""The README's study file, pandas and DuckDB examples, run as they are written (the dataset's
path replaced by a small synthetic study's)."""

from __future__ import annotations

import re
import subprocess
import sys

from memtrace.studies import cli
from memtrace.studies.studyfile import parse
from tests.paths import REPO

README = (REPO / "README.md").read_text()


def block_after(marker: str) -> str:
    """The indented code block that follows ``marker``."""
    rest = README[README.index(marker):]
    m = re.search(r"\n\n((?:    .*\n|\n)+?)\n(?=\S)", rest)
    assert m, marker
    return "\n".join(ln[4:] for ln in m.group(1).splitlines())


def test_study_file_example_is_valid():
    st = parse(block_after("A study file (TOML"), "README.md")
    assert st.name == "ts-sweep" and st.analyses == ["sharing", "oracle", "ksm"]
    assert "--ksm-sweep" in st.analyze_argv
    assert len(st.runs()) == 3 * 2 * 3 + 2 * 3


def test_pandas_and_duckdb_examples_run_on_a_study(tmp_path, capsys, scheduler):
    sf = tmp_path / "ts-sweep.toml"
    sf.write_text("""\
[study]
name = "ts-sweep"
[[workload]]
name = "syn"
command = ["{python}", "-m", "memtrace.traces.synthetic", "{trace}", "--instances", "{n}"]
n = [2, 3]
[analyses.sharing]
[analyses.oracle]
""")
    out = tmp_path / "out" / "studies" / "ts-sweep"
    assert cli.run([str(sf), "-o", str(out), "--scheduler", scheduler, "-q"]) == 0, \
        capsys.readouterr().err
    for marker in ("With pandas:", "With DuckDB"):
        code = block_after(marker).replace("out/studies/ts-sweep", str(out))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, (marker, res.stderr)
    shown = subprocess.run([sys.executable, "-c", block_after("With DuckDB").replace(
        "out/studies/ts-sweep", str(out))], capture_output=True, text=True).stdout
    assert "oracle_mean" in shown and "peak_oracle" in shown
