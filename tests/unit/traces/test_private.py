"""Memory contents stay private: files holding page bytes are 0600 whatever the umask, never
written through a planted symlink, and a trace can be stripped of them to be shared."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from memtrace.analyses.engine import Replay, state_digest
from memtrace.traces.private import UnsafePath, check_output, create_private
from memtrace.traces.reader import open_trace
from memtrace.traces.writer import TraceWriter
from tests.helpers import content


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def write(path, contents: bool, private: bool = False):
    with TraceWriter(path, {"ram_size": 4 * 4096, "source": "synthetic"}, private=private) as w:
        w.time(1)
        lo, hi = content(7)
        w.page(1, lo, hi)
        if contents:
            w.content(lo, hi, (7).to_bytes(8, "little") * 512)


def test_trace_with_contents_is_owner_only_under_umask_000(tmp_path, open_umask):
    write(tmp_path / "hashes.mtr", contents=False)
    write(tmp_path / "pages.mtr", contents=True)
    write(tmp_path / "born.mtr", contents=False, private=True)
    assert mode(tmp_path / "hashes.mtr") == 0o666  # hashes only: the user's umask rules
    assert mode(tmp_path / "pages.mtr") == 0o600
    assert mode(tmp_path / "born.mtr") == 0o600


def test_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "ram"
    link.symlink_to(victim)
    with pytest.raises(UnsafePath, match="symlink"):
        create_private(link)
    with pytest.raises(UnsafePath, match="symlink"):
        TraceWriter(link, {"ram_size": 4096}, private=True)
    assert victim.read_text() == "keep me"
    with pytest.raises(FileExistsError):
        os.close(create_private(victim, exclusive=True))


def test_output_paths_another_user_controls(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, not sticky
    with pytest.raises(UnsafePath, match="not sticky"):
        check_output(shared / "snap.mtr")
    shared.chmod(0o1777)
    check_output(shared / "snap.mtr")
    theirs = shared / "theirs.mtr"
    theirs.write_text("")
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UnsafePath, match="belongs to uid 65534"):
            check_output(theirs)


def test_strip_drops_the_content_store_and_keeps_the_records(tmp_path, open_umask):
    src = tmp_path / "pages.mtr"
    write(src, contents=True)
    assert open_trace(src).content(*content(7)) is not None
    out = subprocess.run([sys.executable, "-m", "memtrace.traces.strip", str(src),
                          str(tmp_path / "shared.mtr")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    tr = open_trace(tmp_path / "shared.mtr")
    assert tr.complete_index and not tr.content_chunks
    assert tr.content(*content(7)) is None
    assert tr.header["content_store"] == "stripped"
    a = state_digest(Replay(open_trace(src), progress=False).run())
    b = state_digest(Replay(tr, progress=False).run())
    assert a == b
    bad = subprocess.run([sys.executable, "-m", "memtrace.traces.strip", str(src), str(src)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "is the trace itself" in bad.stderr
    assert "Traceback" not in bad.stderr
