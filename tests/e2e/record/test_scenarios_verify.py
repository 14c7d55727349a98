"""End to end: every shipped scenario is recorded with --verify at least once in this suite, at
the smallest size that exercises it, and every frame of guest RAM matches the replayed trace
(README: "the shipped scenarios verify with 0 differing frames").

Who records which scenario with --verify: ``VERIFIED`` below; a scenario added to trace-record
without a verified recording fails ``test_every_shipped_scenario_is_verified``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memtrace.analyses.engine import Replay
from memtrace.tracer.record import SCENARIOS
from memtrace.traces.reader import open_trace
from tests.e2e.record.test_record import record, shm_files

pytestmark = pytest.mark.e2e

#: the scenarios recorded here, with the -n that exercises each: two instances of the same
#: binaries, two private copies of them, the boot check's bare start and stop, and a
#: fork/exec/mmap storm on one vCPU (test_smp.py runs it on four, for the events)
HERE = {"terminal-server": 2, "zero-install": 2, "idle": 1, "storm": 1}

#: scenario -> the test that records it with --verify
VERIFIED = {
    "single": "test_record.py::single_trace",
    "server-heap": "test_record.py::test_attribution_finds_the_data_and_the_binary",
    "ksm": "test_ksm_validation.py::ksm_trace",
    "interleave": "test_smp.py::test_two_vcpus_stores_and_events_in_order",
    "desktop": "test_workloads.py::test_desktop_one_user",
    "game-server": "test_workloads.py::test_game_server_one",
    **{name: f"test_scenarios_verify.py::test_scenario_verifies[{name}]" for name in HERE},
}


def test_every_shipped_scenario_is_verified() -> None:
    assert set(VERIFIED) == set(SCENARIOS), \
        f"scenarios without a --verify recording in the e2e suite: {set(SCENARIOS) - set(VERIFIED)}"


@pytest.mark.parametrize("name", list(HERE))
def test_scenario_verifies(tmp_path: Path, name: str, say) -> None:
    out = tmp_path / f"{name}.mtr"
    p = record("--scenario", name, "-n", str(HERE[name]), "--verify", "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"verify: ([\d,]+) frames compared with guest RAM: ([\d,]+) match, 0 differ, "
                  r"0 never described by the trace", p.stderr)
    assert m, p.stderr[-2000:]
    assert m.group(1) == m.group(2)
    say(f"{name} -n {HERE[name]}: {m.group(1)} frames compared, 0 differ")
    assert not shm_files(p.pid), "guest RAM left in /dev/shm"
    with open_trace(out) as tr:
        assert tr.header["scenario"] == {"name": name, "n": HERE[name], "smp": 1}
        st = Replay(tr, progress=False).run()
    assert st.incomplete is None and not st.lost, (st.incomplete, st.lost)
