"""trace-analyze's reports as one Parquet dataset (pyarrow): tables, not text.

A dataset is a folder:

- ``runs.parquet``: a row per run (or per trace): ``run``, ``trace``, the run's parameters,
  ``status`` (done / failed), and every summary of every analysis as a column named
  ``ANALYSIS.KEY`` (``sharing.peak_mmap_fork``, ``oracle.oracle_mean``, ...);
- ``series.parquet``: every time series (a table whose first column is the trace time ``t``)
  in long form: ``run, analysis, table, t, t_end, seconds, seconds_end, phase, figure,
  value``; one row per sample and figure (``figure`` is the series' column, e.g.
  ``mmap_fork``), so that one filter picks a curve;
- ``tables/ANALYSIS.TABLE.parquet``: every other table (``sharing.figures_at_peak``,
  ``sharing.shareable_by_type``, ...) as trace-analyze gives it, with ``run`` first.

The numbers are those of ``trace-analyze --format json`` unchanged (a test holds them equal).
Files are written to a temporary name and renamed, so a reader never sees half a file; a full
disk leaves the previous dataset (and every run's JSON report) as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TIME_COLUMNS = ("t", "t_end", "seconds", "seconds_end", "phase")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_columns(doc: dict[str, Any]) -> dict[str, Any]:
    """A report's summaries as flat columns ``ANALYSIS.KEY``."""
    out: dict[str, Any] = {}
    for name, res in doc.get("results", {}).items():
        for k, v in res.get("summary", {}).items():
            out[f"{name}.{k}"] = v
    return out


def about_columns(doc: dict[str, Any]) -> dict[str, Any]:
    """What the trace is: its length in guest seconds and clock units, its source."""
    t = doc.get("time", {})
    h = doc.get("header", {})
    return {"guest_seconds": t.get("seconds"), "clock": t.get("clock"),
            "clock_unit": t.get("clock_unit"), "source": h.get("source"),
            "warnings": len(doc.get("warnings", [])) + len(doc.get("analyze_warnings", []))}


def frames(entries: Iterable[tuple[dict[str, Any], dict[str, Any] | None]]) -> dict[str, Any]:
    """``entries``: (the run's columns, its trace-analyze JSON report or None if it failed).
    The dataset's tables as pandas DataFrames: ``runs``, ``series``, ``tables/NAME``."""
    import pandas as pd

    runs: list[dict[str, Any]] = []
    series: list[Any] = []
    tables: dict[str, list[Any]] = {}
    for row, doc in entries:
        r = dict(row)
        if doc is not None:
            r |= about_columns(doc) | summary_columns(doc)
        runs.append(r)
        if doc is None:
            continue
        run = row["run"]
        for name, res in doc.get("results", {}).items():
            for tname, t in res.get("tables", {}).items():
                cols, rows = t["columns"], t["rows"]
                df = pd.DataFrame(rows, columns=cols)
                if cols and cols[0] == "t":
                    series.append(melt(df, run, name, tname))
                else:
                    df.insert(0, "run", run)
                    tables.setdefault(f"{name}.{tname}", []).append(df)
    out: dict[str, Any] = {"runs": clean(pd.DataFrame(runs))}
    cols = ["run", "analysis", "table", *TIME_COLUMNS, "figure", "value"]
    out["series"] = clean(pd.concat(series, ignore_index=True) if series
                          else pd.DataFrame(columns=cols))
    for name, dfs in tables.items():
        out[f"tables/{name}"] = clean(pd.concat(dfs, ignore_index=True))
    return out


def melt(df: Any, run: str, analysis: str, table: str) -> Any:
    """A series in long form: one row per sample and numeric column."""
    import pandas as pd

    ids = [c for c in TIME_COLUMNS if c in df.columns]
    values = [c for c in df.columns if c not in ids
              and all(_is_number(v) or v is None for v in df[c].tolist())]
    long = df.melt(id_vars=ids, value_vars=values, var_name="figure", value_name="value")
    for c in TIME_COLUMNS:
        if c not in long.columns:
            long[c] = None
    long["value"] = pd.to_numeric(long["value"], errors="coerce").astype("float64")
    for c in ("seconds", "seconds_end"):
        long[c] = pd.to_numeric(long[c], errors="coerce").astype("float64")
    for c in ("t", "t_end"):
        long[c] = pd.to_numeric(long[c], errors="coerce").astype("Int64")
    long.insert(0, "table", table)
    long.insert(0, "analysis", analysis)
    long.insert(0, "run", run)
    return long[["run", "analysis", "table", *TIME_COLUMNS, "figure", "value"]]


def clean(df: Any) -> Any:
    """Columns Parquet can hold: numbers stay numbers (None -> null), a column of mixed kinds
    (a number in one run, a string in another) becomes text."""
    import pandas as pd

    for c in df.columns:
        s = df[c]
        if s.dtype != object:
            continue
        vals = [v for v in s.tolist() if v is not None and not (
            isinstance(v, float) and math.isnan(v))]
        if vals and all(isinstance(v, bool) for v in vals):
            df[c] = s.astype("boolean")
        elif vals and all(_is_number(v) for v in vals):
            if all(isinstance(v, int) for v in vals):
                df[c] = s.astype("Int64")
            else:
                df[c] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif vals and not all(isinstance(v, str) for v in vals):
            df[c] = [None if v is None else str(v) for v in s.tolist()]
    return df


def write(folder: str | Path, tables: dict[str, Any]) -> list[Path]:
    """Write the tables as ``folder/NAME.parquet`` (each atomically; other ``.parquet`` files
    in ``folder`` are removed: they were an earlier dataset's); the files written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    written = []
    for name, df in tables.items():
        path = folder / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append(path)
    for old in folder.rglob("*.parquet"):  # tables of an earlier run that this one lacks
        if old not in written:
            old.unlink()
    return written
