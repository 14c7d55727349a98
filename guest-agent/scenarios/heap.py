"""server-heap worker: read a data file into anonymous memory and stay alive until told to quit."""

import os
import sys
import time

path, ready, quit_flag = sys.argv[1], sys.argv[2], sys.argv[3]
with open(path, "rb") as f:
    heap = bytearray(f.read())  # anonymous copy of the file contents
heap[0] ^= 0  # touch
open(ready, "w").close()
while not os.path.exists(quit_flag):
    time.sleep(0.1)
print(f"heap pid={os.getpid()} bytes={len(heap)}", flush=True)
