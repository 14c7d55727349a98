"""trace-study: many recordings and analyses on Dask, the results as a Parquet dataset.

    trace-study STUDY.toml          a study file (memtrace.studies.studyfile says what it holds)
    trace-study thesis [--quick] [--miniatures]   the thesis's evaluation (Tables 5.1-5.3)

Runs go on a LocalCluster sized to this machine (one guest per core, as memory allows), or on
an existing Dask cluster with --scheduler. Running a study again skips its finished runs.
Exit status: 0 all runs done, 1 some failed, 2 a bad study file or option, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from memtrace.analyses.base import positive_int
from memtrace.studies.cluster import ClusterError
from memtrace.studies.runner import StudyFailure, StudyRunner, say
from memtrace.studies.studyfile import Study, StudyError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trace-study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a study file (.toml), or 'thesis' for the built-in study")
    ap.add_argument("--quick", action="store_true",
                    help="thesis: one run per configuration instead of six (for CI)")
    ap.add_argument("--miniatures", action="store_true",
                    help="thesis: the miniature scenarios (Python per user, server-heap) "
                         "instead of the desktop and game servers on real software: minutes "
                         "instead of hours (CI)")
    ap.add_argument("--repeats", type=positive_int, default=None, metavar="K",
                    help="runs of every configuration (overrides the study's)")
    ap.add_argument("-o", "--out", metavar="DIR",
                    help="the study's folder (default: out/studies/NAME)")
    ap.add_argument("--traces", metavar="DIR",
                    help="where workers write traces: a folder every worker reaches (a shared "
                         "folder on a cluster; default: DIR/traces)")
    ap.add_argument("--scheduler", metavar="ADDRESS",
                    help="an existing Dask scheduler (host:port) instead of a local cluster")
    ap.add_argument("--workers", type=positive_int, default=None, metavar="N",
                    help="local cluster: N workers (default: one per core, as memory allows)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--progress", action="store_true",
                    help="show the progress bar even when stderr is not a terminal")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the runs and exit (nothing is started)")
    return ap


def load_study(a: argparse.Namespace) -> Study:
    if a.study == "thesis":
        from memtrace.studies.thesis import thesis_study

        return thesis_study(quick=a.quick, repeats=a.repeats, miniatures=a.miniatures)
    if a.quick or a.miniatures:
        raise StudyError(a.study, 0, "", "--quick and --miniatures are for the built-in "
                         "thesis study; give --repeats for a study file")
    from memtrace.studies.studyfile import load

    return load(a.study, a.repeats)


def guest_needs(study: Study) -> tuple[int, int]:
    """The largest guest RAM of the study's recordings and how many copies of it sit in
    /dev/shm at once (2 with --verify: the stop image)."""
    from memtrace.tracer.qemu import parse_size

    ram, copies = 512 << 20, 1
    for s in study.runs():
        if s.kind == "record":
            ram = max(ram, parse_size(str(s.canonical.get("ram", "512M"))))
            if s.canonical.get("verify"):
                copies = 2
    return ram, copies


def open_cluster(a: argparse.Namespace, study: Study) -> tuple[Any, Any]:
    """(client, local cluster or None)."""
    from memtrace.studies import cluster

    if a.scheduler:
        if a.workers:
            raise ClusterError("--workers is for the local cluster; an existing cluster has "
                               "the workers it was started with")
        return cluster.connect(a.scheduler), None
    from dask.distributed import Client

    ram, copies = guest_needs(study)
    sizing = cluster.size_local(ram, copies, a.workers)
    say(f"local Dask cluster: {sizing.why}")
    cluster.become_subreaper()
    lc = cluster.local_cluster(sizing)
    client = Client(lc)
    cluster.ignore_interrupts(client)
    return client, lc


def run(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        study = load_study(a)
    except StudyError as e:
        print(f"trace-study: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out or f"out/studies/{study.name}")
    if a.dry_run:
        for s in study.runs():
            print(f"{s.label()}: {'trace-record' if s.kind == 'record' else 'command'} "
                  f"{' '.join(s.argv)}")
        print(f"analyses: trace-analyze {' '.join(study.analyze_argv) or '(defaults)'}")
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"trace-study: error: cannot create {out}: {e.strerror}", file=sys.stderr)
        return 2
    client = lc = None
    try:
        try:
            client, lc = open_cluster(a, study)
        except KeyboardInterrupt:
            return 130
        from memtrace.studies.cluster import dashboard

        link = dashboard(client)
        say(f"Dask dashboard: {link}" if link else
            "no Dask dashboard (pip install bokeh for one)")
        runner = StudyRunner(study, out, client, Path(a.traces) if a.traces else None,
                             progress=True if a.progress else (False if a.quiet else None))
        runner.execute()
    except (ClusterError, StudyFailure) as e:
        print(f"trace-study: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder that cannot be written
        where = f" ({e.filename})" if e.filename else ""
        print(f"trace-study: error: {e.strerror or e}{where}; every finished run is kept in "
              f"{out / 'runs'} and is not run again", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            if client is not None:
                client.close()
        with contextlib.suppress(Exception):
            if lc is not None:
                lc.close()
        if lc is not None:
            from memtrace.studies.cluster import reap
            from memtrace.studies.guard import GRACE

            reap(GRACE + 30)
    return conclude(runner, study, out)


def conclude(runner: StudyRunner, study: Study, out: Path) -> int:
    """Write the dataset (and the thesis's report), say what happened; the exit status."""
    try:
        files = runner.write_results()
    except OSError as e:
        print(f"trace-study: error: writing the dataset in {out / 'results'} failed: "
              f"{e.strerror or e}; every finished run's report is kept in {out / 'runs'}, "
              "so running the study again (with room) writes it without recording again",
              file=sys.stderr)
        return 1
    runs = runner.runs
    done = sum(1 for r in runs if r.status in ("done", "skipped"))
    failed = [r for r in runs if r.status == "failed"]
    if files:
        say(f"dataset: {out / 'results'} ({len(files)} Parquet files)")
    if study.builtin == "thesis" and done:
        from memtrace.studies.report import write_thesis_report

        try:
            md = write_thesis_report(out, runner)
            say(f"report: {md}")
        except OSError as e:
            print(f"trace-study: error: writing the report failed: {e.strerror or e}",
                  file=sys.stderr)
            return 1
    say(f"{done} of {len(runs)} runs done" + (f", {len(failed)} failed" if failed else "")
        + (", interrupted" if runner.interrupted else ""))
    for r in failed:
        print(f"trace-study: failed: {r.name}: {r.error}", file=sys.stderr)
    if runner.interrupted:
        return 130
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("trace-study: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
