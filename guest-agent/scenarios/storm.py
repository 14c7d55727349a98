"""Bounded fork/exec/exit and mmap storm for the agent tests. Prints what it did for the checker.

Usage: storm.py [forks] [mmaps] [cpu]: with a CPU, the process pins itself there first."""

import ctypes
import mmap
import os
import sys

nfork = int(sys.argv[1]) if len(sys.argv) > 1 else 40
nmmap = int(sys.argv[2]) if len(sys.argv) > 2 else 300
if len(sys.argv) > 3:
    os.sched_setaffinity(0, {int(sys.argv[3])})
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

children = []
for i in range(nfork):
    pid = os.fork()
    if pid == 0:
        if i % 2 == 0:
            os.execv("/bin/busybox", ["true"])
        os._exit(0)
    children.append(pid)
    os.waitpid(pid, 0)
print("STORM-FORK " + " ".join(f"{p}:{'exec' if i % 2 == 0 else 'noexec'}"
                               for i, p in enumerate(children)), flush=True)

maps = []
for _ in range(nmmap):
    m = mmap.mmap(-1, 3 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[0] = 1
    maps.append(m)
    if len(maps) > 8:
        maps.pop(0).close()
for m in maps:
    m.close()
print(f"STORM-MMAP {nmmap}", flush=True)

# mprotect: an anonymous 4-page map, protect the middle two pages read-only
buf = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
rc = libc.mprotect(addr + 4096, 2 * 4096, 1)  # PROT_READ
print(f"STORM-MPROTECT {addr + 4096:x} {addr + 3 * 4096:x} rc={rc}", flush=True)
libc.mprotect(addr + 4096, 2 * 4096, 3)

# mremap: grow an anonymous mapping (Python uses mremap for anonymous mmap.resize)
r = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
r.resize(64 * 4096)
print("STORM-MREMAP done", flush=True)

# brk: grow and shrink the heap
old = libc.sbrk(0)
libc.sbrk(64 * 4096)
new = libc.sbrk(0)
libc.sbrk(-32 * 4096)
print(f"STORM-BRK {old:x} {new:x} {libc.sbrk(0):x}", flush=True)

# page cache: a 3-page tmpfs file, then removed
pc_test = f"/tmp/pc_test.{os.getpid()}"  # one per storm process
with open(pc_test, "wb") as f:
    f.write(b"x" * (3 * 4096))
ino = os.stat(pc_test).st_ino
os.unlink(pc_test)
print(f"STORM-PAGECACHE ino={ino}", flush=True)
del buf, r
