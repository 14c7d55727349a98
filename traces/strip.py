"""trace-strip: a copy of a trace without its content store, safe to share.

A trace's records hold hashes of page contents, not the pages; its optional content store (from
``trace-snapshot --store-contents``) holds the pages themselves. The copy keeps every records
chunk byte for byte (checkpoints included), drops the content-store chunks, and writes a new
index and trailer; its header says ``content_store: stripped``. Hashes still let someone who
guesses a page's exact bytes confirm the guess (README, "What a trace reveals").

Usage: trace-strip IN.mtr OUT.mtr
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from memtrace.traces.format import ChunkType
from memtrace.traces.reader import TraceError, open_trace
from memtrace.traces.writer import encode_header, write_index


def strip(src: str, dst: str) -> tuple[int, int]:
    """Write ``dst``: ``src`` without content-store chunks. Returns (chunks kept, dropped)."""
    tr = open_trace(src)
    if tr.truncated:
        tr.close()
        raise TraceError(src, None, "the trace is cut short",
                         "strip a complete trace (the copy would lose its tail)")
    if os.path.realpath(src) == os.path.realpath(dst):
        tr.close()
        raise TraceError(dst, None, "is the trace itself", "give another output path")
    header = {**tr.header, "content_store": "stripped"}
    kept = dropped = 0
    entries = []
    data = open(src, "rb")  # noqa: SIM115 - closed below
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(encode_header(header))
            for c in tr.chunks_all:
                if c.type == ChunkType.CONTENT:
                    dropped += 1
                    continue
                data.seek(c.offset)
                raw = data.read(c.end - c.offset)
                entries.append((out.tell(), c.t_first, c.t_last, c.seq, c.type, c.flags))
                out.write(raw)
                kept += 1
            write_index(out, entries)
        os.replace(tmp, dst)
    finally:
        data.close()
        tr.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return kept, dropped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="trace-strip", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("output")
    a = ap.parse_args(argv)
    try:
        kept, dropped = strip(a.trace, a.output)
    except TraceError as e:
        print(f"trace-strip: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"trace-strip: error: {e.filename or a.output}: {e.strerror or e}",
              file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"output": a.output, "records_chunks": kept,
                      "content_chunks_dropped": dropped}))


if __name__ == "__main__":
    main()
