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
- three open-addressing hash tables (linear probing, key 0 = empty slot, deletion by backward
  shift): the space table, mm -> mmid; the mapping table, key (mmid << 40 | virtual page) ->
  frame; and the pair table, key (mmid << 40 | frame) -> how many virtual pages of that address
  space map the frame. ``mmid`` is
  a small id the state gives each address space (never 0); virtual pages (48-bit addresses) and
  frames fit in 40 bits.

The hash tables are at most half full. A loop never grows anything itself: it returns the index
of the first record that lacks room (a full table, an address space with no mmid yet, a frame
beyond the arrays), the state grows just that and calls it again from there. So tables grow only
when they really fill, and a block of records that are all known costs no reservation.

What the loops wait for is memory: the tables and per-id rows outgrow the caches, and a loop's
branches depend on the values it loads, so the processor cannot overlap one record's misses
with the next's. Each loop therefore prefetches what the record ``PREFETCH_AHEAD`` places later
will touch (``prefetch``); that made the worst-case page loop three times faster.

Every frame change takes the frame's contribution to the counters out, changes the frame, and
puts the new contribution in (``_contribute`` with -1, then +1), so the counters stay exact after
every record. Changes of ``ref_mapped`` are logged (content id and its value before the block)
for the analyses that follow contents (``Analysis.wants_content_deltas``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from memtrace.traces.format import MAP_PRESENT, PageCacheOp

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
_LOW = np.uint64(LOW_MASK)
_PC_ADD = int(PageCacheOp.ADD)
_PC_DEL = int(PageCacheOp.DEL)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing
_RUN_BITS = np.uint64(4)  # see _home
_RUN_MASK = np.uint64(15)

# The per-record loops and their helpers are compiled without numba's reference counting
# (``_nrt=False``): they allocate nothing, and the counting it adds to every array passed to a
# helper cost 30 ns per record, four times the work itself. Functions that return new arrays
# keep it (``njit(cache=True)``); they run once per block or per query, not per record.
hot = njit(cache=True, _nrt=False)

# LLVM 15 made pointers opaque and renamed the intrinsic's overload accordingly
_PREFETCH = ("llvm.prefetch.p0" if llvmlite.binding.llvm_version_info[0] >= 15
             else "llvm.prefetch.p0i8")
PREFETCH_AHEAD = 16  # records: far enough for a miss to arrive, near enough to stay cached


@intrinsic
def prefetch(typingctx, arr, index):  # noqa: ANN001, ANN201 - numba intrinsic signature
    """Ask the processor to bring ``arr[index]`` into the cache, without waiting for it.

    Why: the loops below spend most of their time on cache misses into tables of several MB
    to tens of MB (a dependent miss costs 100-180 ns on the machines this was measured on,
    independent ones about 10 ns). A loop's branches depend on the values it loads, so the
    processor cannot run far enough ahead to overlap the misses itself; asking for the entries
    of the record ``PREFETCH_AHEAD`` places later lets the misses overlap. On the recorded
    sample this halved the content-id pass (13 to 7 ms).
    """
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


# -- hash tables --------------------------------------------------------------------------------
@hot
def _home(key: np.uint64, shift: np.uint64) -> int:
    """Home slot of ``key`` in a table of ``64 - shift`` bits: keys that differ only in their
    low ``_RUN_BITS`` bits get neighbouring slots. Mapping records come in runs of consecutive
    virtual pages (95% of a recorded trace's MAP records follow the previous one's page), so
    their probes then fall in the cache lines the run before them already brought in."""
    group = (((key >> _RUN_BITS) * _MULT) >> shift) >> _RUN_BITS
    return np.int64((group << _RUN_BITS) | (key & _RUN_MASK))


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
    n = len(keys)
    for i in range(n):
        if i + PREFETCH_AHEAD < n and keys[i + PREFETCH_AHEAD] != 0:
            prefetch(new_keys, _home(keys[i + PREFETCH_AHEAD], new_shift))
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


# ContentArrays = (keys, vals, shift, lo, hi, counts, free): the content table's slots and hash
#   shift (``shift[0]``), the full hash of each id, counts = [ids assigned so far (the highest
#   id + 1), entries in the table, most entries allowed before the table must grow, ids in the
#   free list], and the free list (ids to give again, the next one last). The low 64 bits are
#   the key (see ``analyses.content``); key 0 marks empty slots, so a hash whose low half is 0 is
#   stored under another fixed key (one more 64-bit collision chance).
#
# Ids are recycled: the state forgets the contents no frame holds any more (``collect``: their
# entries leave the table, their ids go to the free list) when the table runs out of room,
# between blocks, after telling the analyses (``Analysis.on_content_forgotten``). A new content
# takes an id from the free list first. So the table holds the contents the frames hold now
# plus those that lost their last frame since the last collection, not every content the trace
# ever had (see ``analyses.state.ReplayState.recycle``).
ContentArrays = tuple


_KEY_OF_ZERO = np.uint64(0x8000000000000001)


@hot
def _content_key(lo: np.uint64) -> np.uint64:
    return lo if lo != 0 else _KEY_OF_ZERO


def content_keys(lo: np.ndarray) -> np.ndarray:
    """The table keys of hashes whose low halves are ``lo``: what makes two contents one for
    the replay (the same key, the same id while the content is held)."""
    lo = np.asarray(lo, dtype=np.uint64)
    return np.where(lo == 0, _KEY_OF_ZERO, lo)


@hot
def _content_id(ct: ContentArrays, hash_lo: np.uint64, hash_hi: np.uint64, room: int) -> int:
    """The id of a hash, giving a new one the last id of the free list, else the next id; -1
    if it is new and there is no room (the table is at its fill limit, or the free list is
    empty and ``room`` ids are already assigned)."""
    keys, vals, shift, lo, hi, counts, free = ct
    key = _content_key(hash_lo)
    s = table_find(keys, key, shift[0])
    if s >= 0:
        return vals[s]
    if counts[1] >= counts[2]:
        return -1
    nfree = counts[3]
    if nfree:
        c = free[nfree - 1]
        counts[3] = nfree - 1
    else:
        c = counts[0]
        if c >= room:
            return -1
        counts[0] = c + 1
    s = -1 - s
    keys[s] = key
    vals[s] = c
    lo[c] = hash_lo
    hi[c] = hash_hi
    counts[1] += 1
    return c


@hot
def collect_contents(ct: ContentArrays, ref_all: np.ndarray, mark: np.ndarray, keep: int,
                     was_free: np.ndarray, forgotten: np.ndarray) -> int:
    """Forget every content no frame holds (``ref_all`` 0), but ``keep`` and those whose change
    the instant's log still holds (``mark``, see ``ContentLog``: the listeners have not heard
    that they emptied): the table is rebuilt with the others and the free list made of all ids
    that name nothing, lowest given first.
    The ids that named a content until now (not already free) go to ``forgotten``; returns how
    many. ``was_free`` is scratch (all False, one per id).

    Rebuilding costs a pass over the ids and one insertion per live content; deleting the
    forgotten entries one by one cost about 50 ns each (a random probe and a backward shift),
    and a collection forgets at least as many contents as it keeps (the state grows the table
    so that at most half of it is live after one)."""
    keys, vals, shift, lo, counts, free = ct[0], ct[1], ct[2][0], ct[3], ct[5], ct[6]
    n, nfree = counts[0], counts[3]
    for i in range(nfree):
        was_free[free[i]] = True
    keys[:] = 0
    live = 0
    nf = 0
    nforgot = 0
    for i in range(n):
        j = i + PREFETCH_AHEAD
        if j < n and (ref_all[j] != 0 or mark[j] != 0):
            prefetch(keys, _home(_content_key(lo[j]), shift))
        if ref_all[i] != 0 or mark[i] != 0 or i == keep:
            s = -1 - table_find(keys, _content_key(lo[i]), shift)
            keys[s] = _content_key(lo[i])
            vals[s] = i
            live += 1
        else:
            free[nf] = i
            nf += 1
            if was_free[i]:
                was_free[i] = False
            else:
                forgotten[nforgot] = i
                nforgot += 1
    for i in range(nf // 2):  # the free list is a stack: lowest ids on top
        free[i], free[nf - 1 - i] = free[nf - 1 - i], free[i]
    counts[1] = live
    counts[3] = nf
    return nforgot


@hot
def content_ids(ct: ContentArrays, hash_lo: np.ndarray, hash_hi: np.ndarray, out: np.ndarray,
                start: int) -> int:
    """Dense ids of the given hashes into ``out`` from index ``start`` on, giving unknown
    hashes new ids. Returns the index it stopped at: ``len(hash_lo)``, or earlier when a new
    hash found no room (the caller grows the table and calls again from there)."""
    room = len(ct[3])
    keys, shift = ct[0], ct[2][0]
    n = len(hash_lo)
    for i in range(start, min(start + PREFETCH_AHEAD, n)):
        prefetch(keys, _home(_content_key(hash_lo[i]), shift))
    for i in range(start, n):
        if i + PREFETCH_AHEAD < n:
            prefetch(keys, _home(_content_key(hash_lo[i + PREFETCH_AHEAD]), shift))
        c = _content_id(ct, hash_lo[i], hash_hi[i], room)
        if c < 0:
            return i
        out[i] = c
    return n


# -- counters -----------------------------------------------------------------------------------
# FrameState = (content, proc_count, named, ref_all, ref_mapped, ref_anon, cnt)
# ContentLog = (mark, log_cid, log_before, nlog): mark[cid] = 1 + its place in the log once cid
#              is logged in this block, else 0 (the fourth column of the count rows: it costs no
#              miss of its own); an empty mark array turns logging off
# Tables = (vkeys, vvals, pkeys, pvals, shifts, tab_n, space_pages, skeys, svals): the mapping
#          and pair tables, the hash shifts of these two and of the space table, tab_n = [entries
#          in each, most entries each may hold before it must grow], present virtual pages per
#          mmid, and the space table (``space_key(mm)`` -> mmid)
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
    if len(mark) and mark[c] == 0:  # first change of this content in the block: note its value
        k = nlog[0]
        mark[c] = k + 1
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


# inlined into each loop: as a call it made the page loop three times slower (4.5 -> 12.7 ms on
# the sample)
@njit(cache=True, _nrt=False, inline="always")
def _set_frame(f: int, c: int, n: bool, fs: FrameState, lg: ContentLog) -> None:
    """Frame ``f`` now holds content ``c`` (-1: unknown) and is named or not (``n``): its
    contribution to the counters goes out with the old values and comes back with the new."""
    content, named = fs[0], fs[2]
    if content[f] == c and named[f] == n:
        return
    _contribute(f, -1, fs, lg)
    content[f] = c
    named[f] = n
    _contribute(f, 1, fs, lg)


@hot
def apply_pages(frames: np.ndarray, ids: np.ndarray, start: int, fs: FrameState,
                lg: ContentLog) -> int:
    """PAGE records from index ``start`` on: frame ``frames[i]`` now holds content ``ids[i]``.
    Returns the index it stopped at: ``len(frames)``, or the first record whose frame is beyond
    the frame arrays (the caller grows them and calls again from there).

    The content ids come from a separate pass (``content_ids``) on purpose: the lookups of a
    block are independent, so the processor overlaps their cache misses; fused into this loop
    they wait on the counter updates, and the replay of a recorded trace took a third longer."""
    content, ref_all = fs[0], fs[3]
    nframes, nids = len(content), len(ref_all)
    n = len(frames)
    ahead, half = PREFETCH_AHEAD, PREFETCH_AHEAD // 2
    for i in range(start, n):
        # the frame's row and the new content's counts, then (once that frame row has
        # arrived) the counts of the content the frame holds now
        if i + ahead < n:
            g = np.int64(frames[i + ahead])
            if 0 <= g < nframes:
                prefetch(content, g)
            if 0 <= ids[i + ahead] < nids:
                prefetch(ref_all, ids[i + ahead])
        if i + half < n:
            g = np.int64(frames[i + half])
            if 0 <= g < nframes and 0 <= content[g] < nids:
                prefetch(ref_all, content[g])
        f = np.int64(frames[i])
        if not 0 <= f < nframes:  # (a frame of 2**63 or more casts negative)
            return i
        _set_frame(f, ids[i], fs[2][f], fs, lg)
    return n


@hot
def apply_pagecache(ops: np.ndarray, frames: np.ndarray, dev: np.ndarray, ino: np.ndarray,
                    index: np.ndarray, files: tuple, start: int, fs: FrameState,
                    lg: ContentLog) -> int:
    """PAGECACHE records from index ``start`` on: frame ``frames[i]`` joins the page cache as
    page ``index[i]`` of file (``dev[i]``, ``ino[i]``) (ADD) or leaves it (DEL); other ops
    change nothing. ``files`` = (file_dev, file_ino, file_index) per frame. Returns the index it
    stopped at: ``len(ops)``, or the first record whose frame is beyond the frame arrays."""
    file_dev, file_ino, file_index = files
    nframes = len(fs[0])
    for i in range(start, len(ops)):
        if ops[i] == _PC_ADD:
            value = True
        elif ops[i] == _PC_DEL:
            value = False
        else:
            continue
        f = np.int64(frames[i])
        if not 0 <= f < nframes:  # (a frame of 2**63 or more casts negative)
            return i
        if value:
            file_dev[f] = dev[i]
            file_ino[f] = ino[i]
            file_index[f] = index[i]
        _set_frame(f, fs[0][f], value, fs, lg)
    return len(ops)


@hot
def forget_frames(frames: np.ndarray, fs: FrameState, lg: ContentLog) -> None:
    """The frames' contents become unknown and they leave the page cache (a state reset)."""
    for f in frames:
        _set_frame(f, -1, False, fs, lg)


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
def space_key(mm: np.uint64) -> np.uint64:
    """Key of an mm in the space table (an mm of 0 would be an empty slot; a real mm, a kernel
    pointer, is never 1)."""
    return mm if mm != 0 else np.uint64(1)


@hot
def apply_maps(mms: np.ndarray, vpns: np.ndarray, frames: np.ndarray, flags: np.ndarray,
               tb: Tables, start: int, fs: FrameState, lg: ContentLog) -> int:
    """MAP records from index ``start`` on: virtual page ``vpns[i]`` of address space ``mms[i]``
    maps ``frames[i]`` (if ``flags[i]`` has MAP_PRESENT) or nothing. Returns the index it
    stopped at: ``len(vpns)``, or the first record whose address space has no mmid yet, that
    could overfill a table, or whose frame is beyond the frame arrays (the caller makes room and
    calls again from there), or whose virtual page does not fit 40 bits (the caller raises)."""
    vkeys, vvals, shifts, tab_n, space_pages, cnt = tb[0], tb[1], tb[4], tb[5], tb[6], fs[6]
    skeys, svals = tb[7], tb[8]
    nframes = len(fs[0])
    sh = np.uint64(MMID_SHIFT)
    last_mm = np.uint64(0)
    mmid = np.uint64(0)
    pkeys, content, ref_all = tb[2], fs[0], fs[3]
    n, nids = len(vpns), len(ref_all)
    for i in range(start, n):
        if tab_n[0] >= tab_n[2] or tab_n[1] >= tab_n[3]:
            return i
        # prefetch the mapping and pair slots and the frame row of a record ahead (if it is
        # in the same address space), then the counts of that frame's content
        j = i + PREFETCH_AHEAD
        if j < n and mmid != 0 and mms[j] == last_mm:
            m = mmid << sh
            prefetch(vkeys, _home(m | np.uint64(vpns[j]), shifts[0]))
            g = np.int64(frames[j])
            if flags[j] & MAP_PRESENT and 0 <= g < nframes:
                prefetch(pkeys, _home(m | np.uint64(g), shifts[1]))
                prefetch(content, g)
        j = i + PREFETCH_AHEAD // 2
        if j < n:
            g = np.int64(frames[j])
            if flags[j] & MAP_PRESENT and 0 <= g < nframes and 0 <= content[g] < nids:
                prefetch(ref_all, content[g])
        if mmid == 0 or mms[i] != last_mm:
            s = table_find(skeys, space_key(mms[i]), shifts[2])
            if s < 0:
                return i
            last_mm = mms[i]
            mmid = np.uint64(svals[s])
        if np.uint64(vpns[i]) > _LOW:  # would spill into the mmid bits
            return i
        key = (mmid << sh) | np.uint64(vpns[i])
        s = table_find(vkeys, key, shifts[0])
        old = vvals[s] if s >= 0 else -1
        if flags[i] & MAP_PRESENT:
            f = np.int64(frames[i])
            if not 0 <= f < nframes:  # (a frame of 2**63 or more casts negative)
                return i
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
    return n


@njit(cache=True)
def release_space(mmid: int, tb: Tables, fs: FrameState, lg: ContentLog) -> None:
    """Address space ``mmid`` is gone: all its mappings go (one pass over each table)."""
    vkeys, vvals, pkeys, pvals, shifts, tab_n, space_pages = tb[:7]
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
    kernels above: at most half full, grown by rehashing (``reserve``) when a loop stops because
    it is full."""

    def __init__(self, bits: int = 12) -> None:
        if bits < _RUN_BITS:
            raise ValueError(f"a table needs at least {_RUN_BITS} bits, got {bits}")
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

    def put(self, key: int, val: int) -> None:
        """Set one entry from Python (the table must have room: ``reserve``)."""
        k = np.uint64(key)
        s = table_find(self.keys, k, self.shift)
        if s < 0:
            s = -1 - s
            self.keys[s] = k
        self.vals[s] = val

    def remove(self, key: int) -> None:
        """Delete one entry from Python, if it is there."""
        s = table_find(self.keys, np.uint64(key), self.shift)
        if s >= 0:
            table_delete(self.keys, self.vals, s, self.shift)

    def lookup(self, keys: np.ndarray, missing: int = -1) -> np.ndarray:
        return table_lookup(self.keys, self.vals, np.asarray(keys, dtype=np.uint64), self.shift,
                            missing)

    def select(self, mmid: int) -> tuple[np.ndarray, np.ndarray]:
        """(low 40 bits of the key, value) of the entries of address space ``mmid``."""
        return table_select(self.keys, self.vals, mmid)


@dataclass(frozen=True)
class ContentHashes:
    """The full hash of each content id at one instant (``ContentTable.hashes``): what a copy of
    the state kept for later reads instead of the live table, whose ids may name other contents
    by then."""

    lo: np.ndarray
    hi: np.ndarray

    def __len__(self) -> int:
        return len(self.lo)


class ContentTable:
    """Maps content hashes to dense ids (0, 1, 2, ...), assigning ids on first sight, and takes
    back the ids of contents the replay no longer needs (``forget``) to give them again.

    A hash table keyed by the hash's low 64 bits (``Table``), probed by compiled loops that stop
    when it is half full; ``lo``/``hi`` give the full hash of each id (of an id in the free list:
    the content it named last).
    """

    def __init__(self, capacity_bits: int = 12) -> None:
        # room for as many ids as the table holds before it must grow
        self.lo = np.empty(1 << (capacity_bits - 1), dtype=np.uint64)
        self.hi = np.empty(1 << (capacity_bits - 1), dtype=np.uint64)
        self.free = np.empty(1 << (capacity_bits - 1), dtype=np.int64)
        # ids assigned so far, entries in the table, most entries before it must grow, free ids
        self.counts = np.zeros(4, dtype=np.int64)
        self._table = Table(capacity_bits)
        self._view: tuple[np.ndarray, ...] = ()
        self._update_view()
        self._was_free = np.zeros(0, dtype=np.bool_)  # scratch of ``collect``
        self._forgotten = np.zeros(0, dtype=np.int64)

    @property
    def n(self) -> int:
        """Ids assigned so far: every id is below it (arrays indexed by id need this many rows)."""
        return int(self.counts[0])

    def __len__(self) -> int:
        return int(self.counts[0])

    @property
    def live(self) -> int:
        """Contents in the table (ids assigned and not in the free list)."""
        return int(self.counts[1])

    @property
    def capacity(self) -> int:
        """Ids the arrays hold (and entries the table takes before it must grow)."""
        return len(self.lo)

    def room(self) -> int:
        """New contents that fit without growing anything."""
        return int(self.counts[3]) + len(self.lo) - int(self.counts[0])

    def _update_view(self) -> None:
        t = self._table
        self.counts[2] = len(t.keys) // 2
        self._view = (t.keys, t.vals, np.array([t.shift], dtype=np.uint64), self.lo, self.hi,
                      self.counts, self.free)

    def kernel_view(self) -> tuple[np.ndarray, ...]:
        """The arrays the compiled loops work on (``ContentArrays``)."""
        return self._view

    def make_room(self, ids_needed: int) -> None:
        """Called when a compiled loop stopped for want of room: grow the table if it is at
        its fill limit, and the per-id arrays to hold at least ``ids_needed`` ids."""
        if self.counts[1] >= self.counts[2]:
            self._table.reserve(int(self.counts[1]), 1)
        if ids_needed > len(self.lo):
            self._resize(max(ids_needed, 2 * len(self.lo)))
        self._update_view()

    def _resize(self, size: int) -> None:
        self.lo = np.resize(self.lo, size)
        self.hi = np.resize(self.hi, size)
        self.free = np.resize(self.free, size)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` ids (table and per-id arrays together), if there is less."""
        if capacity <= len(self.lo):
            return
        self._table.reserve(int(self.counts[1]), capacity - int(self.counts[1]))
        self._resize(capacity)
        self._update_view()

    def collect(self, ref_all: np.ndarray, mark: np.ndarray, keep: int,
                listeners: Sequence[Callable[[np.ndarray], None]] = ()) -> int:
        """Forget the contents whose ``ref_all`` and ``mark`` are 0 (all but ``keep``): they
        leave the table and their ids go to the free list, to be given to new contents, lowest
        first. The ``listeners`` get the ids that named a content until now before any is
        given again. Returns how many contents were forgotten."""
        if len(self._was_free) < len(self.lo):
            self._was_free = np.zeros(len(self.lo), dtype=np.bool_)
            self._forgotten = np.empty(len(self.lo), dtype=np.int64)
        k = collect_contents(self._view, ref_all, mark, keep, self._was_free, self._forgotten)
        if k:
            cids = self._forgotten[:k].copy()
            for listener in listeners:
                listener(cids)
        return k

    def hashes(self) -> ContentHashes:
        """A copy of the full hash of every id, for reading after the ids may be recycled."""
        n = self.n
        return ContentHashes(self.lo[:n].copy(), self.hi[:n].copy())

    def ids(self, hash_lo: np.ndarray, hash_hi: np.ndarray) -> np.ndarray:
        """Content ids for the given hashes (int64 array, same length)."""
        lo = np.asarray(hash_lo, dtype=np.uint64)  # a strided column is fine
        hi = np.asarray(hash_hi, dtype=np.uint64)
        out = np.empty(len(lo), dtype=np.int64)
        i = 0
        while (i := content_ids(self._view, lo, hi, out, i)) < len(lo):
            self.make_room(self.n + 1)
        return out

    def id_of(self, hash_lo: int, hash_hi: int) -> int:
        return int(self.ids(np.array([hash_lo], dtype=np.uint64),
                            np.array([hash_hi], dtype=np.uint64))[0])
