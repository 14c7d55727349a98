"""Render analysis results: aligned text tables, CSV, JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from memtrace.analyses.base import Context, Result, Table

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


def describe(ctx: Context) -> dict[str, Any]:
    """What the report is about, once at its top: source, scenario, guest image, time base,
    length, phases."""
    tr = ctx.trace
    h = tr.header
    tb = ctx.time
    span = tr.t_end - tr.t_begin
    out: dict[str, Any] = {"source": h.get("source", "?")}
    if h.get("mode"):
        out["source"] += f" ({h['mode']} mode" + (
            f", epochs of {h['epoch_length']:,} {tb.unit})" if h.get("epoch_length") else ")")
    scen = h.get("scenario") or {}
    if scen:
        out["scenario"] = " ".join([str(scen.get("name"))] + [
            f"{k}={v}" for k, v in scen.items() if k != "name"])
    img = h.get("guest_image") or {}
    if img:
        out["guest"] = (f"Debian {img.get('suite', '?')}, kernel {img.get('kernel_release', '?')}"
                        + (f", packages from {img['lock']}" if img.get("lock") else ""))
    out["time_base"] = tb.describe()
    out["length"] = (f"{float(tb.to_seconds(tr.t_end)):,.3f} guest seconds, " if tb.seconds
                     else "") + f"{span:,} {tb.unit}"
    phases = tr.phases()
    if phases:
        fmt = "{:,.2f}" if tb.seconds else "{:,.0f}"
        out["phases"] = ", ".join(
            f"{p.name or '(unnamed)'} {fmt.format(float(tb.x(p.t_start)))}-"
            f"{fmt.format(float(tb.x(p.t_end)))}" for p in phases) + (
            " s" if tb.seconds else f" {tb.unit} from the start")
    return out


def render_text(results: Sequence[Result], ctx: Context, path: str) -> str:
    out = [f"trace: {path}"]
    for k, v in describe(ctx).items():
        out.append(f"{k.replace('_', ' ')}: {v}")
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


def render_json(results: Sequence[Result], ctx: Context, path: str,
                warnings: list[str]) -> str:
    tb = ctx.time
    tr = ctx.trace
    doc = {
        "trace": path,
        "header": tr.header,
        "about": describe(ctx),
        "time": {"base": "guest seconds" if tb.seconds else tb.unit,
                 "seconds": float(tb.to_seconds(tr.t_end)) if tb.seconds else None,
                 "clock": tr.t_end - tr.t_begin, "clock_unit": tb.unit,
                 "phases": [{"name": p.name, "t_start": p.t_start, "t_end": p.t_end}
                            for p in tr.phases()]},
        "warnings": warnings,
        "results": {r.name: {"summary": r.summary, "units": r.units, "notes": r.notes,
                             "tables": {n: {"title": t.title, "columns": t.columns,
                                            "rows": t.rows} for n, t in r.tables.items()}}
                    for r in results},
    }
    return json.dumps(doc, indent=1, default=str) + "\n"
