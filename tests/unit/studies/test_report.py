"""The thesis report's arithmetic on hand-made reports: medians over runs, relative to the
one-instance mmap/fork, the KSM model's memory, the published figures beside ours."""

from __future__ import annotations

from types import SimpleNamespace

from memtrace.studies.report import Runs, table_5_1, table_5_2, table_5_3, write_thesis_report
from memtrace.studies.runkeys import run_key
from memtrace.studies.thesis import STAND_INS, thesis_study


def doc(no, mf, ksm, full, oracle_mean=None, saved=None, anon=0, named=0):
    return {"results": {
        "sharing": {"summary": {"peak_no_sharing": no, "peak_mmap_fork": mf,
                                "peak_ksm_hint_all": ksm, "peak_full_cbps": full},
                    "tables": {"shareable_by_type": {
                        "columns": ["type", "contents", "sharings"],
                        "rows": [["anonymous", 1, anon], ["named", 2, named],
                                 ["mixed", 0, 0]]}}},
        "oracle": {"summary": {"oracle_mean": oracle_mean, "oracle_min": 10,
                               "mmap_fork_mean": mf}, "tables": {}},
        "ksm": {"summary": {"saved_pages_mean": saved, "fraction_of_guest_oracle": 0.5},
                "tables": {}}}}


def run(workload, n, d, status="done"):
    return SimpleNamespace(spec=SimpleNamespace(workload=workload, params={"n": n},
                                                scenario=workload), status=status, doc=d)


def test_table_5_1_is_relative_to_the_median_single_user_mmap_fork():
    runs = Runs([
        run("terminal-server", 1, doc(110, 100, 50, 40, oracle_mean=45, saved=30)),
        run("terminal-server", 1, doc(130, 300, 50, 40)),
        run("terminal-server", 1, doc(120, 200, 50, 40)),  # median mmap/fork: 200
        run("terminal-server", 2, doc(400, 360, 300, 280, oracle_mean=100, saved=60)),
        run("zero-install", 3, doc(1, 1, 1, 1), status="failed"),
    ])
    md, base = table_5_1(runs)
    assert base == 200
    lines = md.splitlines()
    assert lines[0] == ("|  | 1 user | 2 users terminal | 2 users zero-install | "
                        "3 users terminal | 3 users zero-install |")
    assert lines[2] == "| no sharing | 0.60 (1.10) | 2.00 (2.20) | - (2.20) | - (3.32) | - (3.33) |"
    assert lines[3].startswith("| mmap/fork | 1.00 (1.00) | 1.80 (1.83) |")
    assert lines[5].startswith("| full CBPS | 0.20 (0.45) | 1.40 (0.60) |")
    ksm = next(ln for ln in lines if ln.startswith("| KSM model at defaults"))
    # median over runs that have it: 100 - 30 = 70 -> 0.35; 360 - 60 = 300 -> 1.50
    assert ksm.split(" | ")[1:3] == ["0.35", "1.50"]
    assert runs.failed == {("zero-install", 3): 1}


def test_tables_5_2_and_5_3():
    runs = Runs([run("zero-install", n, doc(1, 1, 1, 1, anon=10 * n, named=n))
                 for n in (1, 2, 3)]
                + [run("game-server", n, doc(100 * n, 100 * n, 80 * n, 70 * n))
                   for n in (1, 2, 3)])
    t52 = table_5_2(runs).splitlines()
    assert t52[2] == "| anonymous pages | 10 (29707) | 20 (43520) | 30 (60480) |"
    assert t52[3] == "| named pages | 1 (25490) | 2 (30564) | 3 (35675) |"
    t53, base = table_5_3(runs)
    assert base == 100
    assert "| full CBPS | 0.70 (0.97) | 1.40 (1.34) | 2.10 (1.70) |" in t53


def test_report_names_the_stand_in_scenarios(tmp_path):
    study = thesis_study(quick=True, miniatures=True)
    assert [w.scenario for w in study.workloads] == [
        "terminal-server", "zero-install", "server-heap"]
    assert STAND_INS["game-server"] in study.notes
    assert len(study.runs()) == 9 and len(thesis_study(miniatures=True).runs()) == 54
    runner = SimpleNamespace(study=study, runs=[
        run(w, n, doc(100 * n, 90 * n, 80 * n, 70 * n, oracle_mean=60 * n, saved=5))
        for w in ("terminal-server", "zero-install", "game-server") for n in (1, 2, 3)])
    md = write_thesis_report(tmp_path, runner).read_text()
    assert "the `server-heap` miniature runs processes reading the same data file" in md
    for png in ("fig-5.3-terminal-server.png", "fig-5.4-zero-install.png",
                "fig-5.5-game-server.png"):
        assert f"]({png})" in md
        assert (tmp_path / "report" / png).stat().st_size > 10_000


def test_thesis_on_real_software():
    """By default the thesis's study records the desktop (both layouts) and the game servers:
    trace-record's own scenarios, sized by it (desktop 1G + 1G per user), no stand-in notes."""
    study = thesis_study(quick=True)
    assert [(w.name, w.scenario, w.params.get("layout")) for w in study.workloads] == [
        ("terminal-server", "desktop", "terminal-server"),
        ("zero-install", "desktop", "zero-install"), ("game-server", "game-server", None)]
    assert study.notes == []
    runs = {(s.workload, s.params["n"]): s for s in study.runs()}
    assert len(runs) == 9
    zi3 = runs[("zero-install", 3)]
    assert zi3.argv[:2] == ["--scenario", "desktop"] and "--layout" in zi3.argv
    assert zi3.canonical["layout"] == "zero-install" and zi3.canonical["ram"] == "4096M"
    assert runs[("game-server", 2)].canonical["ram"] == "2048M"
    assert run_key(runs[("terminal-server", 1)], None) != run_key(runs[("zero-install", 1)], None)
