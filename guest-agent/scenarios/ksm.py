"""ksm worker: identical anonymous buffers marked MADV_MERGEABLE; lives until told to quit."""

import mmap
import os
import sys
import time

nbuf, ready, quit_flag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
page = bytes((i * 31 + 7) & 0xFF for i in range(4096))
bufs = []
for _ in range(nbuf):
    m = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, len(m), 4096):
        m[off:off + 4096] = page
    m.madvise(mmap.MADV_MERGEABLE)
    bufs.append(m)
open(ready, "w").close()
while not os.path.exists(quit_flag):
    time.sleep(0.1)
print(f"ksm pid={os.getpid()} buffers={len(bufs)}", flush=True)
