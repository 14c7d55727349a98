"""The study file: what it accepts, and one line (file, line, key) for what it does not."""

from __future__ import annotations

import pytest

from memtrace.studies.runkeys import run_key
from memtrace.studies.studyfile import StudyError, parse

GOOD = """\
[study]
name = "sweep"
repeats = 2

[[workload]]
scenario = "terminal-server"
n = [1, 2, 3]
epoch = "10M"

[[workload]]
name = "syn"
command = ["{python}", "-m", "memtrace.traces.synthetic", "{trace}", "--instances", "{n}"]
n = [2, 3]
repeats = 1

[analyses]
interval = "1s"
[analyses.sharing]
[analyses.ksm]
pages_to_scan = 200
scope = "anon"
"""


def error(text: str) -> StudyError:
    with pytest.raises(StudyError) as e:
        parse(text, "s.toml")
    return e.value


def test_runs_sweep_and_repeats():
    st = parse(GOOD, "s.toml")
    runs = st.runs()
    assert len(runs) == 3 * 2 + 2 * 1
    assert [r.label() for r in runs[:2]] == ["terminal-server-n1-r0", "terminal-server-n1-r1"]
    assert runs[0].argv == ["--scenario", "terminal-server", "-n", "1", "--epoch", "10M"]
    assert runs[0].canonical["epoch"] == 10_000_000 and runs[0].canonical["ram"] == "512M"
    syn = runs[-1]
    assert syn.kind == "command" and syn.argv[-1] == "3" and "{trace}" in syn.argv
    assert st.analyses == ["sharing", "ksm"]
    assert st.analyze_argv == ["--interval", "1s", "--sharing", "--ksm",
                               "--ksm-pages-to-scan", "200", "--ksm-scope", "anon"]


def test_repeats_override():
    assert len(parse(GOOD, "s.toml", repeats=1).runs()) == 3 + 2


def test_key_is_the_resolved_inputs():
    """10M and 10000000 are one run; the default written out is too; another value is not."""
    base = '[[workload]]\nscenario = "single"\nn = 1\n'
    keys = [run_key(parse(base + extra).runs()[0], {"guest": "g"})
            for extra in ('epoch = "10M"\n', "epoch = 10000000\n", "", 'epoch = "20M"\n')]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert run_key(parse(base).runs()[0], {"guest": "other"}) != keys[0]


@pytest.mark.parametrize("text, line, key, what", [
    ('[[workload]]\nscenario = "single"\nbogus = 3\n', 3, "workload[1].bogus",
     "not a trace-record option"),
    ('[[workload]]\nscenario = "single"\n\n[[workload]]\nscenario = "single"\nname = "b"\n'
     'n = "lots"\n', 7, "workload[2].n", "not a whole number"),
    ('[[workload]]\nscenario = "nosuch"\n', 2, "workload[1].scenario", "unknown scenario"),
    ('[[workload]]\nscenario = "single"\nmode = "bytes"\n', 3, "workload[1].mode",
     "is not one of pages, writes"),
    ('[[workload]]\nscenario = "single"\nverify = "yes"\n', 3, "workload[1].verify",
     "takes true or false"),
    ('[[workload]]\nscenario = "single"\noutput = "x.mtr"\n', 3, "workload[1].output",
     "a study may set"),
    ('[study]\nrepeats = 0\n[[workload]]\nscenario = "single"\n', 2, "study.repeats",
     "at least 1"),
    ('[study]\nname = "x"\nfolder = 1\n', 3, "study.folder", "unknown key"),
    ('[[workload]]\nscenario = "single"\n[analyses.sharing]\n[analyses.ksm]\n'
     'pages_to_scan = -1\nnot_an_option = 2\n', 5, "analyses.ksm.pages_to_scan", ""),
    ('[[workload]]\nscenario = "single"\n[analyses.ksm]\nwhatever = 2\n', 4,
     "analyses.ksm.whatever", "not a trace-analyze option of ksm"),
    ('[[workload]]\nscenario = "single"\n[analyses.nosuch]\n', 3, "analyses.nosuch",
     "unknown analysis"),
    ('[[workload]]\nscenario = "single"\n[analyses]\nformat = "csv"\n', 4, "analyses.format",
     "not a trace-analyze option"),
    ('[[workload]]\ncommand = ["tool", "-o", "x"]\n', 2, "workload[1].command",
     "{trace}"),
    ('[[workload]]\ncommand = ["tool", "{trace}", "{k}"]\n', 2, "workload[1].command",
     "placeholder {k}"),
    ('[[workload]]\ncommand = ["tool", "{trace}"]\nk = [1, 2]\n', 3, "workload[1].k",
     "no placeholder {k}"),
    ('[[workload]]\nscenario = "single"\ncommand = ["t", "{trace}"]\n', 3,
     "workload[1].command", "either a command or trace-record's workload"),
    ('[[workload]]\nn = 2\n', 1, "workload[1].scenario", "a scenario or a command"),
    ("[study]\nname = 'x'\n", 1, "workload", "at least one"),
    ('[[workload]]\nscenario = "single"\nn = [1, [2]]\n', 3, "workload[1].n",
     "not list"),
    ('[[workload]]\nscenario = "single"\n[extra]\n', 3, "extra", "unknown key"),
])
def test_bad_input_is_one_line_with_file_line_and_key(text, line, key, what):
    e = error(text)
    assert (e.line, e.key) == (line, key), str(e)
    assert what in e.what
    assert str(e).startswith(f"s.toml:{line}: {key}: ")
    assert "\n" not in str(e)


def test_toml_syntax_error_names_the_line():
    e = error('[[workload]]\nscenario = "single"\nn = \n')
    assert e.line == 3 and "not valid TOML" in str(e)


def test_inline_analysis_table_is_found_too():
    e = error('[[workload]]\nscenario = "single"\n\n[analyses]\n'
              'ksm = { pages_to_scan = 100, scan_harder = true }\n')
    assert (e.line, e.key) == (5, "analyses.ksm.scan_harder")
