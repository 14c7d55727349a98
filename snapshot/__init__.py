"""trace-snapshot: dump the memory of live Linux processes into a trace (thesis ch. 4.3).

The thesis's memory dumper, for a live Linux system or a minimal guest, writing trace format v1
(``traces/FORMAT.md``) so that ``trace-analyze`` prints the same figures (eq. 4.6-4.9, Tables 5.1
and 5.2) as for recorded traces. Per selected process it records the thread group (TASK EXISTING,
one per thread, ``mm`` = the tgid since /proc does not show mm addresses), its VMAs from
/proc/PID/maps (VMA EXISTING), the frame behind every present page from /proc/PID/pagemap (MAP),
which frames are named (PAGECACHE ADD, see below), and the xxh3-128 hash of every frame's content
read through /proc/PID/mem (PAGE; each frame is read once however many processes map it; the kernel
zero page, KPF_ZERO_PAGE, is the zero hash, traces.pagehash.ZERO_HASH). Kernel numbers that
validate the figures go into COUNTER records: the sums of Rss and Pss of /proc/PID/smaps_rollup,
the share of the frames' Pss held by processes outside the snapshot (from /proc/kpagecount), the
KSM counters; and the tool's own timings (snapshot.stopped_ns and the phases).

Named or anonymous (thesis eq. 4.1, 4.2). A frame is named when it is in the page cache: its
kpageflags lack KPF_ANON, it is not the zero page, and the VMA mapping it has an inode. Its file
identity is the VMA's (dev, ino) and its index the VMA's pgoff plus the page's offset in the VMA.
This covers regular files, private file mappings not yet written (after a write the copy has
KPF_ANON and is anonymous) and shmem: tmpfs files, SysV shm, memfd and MAP_SHARED|MAP_ANONYMOUS
memory (``/dev/zero (deleted)``) all show an inode in maps and lack KPF_ANON, so they are named, as
FORMAT.md says they are (tests/unit/snapshot/test_snapshot.py checks a
tmpfs file). KSM pages keep KPF_ANON and
are anonymous. A private mapping of /dev/zero has an inode but its frames are anonymous or the zero
page, so the rule still holds. Pages of VM_PFNMAP/VM_IO mappings (``[vvar]``, device memory) are
not RAM the process owns: /proc/PID/mem refuses to read them (with --no-contents, smaps VmFlags
"pf"/"io" tell), and they are left out, as Rss leaves them out; so are frames without a struct page
(KPF_NOPAGE).

Stopping: ptrace, not SIGSTOP.
  SIGSTOP is visible to and undoable by others: the parent's waitpid(WUNTRACED) reports it, a
  shell prints "Stopped", and any SIGCONT (the shell, a supervisor, the user) restarts a process in
  the middle of the dump. If the dumper dies (SIGKILL, OOM killer) the processes stay stopped for
  good, and a final SIGCONT would also wake processes that a user had stopped on purpose.
  PTRACE_SEIZE + PTRACE_INTERRUPT put each thread into a ptrace stop that only the tracer ends: a
  SIGCONT from others waits until we detach, the parent sees nothing, a job-control stop the
  process was already in is kept (the kernel re-enters it at detach), signals that arrive while
  stopped are handed back at detach, and if trace-snapshot dies for any reason the kernel detaches
  and the processes run on. The costs: one tracer per process, so a process under gdb or strace
  cannot be stopped (it is skipped with a warning); ptrace works per thread, so every thread is
  seized and interrupted, and /proc/PID/task is listed again until no new thread has appeared (a
  stopped thread cannot create one); Yama ptrace_scope 3 forbids ptrace altogether (one error
  line). Every thread counts as stopped only when waitpid has reported its stop and
  /proc/PID/task/TID/stat shows 't'. A thread in uninterruptible sleep (D) stops only when it
  leaves it: after --stop-timeout its process is let go and skipped. All selected processes are
  stopped together, read, and resumed together: the snapshot is one instant for all of them.
  trace-snapshot never stops itself or its ancestors (that could deadlock the terminal or the
  shell waiting for it).

What happens while the processes are stopped: only what must be consistent with their memory.
Maps, pagemap (PAGEMAP_SCAN finds the present ranges first on Linux 6.7+, so a runtime that
reserves a TiB costs nothing), smaps_rollup, and the page contents: a reader thread copies the
next 8 MiB from /proc/PID/mem (runs of present pages, one read each) while the main thread hashes
the last 8 MiB, and two more threads read kpageflags and kpagecount for the new frames meanwhile.
Then pagemap is read again: pages whose frame changed (the kernel keeps working: KSM, compaction,
reclaim) are read again. Before stopping: selection, buffers (with --store-contents, memory for
all the pages, populated in advance: a page fault per page while stopped cost more than the
read). After resuming: sorting out distinct contents, building and compressing records, writing;
nothing is written to the trace or the terminal while processes are stopped (a stopped process
may be what drains our terminal or pipe). About 0.8 s stopped per GiB on a 2-CPU VM
(bench/bench_snapshot.py). The kernel can still change frames that unselected processes share
with selected ones (a file written with write(2), shmem written by another process); no dump tool
can prevent that. --no-stop reads running processes (a fuzzy snapshot, for looking at a machine
without touching it).

``--every S --count K`` records a series: each snapshot is a TIME record, MARK SNAPSHOT(k) and
MARK STATE_BEGIN(reset) ... MARK STATE_END, so a replay forgets the previous snapshot's state.
Time is nanoseconds since the tool started (header ``clock_unit`` "ns").

The package, one module per concern: ``procfs`` (the kernel's /proc formats), ``stop`` (ptrace:
stopping and releasing thread groups), ``selection`` (which processes), ``layout`` (maps and
pagemap of one process, PAGEMAP_SCAN), ``frames`` (what is known about each frame: kpageflags,
kpagecount, hash), ``read`` (planning the reads of /proc/PID/mem and hashing them), ``take`` (one
snapshot: stop, read, resume), ``write`` (one snapshot as trace records), ``cli`` (the
``trace-snapshot`` command; ``python -m memtrace.snapshot`` runs it too).
"""
