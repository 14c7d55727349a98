"""Linux KSM replayed over a trace: what ksmd would have merged, when, and at what scanning cost.

The trace says, at every instant, which anonymous pages exist and what they hold. This analysis
drives a model of the kernel's Kernel Samepage Merging (``mm/ksm.c``, 6.1 semantics) over that
history, with the parameters of its sysfs interface, and compares what it merges with the oracle
(what any page-granular deduplication of the same pages could share at the same instants).

What is modelled, and where it comes from in ``mm/ksm.c``:

* **Time.** ``ksm_scan_thread`` runs ``ksm_do_scan(pages_to_scan)`` and sleeps ``sleep_millisecs``.
  A batch is instantaneous at guest time ``origin + k * cycle`` and sees the trace state in force
  then. Between two TIME records the state is constant, so every batch is exact at the trace's
  resolution. The sleep is whole jiffies: ``msecs_to_jiffies`` rounds up and the timer wheel
  fires one jiffy after the expiry (``calc_index``), so with the guest's HZ known (the agent's
  ``guest.hz`` counter, or ``--ksm-hz``) the cycle is ``ceil(sleep * HZ / 1000) + 1`` jiffies:
  56 ms for 50 ms at HZ=250, 24 ms for 20 ms (``cycle_ms``). ksmd's own running time (about 1 ms
  per 100 pages under TCG, from its schedstat) ends within the jiffy it woke in, so it adds
  nothing - except when a batch runs past that jiffy, which the model does not predict.
  Guest time comes from the guest's own clock when the trace has it (the agent's
  ``guest.clock_ns`` counters, interpolated: ``GuestClock``), else from the trace clock and
  ``clock_hz``. A recorded trace's clock is retired instructions, a poor proxy: they stand still
  while the guest idles, and within one ``ksm`` recording they ran at 15 to 180 M per guest
  second.
* **Rmap items and the cursor.** An rmap item is one (mm, virtual page) of an anonymous page in
  scope. ``scan_get_next_rmap_item`` walks the mm list (``ksm_mm_head``) and each mm's pages in
  address order; pages mapping the kernel zero page are not ``PageAnon`` and are skipped without
  being counted. A new mm is inserted *just behind the cursor* (``__ksm_enter``), so it is first
  visited in the next full scan. When the walk passes the last mm, ``ksm_scan.seqnr`` (sysfs
  ``full_scans``) increments and ``ksm_do_scan`` returns early: the rest of that batch is lost,
  so a round of M pages takes ``M // pages_to_scan + 1`` batches.
* **cmp_and_merge_page**, in its order: a page already in the stable tree is skipped; the page is
  removed from the tree it was in (``remove_rmap_item_from_tree``); the **stable tree** is searched
  first, for every page (a match merges at once: ``pages_sharing++``); then the page's checksum
  must equal the one from its previous visit (``oldchecksum``; a new rmap item has none), else it
  is **volatile** and only its checksum is recorded; with ``use_zero_pages`` an empty page is
  merged with the kernel zero page; then the **unstable tree** (rebuilt every full scan) is
  searched: a match with another page creates a new stable node holding both
  (``pages_shared++``, ``pages_sharing++``), a match with the same page (shared by fork) does
  nothing ("don't substitute a ksm page for a forked page"), no match inserts the page
  (``pages_unshared++``). Checksums are the trace's content ids (xxh3_128 of the page).
* **max_page_sharing.** A stable node takes at most that many rmap items; a full node is skipped
  and a new node for the same content (a "dup" of a stable-node chain) is created by a later
  unstable-tree match; the search prefers the fullest dup that still has room
  (``stable_node_dup``). A page that already is a node's KSM page (a fork sibling of a merged
  page) joins that node over the limit (``max_page_sharing_bypass``, "KSM fork").
* **Counters lag, savings do not.** A write to a merged page breaks COW at once: from that
  instant the page no longer saves memory (``saved_pages`` drops). The kernel does not notice
  until ksmd next visits that rmap item (or finds the KSM page freed), so ``pages_sharing`` keeps
  counting it until then, as sysfs does. ``pages_volatile = rmap_items - pages_shared -
  pages_sharing - pages_unshared`` (clamped at 0), ``general_profit = (pages_sharing +
  zero-page merges) * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)`` (64 bytes on
  x86-64; the 6.10+ formula, which counts merges with the zero page).

Approximations (also listed in the report's notes): pages that disappear (unmap, exit, leaving
the scope) leave the counters at once, while the kernel frees their rmap items when the walk next
passes their address; a stale unstable-tree entry (its page changed since insertion) is replaced
by the page being scanned; the kernel zero page is recognized as the zero-content frame mapped at
two or more places in scope (one such frame; a fork-shared zeroed page can be mistaken for it).
A page remapped to another frame with the same content (a guest's own KSM merging it, page
migration) keeps its identity, so a trace recorded with KSM running in the guest is modelled as
the un-merged workload.

Savings. ``saved_pages`` are frames freed by the model within its scope: frames of the in-scope
pages minus those still needed, which are the frames with an unmerged page plus one KSM page per
live stable node - the KSM page is the frame of the page scanned when the node was made
(``try_to_merge_two_pages``), so it counts once while unmerged fork siblings still map it and
holds the node's content; merges with the zero page free their frame. Savings can dip below zero
for a while: merging one mapping of a fork-shared frame does not free that frame, and if the KSM
page's first owner then breaks COW, three frames serve what two did. The ceiling at the same
instant is the scope oracle: in-scope frames minus distinct contents among them (the zero page
counts as one content, like full CBPS). The whole-guest oracle (mmap/fork - full CBPS) is
reported alongside.

A sharing opportunity is a content held by two or more in-scope frames; its latency is the time
from that moment to the model's first merge of that content; an opportunity that ends before any
merge is missed (the short-lived sharing that XLH says scanners cannot see).

The smarter scanner ("hinted") is XLH-style (Miller et al., ATC'13): pages whose content changed
are queued when the trace shows the change, and once they have been stable for one sleep period
they are scanned first, with up to half of each batch, their checksum test passed on the strength
of the write history (a hypervisor would get this from dirty logging); the rest of the batch
continues the ordinary linear scan. Same pages scanned, compared on savings.

Validation against a real kernel: COUNTER records ``ksm.*`` (the guest scenario ``ksm`` writes
them every 0.1 s of guest time) are compared with the first model's counters at the same instants;
"final" is the last sample of the phase ksmd was started in (``--ksm-start phase:NAME``), not a
sample taken after the workload exited. That scenario madvises 2 x 2 x 256 identical pages, turns
KSM on at its phase ``merge`` with ``pages_to_scan`` 100 and ``sleep_millisecs`` 50, and the
guest agent reports madvise(MADV_MERGEABLE) as VMA PROTECT, so the default madvised scope is the
kernel's. Measured on six recordings (``trace-analyze --ksm --ksm-pages-to-scan 100
--ksm-sleep-ms 50 --ksm-start phase:merge``, ``tests/e2e/test_ksm_validation.py``): final
``pages_sharing`` 1020 = 1020 in all, ``full_scans`` equal (6) in all, mean |model - kernel|
``pages_sharing`` over the ~35 samples of phase merge 2.9 to 16 pages (mean 9.5, 1 % of 1020),
all of it on the 0.6 s ramp, where the model runs up to one batch (100 pages) ahead: the kernel's
cycle is sometimes a jiffy longer (a batch that runs past its jiffy, the ``lru_add_drain_all``
at the head of each full scan), and a sample can catch ksmd in the middle of a batch. Without the
guest clock and jiffies (``--ksm-no-guest-clock --ksm-hz 0``) the mean error was 24 to 69 pages
and ``full_scans`` 3 or 4 for the kernel's 6; with 4000 pages per batch every 20 ms the model made
167 to 171 full scans for the kernel's 160 to 165 (its 1024-page batches sometimes cross a jiffy).
Older traces, without the madvise events, need ``--ksm-scope anon``, which also scans every other
process's anonymous memory (on such a trace, model 1274 against kernel 1020).

Implementation. Several models (``--ksm-sweep``, the hinted twins) share one ``ItemSpace``: the
in-scope pages in flat arrays, one segment per mm, rebuilt per mm from the MAP records of the
interval, their contents refreshed from the frames the PAGE records wrote (the engine hands every
block to ``on_records`` after the state applied it). A batch of ``pages_to_scan`` pages is a slice
of those arrays; since contents are independent of each other, a content that no other page in
the step, no stable node and no unstable-tree entry involves is handled with array operations,
and only the rest goes page by page (``KsmModel._process``). A full scan that changed nothing over a
constant state repeats identically, so the remaining ones of that interval are counted, not run.
``tests/test_ksm.py`` checks all of this against a plain page-at-a-time reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.analyses.base import Analysis, Result, Table, positive_int
from memtrace.analyses.content import one_of_each
from memtrace.analyses.guestclock import GUEST_CLOCK_COUNTER, GUEST_HZ_COUNTER, GuestClock
from memtrace.analyses.timeline import pages_to_mib
from memtrace.traces.format import (
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_IO,
    VM_MAYSHARE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    Kind,
    MarkOp,
)

if TYPE_CHECKING:
    from memtrace.analyses.engine import Replay
    from memtrace.analyses.state import AddressSpace, ReplayState
    from memtrace.traces.reader import Chunk

#: flags ksm_madvise_merge() / vma_ksm_compatible() refuse
VM_KSM_INCOMPATIBLE = (VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_HUGETLB
                       | VM_MIXEDMAP)
RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on x86-64
#: guest instructions per second assumed when the trace does not say (clock_unit instructions)
DEFAULT_CLOCK_HZ = 1_000_000_000
#: a recorder's estimate of clock units per second, written at the end of a recording
CLOCK_COUNTER = "tracer.clock_hz"
KERNEL_PREFIX = "ksm."
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "general_profit", "ksm_zero_pages")
#: the sysfs knobs a guest scenario may report, and the model parameter each one is
KNOBS = {"pages_to_scan": "pages_to_scan", "sleep_millisecs": "sleep_ms",
         "max_page_sharing": "max_page_sharing", "use_zero_pages": "use_zero_pages"}

# rmap item states
NONE, UNSTABLE, STABLE, BROKEN, ZERO = 0, 1, 2, 3, 4
NEVER = -2  # no checksum yet (a new rmap item)
NO_CONTENT = -3  # placeholder: content to be read at the next sync
NOT_COUNTED = -5  # a page id not counted in the scope oracle
MAX_SEGMENT = 1 << 18  # items processed per vectorized step
SCAN_ROWS_MAX = 100_000


@dataclass(frozen=True)
class KsmParams:
    """One parameter set, as in /sys/kernel/mm/ksm, plus the scanner flavour."""

    pages_to_scan: int = 100
    sleep_ms: float = 20.0
    max_page_sharing: int = 256
    use_zero_pages: bool = False
    scanner: str = "linear"  # or "hinted"

    @property
    def label(self) -> str:
        return f"{self.pages_to_scan}:{self.sleep_ms:g}" + (
            "+hints" if self.scanner == "hinted" else "")

    def scan_rate(self) -> float:
        """Pages per second of guest time."""
        return self.pages_to_scan * 1000.0 / self.sleep_ms


class Series:
    """A piecewise-constant value and its integral over time (for time-weighted means).

    Times are trace times; with a ``clock`` (a ``GuestClock`` with knots) the integral is over
    guest seconds instead."""

    __slots__ = ("v", "t", "area", "t0", "clock")

    def __init__(self, t0: float, v: float = 0.0, clock: GuestClock | None = None) -> None:
        self.clock = clock
        t0 = self._g(t0)
        self.v, self.t, self.area, self.t0 = v, t0, 0.0, t0

    def _g(self, t: Any) -> Any:
        return t if self.clock is None else self.clock.guest(t)

    def set(self, t: float, v: float) -> None:
        t = self._g(t)
        if t > self.t:
            self.area += self.v * (t - self.t)
            self.t = t
        self.v = v

    def add_events(self, times: np.ndarray, deltas: np.ndarray) -> None:
        """Changes ``deltas`` at ``times`` (all at or after the last change, any order)."""
        if len(times) == 0:
            return
        times = self._g(times)
        end = float(times.max())
        if end > self.t:
            self.area += self.v * (end - self.t)
            self.t = end
        self.area += float(np.dot(deltas, end - times))
        self.v += float(deltas.sum())

    def integral(self, t: float) -> float:
        return self.area + self.v * max(0.0, self._g(t) - self.t)


def cycle_ms(sleep_ms: float, tick_hz: int) -> Fraction:
    """Guest milliseconds from one ksmd batch to the next in a kernel ticking at ``tick_hz``.

    ``ksm_scan_thread`` sleeps ``msecs_to_jiffies(sleep_millisecs)`` jiffies (rounded up), and
    the timer wheel never fires early: ``calc_index`` puts a timer in the bucket one jiffy after
    its expiry, so a timer armed during jiffy j with a timeout of J fires at the start of jiffy
    j + J + 1. ksmd wakes on a tick, scans (about 1 ms for 100 pages under TCG) and sleeps
    again within the same jiffy, so batches are ``J + 1`` jiffies apart: 56 ms for 50 ms at
    HZ=250, 24 ms for 20 ms. ``tick_hz`` 0: exactly ``sleep_ms``.
    """
    ms = Fraction(str(sleep_ms))
    if tick_hz <= 0:
        return ms
    j = math.ceil(ms * tick_hz / 1000)
    return Fraction((j + 1) * 1000, tick_hz)


def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _grow(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """``a`` with room for index ``n - 1``, new cells set to ``fill`` (capacity doubles)."""
    if n <= len(a):
        return a
    out = np.full(max(n, 2 * len(a), 16), fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


# ------------------------------------------------------------------------------------------------
# The pages in scope, shared by every model instance
# ------------------------------------------------------------------------------------------------

class ItemSpace:
    """The rmap items of the trace at the current instant, shared by every model instance.

    Items live in flat arrays; each mm owns a segment (items sorted by virtual page, then spare
    room), so that an mm whose mappings changed is rebuilt in its own segment without touching
    the others, and every model keeps its per-item state in arrays of the same layout. Items keep
    their identity (``uid``) and their page identity (``pfi``: the frame, or a virtual id when
    the page moved to another frame with the same content) across rebuilds. Per page identity
    (dense ids ``dpfi``: frames, then virtual ids) the space counts its items (``npfi``) and the
    content it is counted under in the scope oracle (``pfc``), so that the oracle is kept up to
    date from the changes alone.
    """

    vpn: np.ndarray    # virtual page
    frame: np.ndarray  # frame mapped now
    pfi: np.ndarray    # page identity: the frame, or -1 - k for the k-th virtual id
    dpfi: np.ndarray   # dense page identity: frames, then virtual ids from nf on
    pc: np.ndarray     # content id at the last sync
    uid: np.ndarray    # item identity, stable across rebuilds
    slot: np.ndarray   # the mm (small int)
    ctime: np.ndarray  # time the content last changed
    valid: np.ndarray  # the cell holds an item

    #: per-item arrays: name, dtype, value in unused cells
    FIELDS = (("vpn", np.int64, 0), ("frame", np.int64, 0), ("pfi", np.int64, 0),
              ("dpfi", np.int64, 0), ("pc", np.int64, NO_CONTENT), ("uid", np.int64, -1),
              ("slot", np.int32, -1), ("ctime", np.float64, 0.0), ("valid", np.bool_, False))

    #: cells allocated at first (tests make it tiny to exercise growth and repacking)
    initial_cells = 1024

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.slot_of: dict[int, int] = {}        # mm -> small int
        self.mm_of: list[int] = []
        self.space_id: dict[int, int] = {}       # slot -> id(AddressSpace) it was built from
        self.seg: dict[int, list[int]] = {}      # slot -> [start, length, capacity]
        self.slices: dict[int, tuple[int, int]] = {}  # slot -> (start, end) of its items
        self.layout: list[int] = []              # slots in the order they were first built
        self.mergeable: dict[int, bool] = {}     # slot -> has a VM_MERGEABLE VMA
        self.ever_mergeable = False
        self.eligible: list[int] = []            # slots on KSM's mm list
        self.entered: dict[int, int] = {}        # slot -> rank of its first entry
        self.dirty: set[int] = set()             # mm ids to rebuild whole (VMAs changed)
        self.map_log: list[tuple[np.ndarray, np.ndarray]] = []  # MAP records' (mm, vpn)
        self.vma_cache: dict[int, tuple[np.ndarray, ...]] = {}
        self.all_dirty = True
        self.kzero = -1                          # the frame taken for the kernel zero page
        for name, dt, fill in self.FIELDS:
            setattr(self, name, np.full(self.initial_cells, fill, dtype=dt))
        self.end = 0                             # cells allocated to segments
        self.count = 0                           # items
        self.next_uid = 0
        self.nvirt = 0
        self.nf = -1                             # dense page ids below nf are frames
        self.uid_index = np.full(16, -1, dtype=np.int64)
        self.page_log: list[np.ndarray] = []     # frames PAGE records wrote since the sync
        self.nreal = np.zeros(16, dtype=np.int64)  # in-scope pages per (real) frame
        self._fmask = np.zeros(16, dtype=bool)
        self._fresh: list[np.ndarray] = []       # uids of pages new or remapped since
        self.changed_idx = np.zeros(0, dtype=np.int64)
        self.relaid = False
        self.version = -1
        self.sync_seq = 0
        self.models: list[KsmModel] = []
        # scope oracle and opportunities
        self.npfi = np.zeros(16, dtype=np.int64)
        self.pfc = np.full(16, NOT_COUNTED, dtype=np.int64)
        self.frames_in_scope = 0
        self.distinct = 0
        self.unknown = 0
        self.m = np.zeros(16, dtype=np.int64)
        self.dup = np.zeros(16, dtype=bool)
        self.opp_start = np.full(16, -1.0)
        self.opp_gen = np.zeros(16, dtype=np.int64)
        self.gen = 0
        self.opportunities = 0
        self._m_delta: list[tuple[np.ndarray, np.ndarray]] = []
        self._entering: list[np.ndarray] = []

    @property
    def n(self) -> int:
        """Cells in the per-item arrays (items and spare room)."""
        return len(self.vpn)

    @property
    def ndense(self) -> int:
        return self.nf + self.nvirt

    def _slot(self, mm: int) -> int:
        s = self.slot_of.get(mm)
        if s is None:
            s = self.slot_of[mm] = len(self.mm_of)
            self.mm_of.append(mm)
        return s

    # -- building the items of one address space --------------------------------------------
    def _vmas(self, st: ReplayState, sp: AddressSpace, slot: int) -> bool:
        """Cache the VMAs of ``sp`` as arrays (start/end page, compatible, mergeable); returns
        whether it has a VM_MERGEABLE VMA."""
        shift = st.page_size.bit_length() - 1
        vmas = sorted(sp.vmas.values(), key=lambda v: v.start)
        vs = np.array([v.start >> shift for v in vmas], dtype=np.int64)
        ve = np.array([(v.end + st.page_size - 1) >> shift for v in vmas], dtype=np.int64)
        vf = np.array([v.vm_flags & 0xFFFFFFFFFFFFFFFF for v in vmas], dtype=np.uint64)
        ok = (vf & np.uint64(VM_KSM_INCOMPATIBLE)) == 0
        merge = ok & ((vf & np.uint64(VM_MERGEABLE)) != 0)
        self.vma_cache[slot] = (vs, ve, ok, merge)
        return bool(merge.any())

    def _in_scope(self, st: ReplayState, slot: int, vp: np.ndarray, fr: np.ndarray
                  ) -> np.ndarray:
        """Which of the pages (vp -> fr, fr < 0: not mapped) of ``slot`` are rmap items: mapped,
        anonymous (not in the page cache), not the zero page, in a VMA of the scope."""
        keep = (fr >= 0) & (fr < len(st.named))
        keep[keep] &= ~st.named[fr[keep]]
        if self.kzero >= 0:
            keep &= fr != self.kzero
        vs, ve, ok, merge = self.vma_cache[slot]
        if len(vs):
            i = np.searchsorted(vs, vp, side="right") - 1
            ic = np.maximum(i, 0)
            inside = (i >= 0) & (vp < ve[ic])
            if self.scope == "madvised":
                keep &= inside & merge[ic]
            else:
                keep &= ~inside | ok[ic]
        elif self.scope == "madvised":
            keep[:] = False
        return keep

    def _build(self, st: ReplayState, sp: AddressSpace, slot: int
               ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Sorted in-scope virtual pages of ``sp``, their frames, and whether it has a
        VM_MERGEABLE VMA."""
        vp, fr = sp.mapping()
        has_mergeable = self._vmas(st, sp, slot)
        keep = self._in_scope(st, slot, vp, fr)
        return vp[keep], fr[keep], has_mergeable

    def _patch(self, st: ReplayState, sp: AddressSpace, slot: int, ov: np.ndarray,
               changed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The items of ``slot`` after MAP records for the pages ``changed`` (sorted, unique):
        its old sorted items ``ov`` with those pages taken out (``keep`` is False for them) and
        put back as the state now maps them. Returns ``keep`` and, for the pages to insert,
        their virtual pages, frames and old index (-1: new)."""
        l0 = len(ov)
        pos = np.searchsorted(ov, changed)
        pc_ = np.minimum(pos, max(l0 - 1, 0))
        present = (pos < l0) & (ov[pc_] == changed) if l0 else np.zeros(len(changed), bool)
        keep = np.ones(l0, dtype=bool)
        keep[pos[present]] = False
        nfr = sp.lookup(changed)
        ins = self._in_scope(st, slot, changed, nfr)
        return keep, changed[ins], nfr[ins], np.where(present[ins], pos[ins], -1)

    # -- storage -----------------------------------------------------------------------------
    def _grow_cells(self, need: int) -> None:
        if need <= self.n:
            return
        cap = max(need, 2 * self.n)
        for name, dt, fill in self.FIELDS:
            a = getattr(self, name)
            b = np.full(cap, fill, dtype=dt)
            b[:len(a)] = a
            setattr(self, name, b)
        for m in self.models:
            m.grow(cap)

    def _clear(self, s: int, e: int) -> None:
        if e > s:
            for name, _dt, fill in self.FIELDS:
                getattr(self, name)[s:e] = fill

    def _grow_dense(self) -> None:
        """Room in the per-page-id arrays for every frame and virtual id."""
        need = self.ndense
        self.npfi = _grow(self.npfi, need, 0)
        self.pfc = _grow(self.pfc, need, NOT_COUNTED)
        for m in self.models:
            m.nun = _grow(m.nun, need, 0)
            m.kp_node = _grow(m.kp_node, need, -1)

    def _reindex(self, nf: int) -> None:
        """More frames than before: virtual page ids move up behind them."""
        self.nreal = _grow(self.nreal, nf, 0)
        old = self.nf
        if old < 0:
            self.nf = nf
            self._grow_dense()
            return
        shift = nf - old
        self.nf = nf
        sel = self.valid & (self.pfi < 0)
        self.dpfi[sel] += shift

        def move(a: np.ndarray, fill: Any) -> np.ndarray:
            b = np.full(max(len(a) + shift, nf + self.nvirt), fill, dtype=a.dtype)
            b[:old] = a[:old]
            b[nf:nf + len(a) - old] = a[old:]
            return b

        self.npfi = move(self.npfi, 0)
        self.pfc = move(self.pfc, NOT_COUNTED)
        for m in self.models:
            m.nun = move(m.nun, 0)
            m.kp_node = move(m.kp_node, -1)
        self._grow_dense()

    def _repack(self) -> None:
        """Close the gaps left by segments that moved: one gather per array."""
        srcs: list[np.ndarray] = []
        pos = 0
        for slot in sorted(self.seg, key=lambda x: self.seg[x][0]):
            s, ln, _cap = self.seg[slot]
            cap = ln + (ln >> 1) + 8
            srcs.append(np.concatenate([np.arange(s, s + ln, dtype=np.int64),
                                        np.full(cap - ln, -1, dtype=np.int64)]))
            self.seg[slot] = [pos, ln, cap]
            self.slices[slot] = (pos, pos + ln)
            pos += cap
        src = cat(srcs, np.int64)
        size = max(self.initial_cells, 2 * len(src))
        src = np.concatenate([src, np.full(size - len(src), -1, dtype=np.int64)])
        ok = src >= 0
        sc = np.where(ok, src, 0)
        for name, dt, fill in self.FIELDS:
            a = getattr(self, name)
            setattr(self, name, np.where(ok, a[sc], np.array(fill, dtype=dt)).astype(dt))
        self.end = pos
        self.uid_index[:] = -1
        v = np.flatnonzero(self.valid)
        self.uid_index[self.uid[v]] = v
        for m in self.models:
            m.repack(src)

    # -- rebuilding one address space --------------------------------------------------------
    def _rebuild(self, st: ReplayState, t: float, slot: int,
                 pages: np.ndarray | None = None) -> None:
        """Rebuild the items of one slot from the state, carrying what carries; with ``pages``,
        only those virtual pages changed (MAP records) and the rest of the slot stays.

        The new items are the old ones kept as they were plus inserted ones (all of them for a
        whole rebuild); only the inserted ones are worked out, the kept ones are copied."""
        mm = self.mm_of[slot]
        sp = st.spaces.get(mm)
        old = self.seg.get(slot)
        s0, l0, c0 = old if old else (0, 0, 0)
        o = {name: getattr(self, name)[s0:s0 + l0]
             for name in ("vpn", "frame", "pfi", "dpfi", "pc", "uid", "ctime")}
        e64 = np.zeros(0, dtype=np.int64)
        if sp is None:
            keep = np.zeros(l0, dtype=bool)
            iv = ifr = isrc = e64
            self.space_id.pop(slot, None)
            self.mergeable.pop(slot, None)
            self.vma_cache.pop(slot, None)
        else:
            same_space = id(sp) == self.space_id.get(slot)
            if pages is not None and same_space and slot in self.vma_cache:
                keep, iv, ifr, isrc = self._patch(st, sp, slot, o["vpn"], pages)
            else:
                iv, ifr, mergeable = self._build(st, sp, slot)
                self.space_id[slot] = id(sp)
                self.mergeable[slot] = mergeable
                self.ever_mergeable |= mergeable
                if slot not in self.layout:
                    self.layout.append(slot)
                keep = np.zeros(l0, dtype=bool)
                if same_space and l0 and len(iv):
                    j = np.searchsorted(o["vpn"], iv)
                    jc = np.minimum(j, l0 - 1)
                    isrc = np.where((j < l0) & (o["vpn"][jc] == iv), jc, -1)
                else:
                    isrc = np.full(len(iv), -1, dtype=np.int64)  # nothing carries (new mm)
        k = len(iv)
        nkeep = int(keep.sum())
        ln = nkeep + k
        at = np.searchsorted(o["vpn"][keep], iv) if nkeep else np.zeros(k, dtype=np.int64)
        # the inserted items: carried (the page was there, maybe on another frame) or new
        carried = isrc >= 0
        sc = np.where(carried, isrc, 0)
        content = st.content
        newc = np.where(ifr < len(content), content[np.minimum(ifr, len(content) - 1)], -1) \
            if k else ifr
        if l0:
            of, op, opc = o["frame"][sc], o["pfi"][sc], o["pc"][sc]
            ouid, oct_, od = o["uid"][sc], o["ctime"][sc], o["dpfi"][sc]
        else:
            of = op = opc = ouid = od = np.zeros(k, dtype=np.int64)
            oct_ = np.zeros(k)
        same = carried & (of == ifr)
        # a page moved to another frame with the content it had: the same page (KSM in the
        # guest, migration), not a new one - it keeps its identity, virtual for a frame's
        preserved = carried & ~same & (opc >= 0) & (opc == newc)
        pfi = ifr.copy()
        keep_id = same | (preserved & (op < 0))
        pfi[keep_id] = op[keep_id]
        fresh = preserved & (op >= 0)
        nv = int(fresh.sum())
        if nv:
            pfi[fresh] = -1 - np.arange(self.nvirt, self.nvirt + nv, dtype=np.int64)
            self.nvirt += nv
            self._grow_dense()
        dpfi = np.where(pfi >= 0, pfi, self.nf - 1 - pfi)
        uid = np.where(carried, ouid, 0)
        nnew = k - int(carried.sum())
        uid[~carried] = np.arange(self.next_uid, self.next_uid + nnew, dtype=np.int64)
        self.next_uid += nnew
        cont = same | preserved
        pc = np.where(cont, opc, NO_CONTENT)
        ctime = np.where(cont, oct_, t)
        removed = ~keep
        removed[isrc[carried]] = False
        moved = carried & (dpfi != od)
        refr = carried & (ifr != of)
        # placement: in place when it fits, else a new segment at the end
        if ln == 0:
            s1, c1 = 0, 0
        elif old and ln <= c0:
            s1, c1 = s0, c0
        else:
            if self.end + ln + 8 > self.n and self.end - self.count > self.count:
                self._repack()  # more gaps than items: close them first
                if old:
                    s0, _, c0 = self.seg[slot]
                    o = {name: getattr(self, name)[s0:s0 + l0] for name in o}
            c1 = ln + (ln >> 1) + 8
            s1 = self.end
            self._grow_cells(s1 + c1)
            self.end += c1
        for m in self.models:
            m.segment(s0, l0, c0 if old else 0, s1, ln, c1, keep, at, isrc, removed, moved,
                      o["dpfi"], dpfi, t)
        # only pages gone, inserted with another frame or page id, or new change the counts
        gone_uid = o["uid"][removed]
        nreal_out = np.concatenate([o["frame"][removed], of[refr]])
        d_out = np.concatenate([o["dpfi"][removed], od[moved]])
        new = {"vpn": iv, "frame": ifr, "pfi": pfi, "dpfi": dpfi, "pc": pc, "uid": uid,
               "ctime": ctime}
        cols = {name: np.insert(o[name][keep], at, new[name]) for name in new}
        if old and (s1 != s0 or ln == 0):
            self._clear(s0, s0 + c0)
        if ln:
            e = s1 + ln
            for name, col in cols.items():
                getattr(self, name)[s1:e] = col
            self.slot[s1:e] = slot
            self.valid[s1:e] = True
            self._clear(e, s1 + c1)
            self.seg[slot] = [s1, ln, c1]
            self.slices[slot] = (s1, e)
        else:
            self.seg.pop(slot, None)
            self.slices.pop(slot, None)
        self.uid_index[gone_uid] = -1
        if self.next_uid > len(self.uid_index):
            self.uid_index = _grow(self.uid_index, self.next_uid, -1)
        if ln:
            self.uid_index[cols["uid"]] = np.arange(s1, s1 + ln, dtype=np.int64)
        self.count += ln - l0
        self.relaid = True
        # frames backing in-scope pages, and pages whose content must be read
        np.subtract.at(self.nreal, nreal_out, 1)
        np.add.at(self.nreal, ifr[~carried | refr], 1)
        self._fresh.append(uid[~carried | refr])
        # pages entering and leaving the scope
        fresh_items = ~carried | moved
        d_in = dpfi[fresh_items]
        if len(d_out) or len(d_in):
            u = np.unique(np.concatenate([d_out, d_in]))
            before = self.npfi[u] > 0
            np.subtract.at(self.npfi, d_out, 1)
            np.add.at(self.npfi, d_in, 1)
            after = self.npfi[u] > 0
            leaving = u[before & ~after]
            entering = u[~before & after]
            self.frames_in_scope += len(entering) - len(leaving)
            if len(leaving):
                pc_ = self.pfc[leaving]
                self.unknown -= int(np.count_nonzero(pc_ == -1))
                known = pc_[pc_ >= 0]
                self._m_delta.append((known, np.full(len(known), -1, dtype=np.int64)))
                self.pfc[leaving] = NOT_COUNTED
            if len(entering):
                # counted under their content by _oracle (pages already counted are no-ops)
                self._entering.append(uid[fresh_items])  # by uid: a repack moves cells

    def _detect_zero_frame(self, st: ReplayState) -> bool:
        """Find (or drop) the frame taken for the kernel zero page; True if it changed.

        The kernel's zero page is mapped read-only at every address read before being written,
        and KSM skips it (it is not PageAnon). The trace does not flag it, so take the zero-content
        frame mapped at the most places in scope, two at least.
        """
        z = st.zero_cid
        if self.kzero >= 0:
            if self.kzero < len(st.content) and st.content[self.kzero] == z:
                return False
            self.kzero = -1
            return True
        sel = self.valid & (self._contents(st) == z) & (self.pfi == self.frame)
        if np.count_nonzero(sel) < 2:
            return False
        fr, cnt = np.unique(self.frame[sel], return_counts=True)
        best = int(np.argmax(cnt))
        if cnt[best] < 2:
            return False
        self.kzero = int(fr[best])
        return True

    # -- sync: bring the items up to the state ---------------------------------------------
    def sync(self, st: ReplayState, t: float) -> bool:
        """Update the items to the replay state at time ``t``; True if anything changed."""
        if st.version == self.version and not self.dirty and not self.all_dirty and \
                not self.map_log:
            return False
        self.version = st.version
        if len(st.content) > self.nf:
            self._reindex(len(st.content))
        rebuild: set[int] = set()
        if self.all_dirty:
            for mm in sorted(st.spaces):
                self._slot(mm)
            rebuild = set(self.space_id) | {self.slot_of[mm] for mm in st.spaces}
        else:
            for mm in sorted(self.dirty):  # several new mms at once: in mm order
                rebuild.add(self._slot(mm))
            # address spaces gone or replaced since the last sync
            for slot in list(self.space_id):
                sp = st.spaces.get(self.mm_of[slot])
                if sp is None or id(sp) != self.space_id[slot]:
                    rebuild.add(slot)
            if len(st.spaces) != len(self.space_id):
                for mm in sorted(st.spaces):
                    s = self._slot(mm)
                    if s not in self.space_id:
                        rebuild.add(s)
        patches: dict[int, np.ndarray] = {}
        if self.map_log:
            mms = np.concatenate([x[0] for x in self.map_log])
            vps = np.concatenate([x[1] for x in self.map_log]).astype(np.int64)
            self.map_log = []
            o = np.argsort(mms, kind="stable")
            mms, vps = mms[o], vps[o]
            um, starts = np.unique(mms, return_index=True)
            bounds = np.append(starts, len(mms))
            for k, mm in enumerate(um.tolist()):
                slot = self._slot(mm)
                if slot not in rebuild:
                    patches[slot] = np.unique(vps[bounds[k]:bounds[k + 1]])
        self.dirty.clear()
        self.all_dirty = False
        self.relaid = False
        for slot in sorted(rebuild | set(patches)):
            self._rebuild(st, t, slot, patches.get(slot))
        ch, cc = self._changed(st)
        # new pages and rewritten ones are "changed": only they can reveal the zero page
        if (self.kzero >= 0 or (cc == st.zero_cid).any()) and self._detect_zero_frame(st):
            again = self.uid[ch]
            for slot in sorted(self.space_id):  # pages on that frame leave (or come back)
                self._rebuild(st, t, slot)
            ch, cc = self._changed(st, again)
        self.changed_idx = ch
        self.ctime[ch] = t
        self.pc[ch] = cc
        if self.relaid:
            self._eligibility(st)
        self._oracle(st, t, ch)
        self.sync_seq += 1
        return True

    def _changed(self, st: ReplayState, again: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Cells whose content differs from the last sync, and their contents: the pages on
        frames that PAGE records wrote since (only frames backing in-scope pages matter), the
        pages new or remapped since, and the items ``again`` (uids)."""
        parts = []
        if again is not None and len(again):
            self._fresh.append(again)
        if self.page_log:
            f = np.concatenate(self.page_log)
            self.page_log = []
            f = f[f < len(self.nreal)]
            f = f[self.nreal[f] > 0]
            if len(f):
                if len(self._fmask) < len(self.nreal):
                    self._fmask = np.zeros(len(self.nreal), dtype=bool)
                self._fmask[f] = True
                # every frame in the arrays is below nf (empty cells hold 0)
                pos = np.flatnonzero(self._fmask[self.frame])
                parts.append(pos[self.valid[pos]])
                self._fmask[f] = False
        if self._fresh:
            pos = self.uid_index[np.concatenate(self._fresh)]
            parts.append(pos[pos >= 0])
            self._fresh = []
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        cand = np.unique(np.concatenate(parts))  # a page rebuilt twice is listed twice
        f = self.frame[cand]
        content = st.content
        c = np.where(f < len(content), content[np.minimum(f, len(content) - 1)], -1)
        diff = c != self.pc[cand]
        return cand[diff], c[diff]

    def _contents(self, st: ReplayState) -> np.ndarray:
        f = self.frame
        content = st.content
        if int(f.max(initial=0)) >= len(content):
            return np.where(f < len(content), content[np.minimum(f, len(content) - 1)], -1)
        return content[f]

    def _eligibility(self, st: ReplayState) -> None:
        """KSM's mm list: madvised - mms with a VM_MERGEABLE VMA (``ksm_madvise`` ->
        ``__ksm_enter``); anon - every mm with anonymous pages (like ``prctl(PR_SET_MEMORY_MERGE)``
        on every process)."""
        out = []
        for slot in self.layout:
            if self.scope == "madvised":
                ok = bool(self.mergeable.get(slot))
            else:
                ok = slot in self.seg
            if ok:
                out.append(slot)
        # in the order they first entered; several at the same instant: by mm
        for slot in sorted((x for x in out if x not in self.entered), key=self.mm_of.__getitem__):
            self.entered[slot] = len(self.entered)
        out.sort(key=self.entered.__getitem__)
        self.eligible = out

    def _oracle(self, st: ReplayState, t: float, ch: np.ndarray) -> None:
        """Scope ceiling (in-scope frames - distinct contents) and sharing opportunities.

        ``m[c]`` counts the in-scope pages (frames, or virtual page ids) holding content c; only
        the pages that entered, left or changed content since the last sync move.
        """
        ncont = len(st.contents)
        for name, fill in (("dup", False), ("opp_start", -1.0), ("opp_gen", 0), ("m", 0)):
            setattr(self, name, _grow(getattr(self, name), ncont, fill))
        items = ch
        if self._entering:
            pos = self.uid_index[np.concatenate(self._entering)]
            items = np.concatenate([ch, pos[pos >= 0]])
            self._entering = []
        if len(items):
            # one item per page: a frame shared by fork changes for all its mappers at once
            d, first = np.unique(self.dpfi[items], return_index=True)
            new = self.pc[items[first]]
            old = self.pfc[d]
            mv = old != new
            d, old, new = d[mv], old[mv], new[mv]
            self.pfc[d] = new
            self.unknown += int(np.count_nonzero(new == -1)) - int(np.count_nonzero(old == -1))
            ko, kn = old >= 0, new >= 0
            self._m_delta.append((old[ko], np.full(int(ko.sum()), -1, dtype=np.int64)))
            self._m_delta.append((new[kn], np.ones(int(kn.sum()), dtype=np.int64)))
        if not self._m_delta:
            return
        cs = np.concatenate([x[0] for x in self._m_delta])
        dl = np.concatenate([x[1] for x in self._m_delta])
        self._m_delta = []
        if not len(cs):
            return
        m = self.m
        aff = np.unique(cs)
        before = np.count_nonzero(m[aff])
        np.add.at(m, cs, dl)
        self.distinct = self.distinct + int(np.count_nonzero(m[aff])) - int(before)
        dup = m[aff] >= 2
        was = self.dup[aff]
        opened = aff[dup & ~was]
        closed = aff[was & ~dup]
        self.dup[aff] = dup
        if len(opened):
            self.opp_start[opened] = t
            self.opp_gen[opened] = np.arange(self.gen + 1, self.gen + 1 + len(opened))
            self.gen += len(opened)
            self.opportunities += len(opened)
        for mdl in self.models:
            mdl.close_opportunities(closed, t)
        if len(closed):
            self.opp_start[closed] = -1.0

    @property
    def ceiling(self) -> int:
        return self.frames_in_scope - (self.distinct + self.unknown)


# ------------------------------------------------------------------------------------------------
# One ksmd
# ------------------------------------------------------------------------------------------------

class KsmModel:
    """One instance of KSM with one parameter set, over the shared items."""

    def __init__(self, params: KsmParams, space: ItemSpace, hz: float, t0: float,
                 zero_cid: int, every_scan: bool = False, clock: GuestClock | None = None,
                 tick_hz: int = 0) -> None:
        self.p = params
        self.S = space
        self.zero = zero_cid
        self.hz = float(hz)
        cyc = cycle_ms(params.sleep_ms, tick_hz)  # guest ms between batches
        self.period = cyc * Fraction(hz) / 1000
        self.period_f = float(self.period)
        # with the guest's own clock in the trace, batches are placed in guest time
        self.clock = clock if clock is not None and clock.knots else None
        self.period_s = float(cyc) / 1000.0
        self.g_origin = 0.0
        self.origin: float | None = None
        self.k = 0          # next batch index
        self.used = 0       # pages of batch k already used
        # per-item state, aligned with the space's cells
        self.chk = np.full(space.n, NEVER, dtype=np.int64)
        self.st = np.zeros(space.n, dtype=np.int8)
        self.node = np.full(space.n, -1, dtype=np.int64)
        # stable nodes
        self.node_c = np.zeros(64, dtype=np.int64)
        self.node_len = np.zeros(64, dtype=np.int64)
        self.node_live = np.zeros(64, dtype=np.int64)
        self.node_pruned = np.zeros(64, dtype=bool)
        self.node_kp = np.zeros(64, dtype=np.int64)  # page id (pfi) of the node's KSM page
        self.node_ovl = np.zeros(64, dtype=bool)  # counted in ``overlap``
        self.nnodes = 0
        self.nodes_of: dict[int, list[int]] = {}
        # per content
        self.node_count = np.zeros(16, dtype=np.int64)
        self.ut_round = np.full(16, -1, dtype=np.int64)
        self.ut_slot = np.zeros(16, dtype=np.int64)
        self.ut_vpn = np.zeros(16, dtype=np.int64)
        self.ut_uid = np.zeros(16, dtype=np.int64)
        self.ut_idx = np.zeros(16, dtype=np.int64)
        self.merged_gen = np.full(16, -1, dtype=np.int64)
        self.single_node = np.full(16, -1, dtype=np.int64)  # the node, when there is just one
        # per dense page id: in-scope pages not merged; nz = pages with any (frames still needed)
        self.nun = np.zeros(max(space.ndense, 16), dtype=np.int64)
        self.nz = 0
        # per dense page id: the node whose KSM page this page became (-1: none). The KSM page
        # is the frame of the page scanned when the node was made (try_to_merge_two_pages
        # returns it); while pages not yet merged still map that frame, it is needed once, not
        # twice: ``overlap`` counts such nodes. Frames needed = nz + live_nodes - overlap.
        self.kp_node = np.full(max(space.ndense, 16), -1, dtype=np.int64)
        self.overlap = 0
        self._touch_d: list[np.ndarray] = []  # page ids whose counts or content changed
        self._touch_n: list[np.ndarray] = []  # nodes whose liveness changed
        # cursor and list of mms (ksm_mm_head order)
        self.order: list[int] = []
        self.pos = 0
        self.addr = 0
        self.at_head = True
        self.round = 0
        self.round_items = 0
        self.round_mut = 0
        self.round_sync = -1
        self.mut = 0
        # counters
        self.shared = 0
        self.sharing = 0
        self.unshared = 0
        self.full_scans = 0
        self.pages_scanned = 0
        self.merges = 0
        self.zero_merged = 0
        self.live_nodes = 0
        self.saved = 0
        self.s_sharing = Series(t0, clock=self.clock)
        self.s_saved = Series(t0, clock=self.clock)
        # opportunities
        self.latencies: list[float] = []
        self.missed = 0
        self.missed_time = 0.0
        self.every_scan = every_scan
        self.scan_rows: list[list[Any]] = []
        self.scan_rows_dropped = 0
        self._ev: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._cscratch = np.zeros(16, dtype=np.int64)
        self._pscratch = np.zeros(16, dtype=np.int64)
        self._ev_t: list[float] = []
        self._ev_sharing: list[float] = []
        self._ev_saved: list[float] = []

    # -- time -----------------------------------------------------------------------------------
    def start(self, t: float) -> None:
        """ksmd starts (run=1) at time ``t``: its first batch runs then."""
        if self.origin is None:
            self.origin = t
            self.k = 0
            if self.clock is not None:
                self.g_origin = self.clock.guest(t)

    def k_first(self, t: float) -> int:
        """Index of the first batch at or after ``t``."""
        if self.origin is None:
            return 0
        if self.clock is not None:
            x = (self.clock.guest(t) - self.g_origin) / self.period_s
            return max(0, math.ceil(x - 1e-9))
        return max(0, math.ceil((Fraction(t) - Fraction(self.origin)) / self.period))

    def k_after(self, t: float) -> int:
        """Index of the first batch strictly after ``t``."""
        if self.origin is None:
            return 0
        if self.clock is not None:
            x = (self.clock.guest(t) - self.g_origin) / self.period_s
            return max(0, math.floor(x + 1e-9) + 1)
        return max(0, math.floor((Fraction(t) - Fraction(self.origin)) / self.period) + 1)

    def batch_time(self, k: int | np.ndarray) -> Any:
        if self.clock is not None:
            return self.clock.trace(self.g_origin + k * self.period_s)
        return self.origin + k * self.period_f

    def later(self, t: float) -> float:
        """Trace time one sleep period (of guest time) after ``t``."""
        if self.clock is not None:
            return self.clock.trace(self.clock.guest(t) + self.period_s)
        return t + self.period_f

    def seconds(self, a: Any, b: Any) -> Any:
        """Guest seconds from trace time ``a`` to ``b`` (scalars or arrays)."""
        if self.clock is not None:
            return self.clock.span(a, b)
        return (b - a) / self.hz

    # -- layout changes -------------------------------------------------------------------------
    def grow(self, cap: int) -> None:
        """The space has more cells: so do the per-item arrays."""
        for name, fill in (("chk", NEVER), ("st", NONE), ("node", -1)):
            a = getattr(self, name)
            b = np.full(cap, fill, dtype=a.dtype)
            b[:len(a)] = a
            setattr(self, name, b)

    def repack(self, src: np.ndarray) -> None:
        """The space closed its gaps: cell i now holds what cell src[i] held (-1: empty)."""
        ok = src >= 0
        sc = np.where(ok, src, 0)
        self.chk = np.where(ok, self.chk[sc], NEVER)
        self.st = np.where(ok, self.st[sc], NONE).astype(np.int8)
        self.node = np.where(ok, self.node[sc], -1)
        # unstable-tree entries name cells too, but also their item: _match_fast checks the uid
        # and _visit finds a moved entry by (mm, address)

    def segment(self, s0: int, l0: int, c0: int, s1: int, l1: int, c1: int, keep: np.ndarray,
                at: np.ndarray, isrc: np.ndarray, removed: np.ndarray, moved: np.ndarray,
                old_d: np.ndarray, new_d: np.ndarray, t: float) -> None:
        """One mm was rebuilt: its items move from cells [s0, s0+l0) to [s1, s1+l1). The old
        items with ``keep`` stay as they are; the inserted ones (at positions ``at`` among the
        kept) carry the state of old item ``isrc`` (-1: new); ``removed`` old items are gone and
        leave at once; ``moved`` inserted items have another page id (``new_d``) than before."""
        ochk = self.chk[s0:s0 + l0].copy()
        ost = self.st[s0:s0 + l0].copy()
        onode = self.node[s0:s0 + l0].copy()
        if removed.any():
            self._remove(ost[removed], onode[removed], t)
        carried = isrc >= 0
        sc = np.where(carried, isrc, 0)
        if l0:
            ichk = np.where(carried, ochk[sc], NEVER)
            ist = np.where(carried, ost[sc], NONE).astype(np.int8)
            inode = np.where(carried, onode[sc], -1)
        else:
            ichk = np.full(len(isrc), NEVER, dtype=np.int64)
            ist = np.zeros(len(isrc), dtype=np.int8)
            inode = np.full(len(isrc), -1, dtype=np.int64)
        # frames still needed: unmerged pages gone, new, or under another page id
        om = (ost != STABLE) & (ost != ZERO)
        nm = (ist != STABLE) & (ist != ZERO)
        mv = moved & nm
        d_out = np.concatenate([old_d[removed & om], old_d[isrc[mv]]])
        d_in = new_d[(~carried & nm) | mv]
        if len(d_out) or len(d_in):
            u = np.unique(np.concatenate([d_out, d_in]))
            before = np.count_nonzero(self.nun[u])
            np.subtract.at(self.nun, d_out, 1)
            np.add.at(self.nun, d_in, 1)
            self.nz += int(np.count_nonzero(self.nun[u])) - int(before)
            self._touch_d.append(u)
        nchk = np.insert(ochk[keep], at, ichk)
        nst = np.insert(ost[keep], at, ist)
        nnode = np.insert(onode[keep], at, inode)
        if c0 and (s1 != s0 or l1 == 0):
            self._reset(s0, s0 + c0)
        if l1:
            self.chk[s1:s1 + l1] = nchk
            self.st[s1:s1 + l1] = nst
            self.node[s1:s1 + l1] = nnode
            self._reset(s1 + l1, s1 + c1)

    def _reset(self, s: int, e: int) -> None:
        if e > s:
            self.chk[s:e] = NEVER
            self.st[s:e] = NONE
            self.node[s:e] = -1

    def _remove(self, rs: np.ndarray, rn: np.ndarray, t: float) -> None:
        """Items gone from the trace (unmapped, exited, out of scope) leave the counters."""
        self.unshared -= int(np.count_nonzero(rs == UNSTABLE))
        self.zero_merged -= int(np.count_nonzero(rs == ZERO))
        inn = (rs == STABLE) | (rs == BROKEN)
        if not inn.any():
            return
        nodes = rn[inn]
        live = rn[rs == STABLE]
        u = np.unique(nodes)
        u = u[~self.node_pruned[u]]
        lb, vb = self.node_len[u].copy(), self.node_live[u].copy()
        np.subtract.at(self.node_len, nodes, 1)
        np.subtract.at(self.node_live, live, 1)
        la, va = self.node_len[u], self.node_live[u]
        dshared = int(np.count_nonzero(la >= 1)) - int(np.count_nonzero(lb >= 1))
        self.shared += dshared
        self.sharing += int(la.sum() - lb.sum()) - dshared
        self.live_nodes -= int(np.count_nonzero((vb > 0) & (va <= 0)))
        self._touch_n.append(u)
        self.s_sharing.set(t, self.sharing)

    def update_order(self) -> None:
        """Follow the space's mm list: gone mms leave, new ones go just behind the cursor."""
        elig = self.S.eligible
        es = set(elig)
        if len(es) == len(self.order) and all(s in es for s in self.order):
            return
        keep: list[int] = []
        for i, s in enumerate(self.order):
            if s in es:
                keep.append(s)
            elif not self.at_head:
                if i < self.pos:
                    self.pos -= 1
                elif i == self.pos:
                    self.addr = 0  # the cursor moves on to the next mm
        self.order = keep
        have = set(keep)
        for s in elig:
            if s in have:
                continue
            if self.at_head or self.pos >= len(self.order):
                self.order.append(s)
            else:
                self.order.insert(self.pos, s)
                self.pos += 1
            have.add(s)

    # -- sync: the trace changed -------------------------------------------------------------
    def sync(self, st: ReplayState, t: float) -> None:
        """Pages whose content changed since the last sync leave what they were merged in."""
        S = self.S
        n_cont = len(st.contents)
        self.node_count = _grow(self.node_count, n_cont, 0)
        self.single_node = _grow(self.single_node, n_cont, -1)
        self.ut_round = _grow(self.ut_round, n_cont, -1)
        self.ut_slot = _grow(self.ut_slot, n_cont, 0)
        self.ut_vpn = _grow(self.ut_vpn, n_cont, 0)
        self.ut_uid = _grow(self.ut_uid, n_cont, 0)
        self.ut_idx = _grow(self.ut_idx, n_cont, 0)
        self.merged_gen = _grow(self.merged_gen, n_cont, -1)
        ch = S.changed_idx
        unmerged_now = np.zeros(0, dtype=np.int64)
        if len(ch):
            s = self.st[ch]
            stab = ch[s == STABLE]
            if len(stab):
                # a write broke COW: the page no longer saves anything; the kernel's counters
                # still count it until ksmd visits it again
                broke = stab[S.pc[stab] != self.node_c[self.node[stab]]]
                if len(broke):
                    self.st[broke] = BROKEN
                    nodes = self.node[broke]
                    np.subtract.at(self.node_live, nodes, 1)
                    un = np.unique(nodes)
                    self.live_nodes -= int(np.count_nonzero(
                        (self.node_live[un] <= 0) & ~self.node_pruned[un]))
                    unmerged_now = broke
            zer = ch[s == ZERO]
            if len(zer):
                left = zer[S.pc[zer] != self.zero]
                self.st[left] = NONE
                self.zero_merged -= len(left)
                unmerged_now = np.concatenate([unmerged_now, left])
        if S.relaid:
            self.update_order()
        if len(unmerged_now):
            d = S.dpfi[unmerged_now]
            u = np.unique(d)
            before = np.count_nonzero(self.nun[u])
            np.add.at(self.nun, d, 1)
            self.nz += len(u) - int(before)
        self._touch_d.append(S.dpfi[ch])
        if len(unmerged_now):
            self._touch_n.append(self.node[unmerged_now[self.st[unmerged_now] == BROKEN]])
        self._update_overlap()
        self.saved = S.frames_in_scope - self.nz - self.live_nodes + self.overlap
        self.s_saved.set(t, self.saved)
        self.s_sharing.set(t, self.sharing)

    def _overlaps(self, nodes: np.ndarray) -> np.ndarray:
        """Per node: live, its KSM page still holding its content and also the frame of pages
        not merged yet (fork siblings) - that frame is needed once, not twice."""
        kp = self.node_kp[nodes]
        kd = np.where(kp >= 0, kp, self.S.nf - 1 - kp)
        return (self.node_live[nodes] > 0) & ~self.node_pruned[nodes] & \
            (self.kp_node[kd] == nodes) & (self.nun[kd] > 0) & \
            (self.S.pfc[kd] == self.node_c[nodes])

    def count_overlap(self) -> int:
        """``overlap`` recounted over every node (a check for the incremental count)."""
        return int(np.count_nonzero(self._overlaps(np.arange(self.nnodes))))

    def _update_overlap(self) -> None:
        """Re-evaluate the nodes whose KSM page changed counts or content, or whose liveness
        changed, since the last sync."""
        parts = [x for x in self._touch_n if len(x)]
        if self._touch_d:
            d = np.concatenate(self._touch_d)
            d = d[d < len(self.kp_node)]
            n = self.kp_node[d]
            parts.append(n[n >= 0])
        self._touch_d, self._touch_n = [], []
        if not parts:
            return
        nodes = np.unique(np.concatenate(parts))
        now = self._overlaps(nodes)
        self.overlap += int(now.sum()) - int(self.node_ovl[nodes].sum())
        self.node_ovl[nodes] = now

    def _uncount_kpages(self, d: np.ndarray) -> np.ndarray:
        """The pages ``d`` have no unmerged page left: those that are a counted KSM page stop
        overlapping (the frame stays, as a KSM page). Returns which they are."""
        n = self.kp_node[d]
        nn = np.maximum(n, 0)
        hit = (n >= 0) & self.node_ovl[nn]
        if hit.any():
            self.node_ovl[nn[hit]] = False
            self.overlap -= int(hit.sum())
        return hit

    def close_opportunities(self, closed: np.ndarray, t: float) -> None:
        if not len(closed):
            return
        self.merged_gen = _grow(self.merged_gen, int(closed.max()) + 1, -1)
        miss = closed[self.merged_gen[closed] != self.S.opp_gen[closed]]
        self.missed += len(miss)
        self.missed_time += float(np.sum(self.seconds(self.S.opp_start[miss], float(t))))

    def _merged_content(self, c: int, tau: float) -> None:
        S = self.S
        if c < len(S.opp_start) and S.opp_start[c] >= 0 and self.merged_gen[c] != S.opp_gen[c]:
            self.latencies.append(float(self.seconds(float(S.opp_start[c]), float(tau))))
            self.merged_gen[c] = S.opp_gen[c]

    def _merged_contents(self, cs: np.ndarray, taus: np.ndarray) -> None:
        """The first merge of each content ends its opportunity's wait (latency)."""
        S = self.S
        ok = (S.opp_start[cs] >= 0) & (self.merged_gen[cs] != S.opp_gen[cs])
        if not ok.any():
            return
        cs, taus = cs[ok], taus[ok]
        # the earliest merge of each content (a group is in time order)
        first = one_of_each(cs[::-1], self._content_scratch(len(self.merged_gen)))[::-1]
        self._cscratch[cs] = 0
        cs, taus = cs[first], taus[first]
        self.latencies.extend(np.atleast_1d(self.seconds(S.opp_start[cs], taus)).tolist())
        self.merged_gen[cs] = S.opp_gen[cs]

    # -- scanning ---------------------------------------------------------------------------
    def run_to(self, kend: int) -> None:
        """Run the batches ``self.k`` .. ``kend - 1`` over the current (constant) state."""
        P = self.p.pages_to_scan
        while self.k < kend:
            if not self.order:
                # ksmd_should_run() is false with no mm on the list: nothing happens
                self.k, self.used = kend, 0
                return
            if self.at_head:
                self._start_round()
            lim = self._linear_limit(kend)
            if lim <= self.k:
                self._hinted_batch()
                continue
            budget = min((lim - self.k) * P - self.used, MAX_SEGMENT)
            idx = self._gather(budget)
            n = len(idx)
            if n:
                kk = self.k + (self.used + np.arange(n)) // P
                self._process(idx, self.batch_time(kk))
                self.pages_scanned += n
                self.round_items += n
            total = self.used + n
            if n < budget:
                kb = self.k + total // P
                self._end_round(self.batch_time(kb))
                self.k, self.used = kb + 1, 0
                self._maybe_skip(kend)
            else:
                self.k += total // P
                self.used = total % P

    def _linear_limit(self, kend: int) -> int:
        """Batches before this index are plain linear-scan batches (see HintedModel)."""
        return kend

    def _hinted_batch(self) -> None:
        raise NotImplementedError

    def _start_round(self) -> None:
        # at the head of the list: the unstable tree is rebuilt from scratch
        self.round += 1
        self.at_head = False
        self.pos, self.addr = 0, 0
        self.round_items = 0
        self.round_mut = self.mut
        self.round_sync = self.S.sync_seq

    def _end_round(self, tau: float) -> None:
        self.full_scans += 1
        self.at_head = True
        if self.every_scan:
            if len(self.scan_rows) < SCAN_ROWS_MAX:
                self.scan_rows.append([tau, *self.row_values()])
            else:
                self.scan_rows_dropped += 1

    def _quiet(self) -> bool:
        return True

    def _maybe_skip(self, kend: int) -> None:
        """A full scan over a constant state that changed nothing repeats identically: skip
        the remaining whole rounds of this interval (exact, and cheap on idle stretches)."""
        if self.mut != self.round_mut or self.round_sync != self.S.sync_seq or not self._quiet():
            return
        bpr = self.round_items // self.p.pages_to_scan + 1
        q = (kend - self.k) // bpr
        if q <= 0:
            return
        self.full_scans += q
        self.pages_scanned += q * self.round_items
        self.k += q * bpr
        cur = self.ut_round == self.round
        self.round += q
        self.ut_round[cur] = self.round

    def _gather(self, budget: int) -> np.ndarray:
        """The next ``budget`` scannable items from the cursor (fewer: the round ends)."""
        S = self.S
        out: list[np.ndarray] = []
        need = budget
        while need > 0 and self.pos < len(self.order):
            s, e = S.slices.get(self.order[self.pos], (0, 0))
            i = s + int(np.searchsorted(S.vpn[s:e], self.addr))
            done_mm = True
            while i < e:
                w = min(e - i, need + (need >> 3) + 64)
                ok = np.flatnonzero(self.st[i:i + w] != ZERO)  # zero-page ptes are skipped
                if len(ok) >= need:
                    ok = ok[:need]
                    out.append(ok + i)
                    last = i + int(ok[-1])
                    self.addr = int(S.vpn[last]) + 1
                    need = 0
                    # ksm_scan.mm_slot stays on this mm until the next call finds it exhausted
                    # (a new mm then still goes in front of it)
                    done_mm = False
                    break
                if len(ok):
                    out.append(ok + i)
                    need -= len(ok)
                i += w
            if done_mm:
                self.pos += 1
                self.addr = 0
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _process(self, idx: np.ndarray, tau: np.ndarray, hinted: bool = False) -> None:
        """cmp_and_merge_page for the items ``idx`` in scan order, at times ``tau``.

        Contents are independent of each other, so what happens to a content can be worked out
        with array operations whenever the order of the pages within this step cannot matter:
        pages alone with their content (no stable node, no unstable-tree entry, no other page in
        this step), pages joining the one stable node of their content when it has room for all
        of them, single pages matching an entry inserted earlier in this full scan, and COW-broken
        pages leaving a live node. The rest goes one page at a time through ``_visit``.
        """
        S = self.S
        s = self.st[idx]
        act = s != STABLE  # already merged: cmp_and_merge_page returns at once
        if not act.all():
            idx, tau, s = idx[act], tau[act], s[act]
            if not len(idx):
                return
        c = S.pc[idx]
        u = s == UNSTABLE
        if u.any():
            # remove_rmap_item_from_tree: an unstable item leaves the tree (and pages_unshared)
            ui = idx[u]
            self.unshared -= len(ui)
            self.st[ui] = NONE
            s[u] = NONE
            ck = self.chk[ui]
            ok = ck >= 0
            ui, ck = ui[ok], ck[ok]
            mine = (self.ut_round[ck] == self.round) & (self.ut_uid[ck] == S.uid[ui])
            self.ut_round[ck[mine]] = -1
        if hinted:
            self.chk[idx] = c  # the write history vouches for the checksum
        valid = c >= 0
        cv = np.where(valid, c, 0)
        has_node = valid & (self.node_count[cv] > 0)
        broken = s == BROKEN
        if broken.any():
            self._leave_fast(idx, c, tau, broken, has_node)
        has_entry = valid & (self.ut_round[cv] == self.round)
        zero = valid & (c == self.zero) & ~has_node & ~broken & self.p.use_zero_pages
        cand = valid & ~zero
        nc = np.zeros(len(idx), dtype=np.int64)  # pages of the same content in this step
        if cand.any():
            ci = np.flatnonzero(cand)
            _, inv, cnt = np.unique(c[ci], return_inverse=True, return_counts=True)
            nc[ci] = cnt[inv]
        slow = broken.copy()
        # unknown contents: only the checksum is recorded
        unk = ~valid & ~broken
        if unk.any():
            ki = idx[unk]
            self.mut += int(np.count_nonzero(self.chk[ki] != c[unk]))
            self.chk[ki] = c[unk]
        if zero.any():
            self._zero_fast(idx[zero], tau[zero])
        j = cand & has_node & ~broken
        if j.any():
            slow |= self._join_fast(idx, c, tau, nc, j)
        e = cand & has_entry & ~has_node & (nc == 1) & ~broken
        if e.any():
            slow |= self._match_fast(idx, c, tau, e)
        fast = cand & ~has_node & ~has_entry & (nc == 1) & ~broken
        if fast.any():
            fi, fc = idx[fast], c[fast]
            vol = self.chk[fi] != fc
            if vol.any():
                # volatile: checksum changed since the last visit (or a new rmap item)
                self.chk[fi[vol]] = fc[vol]
                self.mut += int(vol.sum())
                fi, fc = fi[~vol], fc[~vol]
            if len(fi):
                self._insert(fi, fc)
        slow |= cand & ~has_node & (nc > 1)
        if slow.any():
            for i, ci_, ti in zip(idx[slow].tolist(), c[slow].tolist(), tau[slow].tolist(),
                                  strict=True):
                self._visit(i, ci_, ti)
        self._flush_events()

    def _leave_fast(self, idx: np.ndarray, c: np.ndarray, tau: np.ndarray, broken: np.ndarray,
                    has_node: np.ndarray) -> None:
        """COW-broken pages seen again leave their stable node (remove_rmap_item_from_tree): one
        fewer sharer of a live node; the first page of a node whose KSM page is gone prunes the
        whole node (get_ksm_page finds it stale). Pages of a node whose content is being joined
        in this step stay for the slow way (``broken`` keeps them); the others are cleared."""
        bi = np.flatnonzero(broken)
        n = self.node[idx[bi]]
        if has_node.any():
            mark = self._content_scratch(len(self.node_count))
            mark[c[has_node]] = 1
            fast = mark[self.node_c[n]] == 0
            mark[c[has_node]] = 0
        else:
            fast = np.ones(len(bi), dtype=bool)
        if not fast.any():
            return
        bi, n = bi[fast], n[fast]
        pruned = self.node_pruned[n]
        alive = ~pruned & (self.node_live[n] > 0)
        if alive.any():
            fb, fn = bi[alive], n[alive]
            np.subtract.at(self.node_len, fn, 1)
            self.sharing -= len(fb)
            self._ev.append((tau[fb], np.full(len(fb), -1.0), np.zeros(len(fb))))
        dead = ~pruned & ~alive
        if dead.any():
            dn, first = np.unique(n[dead], return_index=True)
            for node, t in zip(dn.tolist(), tau[bi[dead][first]].tolist(), strict=True):
                self._prune(node, t)
        self.mut += len(bi)
        self.st[idx[bi]] = NONE
        self.node[idx[bi]] = -1
        broken[bi] = False

    def _content_scratch(self, n: int) -> np.ndarray:
        """A zeroed int64 array indexed by content id (callers put the zeros back)."""
        if len(self._cscratch) < n:
            self._cscratch = np.zeros(max(n, 2 * len(self._cscratch)), dtype=np.int64)
        return self._cscratch

    def _flush_events(self) -> None:
        if self._ev_t:
            self._ev.append((np.array(self._ev_t), np.array(self._ev_sharing),
                             np.array(self._ev_saved)))
            self._ev_t, self._ev_sharing, self._ev_saved = [], [], []
        if self._ev:
            t = np.concatenate([e[0] for e in self._ev])
            self.s_sharing.add_events(t, np.concatenate([e[1] for e in self._ev]))
            self.s_saved.add_events(t, np.concatenate([e[2] for e in self._ev]))
            self._ev = []

    def _insert(self, fi: np.ndarray, fc: np.ndarray) -> None:
        """unstable_tree_search_insert found nothing: the pages go into the unstable tree."""
        S = self.S
        self.ut_round[fc] = self.round
        self.ut_slot[fc] = S.slot[fi]
        self.ut_vpn[fc] = S.vpn[fi]
        self.ut_uid[fc] = S.uid[fi]
        self.ut_idx[fc] = fi
        self.st[fi] = UNSTABLE
        self.unshared += len(fi)

    def _free(self, items: np.ndarray) -> np.ndarray:
        """The pages ``items`` are merged now: per item, 1 where that frees its frame (the last
        unmerged page of the frame)."""
        d = self.S.dpfi[items]
        np.subtract.at(self.nun, d, 1)
        if len(self._pscratch) < len(self.nun):
            self._pscratch = np.zeros(len(self.nun), dtype=np.int64)
        last = one_of_each(d, self._pscratch)  # the last page of each frame in this group
        freed = last & (self.nun[d] == 0)
        self.nz -= int(freed.sum())
        if freed.any():
            kp = np.zeros(len(d), dtype=bool)
            kp[freed] = self._uncount_kpages(d[freed])  # still needed: it is a KSM page now
            freed &= ~kp
        return freed.astype(np.float64)

    def _join_fast(self, idx: np.ndarray, c: np.ndarray, tau: np.ndarray, nc: np.ndarray,
                   sel: np.ndarray) -> np.ndarray:
        """Pages whose content has exactly one live stable node with room for all of them join
        it (stable_tree_search + stable_tree_append); returns the pages left for the slow way."""
        cs = c[sel]
        n = self.single_node[cs]
        nn = np.maximum(n, 0)
        ok = (n >= 0) & (self.node_live[nn] > 0) & (self.node_len[nn] + nc[sel] <=
                                                     self.p.max_page_sharing)
        rest = np.zeros(len(idx), dtype=bool)
        where = np.flatnonzero(sel)
        rest[where[~ok]] = True
        if not ok.any():
            return rest
        ji, jn, jt = idx[where[ok]], n[ok], tau[where[ok]]
        self.st[ji] = STABLE
        self.node[ji] = jn
        np.add.at(self.node_len, jn, 1)
        np.add.at(self.node_live, jn, 1)
        k = len(ji)
        self.sharing += k
        self.merges += k
        self.mut += k
        freed = self._free(ji)
        self.saved += int(freed.sum())
        self._ev.append((jt, np.ones(k), freed))
        self._merged_contents(cs[ok], jt)
        return rest

    def _match_fast(self, idx: np.ndarray, c: np.ndarray, tau: np.ndarray,
                    sel: np.ndarray) -> np.ndarray:
        """A page alone with its content in this step, whose content has an entry inserted
        earlier in this full scan, with an unchanged checksum: the two pages make a new stable
        node (try_to_merge_two_pages + stable_tree_insert). Returns pages left for the slow way."""
        S = self.S
        where = np.flatnonzero(sel)
        ii, cs, ts = idx[where], c[where], tau[where]
        jj = self.ut_idx[cs]
        jc = np.minimum(jj, max(S.n - 1, 0))
        ok = (jj < S.n) & (S.uid[jc] == self.ut_uid[cs])
        rest = np.zeros(len(idx), dtype=bool)
        rest[where[~ok]] = True  # entry moved by a re-layout: locate it the slow way
        where, ii, cs, ts, jj = where[ok], ii[ok], cs[ok], ts[ok], jc[ok]
        vol = self.chk[ii] != cs
        if vol.any():
            self.chk[ii[vol]] = cs[vol]
            self.mut += int(vol.sum())
        live = ~vol & (self.st[jj] == UNSTABLE) & (S.pc[jj] == cs)
        same = live & (S.pfi[jj] == S.pfi[ii])  # one page (fork): no merge, no insertion
        ins = ~vol & ~live  # a stale entry: the page takes its place
        if ins.any():
            self._insert(ii[ins], cs[ins])
        go = live & ~same
        if not go.any():
            return rest
        ii, jj, cs, ts = ii[go], jj[go], cs[go], ts[go]
        k = len(ii)
        first = self._new_nodes(cs)
        nodes = np.arange(first, first + k, dtype=np.int64)
        self.unshared -= k
        self.ut_round[cs] = -1
        for x in (ii, jj):
            self.st[x] = STABLE
            self.node[x] = nodes
        self.node_len[nodes] = 2
        self.node_live[nodes] = 2
        self.shared += k
        self.sharing += k
        self.live_nodes += k
        self.merges += k
        self.mut += k
        freed = self._free(np.concatenate([ii, jj]))
        dsaved = freed[:k] + freed[k:] - 1.0
        self._set_kpage(ii, nodes)
        dsaved += self.nun[S.dpfi[ii]] > 0
        self.saved += int(dsaved.sum())
        self._ev.append((ts, np.ones(k), dsaved))
        self._merged_contents(cs, ts)
        return rest

    def _zero_fast(self, zi: np.ndarray, tz: np.ndarray) -> None:
        """Zero-content pages with use_zero_pages: volatile ones record their checksum, stable
        ones are merged with the kernel zero page."""
        vol = self.chk[zi] != self.zero
        if vol.any():
            self.chk[zi[vol]] = self.zero
            self.mut += int(vol.sum())
        zi, tz = zi[~vol], tz[~vol]
        if not len(zi):
            return
        self.st[zi] = ZERO
        self.zero_merged += len(zi)
        self.merges += len(zi)
        self.mut += len(zi)
        freed = self._free(zi)
        self.saved += int(freed.sum())
        self._ev.append((tz, np.zeros(len(zi)), freed))
        self._merged_content(self.zero, float(tz[0]))

    def _event(self, tau: float, dsharing: float, dsaved: float) -> None:
        self._ev_t.append(tau)
        self._ev_sharing.append(dsharing)
        self._ev_saved.append(dsaved)

    def _unmerge_page(self, i: int) -> int:
        """One fewer unmerged page on item i's frame; 1 if that frees the frame."""
        d = int(self.S.dpfi[i])
        self.nun[d] -= 1
        if self.nun[d] == 0:
            self.nz -= 1
            if self._uncount_kpages(np.array([d]))[0]:
                return 0  # still needed: it is a KSM page now
            return 1
        return 0

    def _visit(self, i: int, c: int, tau: float) -> None:
        """cmp_and_merge_page for one item, in the kernel's order."""
        S = self.S
        self.mut += 1 if self.st[i] == BROKEN else 0
        if self.st[i] == BROKEN:
            self._leave_node(i, tau)
        if c >= 0 and self.node_count[c] > 0:
            n = int(self.kp_node[S.dpfi[i]])
            if n >= 0 and self.node_c[n] == c and self.node_live[n] > 0 and \
                    not self.node_pruned[n]:
                # the page is that node's KSM page (a fork of a merged page): stable_tree_search
                # returns it at once and it joins, over max_page_sharing if need be
                self._join(i, n, c, tau)
                return
            n = self._find_node(c, tau)
            if n >= 0:
                self._join(i, n, c, tau)
                return
        if self.chk[i] != c:
            self.chk[i] = c
            self.mut += 1
            return
        if c < 0:
            return
        if self.p.use_zero_pages and c == self.zero:
            self.st[i] = ZERO
            self.zero_merged += 1
            self.merges += 1
            self.mut += 1
            freed = self._unmerge_page(i)
            self.saved += freed
            self._event(tau, 0.0, float(freed))
            self._merged_content(c, tau)
            return
        if self.ut_round[c] == self.round:
            j = self._locate(int(self.ut_slot[c]), int(self.ut_vpn[c]), int(self.ut_uid[c]))
            if j >= 0 and self.st[j] == UNSTABLE and S.pc[j] == c:
                if S.pfi[j] == S.pfi[i]:
                    return  # the same page (shared by fork): no merge, no insertion
                self._merge_pair(i, j, c, tau)
                return
        self.ut_round[c] = self.round
        self.ut_slot[c] = S.slot[i]
        self.ut_vpn[c] = S.vpn[i]
        self.ut_uid[c] = S.uid[i]
        self.ut_idx[c] = i
        self.st[i] = UNSTABLE
        self.unshared += 1

    def _locate(self, slot: int, vpn: int, uid: int) -> int:
        S = self.S
        s, e = S.slices.get(slot, (0, 0))
        j = s + int(np.searchsorted(S.vpn[s:e], vpn))
        if j < e and S.vpn[j] == vpn and S.uid[j] == uid:
            return j
        return -1

    def _new_nodes(self, cs: np.ndarray) -> int:
        """Allocate stable nodes for the contents ``cs`` (distinct); returns the first id."""
        first = self.nnodes
        k = len(cs)
        if first + k > len(self.node_c):
            size = max(2 * len(self.node_c), first + k)
            self.node_c = _grow(self.node_c, size, 0)
            self.node_len = _grow(self.node_len, size, 0)
            self.node_live = _grow(self.node_live, size, 0)
            self.node_pruned = _grow(self.node_pruned, size, False)
            self.node_kp = _grow(self.node_kp, size, 0)
            self.node_ovl = _grow(self.node_ovl, size, False)
        self.nnodes += k
        ids = range(first, first + k)
        self.node_c[first:first + k] = cs
        for c, n in zip(cs.tolist(), ids, strict=True):
            lst = self.nodes_of.setdefault(c, [])
            lst.append(n)
            self.single_node[c] = n if len(lst) == 1 else -1
        self.node_count[cs] += 1
        return first

    def _new_node(self, c: int) -> int:
        n = self.nnodes
        if n >= len(self.node_c):
            return self._new_nodes(np.array([c], dtype=np.int64))
        self.nnodes += 1
        self.node_c[n] = c
        lst = self.nodes_of.setdefault(c, [])
        lst.append(n)
        self.single_node[c] = n if len(lst) == 1 else -1
        self.node_count[c] += 1
        return n

    def _prune(self, n: int, tau: float) -> None:
        """A stable node whose KSM page is gone (every sharer broke COW) leaves the tree and the
        counters (get_ksm_page -> remove_node_from_stable_tree)."""
        ln = int(self.node_len[n])
        self.node_pruned[n] = True
        c = int(self.node_c[n])
        lst = self.nodes_of[c]
        lst.remove(n)
        self.node_count[c] -= 1
        self.single_node[c] = lst[0] if len(lst) == 1 else -1
        if ln >= 1:
            self.shared -= 1
            self.sharing -= ln - 1
            self._event(tau, -(ln - 1.0), 0.0)

    def _find_node(self, c: int, tau: float) -> int:
        """stable_tree_search: prune stale nodes, then the fullest node with room."""
        best = -1
        for n in list(self.nodes_of.get(c, ())):
            if self.node_live[n] <= 0:
                self._prune(n, tau)
            elif self.node_len[n] < self.p.max_page_sharing and (
                    best < 0 or self.node_len[n] > self.node_len[best]):
                best = n
        return best

    def _leave_node(self, i: int, tau: float) -> None:
        """A page that broke COW is seen by ksmd again: its rmap item leaves the stable node."""
        n = int(self.node[i])
        self.st[i] = NONE
        self.node[i] = -1
        if self.node_pruned[n]:
            return
        if self.node_live[n] <= 0:
            self._prune(n, tau)
            return
        self.node_len[n] -= 1
        self.sharing -= 1
        self._event(tau, -1.0, 0.0)

    def _join(self, i: int, n: int, c: int, tau: float) -> None:
        """A match in the stable tree: try_to_merge_with_ksm_page + stable_tree_append."""
        self.st[i] = STABLE
        self.node[i] = n
        self.node_len[n] += 1
        self.node_live[n] += 1
        self.sharing += 1
        self.merges += 1
        self.mut += 1
        freed = self._unmerge_page(i)
        self.saved += freed
        self._event(tau, 1.0, float(freed))
        self._merged_content(c, tau)

    def _merge_pair(self, i: int, j: int, c: int, tau: float) -> None:
        """A match in the unstable tree: try_to_merge_two_pages + stable_tree_insert."""
        n = self._new_node(c)
        self.unshared -= 1
        self.ut_round[c] = -1
        for x in (i, j):
            self.st[x] = STABLE
            self.node[x] = n
        self.node_len[n] = 2
        self.node_live[n] = 2
        self.shared += 1
        self.sharing += 1
        self.live_nodes += 1
        self.merges += 1
        self.mut += 1
        freed = self._unmerge_page(i) + self._unmerge_page(j) - 1
        freed += self._set_kpage(np.array([i]), np.array([n]))
        self.saved += freed
        self._event(tau, 1.0, float(freed))
        self._merged_content(c, tau)

    def _set_kpage(self, items: np.ndarray, nodes: np.ndarray) -> int:
        """The new ``nodes`` have the frames of the scanned ``items`` as KSM pages; returns how
        many of those frames were still needed anyway (unmerged siblings): no extra frame."""
        S = self.S
        self.node_kp[nodes] = S.pfi[items]
        d = S.dpfi[items]
        # a frame that was another live node's KSM page stops counting for that node
        prev = self.kp_node[d]
        pc_ = np.maximum(prev, 0)
        was = (prev >= 0) & self.node_ovl[pc_]
        if was.any():
            self.node_ovl[pc_[was]] = False
            self.overlap -= int(was.sum())
        self.kp_node[d] = nodes
        both = self.nun[d] > 0
        self.node_ovl[nodes] = both
        self.overlap += int(both.sum())
        return int(both.sum())

    # -- reporting -----------------------------------------------------------------------------
    def rmap_items(self) -> int:
        return int(np.count_nonzero((self.chk != NEVER) & (self.st != ZERO)))

    def counters(self, page_size: int) -> dict[str, int]:
        rmap = self.rmap_items()
        return {
            "pages_shared": self.shared,
            "pages_sharing": self.sharing,
            "pages_unshared": self.unshared,
            "pages_volatile": max(0, rmap - self.shared - self.sharing - self.unshared),
            "full_scans": self.full_scans,
            "general_profit": (self.sharing + self.zero_merged) * page_size
            - rmap * RMAP_ITEM_BYTES,
            "ksm_zero_pages": self.zero_merged,
        }

    def row_values(self, page_size: int = 4096) -> list[Any]:
        c = self.counters(page_size)
        return [c["pages_shared"], c["pages_sharing"], c["pages_unshared"], c["pages_volatile"],
                c["full_scans"], c["general_profit"], self.pages_scanned, self.saved]


class HintedModel(KsmModel):
    """XLH-style: pages written and then left alone for one sleep period are scanned first."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.queue: deque[tuple[float, np.ndarray]] = deque()
        self.hint_budget = max(1, self.p.pages_to_scan // 2)
        self.hinted_pages = 0

    def sync(self, st: ReplayState, t: float) -> None:
        super().sync(st, t)
        ch = self.S.changed_idx
        if len(ch):
            self.queue.append((t, self.S.uid[ch]))

    def _quiet(self) -> bool:
        return not self.queue

    def _linear_limit(self, kend: int) -> int:
        if not self.queue or self.used:
            return kend
        return min(kend, max(self.k, self.k_first(self.later(self.queue[0][0]))))

    def _pop(self, tau: float) -> np.ndarray:
        """Up to half a batch of settled hinted pages still worth scanning, oldest first."""
        S = self.S
        out: list[np.ndarray] = []
        need = self.hint_budget
        while need > 0 and self.queue and self.later(self.queue[0][0]) <= tau:
            t, uids = self.queue.popleft()
            idx = S.uid_index[uids[uids < len(S.uid_index)]]
            idx = idx[idx >= 0]
            # not changed again since (a later hint covers it), not yet scanned since, unmerged
            s = self.st[idx]
            keep = (S.ctime[idx] == t) & (self.chk[idx] != S.pc[idx]) & (s != STABLE) & \
                (s != ZERO) & (S.pc[idx] >= 0)
            idx = idx[keep]
            if len(idx) > need:
                self.queue.appendleft((t, S.uid[idx[need:]]))
                idx = idx[:need]
            out.append(idx)
            need -= len(idx)
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out)

    def _hinted_batch(self) -> None:
        """One batch: hinted pages first, the linear scan with what is left."""
        P = self.p.pages_to_scan
        tau = self.batch_time(self.k)
        hi = self._pop(tau)
        h = len(hi)
        if h:
            self._process(hi, np.full(h, tau), hinted=True)
            self.pages_scanned += h
            self.hinted_pages += h
            self.mut += h
        budget = P - h
        idx = self._gather(budget) if budget > 0 else np.zeros(0, dtype=np.int64)
        n = len(idx)
        if n:
            self._process(idx, np.full(n, tau))
            self.pages_scanned += n
            self.round_items += n
        if budget > 0 and n < budget:
            self._end_round(tau)
        self.k += 1
        self.used = 0


# ------------------------------------------------------------------------------------------------
# The analysis
# ------------------------------------------------------------------------------------------------

def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def _max_sharing(s: str) -> int:
    v = positive_int(s)
    if v < 2:
        # max_page_sharing_store: "When a KSM page is created it is shared by 2 mappings"
        raise argparse.ArgumentTypeError("max_page_sharing must be at least 2 (as in the kernel)")
    return v


def parse_sweep(s: str) -> list[tuple[int, float]]:
    """``"100:20,1000:20"`` -> [(100, 20.0), (1000, 20.0)] (pages_to_scan:sleep_ms pairs)."""
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"--ksm-sweep: {part!r} is not PAGES:SLEEP_MS (e.g. 100:20,1000:20)")
        out.append((positive_int(a), _positive_float(b)))
    if not out:
        raise argparse.ArgumentTypeError("--ksm-sweep: no PAGES:SLEEP_MS pair")
    return out


def parse_start(s: str) -> str:
    if s.startswith("phase:") and len(s) > 6:
        return s
    try:
        float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ksm-start: {s!r} is neither a time in clock units nor phase:NAME") from None
    return s


def _pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


class KsmAnalysis(Analysis):
    """KSM replayed over the trace: counters over time, savings against the oracle, sweeps."""

    name = "ksm"
    flag = "--ksm"
    help = ("replay the trace through a model of Linux KSM (sysfs parameters --ksm-*): "
            "pages_sharing over time, savings against the oracle, merge latency, sweeps")
    default = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("KSM model (--ksm)")
        g.add_argument("--ksm-pages-to-scan", type=positive_int, default=100, metavar="N",
                       help="pages ksmd scans per batch (sysfs pages_to_scan; default 100)")
        g.add_argument("--ksm-sleep-ms", type=_positive_float, default=20.0, metavar="MS",
                       help="guest milliseconds between batches (sleep_millisecs; default 20)")
        g.add_argument("--ksm-max-page-sharing", type=_max_sharing, default=256, metavar="N",
                       help="rmap items per KSM page at most (max_page_sharing; default 256)")
        g.add_argument("--ksm-use-zero-pages", action="store_true",
                       help="merge empty pages with the kernel zero page (use_zero_pages=1)")
        g.add_argument("--ksm-scope", choices=("madvised", "anon"), default="madvised",
                       help="madvised: only VMAs with VM_MERGEABLE; anon: all anonymous memory "
                            "of every address space (default madvised)")
        g.add_argument("--ksm-sweep", type=parse_sweep, default=None, metavar="P:MS,...",
                       help="also run these pages_to_scan:sleep_ms sets in the same replay, "
                            "e.g. 100:20,1000:20,100:200")
        g.add_argument("--ksm-no-hints", action="store_true",
                       help="do not run the XLH-style hinted scanner next to each set")
        g.add_argument("--ksm-clock-hz", type=_positive_float, default=None, metavar="HZ",
                       help="clock units per guest second (default: the trace header's "
                            "clock_hz, its tracer.clock_hz counter, or 1e9)")
        g.add_argument("--ksm-hz", type=int, default=None, metavar="HZ",
                       help="the guest kernel's tick rate: ksmd sleeps whole jiffies, one more "
                            "than sleep_millisecs rounded up (default: the trace's guest.hz "
                            "counter; 0: batches exactly sleep_ms apart)")
        g.add_argument("--ksm-no-guest-clock", action="store_true",
                       help="ignore the guest's own clock (COUNTER guest.clock_ns) and convert "
                            "trace time to guest time with clock_hz alone")
        g.add_argument("--ksm-start", type=parse_start, default=None, metavar="T|phase:NAME",
                       help="ksmd starts at this time (clock units) or at the first MARK PHASE "
                            "NAME (default: the start of the trace)")
        g.add_argument("--ksm-every-scan", action="store_true",
                       help="also tabulate the counters at the end of every full scan")
        g.add_argument("--plot-ksm", metavar="FILE.png", default=None,
                       help="draw KSM savings over time and against scan rate (matplotlib)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KsmAnalysis:
        plot = getattr(args, "plot_ksm", None)
        if plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                print("trace-analyze: error: --plot-ksm needs matplotlib; install it with "
                      "pip install 'memtrace[plot]'", file=sys.stderr)
                raise SystemExit(2) from None
        return cls(pages_to_scan=args.ksm_pages_to_scan, sleep_ms=args.ksm_sleep_ms,
                   max_page_sharing=args.ksm_max_page_sharing,
                   use_zero_pages=args.ksm_use_zero_pages, scope=args.ksm_scope,
                   sweep=args.ksm_sweep, hints=not args.ksm_no_hints,
                   clock_hz=args.ksm_clock_hz, start=args.ksm_start,
                   guest_clock=not getattr(args, "ksm_no_guest_clock", False),
                   tick_hz=getattr(args, "ksm_hz", None),
                   every_scan=args.ksm_every_scan,
                   plot=plot)

    def __init__(self, pages_to_scan: int = 100, sleep_ms: float = 20.0,
                 max_page_sharing: int = 256, use_zero_pages: bool = False,
                 scope: str = "madvised", sweep: list[tuple[int, float]] | None = None,
                 hints: bool = True, clock_hz: float | None = None, start: str | None = None,
                 interval: int | None = None, every_scan: bool = False,
                 plot: str | None = None, guest_clock: bool = True,
                 tick_hz: int | None = None) -> None:
        if scope not in ("madvised", "anon"):
            raise ValueError(f"scope must be madvised or anon, not {scope!r}")
        base = KsmParams(pages_to_scan, float(sleep_ms), max_page_sharing, use_zero_pages)
        sets = [base] + [KsmParams(p, float(s), max_page_sharing, use_zero_pages)
                         for p, s in (sweep or [])]
        seen: list[KsmParams] = []
        for p in sets:
            if p not in seen:
                seen.append(p)
        self.params: list[KsmParams] = []
        for p in seen:
            self.params.append(p)
            if hints:
                self.params.append(KsmParams(p.pages_to_scan, p.sleep_ms, p.max_page_sharing,
                                             p.use_zero_pages, "hinted"))
        self.scope = scope
        self.clock_hz_arg = clock_hz
        self.guest_clock = guest_clock
        self.tick_hz_arg = tick_hz
        self.trace_tick_hz: int | None = None
        self.gclock = GuestClock(float(clock_hz or DEFAULT_CLOCK_HZ))
        self.start_arg = start
        self.interval = interval
        self.every_scan = every_scan
        self.plot_path = plot
        self.space = ItemSpace(scope)
        self.models: list[KsmModel] = []
        self.samples: list[list[Any]] = []
        self.kernel: dict[str, list[tuple[int, int]]] = {}
        self.compare_rows: list[list[Any]] = []
        self.phase = ""  # the latest MARK PHASE
        self.start_phase: str | None = None  # the phase in force when ksmd started
        self.knobs: dict[str, int] = {}
        self.started = False
        self.t_first: float | None = None
        self.t_last = 0.0
        self.s_ceiling: Series | None = None
        self.s_global: Series | None = None
        self.plotted = False
        self.clock_counter: int | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _clock(self, replay: Replay) -> tuple[float, str]:
        """Clock units per guest second (and where that came from); also reads the guest's
        own clock from the trace into ``self.gclock``."""
        hz, source = self._clock_rate(replay)
        self.gclock = GuestClock(hz)
        if self.guest_clock or self.tick_hz_arg is None:
            clock = self._read_guest_clock(replay.trace, hz)
            if self.guest_clock:
                self.gclock = clock
        return hz, source

    @property
    def tick_hz(self) -> int:
        """The guest's HZ the model's sleeps are rounded with (0: not rounded)."""
        if self.tick_hz_arg is not None:
            return max(0, self.tick_hz_arg)
        return self.trace_tick_hz or 0

    def _read_guest_clock(self, tr: Any, hz: float) -> GuestClock:
        """The trace's ``guest.clock_ns`` counters, each at the trace time it was recorded. A
        pass over the chunks before the replay (chunks without the name are skipped after
        decompression): batches must be placed before the replay reaches them."""
        ts: list[int] = []
        gs: list[int] = []
        t = tr.t_begin
        for info in tr.chunks:
            try:
                ch = tr.read_chunk(info)
            except Exception:  # noqa: BLE001 - the replay reports a damaged chunk
                break
            if GUEST_CLOCK_COUNTER not in ch.strings and GUEST_HZ_COUNTER not in ch.strings:
                t = max(t, info.t_last)
                continue
            for kind, rec in ch.blocks:
                if kind == Kind.TIME and len(rec):
                    t = int(rec["t"][-1])
                elif kind == Kind.COUNTER:
                    for name_id, _pad, value in rec.tolist():
                        name = ch.string(name_id)
                        if name == GUEST_CLOCK_COUNTER:
                            ts.append(t)
                            gs.append(int(value))
                        elif name == GUEST_HZ_COUNTER and int(value) > 0:
                            self.trace_tick_hz = int(value)
        return GuestClock.from_counters(hz, ts, gs)

    def _clock_rate(self, replay: Replay) -> tuple[float, str]:
        tr = replay.trace
        if self.clock_hz_arg:
            return float(self.clock_hz_arg), "--ksm-clock-hz"
        hz = tr.header.get("clock_hz")
        if hz:
            return float(hz), "trace header clock_hz"
        if tr.clock_unit == "ns":
            return 1e9, "clock unit ns"
        # a recorder that learns the rate only at the end writes a counter in the last chunks
        for info in reversed(tr.chunks[-4:]):
            try:
                ch = tr.read_chunk(info)
            except Exception:  # noqa: BLE001 - a damaged tail: fall back to the default
                break
            for kind, rec in ch.blocks:
                if kind == Kind.COUNTER:
                    for r in rec:
                        if ch.string(int(r["name"])) == CLOCK_COUNTER and int(r["value"]):
                            return float(r["value"]), "tracer.clock_hz counter"
        return float(DEFAULT_CLOCK_HZ), "assumed default (no clock_hz in the trace)"

    def begin(self, replay: Replay) -> None:
        super().begin(replay)
        self.hz, self.hz_source = self._clock(replay)
        tr = replay.trace
        self.page_size = tr.page_size
        self.grid = replay.grid(100, self.interval)  # samples on the same grid as --sharing
        self.interval = self.grid.step.value
        self.space.all_dirty = True

    def _make_models(self, t0: float, st: ReplayState) -> None:
        self.t_first = t0
        knots = self.gclock if self.gclock.knots else None
        self.s_ceiling = Series(t0, clock=knots)
        self.s_global = Series(t0, clock=knots)
        for p in self.params:
            cls = HintedModel if p.scanner == "hinted" else KsmModel
            m = cls(p, self.space, self.hz, t0, st.zero_cid, self.every_scan, self.gclock,
                    self.tick_hz)
            self.models.append(m)
            self.space.models.append(m)
        if self.start_arg is None:
            self._start(t0)
        elif not self.start_arg.startswith("phase:"):
            self._start(max(t0, float(self.start_arg)))

    def _start(self, t: float) -> None:
        self.started = True
        self.start_phase = self.phase
        for m in self.models:
            m.start(t)

    # -- hooks -----------------------------------------------------------------------------------
    def _sync(self, st: ReplayState, t: float) -> None:
        if not self.space.sync(st, t):
            return
        for m in self.models:
            m.sync(st, t)
        f = st.figures()
        assert self.s_ceiling is not None and self.s_global is not None
        self.s_ceiling.set(t, self.space.ceiling)
        self.s_global.set(t, f["mmap_fork"] - f["full_cbps"])

    def on_interval(self, st: ReplayState, t0: int, t1: int) -> None:
        if self.t_first is None:
            self._make_models(float(t0), st)
        self._sync(st, float(t0))
        for s in self.grid.instants_in(t0, t1):
            for m in self.models:
                m.run_to(m.k_after(s))
            self._sample(st, s)
        for m in self.models:
            m.run_to(m.k_first(t1))
        self.t_last = float(t1)

    def on_records(self, st: ReplayState, kind: int, records: np.ndarray, chunk: Chunk) -> None:
        # called after the state applied the records: note the pages whose frames were written
        # or whose mappings changed, so that only those are looked at again
        if kind == Kind.PAGE:
            self.space.page_log.append(records["frame"].astype(np.int64))
        elif kind == Kind.MAP:
            if len(records):
                self.space.map_log.append((records["mm"].copy(), records["vpn"].copy()))
        elif kind == Kind.PAGECACHE:
            fr = records["frame"].astype(np.int64)
            fr = fr[fr < len(st.proc_count)]
            if len(fr) and (st.proc_count[fr] > 0).any():
                self.space.all_dirty = True  # a mapped frame became named or anonymous
        elif kind == Kind.VMA:
            self.space.dirty.update(np.unique(records["mm"]).tolist())
        elif kind == Kind.MARK:
            for op, name, arg in records.tolist():
                if op == MarkOp.PHASE:
                    self.phase = chunk.string(name) or ""
                if op == MarkOp.STATE_BEGIN and arg & 1:
                    self.space.all_dirty = True
                elif (op == MarkOp.PHASE and not self.started and self.start_arg
                      and self.start_arg == f"phase:{chunk.string(name)}"):
                    if self.t_first is None:
                        self._make_models(float(st.t), st)
                    self._start(float(st.t))
        elif kind == Kind.COUNTER:
            for name_id, _pad, value in records.tolist():
                name = chunk.string(name_id) or ""
                if name == CLOCK_COUNTER:
                    self.clock_counter = int(value)
                if not name.startswith(KERNEL_PREFIX):
                    continue
                key = name[len(KERNEL_PREFIX):]
                if key in KNOBS:
                    self.knobs[key] = int(value)
                    continue
                self.kernel.setdefault(key, []).append((st.t, int(value)))
                if key in COUNTERS and self.models:
                    model = self.models[0].counters(self.page_size)[key]
                    self.compare_rows.append([st.t, key, int(value), model, model - int(value),
                                              round(self.gclock.guest(st.t), 6), self.phase])

    def _sample(self, st: ReplayState, s: float) -> None:
        if not self.models:
            return
        m = self.models[0]
        row = [s, *m.row_values(self.page_size), self.space.ceiling]
        f = st.figures()
        row.append(f["mmap_fork"] - f["full_cbps"])
        if len(self.models) > 1 and self.models[1].p.scanner == "hinted":
            row += [self.models[1].pages_scanned, self.models[1].saved]
        self.samples.append(row)

    def end(self, st: ReplayState) -> None:
        if self.t_first is None:
            self._make_models(float(st.t), st)
        self._sync(st, float(st.t))
        self.t_last = max(self.t_last, float(st.t))
        if not self.samples or self.samples[-1][0] < st.t:
            self._sample(st, st.t)

    # -- results ---------------------------------------------------------------------------------
    def _dur(self, t0: float, t1: float) -> float:
        """The span the time-weighted means divide by: guest seconds when the trace has the
        guest's clock (the series integrate over guest time then), else clock units."""
        return self.gclock.span(t0, t1) if self.gclock.knots else t1 - t0

    def _model_summary(self, m: KsmModel) -> dict[str, Any]:
        t0 = self.t_first or 0.0
        t1 = self.t_last
        dur = self._dur(t0, t1)
        ceil_area = self.s_ceiling.integral(t1) if self.s_ceiling else 0.0
        glob_area = self.s_global.integral(t1) if self.s_global else 0.0
        saved_area = m.s_saved.integral(t1)
        lat = list(m.latencies)
        return {
            "pages_sharing_mean": m.s_sharing.integral(t1) / dur if dur > 0 else float(m.sharing),
            "saved_mean": saved_area / dur if dur > 0 else float(m.saved),
            "fraction_of_scope_oracle": saved_area / ceil_area if ceil_area > 0 else None,
            "fraction_of_guest_oracle": saved_area / glob_area if glob_area > 0 else None,
            "latency_median_s": _pct(lat, 50),
            "latency_p90_s": _pct(lat, 90),
            "merged_opportunities": len(lat),
        }

    def result(self) -> Result:
        r = Result("ksm")
        tr = self.replay.trace
        unit = tr.clock_unit
        ps = self.page_size
        if not self.models:
            r.notes.append("the trace has no records: nothing to model")
            return r
        m = self.models[0]
        p = m.p
        ms = self._model_summary(m)
        t0, t1 = self.t_first or 0.0, self.t_last
        dur = self._dur(t0, t1)
        summ, units = r.summary, r.units
        summ["scope"] = self.scope
        summ["pages_to_scan"] = p.pages_to_scan
        summ["sleep_millisecs"] = p.sleep_ms
        units["sleep_millisecs"] = "ms"
        summ["max_page_sharing"] = p.max_page_sharing
        summ["use_zero_pages"] = int(p.use_zero_pages)
        summ["clock_hz"] = self.hz
        units["clock_hz"] = f"{unit}/s"
        summ["clock_hz_source"] = self.hz_source
        summ["guest_clock_knots"] = self.gclock.knots
        summ["guest_hz"] = self.tick_hz or None
        summ["batch_cycle_ms"] = round(float(cycle_ms(p.sleep_ms, self.tick_hz)), 3)
        units["batch_cycle_ms"] = "ms"
        summ["guest_seconds"] = round(self.gclock.span(t0, t1), 6)
        units["guest_seconds"] = "s"
        if not self.started:
            r.notes.append(f"ksmd never started: {self.start_arg} was not found in the trace")
        for k, v in m.counters(ps).items():
            summ[f"final_{k}"] = v
        units["final_general_profit"] = "bytes"
        summ["pages_sharing_mean"] = round(ms["pages_sharing_mean"], 3)
        summ["saved_pages_final"] = m.saved
        summ["saved_pages_mean"] = round(ms["saved_mean"], 3)
        summ["saved_mean_mib"] = round(pages_to_mib(ms["saved_mean"], ps), 3)
        units["saved_mean_mib"] = "MiB"
        for k in ("pages_sharing_mean", "saved_pages_final", "saved_pages_mean"):
            units[k] = "pages"
        if self.s_ceiling and dur > 0:
            summ["scope_oracle_mean"] = round(self.s_ceiling.integral(t1) / dur, 3)
            summ["guest_oracle_mean"] = round(self.s_global.integral(t1) / dur, 3) \
                if self.s_global else None
            units["scope_oracle_mean"] = units["guest_oracle_mean"] = "pages"
        for k in ("fraction_of_scope_oracle", "fraction_of_guest_oracle"):
            v = ms[k]
            summ[k] = round(v, 4) if v is not None else None
        summ["pages_scanned"] = m.pages_scanned
        summ["scan_rate"] = round(p.scan_rate(), 1)
        units["scan_rate"] = "pages/s"
        summ["merges"] = m.merges
        summ["opportunities"] = self.space.opportunities
        summ["opportunities_merged"] = ms["merged_opportunities"]
        summ["opportunities_missed"] = m.missed
        summ["missed_page_seconds"] = round(m.missed_time, 6)
        units["missed_page_seconds"] = "content*s"
        for k, out in (("latency_median_s", "latency_median"), ("latency_p90_s", "latency_p90")):
            v = ms[k]
            summ[out] = round(v, 6) if v is not None else None
            units[out] = "s"
        hinted = [x for x in self.models if x.p.scanner == "hinted" and
                  (x.p.pages_to_scan, x.p.sleep_ms) == (p.pages_to_scan, p.sleep_ms)]
        if hinted:
            h = hinted[0]
            hs = self._model_summary(h)
            summ["hinted_saved_pages_mean"] = round(hs["saved_mean"], 3)
            units["hinted_saved_pages_mean"] = "pages"
            f0, f1 = ms["fraction_of_scope_oracle"], hs["fraction_of_scope_oracle"]
            summ["hinted_fraction_of_scope_oracle"] = round(f1, 4) if f1 is not None else None
            summ["hinted_gain"] = round(f1 - f0, 4) if f0 is not None and f1 is not None \
                else None
            summ["hinted_latency_median"] = round(hs["latency_median_s"], 6) \
                if hs["latency_median_s"] is not None else None
            units["hinted_latency_median"] = "s"
            summ["hinted_pages_scanned"] = h.pages_scanned
        cols = ["t", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "general_profit", "pages_scanned", "saved_pages", "scope_oracle",
                "guest_oracle"]
        if len(self.models) > 1 and self.models[1].p.scanner == "hinted":
            cols += ["hinted_pages_scanned", "hinted_saved_pages"]
        r.tables["series"] = Table(cols, [list(x) for x in self.samples],
                                   f"KSM {p.label} over time ({self.scope}; pages, "
                                   "general_profit in bytes; savings in frames)")
        if self.every_scan:
            r.tables["full_scans"] = Table(
                ["t", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "full_scans", "general_profit", "pages_scanned", "saved_pages"],
                [[round(x[0], 3), *x[1:]] for x in m.scan_rows],
                "counters at the end of each full scan")
            if m.scan_rows_dropped:
                r.notes.append(f"{m.scan_rows_dropped} full scans beyond {SCAN_ROWS_MAX} not "
                               "tabulated")
        r.tables["sweep"] = self._sweep_table()
        self._kernel_comparison(r)
        self._notes(r)
        if self.plot_path and not self.plotted:
            self.plotted = True
            self._plot(r)
        return r

    def _sweep_table(self) -> Table:
        rows = []
        t1 = self.t_last
        dur = self._dur(self.t_first or 0.0, t1)
        for x in self.models:
            s = self._model_summary(x)
            rows.append([x.p.label, x.p.pages_to_scan, x.p.sleep_ms, round(x.p.scan_rate(), 1),
                         x.p.scanner, x.pages_scanned, x.full_scans,
                         round(s["pages_sharing_mean"], 2), round(s["saved_mean"], 2),
                         round(s["fraction_of_scope_oracle"], 4)
                         if s["fraction_of_scope_oracle"] is not None else None,
                         round(s["fraction_of_guest_oracle"], 4)
                         if s["fraction_of_guest_oracle"] is not None else None,
                         round(s["latency_median_s"], 4)
                         if s["latency_median_s"] is not None else None,
                         x.missed])
        if self.s_ceiling is not None and dur > 0:
            mean = self.s_ceiling.integral(t1) / dur
            rows.append(["oracle (scope)", None, None, None, "ceiling", None, None, None,
                         round(mean, 2), 1.0, None, 0.0, 0])
        return Table(["set", "pages_to_scan", "sleep_ms", "scan_rate", "scanner",
                      "pages_scanned", "full_scans", "pages_sharing_mean", "saved_mean",
                      "fraction_of_scope_oracle", "fraction_of_guest_oracle",
                      "latency_median_s", "missed"], rows,
                     "savings against scan rate (pages/s of guest time), the oracle as ceiling")

    def _kernel_comparison(self, r: Result) -> None:
        if not self.kernel:
            return
        r.tables["kernel_vs_model"] = Table(
            ["t", "counter", "kernel", "model", "model_minus_kernel", "guest_s", "phase"],
            self.compare_rows,
            f"real kernel counters (COUNTER ksm.*) against the model {self.models[0].p.label} "
            "at the same instants (guest_s: guest seconds)")
        # "final" is the last sample while ksmd ran over the workload: the last one of the
        # phase ksmd was started in (--ksm-start phase:NAME), else the last one of the trace;
        # samples after it (the workload exiting) are in the table but not judged
        t0 = self.models[0].origin if self.models[0].origin is not None else -math.inf
        judged = [x for x in self.compare_rows if x[0] >= t0]
        if self.start_phase:
            judged = [x for x in judged if x[6] == self.start_phase]
            r.summary["final_sample_phase"] = self.start_phase
        last: dict[str, list[Any]] = {}
        for row in judged:
            last[row[1]] = row
        for key in ("pages_sharing", "pages_shared", "full_scans"):
            row = last.get(key)
            if row is None:
                continue
            r.summary[f"kernel_final_{key}"] = row[2]
            r.summary[f"model_at_kernel_final_{key}"] = row[3]
            r.summary[f"relative_error_final_{key}"] = round((row[3] - row[2]) / row[2], 4) \
                if row[2] else None
        ps_rows = [x for x in judged if x[1] == "pages_sharing"]
        if ps_rows:
            r.summary["pages_sharing_mean_abs_error"] = round(
                float(np.mean([abs(x[4]) for x in ps_rows])), 3)
            r.units["pages_sharing_mean_abs_error"] = "pages"
            r.summary["pages_sharing_samples"] = len(ps_rows)
            if self.start_phase:
                r.notes.append(f"kernel_final_* and the mean error: the {len(ps_rows)} counter "
                               f"samples of phase {self.start_phase!r} (ksmd started in it); "
                               "later samples are in the table only")
        p = self.models[0].p
        for knob, attr in KNOBS.items():
            if knob in self.knobs:
                mine = getattr(p, attr)
                if float(self.knobs[knob]) != float(mine):
                    r.notes.append(f"the guest ran KSM with {knob}={self.knobs[knob]}, the model "
                                   f"with {mine}: set --ksm-{attr.replace('_', '-')} to compare "
                                   "like with like")
        fs = [x for x in self.compare_rows if x[1] == "full_scans"]
        if fs and self.start_arg is None and fs[0][2] == 0 and fs[0][3] > 0:
            r.notes.append("the guest's ksmd may have started after the trace did (full_scans "
                           "was 0 at the first counter): use --ksm-start T or --ksm-start "
                           "phase:NAME to start the model with it")

    def _notes(self, r: Result) -> None:
        if self.gclock.knots:
            r.notes.append(f"guest time from the guest's own clock ({self.gclock.knots} "
                           f"{GUEST_CLOCK_COUNTER} counters, interpolated; clock_hz = "
                           f"{self.hz:g} {self.replay.trace.clock_unit}/s outside them)")
        else:
            r.notes.append(f"guest time from clock_hz = {self.hz:g} "
                           f"{self.replay.trace.clock_unit}/s ({self.hz_source})")
        if self.tick_hz:
            sleep = self.models[0].p.sleep_ms if self.models else 0.0
            r.notes.append(f"ksmd's sleep in whole jiffies (HZ={self.tick_hz}): batches "
                           f"{float(cycle_ms(sleep, self.tick_hz)):g} ms apart for "
                           f"sleep_millisecs={sleep:g} (rounded up, plus the jiffy the timer "
                           "wheel adds)")
        if self.clock_counter and self.hz_source != "tracer.clock_hz counter" and \
                abs(self.clock_counter - self.hz) > 0.01 * self.hz:
            r.notes.append(f"the trace's tracer.clock_hz counter says {self.clock_counter}; "
                           "pass --ksm-clock-hz to use it")
        if self.scope == "madvised" and not self.space.ever_mergeable:
            r.notes.append("no VMA in the trace has VM_MERGEABLE: nothing is in the madvised "
                           "scope (no madvise(MADV_MERGEABLE) in the workload, or a trace "
                           "recorded before the guest agent reported it); try --ksm-scope anon")
        r.notes.append("savings are frames freed within the scope; the scope oracle is in-scope "
                       "frames minus distinct contents among them, the guest oracle mmap/fork "
                       "minus full CBPS; fractions are ratios of time integrals")
        if self.kernel:
            r.notes.append("the guest ran its own KSM: the trace's mappings include its merges, "
                           "so the guest oracle is measured after them while the model works on "
                           "the un-merged workload (fraction_of_guest_oracle can exceed 1)")
        r.notes.append("pages_sharing lags a COW break until ksmd revisits the page (as in the "
                       "kernel); pages that are unmapped leave the counters at once (the kernel "
                       "frees their rmap items when its walk next passes them)")
        r.notes.append("an opportunity is a content held by two or more in-scope frames; latency "
                       "is from its start to the model's first merge of that content; missed = "
                       "ended before any merge")
        r.notes.append(f"general_profit = (pages_sharing + zero-page merges) * page size - "
                       f"rmap items * {RMAP_ITEM_BYTES} bytes (6.10+ definition)")
        if self.space.kzero >= 0:
            r.notes.append(f"frame {self.space.kzero:#x} taken for the kernel zero page "
                           "(zero content, mapped at several places; not scanned)")
        if any(x.p.scanner == "hinted" for x in self.models):
            r.notes.append("hinted = XLH-style scanner: pages written and unchanged for one sleep "
                           "period scanned first with up to half of each batch, same pages per "
                           "batch as the plain scan")

    def _plot(self, r: Result) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            r.notes.append("--plot-ksm: matplotlib is not installed")
            return
        ps = self.page_size
        ps_rows = [x for x in self.compare_rows if x[1] == "pages_sharing"]
        if ps_rows:
            fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(19, 5))
            g0 = self.gclock.guest(self.t_first or 0)
            gt = [x[5] - g0 for x in ps_rows]
            a3.plot(gt, [x[2] for x in ps_rows], "k.-", label="kernel (COUNTER ksm.*)")
            a3.plot(gt, [x[3] for x in ps_rows], "x--", label=f"model {self.models[0].p.label}")
            a3.set_xlabel("guest time (s)")
            a3.set_ylabel("pages_sharing")
            a3.set_title("model against the guest's KSM")
            a3.grid(alpha=0.3)
            a3.legend()
        else:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
        s = r.tables["series"]
        t = [self.gclock.span(self.t_first or 0, row[0]) for row in s.rows]
        ci = s.columns.index
        a1.plot(t, [pages_to_mib(row[ci("scope_oracle")], ps) for row in s.rows], "k--",
                label="oracle (scope)", drawstyle="steps-post")
        a1.plot(t, [pages_to_mib(row[ci("saved_pages")], ps) for row in s.rows],
                label=f"KSM {self.models[0].p.label}", drawstyle="steps-post")
        if "hinted_saved_pages" in s.columns:
            a1.plot(t, [pages_to_mib(row[ci("hinted_saved_pages")], ps) for row in s.rows],
                    label=f"KSM {self.models[1].p.label}", drawstyle="steps-post")
        a1.set_xlabel("guest time (s)")
        a1.set_ylabel("memory saved (MiB)")
        a1.set_title("savings over time")
        a1.grid(alpha=0.3)
        a1.legend()
        sw = r.tables["sweep"]
        j = sw.columns.index
        for scanner, mark in (("linear", "o-"), ("hinted", "s--")):
            pts = sorted((row[j("scan_rate")], row[j("saved_mean")]) for row in sw.rows
                         if row[j("scanner")] == scanner)
            if pts:
                a2.plot([x for x, _ in pts], [pages_to_mib(y, ps) for _, y in pts], mark,
                        label=scanner)
        orc = [row for row in sw.rows if row[j("scanner")] == "ceiling"]
        if orc:
            a2.axhline(pages_to_mib(orc[0][j("saved_mean")], ps), color="black", ls="--",
                       label="oracle (scope)")
        a2.set_xscale("log")
        a2.set_xlabel("scan rate (pages per guest second)")
        a2.set_ylabel("mean memory saved (MiB)")
        a2.set_title("savings against scan rate")
        a2.grid(alpha=0.3)
        a2.legend()
        fig.tight_layout()
        try:
            fig.savefig(self.plot_path, dpi=110)
            print(f"KSM plot written to {self.plot_path}", file=sys.stderr)
        except OSError as e:
            r.notes.append(f"--plot-ksm: cannot write {self.plot_path}: {e.strerror}")
        finally:
            plt.close(fig)
