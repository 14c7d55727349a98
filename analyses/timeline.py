"""Units for reports: pages and MiB. (Time, sampling grids and intervals live with the analysis
context, ``memtrace.analyses.base``, and the trace's time base, ``memtrace.traces.timebase``.)"""

from __future__ import annotations

MIB_PAGES = 256  # 4 KiB pages per MiB


def pages_to_mib(pages: float, page_size: int = 4096) -> float:
    return pages * page_size / (1 << 20)
