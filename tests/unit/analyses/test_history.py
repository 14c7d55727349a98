"""analyses/history.py: rows kept in numpy blocks read back as they were appended."""

from __future__ import annotations

import numpy as np

from memtrace.analyses import history
from memtrace.analyses.history import Rows


def test_rows_across_blocks(monkeypatch):
    monkeypatch.setattr(history, "BLOCK", 4)
    rows = Rows(3)
    want: list[list[int]] = []
    rng = np.random.default_rng(1)
    for step in range(40):
        if step % 3 == 0:
            k = int(rng.integers(0, 7))
            chunk = rng.integers(0, 2**40, size=(k, 3))
            rows.extend(chunk)
            want += chunk.tolist()
        else:
            row = [step, 2**62 + step, -step]
            rows.append(row)
            want.append(row)
        if want:
            rows.last[1] += 1  # the last row is a view
            want[-1][1] += 1
        assert len(rows) == len(want)
    assert rows.array().tolist() == want
    assert Rows(5, np.float64).array().shape == (0, 5)
