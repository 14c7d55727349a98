"""The exceptions of trace-snapshot: what ends the tool, what skips one process."""

from __future__ import annotations

import signal


class SnapshotError(Exception):
    """A failure reported as one line: ``trace-snapshot: error: <message>``."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class TargetSkipped(Exception):
    """A process cannot be dumped (the reason is the message); the others can."""


class TargetGone(TargetSkipped):
    """The process exited during the snapshot."""
