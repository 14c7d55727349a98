"""The study file (TOML): workloads, their parameters and repeats, and the analyses.

::

    [study]
    name = "ts-sweep"            # default: the file's name
    repeats = 3                  # runs of every configuration (default 1)
    traces = "/shared/traces"    # where workers write traces (default: OUT/traces)

    [[workload]]                 # a built-in scenario, recorded by trace-record
    scenario = "terminal-server"
    n = [1, 2, 3]                # a list sweeps: one configuration per value
    epoch = "10M"                # any trace-record option, '-' written '_'

    [[workload]]                 # any command that writes a trace to {trace}
    name = "synthetic"
    command = ["{python}", "-m", "memtrace.traces.synthetic", "{trace}", "--instances", "{n}"]
    n = [2, 3]                   # parameters of a command are its placeholders

    [analyses]
    interval = "1s"              # trace-analyze's own options
    [analyses.sharing]
    [analyses.ksm]               # an analysis per table, its options without the prefix
    pages_to_scan = 100          # --ksm-pages-to-scan 100

Keys and values are checked against trace-record's and trace-analyze's own argument parsers,
so a study can use every option the installed tools have (and a tool's new option needs no
change here). An unknown key or a wrong value is one ``StudyError``: the file, the line and the
key.
"""

from __future__ import annotations

import argparse
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: trace-record options a study may not set: the study chooses the trace's path and the log
RECORD_RESERVED = {"output", "serial_log", "quiet", "no_plugin", "help"}
#: trace-analyze options that belong to one invocation's output, not to an analysis
ANALYZE_RESERVED = {"trace", "format", "table", "plot", "output", "quiet", "progress",
                    "add_checkpoints", "show_page", "help", "traces", "scheduler", "workers"}
SCALARS = (str, int, float, bool)


class StudyError(Exception):
    """A study file that cannot be run: ``FILE:LINE: KEY: what``."""

    def __init__(self, path: str | Path, line: int, key: str, what: str) -> None:
        self.path, self.line, self.key, self.what = str(path), line, key, what
        super().__init__(f"{path}:{line}: {key}: {what}" if key else f"{path}:{line}: {what}")


@dataclass
class Workload:
    """One ``[[workload]]``: a scenario for trace-record or a command, and its parameters
    (a list value sweeps)."""

    name: str
    scenario: str | None
    command: list[str] | None
    params: dict[str, Any]
    repeats: int
    index: int


@dataclass
class RunSpec:
    """One run: a workload with one value of each parameter, and its repeat index."""

    workload: str
    scenario: str | None
    params: dict[str, Any]
    repeat: int
    #: trace-record's arguments (without -o), or the command with its placeholders filled
    #: except {trace} and {python}
    argv: list[str]
    #: the parameters as the tool resolved them, defaults included (what the run key hashes)
    canonical: dict[str, Any]
    #: the parameters the workload sweeps (a list in the study file)
    swept: tuple[str, ...] = ()
    #: a command workload (else trace-record records it)
    command: bool = False

    @property
    def kind(self) -> str:
        """``record`` (trace-record) or ``command``."""
        return "command" if self.command else "record"

    def label(self) -> str:
        """A readable name: workload, parameters that vary, repeat."""
        bits = [self.workload] + [f"{k}{v}" if k == "n" else f"{k}={v}"
                                  for k, v in self.params.items() if k in self.swept]
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(bits) + f"-r{self.repeat}")


@dataclass
class Study:
    """A parsed study: its runs and the trace-analyze arguments every trace gets."""

    name: str
    path: str
    repeats: int
    workloads: list[Workload]
    analyze_argv: list[str]
    analyze_canonical: dict[str, Any]
    analyses: list[str]
    traces: str | None = None
    notes: list[str] = field(default_factory=list)
    #: a built-in study's name ("thesis"): its report is written at the end
    builtin: str = ""

    def runs(self) -> list[RunSpec]:
        """Every run of the study, in the file's order, repeats of a configuration together."""
        out = []
        for w in self.workloads:
            keys = list(w.params)
            values = [v if isinstance(v, list) else [v] for v in w.params.values()]
            for combo in itertools.product(*values):
                params = dict(zip(keys, combo, strict=True))
                for r in range(w.repeats):
                    spec = expand_run(self, w, params, r)
                    spec.swept = tuple(k for k, v in w.params.items() if isinstance(v, list))
                    out.append(spec)
        return out


# -- where in the file ---------------------------------------------------------------------------
class Lines:
    """Finds the line of a key in the study file's text (tomllib gives values, not lines)."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.sections: list[tuple[tuple[Any, ...], int, int]] = []  # (path, first, last line)
        counts: dict[str, int] = {}
        cur: tuple[Any, ...] = ()
        start = 1
        lines = text.splitlines()
        for i, ln in enumerate(lines, 1):
            m = self.HEADER.match(ln)
            if not m:
                continue
            self.sections.append((cur, start, i - 1))
            name = m.group(2).replace('"', "").replace(" ", "")
            if m.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                cur = (*name.split("."), counts[name])
            else:
                cur = tuple(name.split("."))
            start = i
        self.sections.append((cur, start, len(lines)))
        self.lines = lines

    def find(self, section: tuple[Any, ...], key: str | None = None) -> int:
        """The line of ``key`` in ``section``: its own table's header, a ``key =`` line in
        the section or its subsections (an inline table counts), else the same in the
        enclosing section; else the section's header line, else 1."""
        if key:
            for path, first, _ in self.sections:
                if path[:len(section) + 1] == (*section, key):
                    return first
        pat = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=") if key else None
        header = None
        for path, first, last in self.sections:
            if path[:len(section)] != section:
                continue
            if header is None:
                header = first
            if pat is None:
                return first
            for i in range(max(first, 1), last + 1):
                if pat.search(self.lines[i - 1]):
                    return i
        if header is None and section:
            return self.find(section[:-1], key)
        return header or 1


# -- checked against the tools' own parsers ------------------------------------------------------
def record_parser() -> argparse.ArgumentParser:
    from memtrace.tracer.record import build_parser

    return build_parser()


def analyze_parser() -> argparse.ArgumentParser:
    from memtrace.analyses.cli import build_parser

    return build_parser()


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> action, for every optional argument of ``parser``."""
    return {s: a for a in parser._actions for s in a.option_strings}


def scenarios() -> tuple[str, ...]:
    """The scenarios the installed trace-record offers."""
    for a in record_parser()._actions:
        if "--scenario" in a.option_strings:
            return tuple(a.choices or ())
    return ()


def check_value(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` does not suit ``action`` (None if it does)."""
    if action.nargs == 0:  # a switch
        return None if isinstance(value, bool) else "takes true or false"
    if isinstance(value, bool) or not isinstance(value, SCALARS):
        return "takes a number or a string, not " + type(value).__name__
    if callable(action.type):
        try:
            v = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            return str(e) or f"not a valid value: {value!r}"
    else:
        v = str(value)
    if action.choices is not None and v not in action.choices:
        return f"{value!r} is not one of {', '.join(map(str, action.choices))}"
    return None


def to_argv(option: str, action: argparse.Action, value: Any) -> list[str]:
    if action.nargs == 0:
        return [option] if value else []
    return [option, str(value)]


def canonical(ns: argparse.Namespace, reserved: set[str]) -> dict[str, Any]:
    """The parsed arguments, defaults included, as plain JSON values (what a key hashes)."""
    out = {}
    for k, v in sorted(vars(ns).items()):
        if k in reserved or k.startswith("run_") and not v:
            continue
        out[k] = v if isinstance(v, (*SCALARS, type(None))) else str(v)
    return out


# -- parsing ---------------------------------------------------------------------------------------
def load(path: str | Path, repeats: int | None = None) -> Study:
    """Read and check a study file (``StudyError`` on anything wrong); ``repeats`` overrides
    the file's."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise StudyError(path, 0, "", f"cannot read the study file: {e.strerror}") from None
    return parse(text, path, repeats)


def parse(text: str, path: str | Path = "<study>", repeats: int | None = None) -> Study:
    lines = Lines(text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else 1
        raise StudyError(path, line, "", "not valid TOML: " +
                         re.sub(r"\s*\(at line.*\)", "", str(e))) from None

    def err(section: tuple[Any, ...], key: str, what: str, dotted: str | None = None) -> None:
        raise StudyError(path, lines.find(section, key.split(".")[-1] if key else None),
                         dotted or key, what)

    for k in doc:
        if k not in ("study", "workload", "analyses"):
            err((), k, "unknown key (a study has [study], [[workload]] and [analyses])")
    head = doc.get("study", {})
    if not isinstance(head, dict):
        err((), "study", "must be a table: [study]")
    for k in head:
        if k not in ("name", "repeats", "traces"):
            err(("study",), k, "unknown key (name, repeats, traces)", f"study.{k}")
    name = head.get("name", re.sub(r"[^A-Za-z0-9_.-]+", "", Path(str(path)).stem) or "study")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        err(("study",), "name", "a name of letters, digits, '.', '_' and '-'", "study.name")
    rep = head.get("repeats", 1)
    if isinstance(rep, bool) or not isinstance(rep, int) or rep < 1:
        err(("study",), "repeats", "a whole number of at least 1", "study.repeats")
    traces = head.get("traces")
    if traces is not None and not isinstance(traces, str):
        err(("study",), "traces", "a folder's path (a string)", "study.traces")
    wl = doc.get("workload", [])
    if not isinstance(wl, list) or not wl:
        err((), "workload", "a study needs at least one [[workload]]")
    study = Study(name=name, path=str(path), repeats=repeats or rep, workloads=[],
                  analyze_argv=[], analyze_canonical={}, analyses=[], traces=traces)
    rec_opts = options(record_parser())
    known = scenarios()
    for i, w in enumerate(wl):
        study.workloads.append(parse_workload(w, i, study, rec_opts, known, err, repeats))
    names = [w.name for w in study.workloads]
    for w in study.workloads:
        if names.count(w.name) > 1:
            err(("workload", w.index), "name", f"two workloads are called {w.name!r}: give "
                "each its own name", f"workload[{w.index + 1}].name")
    parse_analyses(doc.get("analyses", {}), study, err)
    return study


def parse_workload(w: Any, i: int, study: Study, rec_opts: dict[str, argparse.Action],
                   known: tuple[str, ...], err: Any, repeats: int | None) -> Workload:
    sec = ("workload", i)
    where = f"workload[{i + 1}]"
    if not isinstance(w, dict):
        err(sec, "", f"{where} must be a table")
    scen, cmd = w.get("scenario"), w.get("command")
    # trace-record's own workloads (--run/--script, where the installed trace-record has them)
    own = [k for k in ("run", "script") if k in w and record_option(k, rec_opts)]
    if cmd is not None and (scen is not None or own):
        err(sec, "command", "give a workload either a command or trace-record's workload "
            "(scenario" + (", run, script" if own else "") + "), not both", f"{where}.command")
    if cmd is None and scen is None and not own:
        err(sec, "scenario", "give a workload a scenario or a command" + (
            " (or run/script)" if record_option("run", rec_opts) else ""), f"{where}.scenario")
    if scen is not None and (not isinstance(scen, str) or scen not in known):
        err(sec, "scenario", f"unknown scenario {scen!r} (trace-record offers: "
            f"{', '.join(known)})", f"{where}.scenario")
    if cmd is not None and (not isinstance(cmd, list) or not cmd
                            or not all(isinstance(c, str) for c in cmd)):
        err(sec, "command", "a list of strings, e.g. [\"my-tool\", \"-o\", \"{trace}\"]",
            f"{where}.command")
    if cmd is not None and not any("{trace}" in c for c in cmd):
        err(sec, "command", "the command must write the trace to {trace}", f"{where}.command")
    name = w.get("name", scen or (own[0] if own else Path(cmd[0]).name))
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        err(sec, "name", "a name of letters, digits, '.', '_' and '-'", f"{where}.name")
    rep = w.get("repeats", study.repeats)
    if isinstance(rep, bool) or not isinstance(rep, int) or rep < 1:
        err(sec, "repeats", "a whole number of at least 1", f"{where}.repeats")
    params: dict[str, Any] = {}
    for k, v in w.items():
        if k in ("scenario", "command", "name", "repeats"):
            continue
        dotted = f"{where}.{k}"
        vals = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            err(sec, k, "an empty list sweeps nothing", dotted)
        for x in vals:
            if not isinstance(x, SCALARS):
                err(sec, k, f"a number, string or true/false (or a list of them), not "
                    f"{type(x).__name__}", dotted)
        if cmd is None:
            opt = record_option(k, rec_opts)
            if opt is None or k in RECORD_RESERVED or k == "scenario":
                err(sec, k, "unknown key: not a trace-record option" + (
                    " a study may set" if opt else "") + " (see trace-record --help)", dotted)
            for x in vals:
                why = check_value(rec_opts[opt], x)
                if why:
                    err(sec, k, why, dotted)
        else:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                err(sec, k, "a command's parameter needs a name of letters, digits and _",
                    dotted)
            if not any("{" + k + "}" in c for c in cmd):
                err(sec, k, f"the command has no placeholder {{{k}}} for it", dotted)
        params[k] = v
    if cmd is not None:
        for c in cmd:
            for ph in re.findall(r"\{([^{}]*)\}", c):
                if ph not in params and ph not in ("trace", "python", "repeat"):
                    err(sec, "command", f"placeholder {{{ph}}} has no parameter of that name",
                        f"{where}.command")
    return Workload(name=name, scenario=scen, command=cmd, params=params,
                    repeats=repeats or rep, index=i)


def record_option(key: str, opts: dict[str, argparse.Action]) -> str | None:
    for cand in (f"--{key.replace('_', '-')}", f"-{key}"):
        if cand in opts:
            return cand
    return None


def analysis_classes() -> dict[str, Any]:
    from memtrace.analyses.registry import ANALYSES

    return {c.name: c for c in ANALYSES}


def parse_analyses(a: Any, study: Study, err: Any) -> None:
    if not isinstance(a, dict):
        err((), "analyses", "must be a table: [analyses]")
    parser = analyze_parser()
    opts = options(parser)
    classes = analysis_classes()
    argv: list[str] = []
    chosen: list[str] = []

    def add(section: tuple[Any, ...], k: str, v: Any, cands: list[str], dotted: str) -> None:
        opt = next((c for c in cands if c in opts), None)
        dest = opts[opt].dest if opt else None
        if opt is None or dest in ANALYZE_RESERVED or (dest or "").startswith("run_"):
            err(section, k, "unknown key: not a trace-analyze option" + (
                f" of {section[-1]}" if len(section) > 1 else "") + " (see trace-analyze "
                "--help)", dotted)
        if not isinstance(v, SCALARS):
            err(section, k, f"a number, string or true/false, not {type(v).__name__}", dotted)
        why = check_value(opts[opt], v)
        if why:
            err(section, k, why, dotted)
        argv.extend(to_argv(opt, opts[opt], v))

    for k, v in a.items():
        if isinstance(v, dict):
            if k not in classes:
                err(("analyses",), k, f"unknown analysis (the analyses: "
                    f"{', '.join(classes)})", f"analyses.{k}")
            cls = classes[k]
            chosen.append(k)
            argv.append(cls.flag)
            stem = cls.flag.lstrip("-")
            for ok, ov in v.items():
                ko = ok.replace("_", "-")
                add(("analyses", k), ok, ov,
                    [f"--{stem}-{ko}", f"--{stem.split('-')[0]}-{ko}", f"--{ko}"],
                    f"analyses.{k}.{ok}")
        else:
            add(("analyses",), k, v, [f"--{k.replace('_', '-')}"], f"analyses.{k}")
    if not chosen:
        chosen = [c.name for c in classes.values() if c.default]
    try:
        ns = parser.parse_args(argv)
    except SystemExit:  # pragma: no cover - every value was checked above
        err(("analyses",), "", "trace-analyze refuses these options: " + " ".join(argv))
    study.analyze_argv = argv
    study.analyze_canonical = canonical(ns, ANALYZE_RESERVED)
    study.analyses = chosen


def expand_run(study: Study, w: Workload, params: dict[str, Any], repeat: int) -> RunSpec:
    """One run's arguments: trace-record's (checked, defaults resolved) or the command's."""
    if w.command is None:
        opts = options(record_parser())
        argv = ["--scenario", w.scenario] if w.scenario else []
        for k, v in params.items():
            opt = record_option(k, opts)
            assert opt is not None
            argv += to_argv(opt, opts[opt], v)
        ns = record_parser().parse_args(argv)
        if ns.ram is None:  # trace-record sizes the guest by scenario: the key says how much
            from memtrace.tracer.workload import default_ram

            ns.ram = default_ram(ns.scenario, ns.n)
        return RunSpec(w.name, w.scenario, params, repeat, argv,
                       canonical(ns, RECORD_RESERVED))
    fill = {k: str(v) for k, v in params.items()} | {"repeat": str(repeat)}
    argv = [re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}",
                   lambda m: fill.get(m.group(1), m.group(0)), c) for c in w.command or []]
    return RunSpec(w.name, None, params, repeat, argv,
                   {"command": argv, "params": {k: params[k] for k in sorted(params)}},
                   command=True)
