"""One ksmd: a model of mm/ksm.c with one parameter set over the shared items (the package
docstring says what is modelled and how)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.analyses.content import one_of_each
from memtrace.analyses.ksm.items import (
    BROKEN,
    NEVER,
    NONE,
    STABLE,
    UNSTABLE,
    ZERO,
    grow,
)
from memtrace.analyses.ksm.params import KsmParams, cycle_ms
from memtrace.analyses.ksm.series import Series

if TYPE_CHECKING:
    from memtrace.analyses.ksm.items import ItemSpace
    from memtrace.analyses.state import ReplayState
    from memtrace.traces.timebase import GuestClock

RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on x86-64
MAX_SEGMENT = 1 << 18  # items processed per vectorized step
SCAN_ROWS_MAX = 100_000


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
        self.node_count = grow(self.node_count, n_cont, 0)
        self.single_node = grow(self.single_node, n_cont, -1)
        self.ut_round = grow(self.ut_round, n_cont, -1)
        self.ut_slot = grow(self.ut_slot, n_cont, 0)
        self.ut_vpn = grow(self.ut_vpn, n_cont, 0)
        self.ut_uid = grow(self.ut_uid, n_cont, 0)
        self.ut_idx = grow(self.ut_idx, n_cont, 0)
        self.merged_gen = grow(self.merged_gen, n_cont, -1)
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
        self.merged_gen = grow(self.merged_gen, int(closed.max()) + 1, -1)
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
            self.node_c = grow(self.node_c, size, 0)
            self.node_len = grow(self.node_len, size, 0)
            self.node_live = grow(self.node_live, size, 0)
            self.node_pruned = grow(self.node_pruned, size, False)
            self.node_kp = grow(self.node_kp, size, 0)
            self.node_ovl = grow(self.node_ovl, size, False)
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
