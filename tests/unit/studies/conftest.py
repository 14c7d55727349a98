"""One Dask cluster for the whole session: two single-threaded workers in this process
(``processes=False``), reached over TCP as a cluster elsewhere is (``--scheduler``). The
commands the tasks run (the guard, the workload, trace-analyze) are real subprocesses; only
the workers are threads. The tests that need worker processes (a worker killed mid-run, the
local cluster trace-study starts itself) start their own."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def scheduler() -> Iterator[str]:
    """The shared cluster's scheduler address (tcp://127.0.0.1:PORT)."""
    from dask.distributed import LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL)
    try:
        yield lc.scheduler_address
    finally:
        lc.close()
