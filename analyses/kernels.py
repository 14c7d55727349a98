"""Compiled inner loops of the replay: PAGE, MAP and PAGECACHE blocks applied record by record.

Why compiled (numba) rather than numpy: a record's effect depends on the records before it (a
frame's old content is whatever the previous update wrote; a virtual page's old frame is whatever
the previous mapping said), so numpy can only vectorize a block by sorting it first, and the
mappings need a hash table keyed by (address space, virtual page) with deletion. Written as plain
loops these cost tens of nanoseconds per record; the same work through Python dicts cost about
two microseconds (issue 2's speed targets: 5 M page updates per second, replay within 3x of
decompression).

State layout (all numpy arrays owned by ``analyses.state.ReplayState``):

- per frame: ``content`` (dense content id, -1 unknown), ``proc_count`` (how many address spaces
  map it), ``named`` (in the page cache); content and proc_count are the two columns of one array
  so that a frame costs one cache miss;
- per content id: ``ref_all``, ``ref_mapped``, ``ref_anon`` (frames holding it: all, mapped,
  mapped and anonymous), columns of one array for the same reason;
- ``cnt``: the incremental counters behind the thesis's figures, indexed by the ``C_*`` constants;
- two open-addressing hash tables (linear probing, key 0 = empty slot, deletion by backward
  shift): the mapping table, key (mmid << 40 | virtual page) -> frame, and the pair table, key
  (mmid << 40 | frame) -> how many virtual pages of that address space map the frame. ``mmid`` is
  a small id the state gives each address space (never 0); virtual pages (48-bit addresses) and
  frames fit in 40 bits.

Every frame change takes the frame's contribution to the counters out, changes the frame, and
puts the new contribution in (``_contribute`` with -1, then +1), so the counters stay exact after
every record. Changes of ``ref_mapped`` are logged (content id and its value before the block)
for the analyses that follow contents (``Analysis.wants_content_deltas``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# indices into the counter array
C_VPAGES = 0          # present virtual pages over all address spaces
C_PAIRS = 1           # (address space, frame) pairs: the "no sharing" figure
C_MAPPED = 2          # frames mapped by at least one address space: "mmap/fork"
C_NAMED_MAPPED = 3    # mapped frames that are named
C_UNKNOWN_MAPPED = 4  # mapped frames whose content is not known
C_UNKNOWN_ANON = 5    # ... of which anonymous
C_KNOWN = 6           # frames whose content is known (whole-guest view)
C_DISTINCT_ALL = 7    # distinct contents over all known frames
C_DISTINCT_MAPPED = 8  # distinct contents over mapped frames
C_DISTINCT_ANON = 9   # distinct contents over mapped anonymous frames
C_ZERO_MAPPED = 10    # mapped frames holding the zero page content
C_ZERO_CID = 11       # the zero page's content id (a constant, kept here for the kernels)
N_COUNTERS = 12

MMID_SHIFT = 40
LOW_MASK = (1 << MMID_SHIFT) - 1
_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing

# The per-record loops and their helpers are compiled without numba's reference counting
# (``_nrt=False``): they allocate nothing, and the counting it adds to every array passed to a
# helper cost 30 ns per record, four times the work itself. Functions that return new arrays
# keep it (``njit(cache=True)``); they run once per block or per query, not per record.
hot = njit(cache=True, _nrt=False)


# -- hash tables --------------------------------------------------------------------------------
@hot
def _home(key: np.uint64, shift: np.uint64) -> int:
    return np.int64((key * _MULT) >> shift)


@hot
def table_find(keys: np.ndarray, key: np.uint64, shift: np.uint64) -> int:
    """Slot of ``key``, or the empty slot where it would go (as ``-1 - slot``)."""
    mask = len(keys) - 1
    i = _home(key, shift)
    while True:
        k = keys[i]
        if k == key:
            return i
        if k == 0:
            return -1 - i
        i = (i + 1) & mask


@hot
def table_delete(keys: np.ndarray, vals: np.ndarray, i: int, shift: np.uint64) -> None:
    """Empty slot ``i``, shifting back the entries of the chain after it (no tombstones)."""
    mask = len(keys) - 1
    j = i
    while True:
        keys[i] = 0
        while True:
            j = (j + 1) & mask
            if keys[j] == 0:
                return
            h = _home(keys[j], shift)
            # the entry at j may move to i unless its home lies cyclically in (i, j]
            if i <= j:
                if i < h <= j:
                    continue
            elif h > i or h <= j:
                continue
            break
        keys[i] = keys[j]
        vals[i] = vals[j]
        i = j


@hot
def table_rehash(keys: np.ndarray, vals: np.ndarray, new_keys: np.ndarray,
                 new_vals: np.ndarray, new_shift: np.uint64) -> None:
    for i in range(len(keys)):
        k = keys[i]
        if k != 0:
            s = table_find(new_keys, k, new_shift)
            s = -1 - s
            new_keys[s] = k
            new_vals[s] = vals[i]


@njit(cache=True)
def table_lookup(keys: np.ndarray, vals: np.ndarray, query: np.ndarray, shift: np.uint64,
                 missing: int) -> np.ndarray:
    out = np.empty(len(query), dtype=np.int64)
    for i in range(len(query)):
        s = table_find(keys, query[i], shift)
        out[i] = vals[s] if s >= 0 else missing
    return out


@njit(cache=True)
def table_select(keys: np.ndarray, vals: np.ndarray, mmid: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The (low part of key, value) entries whose key carries ``mmid``, in slot order."""
    hi = np.uint64(mmid)
    sh = np.uint64(MMID_SHIFT)
    low = np.uint64(LOW_MASK)
    n = 0
    for i in range(len(keys)):
        if keys[i] != 0 and keys[i] >> sh == hi:
            n += 1
    lo_out = np.empty(n, dtype=np.int64)
    v_out = np.empty(n, dtype=np.int64)
    n = 0
    for i in range(len(keys)):
        k = keys[i]
        if k != 0 and k >> sh == hi:
            lo_out[n] = np.int64(k & low)
            v_out[n] = vals[i]
            n += 1
    return lo_out, v_out


# ContentArrays = (keys, vals, shift, lo, hi, counts): the content table's slots and hash shift
#   (``shift[0]``), the full hash of each id, and counts = [ids assigned, entries in the table].
#   The low 64 bits are the key (see ``analyses.content``); key 0 marks empty slots, so a hash
#   whose low half is 0 is stored under another fixed key (one more 64-bit collision chance).
#   Every content ever seen keeps its entry and its id (analyses remember ids: a content that
#   comes back must get the same one), so the table grows with the distinct contents of the
#   trace, about 50 bytes each with the per-id arrays of the state.
ContentArrays = tuple


@hot
def _content_key(lo: np.uint64) -> np.uint64:
    return lo if lo != 0 else np.uint64(0x8000000000000001)


@hot
def content_ids(ct: ContentArrays, hash_lo: np.ndarray, hash_hi: np.ndarray,
                out: np.ndarray) -> None:
    """Dense ids of the given hashes into ``out``, appending unknown hashes as new ids. The
    table must have room for ``len(hash_lo)`` more entries."""
    keys, vals, shift, lo, hi, counts = ct
    n = counts[0]
    for i in range(len(hash_lo)):
        key = _content_key(hash_lo[i])
        s = table_find(keys, key, shift[0])
        if s >= 0:
            out[i] = vals[s]
        else:
            s = -1 - s
            keys[s] = key
            vals[s] = n
            lo[n] = hash_lo[i]
            hi[n] = hash_hi[i]
            out[i] = n
            n += 1
            counts[1] += 1
    counts[0] = n


# -- counters -----------------------------------------------------------------------------------
# FrameState = (content, proc_count, named, ref_all, ref_mapped, ref_anon, cnt)
# ContentLog = (mark, log_cid, log_before, nlog): mark[cid] >= 0 once cid is logged in this block;
#              an empty mark array turns logging off
# Tables = (vkeys, vvals, pkeys, pvals, shifts, tab_n, space_pages): the mapping and pair tables,
#          their hash shifts, their entry counts, and present virtual pages per mmid
FrameState = tuple
ContentLog = tuple
Tables = tuple


@hot
def _contribute(f: int, d: int, fs: FrameState, lg: ContentLog) -> None:
    """Add (d = 1) or take out (d = -1) frame ``f``'s contribution to every counter."""
    content, proc_count, named, ref_all, ref_mapped, ref_anon, cnt = fs
    c = content[f]
    if c >= 0:
        cnt[C_KNOWN] += d
        r = ref_all[c]
        ref_all[c] = r + d
        if r + d == 0 or r == 0:
            cnt[C_DISTINCT_ALL] += d
    if proc_count[f] <= 0:
        return
    n = named[f]
    cnt[C_MAPPED] += d
    if n:
        cnt[C_NAMED_MAPPED] += d
    if c < 0:
        cnt[C_UNKNOWN_MAPPED] += d
        if not n:
            cnt[C_UNKNOWN_ANON] += d
        return
    if c == cnt[C_ZERO_CID]:
        cnt[C_ZERO_MAPPED] += d
    mark, log_cid, log_before, nlog = lg
    if len(mark) and mark[c] < 0:  # first change of this content in the block: note its value
        k = nlog[0]
        mark[c] = k
        log_cid[k] = c
        log_before[k] = ref_mapped[c]
        nlog[0] = k + 1
    r = ref_mapped[c]
    ref_mapped[c] = r + d
    if r + d == 0 or r == 0:
        cnt[C_DISTINCT_MAPPED] += d
    if not n:
        r = ref_anon[c]
        ref_anon[c] = r + d
        if r + d == 0 or r == 0:
            cnt[C_DISTINCT_ANON] += d


@hot
def apply_pages(frames: np.ndarray, ids: np.ndarray, fs: FrameState, lg: ContentLog) -> None:
    """PAGE records: frame ``frames[i]`` now holds content ``ids[i]``."""
    content = fs[0]
    for i in range(len(frames)):
        f = frames[i]
        if content[f] == ids[i]:
            continue
        _contribute(f, -1, fs, lg)
        content[f] = ids[i]
        _contribute(f, 1, fs, lg)


@hot
def set_named(frames: np.ndarray, value: np.ndarray, fs: FrameState, lg: ContentLog) -> None:
    """PAGECACHE records: frame ``frames[i]`` joins (True) or leaves the page cache."""
    named = fs[2]
    for i in range(len(frames)):
        f = frames[i]
        if named[f] == value[i]:
            continue
        _contribute(f, -1, fs, lg)
        named[f] = value[i]
        _contribute(f, 1, fs, lg)


@hot
def forget_frames(frames: np.ndarray, fs: FrameState, lg: ContentLog) -> None:
    """The frames' contents become unknown and they leave the page cache (a state reset)."""
    content, named = fs[0], fs[2]
    for f in frames:
        _contribute(f, -1, fs, lg)
        content[f] = -1
        named[f] = False
        _contribute(f, 1, fs, lg)


@hot
def _proc_change(f: int, d: int, fs: FrameState, lg: ContentLog) -> None:
    """One more (d = 1) or one fewer (d = -1) address space maps frame ``f``."""
    proc_count, cnt = fs[1], fs[6]
    cnt[C_PAIRS] += d
    p = proc_count[f]
    if p == 0 or p + d == 0:  # the frame starts or stops being mapped at all
        _contribute(f, -1, fs, lg)
        proc_count[f] = p + d
        _contribute(f, 1, fs, lg)
    else:
        proc_count[f] = p + d


@hot
def _pair_change(mmid: np.uint64, f: int, d: int, tb: Tables, fs: FrameState,
                 lg: ContentLog) -> None:
    """One more (d = 1) or one fewer virtual page of address space ``mmid`` maps frame ``f``."""
    pkeys, pvals, shifts, tab_n = tb[2], tb[3], tb[4], tb[5]
    key = (mmid << np.uint64(MMID_SHIFT)) | np.uint64(f)
    s = table_find(pkeys, key, shifts[1])
    if d > 0:
        if s >= 0:
            pvals[s] += 1
            return
        s = -1 - s
        pkeys[s] = key
        pvals[s] = 1
        tab_n[1] += 1
    else:
        r = pvals[s] - 1
        if r:
            pvals[s] = r
            return
        table_delete(pkeys, pvals, s, shifts[1])
        tab_n[1] -= 1
    _proc_change(f, d, fs, lg)


@hot
def apply_maps(mmids: np.ndarray, vpns: np.ndarray, frames: np.ndarray, present: np.ndarray,
               tb: Tables, fs: FrameState, lg: ContentLog) -> None:
    """MAP records: virtual page ``vpns[i]`` of address space ``mmids[i]`` maps ``frames[i]``
    (``present[i]``) or nothing. The tables must have room for ``len(vpns)`` more entries."""
    vkeys, vvals, shifts, tab_n, space_pages, cnt = tb[0], tb[1], tb[4], tb[5], tb[6], fs[6]
    sh = np.uint64(MMID_SHIFT)
    for i in range(len(vpns)):
        mmid = np.uint64(mmids[i])
        key = (mmid << sh) | vpns[i]
        s = table_find(vkeys, key, shifts[0])
        old = vvals[s] if s >= 0 else -1
        if present[i]:
            f = frames[i]
            if old == f:
                continue
            if s >= 0:
                vvals[s] = f
            else:
                s = -1 - s
                vkeys[s] = key
                vvals[s] = f
                tab_n[0] += 1
                cnt[C_VPAGES] += 1
                space_pages[mmid] += 1
            _pair_change(mmid, f, 1, tb, fs, lg)
        else:
            if s < 0:
                continue
            table_delete(vkeys, vvals, s, shifts[0])
            tab_n[0] -= 1
            cnt[C_VPAGES] -= 1
            space_pages[mmid] -= 1
        if old >= 0:
            _pair_change(mmid, old, -1, tb, fs, lg)


@njit(cache=True)
def release_space(mmid: int, tb: Tables, fs: FrameState, lg: ContentLog) -> None:
    """Address space ``mmid`` is gone: all its mappings go (one pass over each table)."""
    vkeys, vvals, pkeys, pvals, shifts, tab_n, space_pages = tb
    m = np.uint64(mmid) << np.uint64(MMID_SHIFT)
    frames, _refs = table_select(pkeys, pvals, mmid)
    for f in frames:
        table_delete(pkeys, pvals, table_find(pkeys, m | np.uint64(f), shifts[1]), shifts[1])
        tab_n[1] -= 1
        _proc_change(f, -1, fs, lg)
    vpns, _frames = table_select(vkeys, vvals, mmid)
    for v in vpns:
        table_delete(vkeys, vvals, table_find(vkeys, m | np.uint64(v), shifts[0]), shifts[0])
        tab_n[0] -= 1
    fs[6][C_VPAGES] -= len(vpns)
    space_pages[mmid] = 0


class Table:
    """An open-addressing hash table (uint64 key -> int64 value) in two numpy arrays, for the
    kernels above: at most half full, grown by rehashing before a batch that could overfill it."""

    def __init__(self, bits: int = 12) -> None:
        self._alloc(bits)

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        # key and value side by side: a probe costs one cache miss, not two
        slots = np.zeros((1 << bits, 2), dtype=np.uint64)
        self.keys = slots[:, 0]
        self.vals = slots[:, 1].view(np.int64)

    @property
    def shift(self) -> np.uint64:
        return np.uint64(64 - self.bits)

    def reserve(self, used: int, more: int) -> bool:
        """Make room for ``more`` entries beyond ``used``; True if the arrays were replaced."""
        need = 2 * (used + more)
        if need <= len(self.keys):
            return False
        bits = self.bits
        while (1 << bits) < need:
            bits += 1
        keys, vals = self.keys, self.vals
        self._alloc(bits)
        table_rehash(keys, vals, self.keys, self.vals, self.shift)
        return True

    def lookup(self, keys: np.ndarray, missing: int = -1) -> np.ndarray:
        return table_lookup(self.keys, self.vals, np.asarray(keys, dtype=np.uint64), self.shift,
                            missing)

    def select(self, mmid: int) -> tuple[np.ndarray, np.ndarray]:
        """(low 40 bits of the key, value) of the entries of address space ``mmid``."""
        return table_select(self.keys, self.vals, mmid)


class ContentTable:
    """Maps content hashes to dense ids (0, 1, 2, ...), assigning new ids on first sight.

    A hash table keyed by the hash's low 64 bits (``Table``), probed by a compiled loop;
    ``lo``/``hi`` give the full hash of each id.
    """

    def __init__(self, capacity_bits: int = 12) -> None:
        self.lo = np.empty(1024, dtype=np.uint64)
        self.hi = np.empty(1024, dtype=np.uint64)
        self.counts = np.zeros(2, dtype=np.int64)  # ids assigned, entries in the table
        self._table = Table(capacity_bits)

    @property
    def n(self) -> int:
        return int(self.counts[0])

    def __len__(self) -> int:
        return int(self.counts[0])

    def kernel_view(self) -> tuple[np.ndarray, ...]:
        """The arrays the compiled loops work on (``ContentArrays``)."""
        t = self._table
        return (t.keys, t.vals, np.array([t.shift], dtype=np.uint64), self.lo, self.hi,
                self.counts)

    def ids(self, hash_lo: np.ndarray, hash_hi: np.ndarray) -> np.ndarray:
        """Content ids for the given hashes (int64 array, same length)."""
        lo = np.ascontiguousarray(hash_lo, dtype=np.uint64)
        k = len(lo)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        self._table.reserve(int(self.counts[1]), k)
        n = self.n
        if n + k > len(self.lo):
            size = max(n + k, 2 * len(self.lo))
            self.lo = np.resize(self.lo, size)
            self.hi = np.resize(self.hi, size)
        out = np.empty(k, dtype=np.int64)
        content_ids(self.kernel_view(), lo, np.ascontiguousarray(hash_hi, dtype=np.uint64), out)
        return out

    def id_of(self, hash_lo: int, hash_hi: int) -> int:
        return int(self.ids(np.array([hash_lo], dtype=np.uint64),
                            np.array([hash_hi], dtype=np.uint64))[0])
