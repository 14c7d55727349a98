"""Files that hold memory contents are their owner's alone.

A page's bytes are other people's secrets (a browser's heap, an ssh-agent's keys). Every file we
write that holds them, a trace with a content store, guest RAM and its stop image, a
verification's scratch copy, is created readable and writable by its owner only (0600, whatever
the umask), without following a symlink planted at its name, and, where a name could be raced
(/dev/shm, /tmp), with O_EXCL. Traces of hashes only keep the user's umask: they are meant to be
shared (README, "What a trace reveals").
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600


class UnsafePath(OSError):
    """A path another user could control, or a name that is not a plain file of ours."""


def create_private(path: str | os.PathLike[str], exclusive: bool = False) -> int:
    """Open ``path`` for writing as a private file (mode 0600, truncated, never through a
    symlink at its last component); returns the descriptor. With ``exclusive`` the name must
    not exist yet (O_EXCL): for names in shared folders."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink sits at the name
            raise UnsafePath(e.errno, "a symlink sits at this name; refusing to follow it",
                             os.fspath(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePath(1, "not a regular file of ours", os.fspath(path))
    os.fchmod(fd, PRIVATE_MODE)  # the umask may only have narrowed it; make it exact
    return fd


def make_private(fd: int) -> None:
    """Narrow an open file to its owner (a trace that is about to receive page contents)."""
    os.fchmod(fd, PRIVATE_MODE)


def check_output(path: str | os.PathLike[str]) -> None:
    """Refuse an output path another user controls: an existing file we do not own, or a name in
    a world-writable folder without the sticky bit (anyone could replace it)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        pst = os.stat(parent)
    except OSError:
        return  # the caller reports a missing folder its own way
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise UnsafePath(1, f"the folder {parent} is writable by everyone and not sticky: "
                            "another user could swap the file; write elsewhere", os.fspath(p))
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(1, "a symlink sits at this name; refusing to follow it", os.fspath(p))
    if st.st_uid != os.geteuid():
        raise UnsafePath(1, f"the file exists and belongs to uid {st.st_uid}; refusing to "
                            "overwrite another user's file", os.fspath(p))
