"""A stable process for the state-dump check: maps a file and some anonymous memory, then waits."""

import mmap
import os
import sys
import time

ready, quit_flag = sys.argv[1], sys.argv[2]
with open("/scenarios/work.py", "rb") as f:
    fm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
anon = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
anon[0] = 1
open(ready, "w").close()
while not os.path.exists(quit_flag):
    time.sleep(0.05)
