"""A piecewise-constant value and its time integral (the time-weighted means of the KSM report)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memtrace.traces.timebase import GuestClock


class Series:
    """A piecewise-constant value and its integral over time (for time-weighted means).

    Times are trace times; with a ``clock`` (a ``GuestClock`` with knots) the integral is over
    guest seconds instead."""

    __slots__ = ("v", "t", "area", "t0", "clock")

    def __init__(self, t0: float, v: float = 0.0, clock: GuestClock | None = None) -> None:
        self.clock = clock
        t0 = self._g(t0)
        self.v, self.t, self.area, self.t0 = v, t0, 0.0, t0

    def _g(self, t: Any) -> Any:
        return t if self.clock is None else self.clock.guest(t)

    def set(self, t: float, v: float) -> None:
        t = self._g(t)
        if t > self.t:
            self.area += self.v * (t - self.t)
            self.t = t
        self.v = v

    def add_events(self, times: np.ndarray, deltas: np.ndarray) -> None:
        """Changes ``deltas`` at ``times`` (all at or after the last change, any order)."""
        if len(times) == 0:
            return
        times = self._g(times)
        end = float(times.max())
        if end > self.t:
            self.area += self.v * (end - self.t)
            self.t = end
        self.area += float(np.dot(deltas, end - times))
        self.v += float(deltas.sum())

    def integral(self, t: float) -> float:
        return self.area + self.v * max(0.0, self._g(t) - self.t)
