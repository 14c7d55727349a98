"""Two threads pinned to two CPUs take turns: thread A (first CPU) stores MAGIC + v for even v,
thread B (last CPU) for odd v, into the same 8-byte word, strictly in order v = 0, 1, 2, ...
(a condition variable hands the turn over); after each store the thread writes the event
`counter interleave v` to the agent. Prints the word's guest physical address for the checker
(tests/e2e/record/test_smp.py), which finds both sequences in the trace."""

import ctypes
import mmap
import os
import struct
import sys
import threading

MAGIC = 0x1E7E << 32
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
cpus = sorted(os.sched_getaffinity(0))
if len(cpus) < 2:
    print("INTERLEAVE-ERROR needs two CPUs", flush=True)
    sys.exit(2)
buf = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
word = memoryview(buf).cast("Q")
word[0] = 0  # fault the page in before its physical address is looked up
vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
with open("/proc/self/pagemap", "rb") as f:
    f.seek(vaddr // 4096 * 8)
    entry = struct.unpack("<Q", f.read(8))[0]
if not entry >> 63:
    print("INTERLEAVE-ERROR page not present", flush=True)
    sys.exit(2)
phys = (entry & ((1 << 55) - 1)) * 4096 + vaddr % 4096
print(f"INTERLEAVE-WORD phys={phys:#x} magic={MAGIC:#x} cpus={cpus[0]},{cpus[-1]} "
      f"values={2 * rounds}", flush=True)
agent = os.open("/proc/memtrace", os.O_WRONLY) if os.access("/proc/memtrace", os.W_OK) else -1
turn = threading.Condition()
state = {"next": 0, "ran_on": {}}


def worker(parity: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    for v in range(parity, 2 * rounds, 2):
        with turn:
            while state["next"] != v:
                turn.wait()
            word[0] = MAGIC + v
            if agent >= 0:
                os.write(agent, f"counter interleave {v}\n".encode())
            state["ran_on"].setdefault(parity, set()).add(os.sched_getaffinity(0).pop())
            state["next"] = v + 1
            turn.notify_all()


threads = [threading.Thread(target=worker, args=(0, cpus[0])),
           threading.Thread(target=worker, args=(1, cpus[-1]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"INTERLEAVE-DONE last={word[0] - MAGIC} ran_on={sorted(state['ran_on'][0])},"
      f"{sorted(state['ran_on'][1])}", flush=True)
