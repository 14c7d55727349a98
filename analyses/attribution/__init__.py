"""Attribution: who holds the shareable frames, what kind of memory they are, where they came from.

The figures say *how much* memory full content-based page sharing (CBPS) could save; this analysis
says *whose* it is, the question of thesis chapter 6 and of Barker et al. [BWSS12]: heap, library
or stack pages, sharing within one instance ("self sharing") or between instances ("cross
sharing"). ``trace-analyze --by task|file|section|kind`` attributes every mapped frame and every
saved page, at one instant (``--at T``; default: the sample with the most frames mapped, the same
instant ``--sharing`` reports as its peak) or averaged over samples every ``--interval``
(``--average``). ``--top K`` lists the K most duplicated contents and every copy's owner;
``--show-page HASH`` prints one content from the trace's content store.

The attribution rule (every table sums to the same totals):

* A content held by n mapped frames saves n - 1 frames under full CBPS (its n copies become one).
* Self and cross sharing. Copies are grouped into *components*: two copies are in one component
  when one address space maps both (directly or through other copies of that content). The
  instance is the address space: threads share it, a forked child has its own. With K components
  of sizes s_1..s_K (summing to n), deduplicating inside each address space alone saves n - K
  (self sharing) and deduplicating what remains across address spaces saves K - 1 (cross
  sharing). A copy in a component of size s gets (s - 1)/s of self saving (its component's s - 1
  shared by its s copies) and (K - 1)/(K s) of cross saving (the K - 1 shared by the K components,
  each component's part by its copies). When all copies are in one space, or each in its own,
  every copy gets (n - 1)/n, the plain rule.
* A frame mapped by k address spaces (fork, shared libraries) is split 1/k to each, as the
  proportional set size (PSS) does, for frames, shareable frames and savings alike. So the
  ``frames`` column of any table sums to the mapped frames ("mmap/fork") and ``saved`` to
  mmap/fork - full CBPS.
* Frames whose content is unknown count as frames but are never shareable.

Memory kinds (``--by kind``), from the frame and the VMA that maps it in each address space:
``zero`` (the zero page's content, whatever maps it: counted apart as Barker et al. do), ``file``
(a page-cache page mapped from a file), ``shmem`` (shared memory: VM_SHARED anonymous mappings,
/dev/zero, /SYSV, memfd:, /dev/shm/), ``heap`` (the brk area), ``stack`` ([stack] or
VM_GROWSDOWN), ``cow`` (an anonymous private copy of a page of a file mapping, made by a write),
``bss`` (anonymous memory continuing a file mapping where an ELF segment's memsz exceeds its
filesz: confirmed against the ELF file under --guest-root), ``anon`` (other anonymous mmap),
``special`` (vdso, vvar, device mappings: VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND) and
``unknown`` (no VMA known at that address).

Files (``--by file``): a named frame belongs to its page-cache file and offset (``file_of``); an
anonymous copy in a file-backed private VMA (``cow``, ``bss``) to the file and offset the VMA maps
there; any other anonymous frame whose content is also in the page cache (a ``read()`` of a data
file into the heap, say) to that file and offset as a *copy*. Paths come from the VMA records of
the whole trace; a file never mapped has no path in the trace and is named by its device and inode,
or, with ``--guest-root``, by the host file whose pages have the same contents.

Sections (``--by section``): with ``--guest-root DIR`` (the unpacked guest image) the same paths are
opened on the host (symlinks resolved inside DIR; ``--guest-path-map`` rewrites guest paths first,
e.g. for copies made at run time) and, when the file is an ELF object, a page-cache page is
attributed by file offset to the section holding most of its bytes (sh_offset/sh_size), and an
anonymous copy by virtual address within its PT_LOAD segment (sh_addr/sh_size), which reaches
NOBITS sections such as .bss past the segment's filesz.

The package, one module per concern: ``frozen`` (the state kept for the instant attributed),
``elf`` (an ELF file's segments and sections), ``guestfiles`` (guest paths and the guest's files
under --guest-root), ``attributor`` (kinds, links to files, the attribution rule), ``tables``
(grouping and the result tables), ``analysis`` (``AttributionAnalysis``: options, replay hooks,
the report), ``showpage`` (``--show-page``).
"""

from __future__ import annotations

from memtrace.analyses.attribution.analysis import AttributionAnalysis
from memtrace.analyses.attribution.attributor import Attribution, Attributor
from memtrace.analyses.attribution.elf import ElfLayout
from memtrace.analyses.attribution.guestfiles import (
    GuestFiles,
    ImageFiles,
    parse_path_map,
    resolve_in_root,
)
from memtrace.analyses.attribution.showpage import PageNotFound, hexdump, show_page

__all__ = ["Attribution", "AttributionAnalysis", "Attributor", "ElfLayout", "GuestFiles",
           "ImageFiles", "PageNotFound", "hexdump", "parse_path_map", "resolve_in_root",
           "show_page"]
