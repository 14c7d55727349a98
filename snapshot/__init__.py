"""trace-snapshot: the thesis's memory dumper (chapter 4.3) for a live Linux system, writing
the trace format of ``memtrace.traces`` from /proc (maps, pagemap, kpageflags, memory)."""
