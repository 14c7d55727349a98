"""Small builders for synthetic traces with known answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memtrace.analyses.engine import Replay
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.analyses.sharing import SharingAnalysis, full_figures
from memtrace.analyses.snapshots import SnapshotVsContinuous
from memtrace.traces.format import MAP_PRESENT
from memtrace.traces.pagehash import page_hash
from memtrace.traces.reader import open_trace
from memtrace.traces.writer import TraceWriter


def content(token: int) -> tuple[int, int]:
    """The hash of a page filled with ``token`` (0: the zero page)."""
    data = bytes(4096) if token == 0 else token.to_bytes(8, "little") * 512
    return page_hash(data)


class Builder:
    """Write records with contents named by small integers."""

    def __init__(self, path: Path, nframes: int = 256, **header: Any) -> None:
        self.w = TraceWriter(path, {"ram_size": nframes * 4096, "source": "synthetic", **header},
                             chunk_bytes=header.pop("chunk_bytes", 1 << 20))
        self.t = 0

    def at(self, t: int) -> Builder:
        self.t = t
        self.w.time(t)
        return self

    def page(self, frame: int, token: int) -> Builder:
        self.w.page(frame, *content(token))
        return self

    def map(self, mm: int, vpn: int, frame: int | None) -> Builder:
        self.w.map(mm, vpn, frame or 0, MAP_PRESENT if frame is not None else 0)
        return self

    def close(self) -> None:
        self.w.close()


def replay(path: Path, interval: int | None = None) -> dict[str, Any]:
    tr = open_trace(path)
    an = [SharingAnalysis(interval), OracleAnalysis(), SnapshotVsContinuous(interval)]
    rp = Replay(tr, an, progress=False)
    st = rp.run()
    return {"state": st, "figures": st.figures(), "full": full_figures(st),
            "results": {a.name: a.result() for a in an}, "trace": tr}
