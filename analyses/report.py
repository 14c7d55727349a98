"""Render analysis results: aligned text tables, CSV, JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from memtrace.analyses.base import Result, Table

TEXT_ROWS = 12  # series rows shown in text mode; CSV and JSON carry them all


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def text_table(t: Table, max_rows: int | None = TEXT_ROWS) -> str:
    rows = t.rows
    cut = max_rows is not None and len(rows) > max_rows
    if cut:
        half = max_rows // 2
        rows = rows[:half] + [["..."] * len(t.columns)] + rows[-half:]
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(t.columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(t.columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    if cut:
        lines.append(f"({len(t.rows)} rows; --format csv --table NAME prints them all)")
    return "\n".join(lines)


def render_text(results: Sequence[Result], header: dict[str, Any], path: str) -> str:
    out = [f"trace: {path}"]
    src = header.get("source", "?")
    scen = header.get("scenario") or {}
    out.append(f"source: {src}" + (f", scenario {scen.get('name')} n={scen.get('n')}"
                                   if scen else "") + f", clock: {header.get('clock_unit')}")
    for r in results:
        out.append("")
        out.append(f"== {r.name} ==")
        width = max((len(k) for k in r.summary), default=0)
        for k, v in r.summary.items():
            unit = r.units.get(k, "")
            out.append(f"  {k.ljust(width)}  {_fmt(v)} {unit}".rstrip())
        for name, t in r.tables.items():
            out.append("")
            out.append(f"  [{r.name}.{name}] {t.title}")
            out.append("  " + text_table(t).replace("\n", "\n  "))
        for n in r.notes:
            out.append(f"  note: {n}")
    return "\n".join(out) + "\n"


def render_csv(results: Sequence[Result], table: str | None) -> str:
    """One table as plain CSV (``--table analysis.name``), or every table in blocks."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    chosen = [(r, n, t) for r in results for n, t in r.tables.items()
              if table is None or table in (f"{r.name}.{n}", n)]
    if table is not None and not chosen:
        names = ", ".join(f"{r.name}.{n}" for r in results for n in r.tables)
        raise ValueError(f"no table {table!r}; tables: {names}")
    if table is None:
        w.writerow(["analysis", "key", "value", "unit"])
        for r in results:
            for k, v in r.summary.items():
                w.writerow([r.name, k, v, r.units.get(k, "")])
    for r, n, t in chosen:
        if table is None:
            buf.write(f"\n# {r.name}.{n}\n")
        w.writerow(t.columns)
        w.writerows(t.rows)
    return buf.getvalue()


def render_json(results: Sequence[Result], header: dict[str, Any], path: str,
                warnings: list[str]) -> str:
    doc = {
        "trace": path,
        "header": header,
        "warnings": warnings,
        "results": {r.name: {"summary": r.summary, "units": r.units, "notes": r.notes,
                             "tables": {n: {"title": t.title, "columns": t.columns,
                                            "rows": t.rows} for n, t in r.tables.items()}}
                    for r in results},
    }
    return json.dumps(doc, indent=1, default=str) + "\n"
