"""Guest RAM in /dev/shm is private: trace-record creates the file before QEMU opens it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memtrace.tracer.qemu import GuestRun, SetupError


def run_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GuestRun:
    run = GuestRun(kernel=Path("bzImage"), initrd=Path("initramfs.cpio"), append="",
                   ram_size=8 << 20, workdir=tmp_path)
    # the RAM file's name, in a folder of the test's own instead of /dev/shm
    monkeypatch.setattr(GuestRun, "ram_path", property(lambda r: tmp_path / f"{r.tag}.ram"))
    return run


def test_ram_file_is_owner_only_under_any_umask(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_in(tmp_path, monkeypatch)
    old = os.umask(0)
    try:
        run.create_ram_file()
    finally:
        os.umask(old)
    st = run.ram_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 8 << 20 and st.st_blocks == 0  # sized, not written: QEMU maps it
    run.cleanup()
    assert not run.ram_path.exists()


def test_planted_symlink_is_not_followed(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone puts a symlink at the RAM file's name (pointing at a file of theirs to receive
    guest RAM, or at one of ours to be overwritten): one line, nothing written through it, and
    cleanup leaves the name alone (it is not ours)."""
    run = run_in(tmp_path, monkeypatch)
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    run.ram_path.symlink_to(target)
    with pytest.raises(SetupError) as e:
        run.create_ram_file()
    assert "\n" not in str(e.value) and str(run.ram_path) in str(e.value)
    assert target.read_bytes() == b"keep"
    run.cleanup()
    assert run.ram_path.is_symlink() and target.read_bytes() == b"keep"


def test_existing_file_at_the_name_is_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_in(tmp_path, monkeypatch)
    run.ram_path.write_bytes(b"someone else's")
    with pytest.raises(SetupError, match="cannot create the guest RAM file"):
        run.create_ram_file()
    assert run.ram_path.read_bytes() == b"someone else's"
