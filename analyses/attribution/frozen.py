"""The replay state as the attribution reads it, live or kept for later."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from memtrace.analyses.kernels import ContentHashes
from memtrace.analyses.state import AddressSpace, ReplayState, Task


@dataclass
class FrozenState:
    """A copy of the parts of a ``ReplayState`` the attribution reads, kept for later.

    The default instant (the sample with the most frames mapped) is only known at the end of the
    replay, so each new maximum is copied when it is seen. Its content ids name the contents of
    that instant: their hashes are copied too, since the replay gives the ids of contents it
    forgets to new ones. VMA objects are replaced, never changed, by the state, so copying the
    dicts that hold them is enough; tasks are changed in place, so they are copied.
    """

    t: int
    page_size: int
    content: np.ndarray
    named: np.ndarray
    file_of: dict[int, tuple[int, int, int]]
    spaces: dict[int, AddressSpace]
    tasks: dict[int, Task]
    zero_cid: int
    contents: ContentHashes
    mapped_frames: int = 0

    def mappings(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """mm -> (virtual pages, frames), as ``ReplayState.mappings``."""
        return {mm: sp.mapping() for mm, sp in self.spaces.items() if sp.npages}


#: what the attribution reads: a live replay state or a copy kept for later
StateView = ReplayState | FrozenState


def freeze(st: ReplayState, t: int | None = None) -> FrozenState:
    maps = st.mappings()
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    spaces = {mm: sp.freeze(maps.get(mm, empty)) for mm, sp in st.spaces.items()
              if mm in maps or sp.vmas}
    return FrozenState(st.t if t is None else t, st.page_size, st.content.copy(),
                       st.named.copy(), dict(st.file_of), spaces,
                       {pid: copy.copy(task) for pid, task in st.tasks.items()}, st.zero_cid,
                       st.contents.hashes(), st.mapped_frames)
