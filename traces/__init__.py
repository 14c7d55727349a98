"""The memory trace format: specification (FORMAT.md), writer and reader."""

from memtrace.traces.format import FORMAT_VERSION, Kind
from memtrace.traces.reader import Trace, TraceError, open_trace
from memtrace.traces.writer import TraceWriter

__all__ = ["FORMAT_VERSION", "Kind", "Trace", "TraceError", "TraceWriter", "open_trace"]
