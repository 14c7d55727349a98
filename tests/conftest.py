from __future__ import annotations

import os

import pytest

from tests.paths import BUILD

# The tests use the clone's build/ as the build cache (memtrace.tracer.cache), whatever
# $MEMTRACE_CACHE says: CI needs no home folder, and the tests that look at built files find
# them in build/guest, build/tracer, build/qemu10.
os.environ["MEMTRACE_CACHE"] = str(BUILD)

# -- what tests say: lines printed at the end of the run (comparisons, what was left out) -----
_SAID: list[str] = []


@pytest.fixture
def say(request):
    """``say(line)``: a line for the run's summary (shown by pytest -q too), for tests that
    must tell how much they compared and what they left out."""

    def _say(line: str) -> None:
        _SAID.append(f"{request.node.nodeid}: {line}")

    return _say


def pytest_terminal_summary(terminalreporter):
    if _SAID:
        terminalreporter.section("what the tests compared")
        for line in _SAID:
            terminalreporter.write_line(line)
