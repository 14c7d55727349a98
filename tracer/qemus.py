"""The QEMU binaries trace-record runs, the plugin build for each, and the check before a boot.

A plugin is built against one QEMU's ``qemu-plugin.h`` and loads only into a QEMU that accepts
its plugin API version (QEMU 7.2: API 1 only; QEMU 10.0: API 2 to 4). So each binary gets its
own build (``Qemu.plugin``) in the cache (memtrace.tracer.cache): the system's
``qemu-system-x86_64`` in ``CACHE/tracer/``, any other in ``CACHE/tracer-qemu-<version>/``, each
with a ``build.json`` saying which QEMU source and plugin API it was built for and a digest of
the tracer's C sources (a stale build is rebuilt).

    system   the host's qemu-system-x86_64 (Debian 12: 7.2, Debian 13: 10.0)
    10       QEMU 10: the host's own on Debian 13, else bookworm-backports' unpacked in the cache
             (tracer/qemu10.py, locked in tracer/qemu10.lock.json)
    PATH     any qemu-system-x86_64 (its plugin is built from its Debian source package, or
             given with trace-record --plugin)

``preflight()`` runs before a guest boots: the binary is a QEMU, it can load plugins, the
plugin was built for it, and the plugin accepts the vCPU count (it answers ``probe=on`` with one
line and refuses to install, so QEMU exits at once). Each failure is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from memtrace.tracer import cache
from memtrace.tracer.qemu import TRACER, SetupError, plugin_path

BUILD_SH = TRACER / "build.sh"
# the header of Debian 13's QEMU 10.0 (bookworm-backports' source package lacks its Debian
# part on the mirrors; the plugin header is the same in every 10.0.x)
QEMU10_HEADER = ("trixie", "latest")


def source_digest() -> str:
    """sha256 over the tracer's C sources and build script (build.sh writes the same)."""
    h = hashlib.sha256()
    for p in sorted(TRACER.glob("*.[ch]")) + [BUILD_SH]:
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Qemu:
    """A qemu-system-x86_64 and what trace-record needs to run it with the plugin."""

    path: Path
    version: str                    # upstream, e.g. "10.0.2"
    debian: str | None = None       # its Debian package version, e.g. "1:7.2+dfsg-7+deb12u18+b3"
    datadir: Path | None = None     # -L: firmware of an unpacked QEMU
    system: bool = False            # the host's own (its plugin in CACHE/tracer)
    header: tuple[str, str] | None = None  # (suite, source version) of qemu-plugin.h

    @property
    def series(self) -> str:
        """major.minor: plugin builds are interchangeable within a series."""
        return ".".join(self.version.split(".")[:2])

    @property
    def plugin(self) -> Path:
        if self.system:
            return plugin_path()
        return cache.path(f"tracer-qemu-{self.version}") / "libmemtrace.so"

    def args(self) -> list[str]:
        """Command-line arguments before the machine's (-L for an unpacked QEMU)."""
        return ["-L", str(self.datadir)] if self.datadir else []

    def describe(self) -> str:
        return f"QEMU {self.version} ({self.path})"


def identify(path: str | Path) -> tuple[str, str | None]:
    """(upstream version, Debian version or None) of a QEMU binary; one-line error if the file
    is not a QEMU."""
    try:
        r = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SetupError(f"--qemu {path}: no such file") from None
    except PermissionError:
        raise SetupError(f"--qemu {path}: not executable") from None
    except OSError as e:
        raise SetupError(f"--qemu {path}: cannot run it ({e.strerror})") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"--qemu {path}: '--version' did not answer in 60 s: not a QEMU?"
                         ) from None
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)(?:\s*\(Debian ([^)]+)\))?",
                  r.stdout)
    if not m:
        said = (r.stdout + r.stderr).strip().splitlines()
        raise SetupError(f"--qemu {path} is not a QEMU system emulator ('--version' said: "
                         f"{said[0][:80] if said else 'nothing'})")
    return m.group(1), m.group(2)


def system_qemu() -> Qemu:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise SetupError("qemu-system-x86_64 not found: install the Debian package "
                         "qemu-system-x86 (bash scripts/setup.sh does it)")
    version, debian = identify(exe)
    return Qemu(Path(exe), version, debian, system=True)


def qemu10() -> Qemu:
    """QEMU 10: the host's own (Debian 13), else the locked one unpacked in the cache."""
    sys_q = system_qemu()
    if int(sys_q.version.split(".")[0]) >= 10:
        return sys_q
    from memtrace.tracer import qemu10 as locked

    binary, datadir = locked.ensure()
    version, debian = identify(binary)
    return Qemu(binary, version, debian, datadir=datadir, header=QEMU10_HEADER)


def resolve(spec: str | None) -> Qemu:
    """``system`` (default), ``10`` or a path to a qemu-system-x86_64."""
    if spec in (None, "", "system"):
        return system_qemu()
    if spec == "10":
        return qemu10()
    path = Path(spec)
    version, debian = identify(path)
    exe = shutil.which("qemu-system-x86_64")
    if exe and path.resolve() == Path(exe).resolve():
        return system_qemu()
    from memtrace.tracer import qemu10 as locked

    if locked.home() in path.resolve().parents:
        q = qemu10()
        if q.path.resolve() == path.resolve():
            return q
    datadir = path.resolve().parent.parent / "share" / "qemu"
    return Qemu(path, version, debian, datadir=datadir if datadir.is_dir() else None)


def build_info(plugin: Path) -> dict[str, object] | None:
    try:
        return json.loads((plugin.parent / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _build(q: Qemu) -> None:
    """build.sh into a staging folder, renamed into place (the caller holds the item's lock)."""
    dest = q.plugin.parent
    tmp = cache.staging(dest)
    args = ["bash", str(BUILD_SH), "--out", str(tmp)]
    if q.header:
        args += ["--suite", q.header[0], "--qemu-version", q.header[1]]
    elif not q.system:
        if not q.debian:
            raise SetupError(f"{q.describe()} is not from a Debian package, so its "
                             "qemu-plugin.h cannot be fetched: build the plugin with "
                             "tracer/build.sh --header .../qemu-plugin.h --out DIR and pass "
                             "--plugin DIR/libmemtrace.so")
        args += ["--qemu-version", re.sub(r"\+b\d+$", "", q.debian)]  # binNMU: same source
    print(f"trace-record: building the tracer plugin for {q.describe()} (cache {dest})",
          flush=True, file=sys.stderr)
    r = subprocess.run(args, timeout=3600, env={**os.environ, cache.ENV: str(cache.root())})
    if r.returncode != 0 or not (tmp / q.plugin.name).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SetupError(f"building the tracer plugin for {q.describe()} failed (see above); "
                         f"rerun {' '.join(args[1:2] + args[4:])} --out {dest}")
    cache.replace(tmp, dest)


def ensure_plugin(q: Qemu) -> Path:
    """The plugin build for ``q``, built when missing or older than the tracer's sources
    (under the cache item's lock: two runs starting at once build it once)."""

    def fresh() -> bool:
        info = build_info(q.plugin)
        return q.plugin.exists() and info is not None and info.get("sources") == source_digest()

    if not fresh():
        with cache.lock(q.plugin.parent.name):
            if not fresh():
                _build(q)
    return q.plugin


def check_build(q: Qemu, plugin: Path) -> None:
    """One line if ``plugin`` was built for another QEMU series than ``q``."""
    if not plugin.exists():
        raise SetupError(f"--plugin {plugin}: no such file")
    info = build_info(plugin)
    if info is None:
        return  # a build without build.json (by hand): the probe decides
    built = str(info.get("qemu_series") or "")
    if built and built != q.series:
        raise SetupError(f"{plugin} was built for QEMU {built} (plugin API "
                         f"{info.get('plugin_api')}), not for {q.describe()}: rebuild it, or "
                         "let trace-record build one (omit --plugin)")


def probe(q: Qemu, plugin: Path, smp: int) -> str:
    """Ask QEMU to load the plugin with ``probe=on`` and -smp N; returns the plugin's line or
    raises one line saying why QEMU or the plugin refused."""
    cmd = [str(q.path), *q.args(), "-accel", "tcg", "-machine", "pc", "-smp", str(smp),
           "-display", "none", "-nodefaults", "-no-user-config",
           "-plugin", f"{plugin},probe=on"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise SetupError(f"{q.describe()} did not answer the plugin probe in 120 s "
                         f"({' '.join(cmd)})") from None
    out = r.stdout + r.stderr
    lines = [ln for ln in out.splitlines() if ln.strip()]
    ok = [ln for ln in lines if ln.startswith("memtrace: probe ok:")]
    if ok:
        return ok[0].removeprefix("memtrace: ")
    mine = [ln.removeprefix("memtrace: ") for ln in lines
            if ln.startswith("memtrace: ") and "plugin arguments" not in ln]
    if mine:
        raise SetupError(f"the tracer plugin refused: {mine[0]}")
    if re.search(r"-plugin.*invalid option|invalid option.*-plugin|plugin.*not supported|"
                 r"unrecognized option '-plugin'", out, re.I):
        raise SetupError(f"{q.describe()} has no TCG plugin support (built without "
                         "--enable-plugins): use a QEMU that has it (Debian's do)")
    api = re.search(r"(plugin requires API version \d+[^\n]*|undefined symbol: \w+)", out)
    if api:
        info = build_info(plugin) or {}
        built = f" (built for plugin API {info['plugin_api']})" if "plugin_api" in info else ""
        raise SetupError(f"{q.describe()} cannot load {plugin}{built}: {api.group(1)}; use "
                         "the build for this QEMU (omit --plugin)")
    said = lines[-1] if lines else f"exit code {r.returncode}"
    raise SetupError(f"{q.describe()} did not load the tracer plugin: {said}")


def preflight(q: Qemu, plugin: Path, smp: int) -> str:
    """Every check before a boot (see the module docstring); returns the probe's line."""
    check_build(q, plugin)
    return probe(q, plugin, smp)
