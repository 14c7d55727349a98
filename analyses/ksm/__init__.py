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
``tests/unit/analyses/test_ksm.py`` checks all of this against a plain page-at-a-time reference.

The package, one module per concern: ``params`` (a parameter set, the sysfs knobs, the option
parsers), ``series`` (time-weighted values), ``items`` (the rmap items in scope, their layout,
the scope rule and the scope oracle), ``model`` (one ksmd: scanning, the stable and unstable
trees, counters), ``hinted`` (the XLH-style scanner), ``analysis`` (``KsmAnalysis``: options,
replay hooks, results), ``plot`` (its panels for ``--plot``).
"""

from __future__ import annotations

from memtrace.analyses.ksm.analysis import KsmAnalysis
from memtrace.analyses.ksm.hinted import HintedModel
from memtrace.analyses.ksm.items import ItemSpace
from memtrace.analyses.ksm.model import KsmModel
from memtrace.analyses.ksm.params import KsmParams, cycle_ms, parse_start, parse_sweep

__all__ = ["HintedModel", "ItemSpace", "KsmAnalysis", "KsmModel", "KsmParams", "cycle_ms",
           "parse_start", "parse_sweep"]
