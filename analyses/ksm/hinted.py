"""The smarter scanner: XLH-style hints (Miller et al., ATC'13) on top of the linear scan."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.analyses.ksm.items import STABLE, ZERO
from memtrace.analyses.ksm.model import KsmModel

if TYPE_CHECKING:
    from memtrace.analyses.state import ReplayState


class HintedModel(KsmModel):
    """XLH-style: pages written and then left alone for one sleep period are scanned first."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.queue: deque[tuple[float, np.ndarray]] = deque()
        self.hint_budget = max(1, self.p.pages_to_scan // 2)
        self.hinted_pages = 0

    def sync(self, st: ReplayState, t: float) -> None:
        super().sync(st, t)
        ch = self.S.changed_idx
        if len(ch):
            self.queue.append((t, self.S.uid[ch]))

    def _quiet(self) -> bool:
        return not self.queue

    def _linear_limit(self, kend: int) -> int:
        if not self.queue or self.used:
            return kend
        return min(kend, max(self.k, self.k_first(self.later(self.queue[0][0]))))

    def _pop(self, tau: float) -> np.ndarray:
        """Up to half a batch of settled hinted pages still worth scanning, oldest first."""
        S = self.S
        out: list[np.ndarray] = []
        need = self.hint_budget
        while need > 0 and self.queue and self.later(self.queue[0][0]) <= tau:
            t, uids = self.queue.popleft()
            idx = S.uid_index[uids[uids < len(S.uid_index)]]
            idx = idx[idx >= 0]
            # not changed again since (a later hint covers it), not yet scanned since, unmerged
            s = self.st[idx]
            keep = (S.ctime[idx] == t) & (self.chk[idx] != S.pc[idx]) & (s != STABLE) & \
                (s != ZERO) & (S.pc[idx] >= 0)
            idx = idx[keep]
            if len(idx) > need:
                self.queue.appendleft((t, S.uid[idx[need:]]))
                idx = idx[:need]
            out.append(idx)
            need -= len(idx)
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out)

    def _hinted_batch(self) -> None:
        """One batch: hinted pages first, the linear scan with what is left."""
        P = self.p.pages_to_scan
        tau = self.batch_time(self.k)
        hi = self._pop(tau)
        h = len(hi)
        if h:
            self._process(hi, np.full(h, tau), hinted=True)
            self.pages_scanned += h
            self.hinted_pages += h
            self.mut += h
        budget = P - h
        idx = self._gather(budget) if budget > 0 else np.zeros(0, dtype=np.int64)
        n = len(idx)
        if n:
            self._process(idx, np.full(n, tau))
            self.pages_scanned += n
            self.round_items += n
        if budget > 0 and n < budget:
            self._end_round(tau)
        self.k += 1
        self.used = 0
