"""Mutation check of the core modules: faults put into the code on purpose, and whether the
unit tests notice. Issue 20 found that faults put into the reader, the recorder's checks and the
command line mostly left the suite green; this script measures that, per module, so that a
promise no test can break shows up as a surviving mutant.

    python bench/mutation.py [--modules reader,verify] [--sample 40] [--seed 20] [--keep]
                             [--workdir /var/tmp/memtrace-mutation] [--rev HEAD] [--json OUT]

How: cosmic-ray (PyPI ``cosmic-ray``) changes one operator, constant or keyword of a module in
place, runs a test command and restores the file. Our package maps ``memtrace.*`` onto the
repository's top-level folders through an editable install, so a tool that copies the sources
elsewhere (mutmut 3's mutants/ folder) would test the unmutated files. This script therefore
clones the committed tree (``--rev``, default HEAD: commit what you want measured) into a
throwaway folder with its own venv (``pip install -e CLONE[test] cosmic-ray``), where in-place
mutation is harmless, even if the run is killed half way.

Per module the test command is the unit tests that exercise it (never the e2e suite), with
``-x`` (a killed mutant stops at its first failing test) and a fixed Hypothesis seed (a mutant
is killed or not, not by chance). A module with more mutants than ``--sample`` has a random
sample of that many, drawn with ``--seed`` from its mutants in a fixed order; the output says
so. A mutant whose tests run longer than the timeout (4x the unmutated run, plus 30 s) counts as
killed, as cosmic-ray counts it. Mutants inside type annotations are not run: with ``from
__future__ import annotations`` (every core module) annotations are never evaluated, so they are
equivalent by construction. Everything runs under ``nice -n 19``: the machine is shared.

This is not part of the test suite (a full run takes hours on two cores); README's "Testing"
section has the latest score.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One line per core module: the unit tests that exercise it. Order matters with -x: the
# fastest, most direct tests first, so that most mutants are killed in seconds.
TESTS: dict[str, tuple[str, list[str]]] = {
    "reader": ("traces/reader.py", [
        "tests/unit/traces/test_reader.py", "tests/unit/traces/test_format_rules.py",
        "tests/unit/analyses/test_promises.py"]),
    "writer": ("traces/writer.py", [
        "tests/unit/traces/test_writer.py", "tests/unit/traces/test_reader.py",
        "tests/unit/traces/test_private.py", "tests/unit/traces/test_format_rules.py",
        "tests/unit/analyses/test_promises.py"]),
    "format": ("traces/format.py", [
        "tests/unit/traces/test_format_doc.py", "tests/unit/traces/test_reader.py",
        "tests/unit/traces/test_format_rules.py", "tests/unit/analyses/test_known_answers.py",
        "tests/unit/analyses/test_promises.py"]),
    "timebase": ("traces/timebase.py", [
        "tests/unit/traces/test_timebase.py", "tests/unit/analyses/test_ksm_guest_time.py"]),
    "engine": ("analyses/engine.py", [
        "tests/unit/analyses/test_engine.py",
        "tests/unit/analyses/test_recycling.py::test_ksm_turns_recycling_off",
        "tests/unit/analyses/test_known_answers.py", "tests/unit/traces/test_format_rules.py",
        "tests/unit/analyses/test_promises.py", "tests/unit/analyses/test_snapshots.py"]),
    "state": ("analyses/state.py", [
        "tests/unit/analyses/test_state.py", "tests/unit/analyses/test_known_answers.py",
        "tests/unit/traces/test_format_rules.py", "tests/unit/analyses/test_properties.py",
        "tests/unit/analyses/test_kernels.py", "tests/unit/analyses/test_recycling.py"]),
    "verify": ("tracer/verify.py", [
        "tests/unit/tracer", "tests/unit/analyses/test_promises.py"]),
    "cli": ("analyses/cli.py", [
        "tests/unit/analyses/test_promises.py", "tests/unit/analyses/test_cli.py",
        "tests/unit/studies/test_many.py::test_two_traces_one_table_with_the_trace_column"]),
    "report": ("analyses/report.py", [
        "tests/unit/analyses/test_report.py", "tests/unit/analyses/test_promises.py",
        "tests/unit/analyses/test_cli.py"]),
}


@dataclass
class Score:
    """One module's outcome: mutants drawn and run, killed, and the survivors' diffs."""

    module: str
    path: str
    mutants: int
    in_annotations: int
    sampled: int
    killed: int
    survivors: list[dict[str, str]]
    incompetent: int
    seconds: float


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command under nice -n 19, failing loudly with its output."""
    p = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"mutation: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def prepare(workdir: Path, rev: str) -> tuple[Path, Path]:
    """The clone of ``rev`` and a venv with it installed editable plus cosmic-ray."""
    sha = sh(["git", "-C", str(REPO), "rev-parse", rev]).stdout.strip()
    clone, venv = workdir / "clone", workdir / "venv"
    if clone.exists():
        shutil.rmtree(clone)
    workdir.mkdir(parents=True, exist_ok=True)
    sh(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)])
    sh(["git", "-C", str(clone), "checkout", "--quiet", sha])
    py = venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(venv)])
    # the editable install points at the clone's path, which stays the same between runs
    sh([str(py), "-m", "pip", "install", "-q", "-e", f"{clone}[test]", "cosmic-ray"])
    print(f"mutation: {clone} at {sha[:12]}, venv {venv}", flush=True)
    return clone, py


def test_command(py: Path, tests: list[str]) -> str:
    return (f"{py} -m pytest -x -q -p no:cacheprovider --hypothesis-seed=0 "
            f"-m 'not e2e' {' '.join(tests)}")


def run_module(name: str, clone: Path, py: Path, sample: int, seed: int) -> Score:
    """Initialise a cosmic-ray session for one module, keep a sample, run it, count."""
    path, tests = TESTS[name]
    cmd = test_command(py, tests)
    t0 = time.monotonic()
    base = subprocess.run(["nice", "-n", "19", "sh", "-c", cmd], cwd=clone,
                          capture_output=True, text=True)
    baseline = time.monotonic() - t0
    if base.returncode != 0:
        sys.exit(f"mutation: the unmutated tests of {path} fail; fix them first:\n"
                 f"{base.stdout[-3000:]}")
    timeout = 4 * baseline + 30
    cfg = clone / f"cosmic-ray-{name}.toml"
    db = clone / f"cosmic-ray-{name}.sqlite"
    db.unlink(missing_ok=True)
    cfg.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{path}"\n'
        f"timeout = {timeout:.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(cmd)}\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n')
    cr = str(py.parent / "cosmic-ray")
    sh([cr, "init", str(cfg), str(db)], cwd=clone)
    total, notes, kept = _keep_sample(py, db, sample, seed, clone / path)
    print(f"{name}: {path}: {total} mutants, {notes} in annotations skipped, "
          + (f"a sample of {kept} of the {total - notes} others (seed {seed})"
             if kept < total - notes else "all others run")
          + f"; tests {baseline:.0f} s unmutated, timeout {timeout:.0f} s", flush=True)
    sh([cr, "exec", str(cfg), str(db)], cwd=clone)
    results = json.loads(sh([str(py), "-c", _RESULTS, str(db)]).stdout)
    killed = sum(1 for r in results if r["outcome"] == "killed")
    incompetent = sum(1 for r in results if r["outcome"] == "incompetent")
    survivors = [r for r in results if r["outcome"] == "survived"]
    return Score(name, path, total, notes, kept, killed, survivors, incompetent,
                 time.monotonic() - t0)


# Run in the venv (cosmic-ray's API). Mutants inside type annotations are skipped: every core
# module has ``from __future__ import annotations``, so annotations are never evaluated and
# ``str | Path`` -> ``str / Path`` is an equivalent mutant by construction (a third of some
# modules' mutants). The rest are put in a fixed order; a seeded sample is kept, the others
# marked skipped.
_SAMPLE = """
import ast, json, random, sys
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkResult, WorkerOutcome
db, n, seed, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
text = open(source).read()
assert "from __future__ import annotations" in text, source
spans = []
for node in ast.walk(ast.parse(text)):
    notes = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        notes = [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs
                 + [a.vararg, a.kwarg] if x is not None] + [node.returns]
    elif isinstance(node, ast.AnnAssign):
        notes = [node.annotation]
    spans += [((x.lineno, x.col_offset), (x.end_lineno, x.end_col_offset))
              for x in notes if x is not None]

def annotation(m):
    start, end = tuple(m.start_pos), tuple(m.end_pos)
    return any(a <= start and end <= b for a, b in spans)

def skip(w, ids, why):
    if ids:
        w.set_multiple_results(ids, WorkResult(output=why, worker_outcome=WorkerOutcome.SKIPPED))

with use_db(db, WorkDB.Mode.open) as w:
    items = list(w.pending_work_items)
    notes = [i for i in items if all(annotation(m) for m in i.mutations)]
    skip(w, [i.job_id for i in notes], "in a type annotation (never evaluated)")
    items = sorted((i for i in items if i not in notes), key=lambda i: [
        (str(m.module_path), m.operator_name, m.occurrence, tuple(m.start_pos))
        for m in i.mutations])
    keep = items if n <= 0 or n >= len(items) else random.Random(seed).sample(items, n)
    ids = {i.job_id for i in keep}
    skip(w, [i.job_id for i in items if i.job_id not in ids], "not in the sample")
print(json.dumps([len(items) + len(notes), len(notes), len(keep)]))
"""

_RESULTS = """
import json, sys
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome
out = []
with use_db(sys.argv[1], WorkDB.Mode.open) as w:
    for item, result in w.completed_work_items:
        if result.worker_outcome == WorkerOutcome.SKIPPED:
            continue
        m = item.mutations[0]
        outcome = result.test_outcome.value if result.test_outcome else "incompetent"
        out.append({"outcome": outcome, "line": m.start_pos[0], "operator": m.operator_name,
                    "occurrence": m.occurrence, "diff": result.diff or ""})
print(json.dumps(sorted(out, key=lambda r: (r["line"], r["operator"], r["occurrence"]))))
"""


def _keep_sample(py: Path, db: Path, n: int, seed: int, source: Path) -> tuple[int, int, int]:
    """(mutants, of them in annotations, kept in the sample)."""
    total, notes, kept = json.loads(sh([str(py), "-c", _SAMPLE, str(db), str(n), str(seed),
                                        str(source)]).stdout)
    return total, notes, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(TESTS),
                    help=f"comma-separated, of: {', '.join(TESTS)}")
    ap.add_argument("--sample", type=int, default=40,
                    help="mutants per module at most, drawn at random (0: all)")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/memtrace-mutation"))
    ap.add_argument("--rev", default="HEAD", help="the commit to measure (default HEAD)")
    ap.add_argument("--json", type=Path, help="write the scores and survivors here")
    ap.add_argument("--keep", action="store_true", help="keep the clone (the venv is kept)")
    args = ap.parse_args()
    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in names if m not in TESTS]
    if unknown:
        sys.exit(f"mutation: unknown module {unknown[0]!r}; choose from {', '.join(TESTS)}")
    clone, py = prepare(args.workdir, args.rev)
    scores = []
    for name in names:
        s = run_module(name, clone, py, args.sample, args.seed)
        scores.append(s)
        print(f"{name}: {s.killed}/{s.sampled - s.incompetent} killed "
              f"({s.incompetent} incompetent), {len(s.survivors)} survived, "
              f"{s.seconds / 60:.1f} min", flush=True)
        for r in s.survivors:
            print(f"  survived {s.path}:{r['line']} {r['operator']} #{r['occurrence']}")
            for line in r["diff"].splitlines():
                if line[:1] in "+-" and line[:3] not in ("+++", "---"):
                    print(f"      {line}")
    print("\nmodule                 mutants  annotations  run  killed  survived  score")
    for s in scores:
        run = s.sampled - s.incompetent
        print(f"{s.path:22} {s.mutants:7} {s.in_annotations:12} {s.sampled:4} {s.killed:7} "
              f"{len(s.survivors):9}  {100 * s.killed / max(run, 1):4.0f} %")
    k = sum(s.killed for s in scores)
    n = sum(s.sampled - s.incompetent for s in scores)
    print(f"all: {k}/{n} killed ({100 * k / max(n, 1):.0f} %); "
          f"sample of at most {args.sample} per module, seed {args.seed}")
    if args.json:
        args.json.write_text(json.dumps([s.__dict__ for s in scores], indent=1))
    if not args.keep:
        shutil.rmtree(clone)


if __name__ == "__main__":
    main()
