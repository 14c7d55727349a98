"""trace-analyze over several traces (in parallel on Dask), and ``--format parquet``.

    trace-analyze A.mtr B.mtr ... [analyses and options]     one combined report
    trace-analyze 'out/*.mtr' --format parquet -o DIR         a Parquet dataset

Each trace is one ``trace-analyze --format json`` with the same analyses and options, run as
a task on a Dask cluster (``memtrace.studies.cluster``: a local one with a worker per core, or
``--scheduler ADDRESS``); one trace with ``--format parquet`` needs no cluster. The reports are
combined into one table with a column naming the trace: ``text`` and ``csv`` give every
summary (a row per trace; ``--table NAME`` gives that table of every trace), ``json`` the
reports under their traces, ``parquet`` the dataset of ``memtrace.studies.dataset``. A trace
that fails is reported on one line and the others still are (status 1).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from memtrace.analyses.base import Table, UsageError
from memtrace.analyses.report import render_csv, text_table

#: options that belong to the combined output, not to each trace's analysis
OWN = {"--format", "-o", "--output", "--scheduler", "--workers", "--table"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("several traces (in parallel on Dask)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="analyze on an existing Dask cluster (default: a local one)")
    g.add_argument("--workers", type=int, metavar="N", default=None,
                   help="local cluster: N workers (default: one per core)")


def wanted(a: argparse.Namespace) -> bool:
    """Whether the arguments ask for this module: several traces, a pattern, parquet, or a
    cluster."""
    return len(a.trace) > 1 or a.format == "parquet" or bool(a.scheduler) or any(
        glob.has_magic(t) and not Path(t).exists() for t in a.trace)


def expand(patterns: list[str]) -> list[str]:
    """Trace paths; a pattern the shell left alone (quoted) is expanded here."""
    out: list[str] = []
    for p in patterns:
        if glob.has_magic(p) and not Path(p).exists():
            hits = sorted(glob.glob(p))
            if not hits:
                raise UsageError(f"{p}: no trace matches")
            out += hits
        else:
            out.append(p)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def per_trace_argv(argv: list[str], traces: list[str]) -> list[str]:
    """The command line each trace gets: the user's, without the traces and the options of
    the combined output."""
    out: list[str] = []
    skip = False
    names = set(traces)
    for tok in argv:
        if skip:
            skip = False
            continue
        opt = tok.split("=", 1)[0]
        if opt in OWN:
            skip = "=" not in tok
            continue
        if tok in names:
            continue
        out.append(tok)
    return out


def run_many(a: argparse.Namespace, argv: list[str]) -> int:
    from memtrace.studies import tasks

    if a.plot:
        raise UsageError("--plot draws one trace; give one trace (or use trace-study's report)")
    if a.format == "parquet" and not a.output:
        raise UsageError("--format parquet writes a dataset: give its folder with -o DIR")
    if a.table and a.format not in ("csv", "parquet"):
        raise UsageError("--table needs --format csv")
    traces = expand(a.trace)
    for t in traces:
        if not Path(t).is_file():
            raise UsageError(f"{t}: no such trace file")
    each = per_trace_argv(argv, a.trace)
    docs: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    if len(traces) == 1 and not a.scheduler:
        try:
            docs[traces[0]] = tasks.analyze({"trace": traces[0]}, each)
        except tasks.RunFailed as e:
            errors[traces[0]] = str(e)
    else:
        analyze_on_dask(a, traces, each, docs, errors)
    for t, e in errors.items():
        print(f"trace-analyze: error: {t}: {one_line(e)}", file=sys.stderr)
    ordered = [(t, docs[t]) for t in traces if t in docs]
    if ordered:
        write(a, ordered)
    return 1 if errors else 0


def analyze_on_dask(a: argparse.Namespace, traces: list[str], each: list[str],
                    docs: dict[str, dict[str, Any]], errors: dict[str, str]) -> None:
    from dask.distributed import Client, as_completed
    from tqdm import tqdm

    from memtrace.studies import cluster, tasks

    lc = None
    if a.scheduler:
        client = cluster.connect(a.scheduler)
    else:
        sizing = cluster.size_local(0, 1, a.workers)
        sizing.workers = min(sizing.workers, len(traces))
        lc = cluster.local_cluster(sizing)
        client = Client(lc)
    try:
        futures = {client.submit(tasks.analyze, {"trace": os.path.abspath(t), "label": t},
                                 each, key=f"analyze-{i}-{Path(t).name}", pure=False): t
                   for i, t in enumerate(traces)}
        bar = tqdm(total=len(traces), unit="trace", file=sys.stderr,
                   disable=a.quiet or not (a.progress or sys.stderr.isatty()))
        try:
            for f in as_completed(futures):
                t = futures[f]
                if f.status == "finished":
                    docs[t] = f.result()
                else:
                    errors[t] = str(f.exception())
                bar.update(1)
        except KeyboardInterrupt:
            client.cancel(list(futures))
            client.run(tasks.stop_commands)
            raise
        finally:
            bar.close()
    finally:
        client.close()
        if lc is not None:
            lc.close()


def one_line(e: str) -> str:
    lines = [ln for ln in e.splitlines() if ln.strip()]
    said = [ln for ln in lines if "error:" in ln]
    return (said[-1].split("error: ", 1)[-1] if said else lines[0] if lines else "failed")


def summaries(ordered: list[tuple[str, dict[str, Any]]]) -> dict[str, Table]:
    """Per analysis, a table of its summaries with a row per trace."""
    out: dict[str, Table] = {}
    for _t, doc in ordered:
        for name, res in doc["results"].items():
            tab = out.setdefault(name, Table(["trace"], [], f"{name}: summaries per trace"))
            for k in res["summary"]:
                if k not in tab.columns:
                    tab.columns.append(k)
    for t, doc in ordered:
        for name, res in doc["results"].items():
            tab = out[name]
            tab.rows.append([t] + [res["summary"].get(c) for c in tab.columns[1:]])
    return out


def combined_table(ordered: list[tuple[str, dict[str, Any]]], name: str) -> Table:
    """One table (``analysis.table`` or ``table``) of every trace, ``trace`` first."""
    cols: list[str] | None = None
    rows: list[list[Any]] = []
    for t, doc in ordered:
        for an, res in doc["results"].items():
            for tn, tab in res["tables"].items():
                if name in (f"{an}.{tn}", tn):
                    if cols is None:
                        cols = ["trace", *tab["columns"]]
                    rows += [[t, *r] for r in tab["rows"]]
    if cols is None:
        names = sorted({f"{an}.{tn}" for _, d in ordered for an, r in d["results"].items()
                        for tn in r["tables"]})
        raise UsageError(f"no table {name!r}; tables: {', '.join(names)}")
    return Table(cols, rows, name)


def write(a: argparse.Namespace, ordered: list[tuple[str, dict[str, Any]]]) -> None:
    if a.format == "parquet":
        from memtrace.studies import dataset

        entries = [({"run": t, "trace": t}, doc) for t, doc in ordered]
        files = dataset.write(a.output, dataset.frames(entries))
        print(f"trace-analyze: wrote {len(files)} Parquet files to {a.output}",
              file=sys.stderr)
        return
    if a.format == "json":
        out = json.dumps({"traces": [{"trace": t, **d} for t, d in ordered]}, indent=1,
                         default=str) + "\n"
    elif a.format == "csv":
        if a.table:
            out = render_csv([_as_result("combined", {"t": combined_table(ordered, a.table)})],
                             "t")
        else:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["trace", "analysis", "key", "value", "unit"])
            for t, doc in ordered:
                for name, res in doc["results"].items():
                    for k, v in res["summary"].items():
                        w.writerow([t, name, k, v, res["units"].get(k, "")])
            out = buf.getvalue()
    else:
        parts = []
        for name, tab in summaries(ordered).items():
            parts.append(f"== {name} ==\n" + text_table(tab, None))
        out = "\n\n".join(parts) + "\n"
    if a.output:
        Path(a.output).write_text(out)
    else:
        sys.stdout.write(out)


def _as_result(name: str, tables: dict[str, Table]) -> Any:
    from memtrace.analyses.base import Result

    return Result(name, tables=tables)

