from __future__ import annotations

import pytest

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
