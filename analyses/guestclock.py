"""Trace time <-> guest seconds, from the guest agent's clock counters.

A recorded trace's clock is retired guest instructions. Under TCG without -icount the guest's own
clock follows host time, so the number of instructions per guest second swings by an order of
magnitude (it falls while the guest idles, rises while it computes: 15-180 M/s measured in one
recording). The guest agent writes the guest's CLOCK_MONOTONIC into the trace as COUNTER
``guest.clock_ns`` every few ms (and the kernel's HZ as ``guest.hz``); analyses that need seconds
(the KSM model's sleeps, the oracle's savings in MiB*s) map trace time through them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the guest's CLOCK_MONOTONIC in ns, written by the guest agent every few ms (``clock MS``)
GUEST_CLOCK_COUNTER = "guest.clock_ns"
#: the guest kernel's HZ, written by the guest agent with its first clock counter
GUEST_HZ_COUNTER = "guest.hz"


class GuestClock:
    """Trace time <-> guest seconds.

    A recorded trace's clock is retired guest instructions, which stand still while the guest
    idles and run up to ten times faster while it computes, whereas ksmd sleeps in guest time
    (jiffies). With the guest agent's ``guest.clock_ns`` counters in the trace the map is
    piecewise linear through them (one knot per distinct trace time, at the latest guest time
    drained then: the agent's events reach the trace when the tracer drains the mailbox, at
    once when the guest idles, at the next epoch end while it computes); outside the knots,
    and without any, guest time advances by one second per ``hz`` clock units.
    """

    def __init__(self, hz: float, t: np.ndarray | None = None, g: np.ndarray | None = None
                 ) -> None:
        self.hz = float(hz)
        self.t = np.zeros(0) if t is None else np.asarray(t, dtype=np.float64)
        self.g = np.zeros(0) if g is None else np.asarray(g, dtype=np.float64)
        if len(self.t):
            order = np.argsort(self.t, kind="stable")
            t, g = self.t[order], np.maximum.accumulate(self.g[order])
            last = np.r_[t[1:] != t[:-1], True]  # one knot per trace time: the latest
            t, g = t[last], g[last]
            keep = np.r_[True, g[1:] > g[:-1]]   # a guest time that did not move: first one
            self.t, self.g = t[keep], g[keep]

    @property
    def knots(self) -> int:
        return len(self.t)

    def guest(self, t: Any) -> Any:
        """Guest seconds at trace time ``t`` (scalar or array)."""
        if not len(self.t):
            return np.asarray(t, dtype=np.float64) / self.hz if isinstance(t, np.ndarray) \
                else float(t) / self.hz
        x = np.asarray(t, dtype=np.float64)
        y = np.interp(x, self.t, self.g)
        y = np.where(x < self.t[0], self.g[0] - (self.t[0] - x) / self.hz, y)
        y = np.where(x > self.t[-1], self.g[-1] + (x - self.t[-1]) / self.hz, y)
        return y if isinstance(t, np.ndarray) else float(y)

    def trace(self, g: Any) -> Any:
        """Trace time at guest seconds ``g`` (scalar or array): the inverse of ``guest``."""
        if not len(self.t):
            return np.asarray(g, dtype=np.float64) * self.hz if isinstance(g, np.ndarray) \
                else float(g) * self.hz
        x = np.asarray(g, dtype=np.float64)
        y = np.interp(x, self.g, self.t)
        y = np.where(x < self.g[0], self.t[0] - (self.g[0] - x) * self.hz, y)
        y = np.where(x > self.g[-1], self.t[-1] + (x - self.g[-1]) * self.hz, y)
        return y if isinstance(g, np.ndarray) else float(y)

    def span(self, a: Any, b: Any) -> Any:
        """Guest seconds from trace time ``a`` to ``b``."""
        return self.guest(b) - self.guest(a)

    @classmethod
    def from_counters(cls, hz: float, t: list[int], ns: list[int]) -> GuestClock:
        """From ``guest.clock_ns`` values ``ns`` seen at trace times ``t`` (seconds counted
        from the first); fewer than two give the linear map."""
        if len(t) < 2:
            return cls(hz)
        g = np.array(ns, dtype=np.float64)
        return cls(hz, np.array(t, dtype=np.float64), (g - g[0]) / 1e9)
