"""A command workload for the study tests: writes a synthetic trace (memtrace.traces.synthetic)
to TRACE, or misbehaves as told, as a real workload or a real worker can.

    python workload.py TRACE N HOW STATE

HOW: ``ok``; ``fail`` (exits 3 with a message); ``die-once`` (the first time, with no STATE
file yet, kills the Dask worker that runs it: its guard's parent); ``slow-once-N`` (the
first time, for this N, writes its pid to STATE and sleeps, so a test can interrupt it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from memtrace.traces.synthetic import generate


def main() -> int:
    trace, n, how, state = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(f"workload: n={n} how={how}", flush=True)
    if how == "fail":
        print("workload: error: told to fail", file=sys.stderr)
        return 3
    if how == "die-once" and not os.path.exists(state):
        open(state, "w").write("died\n")
        guard = os.getppid()
        with open(f"/proc/{guard}/stat") as f:
            worker = int(f.read().rsplit(")", 1)[1].split()[1])
        os.kill(worker, signal.SIGKILL)
        time.sleep(60)
        return 1
    if how == f"slow-once-{n}" and not os.path.exists(state):
        with open(state, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
        return 1
    generate(trace, instances=n, seed=n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
