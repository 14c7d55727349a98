"""trace-analyze: replay a memory trace once and report sharing over time.

Figures (thesis eq. 4.6-4.9, all in 4 KiB pages and MiB):
  no sharing     sum over address spaces of the frames each maps (a frame mapped by k counts k)
  mmap/fork      distinct frames mapped: what Linux already shares
  KSM hint all   named frames + distinct contents among anonymous frames: an ideal KSM
  full CBPS      distinct contents among all mapped frames, named or anonymous
  oracle         full CBPS at every change in the trace: the least memory any page-granular
                 deduplication could use at that instant
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memtrace.analyses import many
from memtrace.analyses.base import Analysis, Interval, Result, UsageError
from memtrace.analyses.engine import Replay
from memtrace.analyses.registry import ANALYSES
from memtrace.analyses.report import describe, render_csv, render_json, render_text
from memtrace.traces.format import events_lost, lost_source_name
from memtrace.traces.reader import TraceError, open_trace

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "traces" / "samples"
DEFAULT_TRACE = SAMPLES_DIR / "default.mtr"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="trace-analyze", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="*", default=[],
                    help=f"trace file (default: the shipped sample, {DEFAULT_TRACE.name}); "
                         "several (or a quoted glob): analyzed in parallel, one combined table")
    g = ap.add_argument_group("analyses (default: " + ", ".join(
        c.flag for c in ANALYSES if c.default) + ")")
    for cls in ANALYSES:
        g.add_argument(cls.flag, action="store_true", dest=cls.flag_dest(), help=cls.help)
    ap.add_argument("--interval", type=Interval.parse, default=None, metavar="T",
                    help="sampling interval: clock units (suffix k/M/G, e.g. 10M) or seconds "
                         "(e.g. 2.5s); default: 1/100 of the trace for --sharing, 1/20 for "
                         "--snapshot-vs-continuous")
    ap.add_argument("--format", choices=("text", "csv", "json", "parquet"), default="text",
                    help="parquet: a dataset in the folder -o DIR (analyses/many.py)")
    ap.add_argument("--table", metavar="NAME",
                    help="with --format csv: print only this table, e.g. sharing.series")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="draw the analyses' pictures to a PNG (one panel each)")
    ap.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    ap.add_argument("--salvage", action="store_true",
                    help="analyze a trace with a corrupt chunk up to that chunk")
    ap.add_argument("--add-checkpoints", type=int, metavar="N", default=None,
                    help="append a seek checkpoint after every N chunks of the trace and exit")
    ap.add_argument("--show-page", metavar="HASH", default=None,
                    help="print a hex dump of one content from the trace's content store and "
                         "exit (HASH: 32 hex digits or a unique prefix, as --top prints them)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--progress", action="store_true",
                    help="show the progress bar even when stderr is not a terminal (logs)")
    for cls in ANALYSES:
        cls.add_arguments(ap)
    many.add_arguments(ap)
    return ap


def fail(msg: str, code: int = 1) -> int:
    print(f"trace-analyze: error: {msg}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    a = build_parser().parse_intermixed_args(argv)
    a.trace = a.trace or [str(DEFAULT_TRACE)]
    if many.wanted(a):
        try:
            return many.run_many(a, sys.argv[1:] if argv is None else argv)
        except UsageError as e:
            return fail(str(e), 2)
    path = a.trace[0]
    if a.add_checkpoints is not None:
        from memtrace.analyses.checkpoints import add_checkpoints

        if a.add_checkpoints < 1:
            return fail("--add-checkpoints needs N >= 1", 2)
        n = add_checkpoints(path, a.add_checkpoints, progress=not a.quiet)
        print(f"{path}: added {n} checkpoints")
        return 0
    if a.show_page is not None:
        from memtrace.analyses.attribution import PageNotFound, show_page

        try:
            sys.stdout.write(show_page(path, a.show_page))
        except PageNotFound as e:
            return fail(str(e))
        return 0
    classes = [c for c in ANALYSES if c.selected(a)] or [c for c in ANALYSES if c.default]
    if a.table and a.format != "csv":
        return fail("--table needs --format csv", 2)
    try:
        analyses: list[Analysis] = [c.from_args(a) for c in classes]
        if a.plot:
            from memtrace.analyses.plot import PlotError, check_matplotlib

            try:
                check_matplotlib()
            except PlotError as e:
                return fail(str(e))
        trace = open_trace(path)
        for w in trace.warnings:
            print(f"warning: {w}", file=sys.stderr)
        seen = len(trace.warnings)
        progress = True if a.progress else (False if a.quiet else None)
        replay = Replay(trace, analyses, salvage=a.salvage, progress=progress,
                        interval=a.interval)
        replay.run()
    except UsageError as e:
        return fail(str(e), 2)
    for w in trace.warnings[seen:]:
        print(f"warning: {w}", file=sys.stderr)
    st = replay.state
    if st.incomplete:
        print(f"warning: {path}: the recorder marked this trace incomplete: {st.incomplete}",
              file=sys.stderr)
    lost = events_lost(st.lost)
    if lost:
        names = ", ".join(f"{lost_source_name(k)}: {v:,}" for k, v in sorted(st.lost.items()))
        print(f"warning: {path}: {lost:,} guest events were lost while recording (LOST "
              f"records: {names}; ring-full drops also show as sequence gaps, so the larger of "
              "the two counts)", file=sys.stderr)
    results: list[Result] = [x.result() for x in analyses]
    if a.format == "text":
        out = render_text(results, replay.context, path)
    elif a.format == "json":
        out = render_json(results, replay.context, path, trace.warnings)
    else:
        try:
            out = render_csv(results, a.table)
        except ValueError as e:
            return fail(str(e), 2)
    if a.output:
        try:
            Path(a.output).write_text(out)
        except OSError as e:
            return fail(f"cannot write {a.output}: {e.strerror}")
    else:
        sys.stdout.write(out)
    if a.plot:
        from memtrace.analyses.plot import PlotError, draw

        try:
            about = describe(replay.context)
            draw(a.plot, [(x, x.plots(r)) for x, r in zip(analyses, results, strict=True)],
                 replay.context, Path(path).name + (f": {about['scenario']}"
                                                    if "scenario" in about else ""))
        except PlotError as e:
            return fail(str(e))
        print(f"plot written to {a.plot}", file=sys.stderr)
    return 130 if replay.interrupted else 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except TraceError as e:
        code = fail(str(e))
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    except BrokenPipeError:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
