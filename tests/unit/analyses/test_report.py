"""The report's text and JSON (analyses/report.py), written out by hand for a small trace and a
made-up result: what a reader of the report sees, to the character."""

from __future__ import annotations

import json

from memtrace.analyses.base import Result, Table
from memtrace.analyses.engine import Replay
from memtrace.analyses.report import render_json, render_text
from memtrace.traces.reader import open_trace
from tests.helpers import Builder


def replayed(tmp_path):
    """A trace from time 100 to 350 without a guest clock, and its replay's context."""
    p = tmp_path / "r.mtr"
    b = Builder(p, scenario={"name": "x", "n": 2})
    b.at(100).page(1, 0xA).map(7, 0, 1)
    b.at(350)
    b.close()
    rp = Replay(open_trace(p), progress=False)
    rp.run()
    return str(p), rp.context


RESULT = Result(
    "demo", summary={"pages": 1234, "mean": 2.5, "big": 123456.7, "none": None},
    units={"pages": "pages"},
    tables={"t": Table(["t", "v"], [[i, i * i] for i in range(20)], "squares")},
    notes=["a note"])


def test_text_report(tmp_path):
    """The header lines describe the trace; summaries are aligned, floats below 10,000 keep 4
    significant digits and larger ones none, None is "-"; a table of 20 rows shows its first
    and last 6 around "..." and says how to get all of them."""
    path, ctx = replayed(tmp_path)
    # two spaces of indent, then columns right-aligned to their widest cell ("..." is 3 wide)
    rows = [f"  {i:>3}  {i * i:>3}" for i in range(6)] + ["  ...  ..."] + \
        [f"  {i:>3}  {i * i:>3}" for i in range(14, 20)]
    assert render_text([RESULT], ctx, path) == "\n".join([
        f"trace: {path}",
        "source: synthetic",
        "scenario: x n=2",
        "time base: instructions (the trace has no guest clock)",
        "length: 250 instructions",
        "",
        "== demo ==",
        "  pages  1,234 pages",
        "  mean   2.5",
        "  big    123,457",
        "  none   -",
        "",
        "  [demo.t] squares",
        "    t    v",
        *rows,
        "  (20 rows; --format csv --table NAME prints them all)",
        "  note: a note",
    ]) + "\n"


def test_json_report_time(tmp_path):
    path, ctx = replayed(tmp_path)
    doc = json.loads(render_json([RESULT], ctx, path, ["w"]))
    assert doc["time"] == {"base": "instructions", "seconds": None, "clock": 250,
                           "clock_unit": "instructions", "phases": []}
    assert doc["about"]["length"] == "250 instructions" and doc["warnings"] == ["w"]
    assert doc["results"]["demo"]["summary"] == RESULT.summary
    assert doc["results"]["demo"]["tables"]["t"]["rows"][19] == [19, 361]
