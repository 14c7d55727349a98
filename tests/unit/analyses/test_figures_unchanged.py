"""Every figure of every analysis, compared with what the replay reported before content ids were
recycled (issue 18): on the shipped samples and on the replay benchmark's generator (small
versions of its repeating and never-repeating traces).

``figures_reference.json`` holds, per trace, each analysis's summary (every scalar as
``trace-analyze --format json`` prints it) and a sha256 of each of its tables, written by the
analyses of main at f68c177, which never recycle ids (this module's ``--write`` run with main's
``memtrace`` package first on PYTHONPATH and this branch's ``traces/synthetic.py`` beside it for
the generator; ``python -m tests.unit.analyses.test_figures_unchanged --write`` rewrites it from
the code at hand: only do that with code whose figures are known to be right). The generated
traces carry a digest of their records, so a generator that changed (numpy's random streams may
move between versions) is reported as such, not as changed figures.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memtrace.analyses.cli import run
from memtrace.analyses.state import ReplayState
from memtrace.traces.reader import open_trace
from memtrace.traces.synthetic import page_updates
from tests.paths import SAMPLES

REFERENCE = Path(__file__).with_name("figures_reference.json")
#: every analysis but KSM (which keeps content ids of its own: the engine then recycles none)
ANALYSES = ["--sharing", "--oracle", "--snapshot-vs-continuous", "--attribution"]
KSM = ["--ksm"]
#: the snapshot analysis's other view, which follows content ids per frame
FRAME_VIEW = ["--snapshot-vs-continuous", "--snapshot-view", "frame"]

# the generated traces: small versions of bench_replay's, with 8192 frames, so that contents
# come and go many times over (several hundred thousand contents through a few thousand frames)
GENERATED: dict[str, dict[str, Any]] = {
    "updates-repeat": {"updates": 300_000, "per_epoch": 1000, "nframes": 8192, "seed": 1},
    "updates-fresh": {"updates": 200_000, "per_epoch": 1000, "nframes": 8192, "seed": 2,
                      "repeat": False},
}
SHIPPED = {"default": SAMPLES / "default.mtr",
           "synthetic-zero-install": SAMPLES / "synthetic-zero-install.mtr"}
CASES = [*SHIPPED, *GENERATED]


def records_digest(path: Path) -> str:
    """sha256 over the trace's records (not the file: compression may differ between zstd
    versions)."""
    h = hashlib.sha256()
    for chunk in open_trace(path).iter_chunks():
        for kind, rec in chunk.blocks:
            h.update(int(kind).to_bytes(4, "little"))
            h.update(rec.tobytes())
    return h.hexdigest()


def trace_of(case: str, folder: Path) -> Path:
    if case in SHIPPED:
        return SHIPPED[case]
    path = folder / f"{case}.mtr"
    if not path.exists():
        page_updates(path, **GENERATED[case])
    return path


def fingerprint(doc: dict[str, Any]) -> dict[str, Any]:
    """Per analysis: its summary and units as printed, its notes, and per table the columns,
    the row count and a sha256 of the rows (as JSON)."""
    out = {}
    for name, r in doc["results"].items():
        out[name] = {
            "summary": r["summary"], "units": r["units"], "notes": r["notes"],
            "tables": {t: {"columns": v["columns"], "rows": len(v["rows"]),
                           "sha256": hashlib.sha256(json.dumps(v["rows"]).encode()).hexdigest()}
                       for t, v in r["tables"].items()},
        }
    return out


def analyze(path: Path, args: list[str], out: Path) -> dict[str, Any]:
    assert run([str(path), *args, "--format", "json", "-q", "-o", str(out)]) == 0
    return fingerprint(json.loads(out.read_text()))


def figures(case: str, folder: Path) -> dict[str, Any]:
    path = trace_of(case, folder)
    got = analyze(path, ANALYSES, folder / "a.json")
    got.update(analyze(path, KSM, folder / "k.json"))
    got.update({f"{k} (frame view)": v
                for k, v in analyze(path, FRAME_VIEW, folder / "f.json").items()})
    return got


def diff(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Readable differences: analysis, summary key or table, value before and now."""
    lines = []
    for name in sorted(set(want) | set(got)):
        w, g = want.get(name), got.get(name)
        if w is None or g is None:
            lines.append(f"{name}: {'missing now' if g is None else 'new'}")
            continue
        for part in ("summary", "units", "tables"):
            for k in sorted(set(w[part]) | set(g[part])):
                if w[part].get(k) != g[part].get(k):
                    lines.append(f"{name}.{part}.{k}: before {w[part].get(k)!r}, "
                                 f"now {g[part].get(k)!r}")
        if w["notes"] != g["notes"]:
            lines.append(f"{name}.notes: before {w['notes']!r}, now {g['notes']!r}")
    return lines


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


# the shipped samples also through a content table that starts at 2,048 ids, so that they too
# recycle ids (with the usual size, one per frame, the sample's contents fit)
VARIANTS = [(case, None) for case in CASES] + [(case, 12) for case in SHIPPED]


@pytest.mark.parametrize("case,bits", VARIANTS,
                         ids=[f"{c}-small-table" if b else c for c, b in VARIANTS])
def test_every_figure_as_before(case, bits, reference, tmp_path, monkeypatch, say):
    if bits:
        monkeypatch.setattr(ReplayState, "content_bits", bits)
    ref = reference[case]
    path = trace_of(case, tmp_path)
    if case in GENERATED:
        assert records_digest(path) == ref["records_sha256"], (
            f"page_updates({GENERATED[case]}) no longer writes the trace the reference was "
            "made from (numpy's random streams?): the figures cannot be compared")
    got = figures(case, tmp_path)
    assert not diff(ref["figures"], got), "\n".join(diff(ref["figures"], got))
    n = sum(len(a["summary"]) + len(a["tables"]) for a in got.values())
    say(f"{case}{' (small content table)' if bits else ''}: {n} summary figures and tables "
        f"of {len(got)} analyses as before")


def write_reference(folder: Path) -> None:
    ref = {}
    for case in CASES:
        path = trace_of(case, folder)
        ref[case] = {"figures": figures(case, folder)}
        if case in GENERATED:
            ref[case]["records_sha256"] = records_digest(path)
        print(f"{case}: done", file=sys.stderr)
    REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.analyses.test_figures_unchanged --write")
    with tempfile.TemporaryDirectory() as d:
        write_reference(Path(d))
