"""The interface every analysis implements, and the result it hands back.

Modelled on DynamoRIO's drmemtrace analysis tools: the engine replays the trace once and drives
any number of analyses; each sees the state change by change and builds its report at the end.
Adding an analysis means writing one such class; the engine does not change.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from memtrace.analyses.engine import Replay
    from memtrace.analyses.state import ReplayState
    from memtrace.traces.reader import Chunk


def positive_int(s: str) -> int:
    """An argparse type for counts such as ``--top K``: an integer of at least 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {s!r}")
    return v


@dataclass
class Table:
    """Rows of values under named columns (a series when the first column is time)."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    title: str = ""


@dataclass
class Result:
    """What an analysis reports: scalar summaries and tables, all JSON-serializable."""

    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Analysis:
    """Base class: override the hooks you need.

    Hooks run in trace order. ``on_interval(state, t0, t1)`` says the state stayed as it is
    on [t0, t1); ``on_content(cids, before, after)`` reports changes of how many mapped frames
    hold each content; ``on_records(state, kind, records, chunk)`` passes event records
    (TASK, VMA, MARK, COUNTER, LOST) after they were applied.
    """

    name = "analysis"
    #: command-line switch that selects the analysis, and its one-line help
    flag = ""
    help = ""
    #: run when trace-analyze is given no analysis switch
    default = False
    wants_content_deltas = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the analysis's own options (e.g. model parameters) to trace-analyze."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Analysis:
        """Build the analysis from trace-analyze's parsed arguments."""
        return cls()

    def begin(self, replay: Replay) -> None:
        self.replay = replay

    def on_interval(self, state: ReplayState, t0: int, t1: int) -> None:
        pass

    def on_content(self, cids: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
        pass

    def on_records(self, state: ReplayState, kind: int, records: np.ndarray, chunk: Chunk) -> None:
        """A block of records of ``kind`` (any kind but WRITE), after the state applied it."""

    def end(self, state: ReplayState) -> None:
        pass

    def result(self) -> Result:
        raise NotImplementedError
