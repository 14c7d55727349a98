"""Who may write to the agent: each attempt in a child that drops root first, one line each.

    MT-PERM <who> <file> <command> -> ok | <errno name>

/proc/memtrace is written by root only; /proc/memtrace-mark (agent parameter mark_gid) takes
phase and counter marks from members of that group and nothing else."""

import errno
import os
import sys

GID = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else 1000
ATTEMPTS = [
    # who, uid, supplementary groups, file, command
    ("user", 1001, [], "/proc/memtrace", "phase user-phase-main"),
    ("user", 1001, [], "/proc/memtrace", "stop"),
    ("user", 1001, [], "/proc/memtrace-mark", "phase user-phase-outsider"),
    ("member", 1002, [GID], "/proc/memtrace", "phase member-phase-main"),
    ("member", 1002, [GID], "/proc/memtrace-mark", "phase member-phase"),
    ("member", 1002, [GID], "/proc/memtrace-mark", "counter member.value 7"),
    ("member", 1002, [GID], "/proc/memtrace-mark", "stop"),
]

for who, uid, groups, path, command in ATTEMPTS:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setgroups(groups)
        os.setgid(uid)
        os.setuid(uid)
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, command.encode())
            finally:
                os.close(fd)
            result = "ok"
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno))
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    result = os.read(r, 64).decode() or "no-answer"
    os.close(r)
    os.waitpid(pid, 0)
    print(f"MT-PERM {who} {path} {command.split()[0]} {command.split()[-1]} -> {result}",
          flush=True)
