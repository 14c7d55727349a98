"""Everything under tests/e2e runs real QEMU, a real guest kernel and the real agent:
marked ``e2e`` (``pytest -m "not e2e"`` runs the unit tests alone)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
