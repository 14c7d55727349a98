"""The rmap items: the pages in KSM's scope at the current instant, shared by every model
instance (their layout, the scope rule, the scope oracle), and the states a model gives them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.traces.format import (
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_IO,
    VM_MAYSHARE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
)

if TYPE_CHECKING:
    from memtrace.analyses.ksm.model import KsmModel
    from memtrace.analyses.state import AddressSpace, ReplayState

#: flags ksm_madvise_merge() / vma_ksm_compatible() refuse
VM_KSM_INCOMPATIBLE = (VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_HUGETLB
                       | VM_MIXEDMAP)

# rmap item states
NONE, UNSTABLE, STABLE, BROKEN, ZERO = 0, 1, 2, 3, 4
NEVER = -2  # no checksum yet (a new rmap item)
NO_CONTENT = -3  # placeholder: content to be read at the next sync
NOT_COUNTED = -5  # a page id not counted in the scope oracle


def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def grow(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """``a`` with room for index ``n - 1``, new cells set to ``fill`` (capacity doubles)."""
    if n <= len(a):
        return a
    out = np.full(max(n, 2 * len(a), 16), fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


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
        self.npfi = grow(self.npfi, need, 0)
        self.pfc = grow(self.pfc, need, NOT_COUNTED)
        for m in self.models:
            m.nun = grow(m.nun, need, 0)
            m.kp_node = grow(m.kp_node, need, -1)

    def _reindex(self, nf: int) -> None:
        """More frames than before: virtual page ids move up behind them."""
        self.nreal = grow(self.nreal, nf, 0)
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
            self.uid_index = grow(self.uid_index, self.next_uid, -1)
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
            setattr(self, name, grow(getattr(self, name), ncont, fill))
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
