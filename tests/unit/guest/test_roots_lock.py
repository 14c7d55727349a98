"""The committed lock of the project's Debian roots (guest-agent/roots.lock.json) and the checks a
build makes against the archive, with a stand-in for apt's view of it."""

from __future__ import annotations

import json

import pytest

from memtrace.guest import roots
from memtrace.guest.build_image import BuildError


def test_every_recipe_is_locked_whole():
    locked = roots.read_roots_lock()
    assert set(locked) == set(roots.RECIPES)
    for name, r in locked.items():
        assert r["include"] == sorted(set(roots.RECIPES[name]))
        # what mmdebstrap's minbase always brings, plus the recipe's own packages
        for pkg in ("libc6", "dpkg", "base-files", *r["include"]):
            assert pkg in r["packages"], (name, pkg)


def test_lock_is_validated(tmp_path):
    bad = tmp_path / "lock.json"
    bad.write_text(json.dumps({"suite": "bookworm", "arch": "amd64", "variant": "minbase",
                               "roots": {"base": {"include": [],
                                                  "packages": {"x": {"version": "1"}}}}}))
    with pytest.raises(BuildError, match="needs a version and a sha256"):
        roots.read_roots_lock(bad)
    bad.write_text(json.dumps({"suite": "trixie", "arch": "amd64", "variant": "minbase",
                               "roots": {}}))
    with pytest.raises(BuildError, match="trixie"):
        roots.read_roots_lock(bad)


def test_versions_no_longer_served_stop_the_build(monkeypatch):
    sha = "a" * 64
    served = {"libc6": {"2.36-9+deb12u15": sha}, "dpkg": {"1.21.23": "b" * 64}}
    monkeypatch.setattr(roots, "served_versions", lambda apt, names: {n: served.get(n, {})
                                                                       for n in names})
    lock = {"libc6": {"version": "2.36-9+deb12u14", "sha256": sha}}
    with pytest.raises(BuildError, match=r"libc6 2\.36-9\+deb12u14 is locked but bookworm no "
                                         r"longer serves it \(it serves 2\.36-9\+deb12u15\); "
                                         r"re-lock with python -m memtrace.guest.roots lock base"):
        roots.check_locked_served(None, "base", lock)  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="sha256"):
        roots.check_locked_served(None, "base", {"dpkg": {"version": "1.21.23",  # type: ignore
                                                          "sha256": sha}})
    roots.check_locked_served(None, "base", {"dpkg": {"version": "1.21.23",  # type: ignore
                                                      "sha256": "b" * 64}})
    with pytest.raises(BuildError, match="nosuch does not exist"):
        roots.check_packages_exist(None, ["nosuch"])  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="not a Debian package name"):
        roots.check_packages_exist(None, ["Bad Name"])  # type: ignore[arg-type]
