"""The memory trace format: specification (FORMAT.md), writer and reader."""

from traces.format import FORMAT_VERSION, Kind
from traces.reader import Trace, TraceError, open_trace
from traces.writer import TraceWriter

__all__ = ["FORMAT_VERSION", "Kind", "Trace", "TraceError", "TraceWriter", "open_trace"]
