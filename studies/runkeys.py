"""What identifies a run: its inputs, hashed, so that running a study again skips what is done.

A recording is the same when its workload, its parameters as trace-record resolves them
(``epoch = "10M"`` and ``epoch = 10000000`` are one run; a default is written out), its repeat
index, the guest image (the manifest ``build_image.py`` writes: the lock, the agent's and the
scenarios' sources, the kernel, the initramfs) and the tools (memtrace's version, the QEMU
version and the tracer plugin's sha256 on the worker) are. An analysis is the same when its
recording and trace-analyze's resolved arguments and memtrace's version are. Changing any
input gives a new key, so an old result is never taken for a new one; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any

from memtrace.studies.studyfile import RunSpec

KEY_LEN = 12  # hex digits in names; the full digest is in the run's record


def tool_version() -> str:
    try:
        return metadata.version("memtrace")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_inputs(spec: RunSpec, environment: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a recording depends on. ``environment``: what ``tasks.prepare`` reported
    about the workers' guest image and tools (None for command workloads, which use neither)."""
    return {"kind": spec.kind, "workload": spec.workload, "arguments": spec.canonical,
            "repeat": spec.repeat, "environment": environment or {},
            "memtrace": tool_version()}


def run_key(spec: RunSpec, environment: dict[str, Any] | None) -> str:
    return digest(run_inputs(spec, environment))


def analysis_key(run: str, analyze: dict[str, Any]) -> str:
    return digest({"run": run, "analyze": analyze, "memtrace": tool_version()})


def run_name(spec: RunSpec, key: str) -> str:
    """A run's folder and trace name: readable, and unique through the key."""
    return f"{spec.label()}-{key[:KEY_LEN]}"
