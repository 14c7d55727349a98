"""A study's runs on a Dask cluster: plan, skip what is done, submit, follow, gather, stop.

Each run is two tasks: ``record`` (a trace) and ``analyze`` (its report, depending on the
first). The study's folder holds everything a later run of the study needs to resume:

    OUT/study.json                   the study as run (runs, keys, analysis arguments)
    OUT/runs/NAME/record.json        a finished recording (inputs, times, host, log)
    OUT/runs/NAME/analysis-AKEY.json a finished analysis (trace-analyze --format json)
    OUT/runs/NAME/error.txt          why the run failed the last time (removed once it is done)
    TRACES/NAME.mtr, .log            the trace and its recording's log (TRACES: OUT/traces
                                     unless the study or --traces says where workers write)
    OUT/results/*.parquet            the dataset (``memtrace.studies.dataset``)

A run whose analysis file exists is done and skipped; one whose recording is finished but not
its analysis is only analyzed; anything else is recorded again from the start. A failed run is
reported with its log and the others go on; Ctrl-C (or SIGTERM) cancels what is pending, stops
the running commands on every worker (trace-record stops QEMU and removes its RAM file) and
still writes the dataset of what finished.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memtrace.studies import dataset, tasks
from memtrace.studies.runkeys import KEY_LEN, analysis_key, run_inputs, run_key, run_name
from memtrace.studies.studyfile import RunSpec, Study

POLL = 0.5


class StudyFailure(Exception):
    """The study as a whole cannot go on (the guest cannot be built, workers disagree)."""


@dataclass
class Run:
    """One run's plan and, as the study goes, its outcome."""

    spec: RunSpec
    key: str
    name: str
    akey: str
    inputs: dict[str, Any]
    status: str = "pending"  # pending, skipped, done, failed, interrupted
    record: dict[str, Any] | None = None
    doc: dict[str, Any] | None = None
    error: str | None = None
    futures: list[Any] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The run's columns in the dataset (before its summaries)."""
        spec = self.spec
        params = dict(spec.canonical) if spec.kind == "record" else dict(spec.params)
        params.pop("command", None)
        params.pop("params", None)
        rec = self.record or {}
        return {"run": self.name, "key": self.key[:KEY_LEN], "workload": spec.workload,
                "scenario": spec.scenario, **params, "repeat": spec.repeat,
                "status": "done" if self.status in ("done", "skipped") else self.status,
                "error": self.error, "trace": rec.get("trace"), "trace_bytes": rec.get("bytes"),
                "record_seconds": rec.get("record_seconds"), "host": rec.get("host"),
                "analyze_seconds": (self.doc or {}).get("analyze_seconds")}


class StudyRunner:
    def __init__(self, study: Study, out: Path, client: Any, traces: Path | None = None,
                 progress: bool | None = None) -> None:
        self.study = study
        self.out = out.resolve()
        self.traces = (traces or Path(study.traces or self.out / "traces")).resolve()
        self.client = client
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.environment: dict[str, Any] | None = None
        self.runs: list[Run] = []
        self.interrupted = False

    # -- plan ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the guest and the plugin on every worker (once per host) and check that all
        workers have the same ones: a run's key names them."""
        if not any(s.kind == "record" for s in self.study.runs()):
            return
        say("preparing the guest image and the tracer plugin on the workers")
        try:
            envs = self.client.run(tasks.prepare)
        except Exception as e:  # noqa: BLE001 - any failure of the build, one line
            raise StudyFailure(f"preparing the workers failed: {str(e).splitlines()[0]}"
                               ) from None
        ident = {w: {k: v for k, v in e.items() if k != "host"} for w, e in envs.items()}
        distinct = {json.dumps(v, sort_keys=True) for v in ident.values()}
        if len(distinct) > 1:
            lines = "; ".join(f"{w}: guest {v['guest'][:12]}, qemu {v['qemu']}, plugin "
                              f"{v['plugin'][:12]}" for w, v in ident.items())
            raise StudyFailure(f"the workers have different guest images or tools ({lines}): "
                               "install the same memtrace and guest lock on every host")
        self.environment = next(iter(ident.values()))

    def plan(self) -> list[Run]:
        runs = []
        names: set[str] = set()
        for spec in self.study.runs():
            env = self.environment if spec.kind == "record" else None
            key = run_key(spec, env)
            name = run_name(spec, key)
            if name in names:
                raise StudyFailure(f"two runs of the study are the same ({name}): give the "
                                   "workloads different parameters or names")
            names.add(name)
            runs.append(Run(spec, key, name, analysis_key(key, self.study.analyze_canonical),
                            run_inputs(spec, env)))
        self.runs = runs
        return runs

    def run_dir(self, r: Run) -> Path:
        return self.out / "runs" / r.name

    def analysis_path(self, r: Run) -> Path:
        return self.run_dir(r) / f"analysis-{r.akey[:KEY_LEN]}.json"

    def load_finished(self) -> None:
        for r in self.runs:
            p = self.analysis_path(r)
            if p.exists():
                try:
                    r.doc = json.loads(p.read_text())
                    r.record = json.loads((self.run_dir(r) / "record.json").read_text())
                    r.status = "skipped"
                except (OSError, ValueError):
                    r.doc = r.record = None

    def write_plan(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"name": self.study.name, "file": self.study.path,
               "analyze": self.study.analyze_argv, "analyses": self.study.analyses,
               "environment": self.environment, "traces": str(self.traces),
               "runs": [{"name": r.name, "key": r.key, "analysis_key": r.akey,
                         "workload": r.spec.workload, "argv": r.spec.argv,
                         "repeat": r.spec.repeat} for r in self.runs]}
        write_json(self.out / "study.json", doc)

    # -- run ----------------------------------------------------------------------------------
    def submit(self, r: Run) -> None:
        trace = self.traces / f"{r.name}.mtr"
        rec = self.client.submit(tasks.record, r.name, r.spec.kind, r.spec.argv, str(trace),
                                 r.inputs, key=f"record-{r.name}", pure=False)
        ana = self.client.submit(tasks.analyze, rec, self.study.analyze_argv,
                                 key=f"analyze-{r.name}", pure=False)
        r.futures = [rec, ana]

    def finish(self, r: Run) -> None:
        """A run's futures are done: keep what it gave, or why it failed."""
        rec, ana = r.futures
        d = self.run_dir(r)
        d.mkdir(parents=True, exist_ok=True)
        if ana.status == "finished":
            r.record, r.doc = rec.result(), ana.result()
            write_json(d / "record.json", r.record)
            write_json(self.analysis_path(r), r.doc)
            with contextlib.suppress(FileNotFoundError):
                (d / "error.txt").unlink()
            r.status = "done"
        else:
            r.status = "failed"
            r.error = describe_failure(ana)
            if rec.status == "finished":
                r.record = rec.result()
            (d / "error.txt").write_text(r.error + "\n")
        r.futures = []

    def running(self) -> int:
        """Runs with a task on a worker now: the scheduler's processing tasks include those
        queued on a worker, so no more than the cluster's threads."""
        try:
            busy = {k for keys in self.client.processing().values() for k in keys}
            threads = sum(self.client.nthreads().values())
        except Exception:  # noqa: BLE001 - a count for the progress bar only
            return 0
        return min(threads, sum(1 for r in self.runs if r.futures
                                and any(f.key in busy for f in r.futures)))

    def execute(self) -> list[Run]:
        """Plan, skip what is done, run the rest; every run's outcome."""
        self.prepare()
        self.plan()
        self.load_finished()
        self.write_plan()
        todo = [r for r in self.runs if r.status == "pending"]
        skipped = len(self.runs) - len(todo)
        say(f"study {self.study.name}: {len(self.runs)} runs, {skipped} already done, "
            f"{len(todo)} to run; results in {self.out}")
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
        bar = tqdm(total=len(self.runs), initial=skipped, unit="run", file=sys.stderr,
                   disable=not self.progress, desc=self.study.name, dynamic_ncols=True)
        try:
            for r in todo:
                self.submit(r)
            self.follow(todo, bar)
        except KeyboardInterrupt:
            self.interrupted = True
            bar.close()
            self.stop(todo)
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, old)
        return self.runs

    def follow(self, todo: list[Run], bar: Any) -> None:
        pending = list(todo)
        failed = 0
        last = 0.0
        while pending:
            still = []
            for r in pending:
                if r.futures[1].done():
                    self.finish(r)
                    bar.update(1)
                    if r.status == "failed":
                        failed += 1
                        msg = f"trace-study: run {r.name} failed: {r.error}"
                        bar.write(msg, file=sys.stderr) if self.progress else say(msg[13:])
                    elif not self.progress:
                        say(f"[{self.count_finished()}/{len(self.runs)}] {r.name} done "
                            f"(record {fmt_s((r.record or {}).get('record_seconds'))}, "
                            f"analyze {fmt_s((r.doc or {}).get('analyze_seconds'))})")
                else:
                    still.append(r)
            pending = still
            now = time.monotonic()
            if self.progress and now - last > 1.0:
                bar.set_postfix_str(f"running {self.running()}, failed {failed}", refresh=True)
                last = now
            if pending:
                time.sleep(POLL)

    def count_finished(self) -> int:
        return sum(1 for r in self.runs if r.status != "pending")

    def stop(self, todo: list[Run]) -> None:
        """Ctrl-C: cancel what waits, stop what runs (on every worker), keep what finished."""
        say("interrupted: cancelling the pending runs and stopping the running ones "
            "(QEMU is asked to quit; this can take a minute)")
        futures = [f for r in todo for f in r.futures]
        for r in todo:
            if r.futures and r.futures[1].done():
                with contextlib.suppress(Exception):
                    self.finish(r)
        with contextlib.suppress(Exception):
            self.client.cancel(futures)
        with contextlib.suppress(Exception):
            n = sum(self.client.run(tasks.stop_commands).values())
            say(f"stopped {n} running command(s)")
        for r in todo:
            if r.status == "pending":
                r.status = "interrupted"
                r.futures = []

    # -- results ------------------------------------------------------------------------------
    def write_results(self) -> list[Path]:
        """The dataset of every run of this study that finished (and a row per failed one)."""
        entries = [(r.row(), r.doc) for r in self.runs if r.status in ("done", "skipped")]
        entries += [(r.row(), None) for r in self.runs if r.status == "failed"]
        if not entries:
            return []
        return dataset.write(self.out / "results", dataset.frames(entries))

    def finished(self) -> Iterator[Run]:
        return (r for r in self.runs if r.status in ("done", "skipped"))


def describe_failure(future: Any) -> str:
    """One run's failure, for the user: the command's message, or what happened to it."""
    from dask.distributed import KilledWorker

    if future.status == "cancelled":
        return "cancelled"
    try:
        exc = future.exception(timeout=5)
    except Exception as e:  # noqa: BLE001 - the future could not say: say that
        return f"unknown failure ({type(e).__name__})"
    if isinstance(exc, KilledWorker):
        return ("the worker running it died each time it was tried (out of memory? killed?): "
                + str(exc).splitlines()[0])
    if isinstance(exc, tasks.RunFailed):
        return str(exc).split(": ", 1)[-1]
    return f"{type(exc).__name__}: {exc}"


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def say(msg: str) -> None:
    print(f"trace-study: {msg}", file=sys.stderr, flush=True)


def fmt_s(v: Any) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt
