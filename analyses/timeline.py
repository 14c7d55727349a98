"""Helpers for time: sample times every T, units for reports."""

from __future__ import annotations

from collections.abc import Iterator

from memtrace.traces.reader import Trace

MIB_PAGES = 256  # 4 KiB pages per MiB


def samples_in(t0: int, t1: int, origin: int, step: int) -> Iterator[int]:
    """Sample times origin + k*step that fall in [t0, t1)."""
    if step <= 0:
        return
    k = max(0, -(-(t0 - origin) // step))
    s = origin + k * step
    while s < t1:
        yield s
        s += step


def default_interval(trace: Trace, samples: int = 100) -> int:
    """An interval giving about ``samples`` samples over the trace (at least 1 clock unit)."""
    if not trace.chunks:
        return 1
    span = trace.chunks[-1].t_last - trace.t_begin
    return max(1, span // samples)


def clock_label(trace: Trace) -> str:
    return "instructions" if trace.clock_unit == "instructions" else trace.clock_unit


def pages_to_mib(pages: float, page_size: int = 4096) -> float:
    return pages * page_size / (1 << 20)
