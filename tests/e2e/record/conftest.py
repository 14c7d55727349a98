from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def built_tracer_and_guest():
    """Build the plugin and the guest image once (both are cached under build/)."""
    from memtrace.tracer.record import ensure_plugin, guest_image

    ensure_plugin()
    guest_image()
