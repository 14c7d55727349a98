/*
 * x86-64 page-table walker over guest physical memory, for the MAP records of traces/FORMAT.md.
 *
 * Walks the user half (PML4 entries 0..255) of 4-level paging (Intel SDM vol. 3A, 4.5: PML4 ->
 * page-directory-pointer table -> page directory -> page table). 5-level paging (LA57) is not
 * handled: QEMU's default x86-64 CPU models do not offer it. Large pages are expanded into one
 * 4 KiB entry per frame (a 2 MiB page gives 512 entries, a 1 GiB page 262144), so consumers only
 * ever see 4 KiB granules. Only entries with the User/Supervisor bit set at every level are user
 * mappings; only present entries map anything; frames outside guest RAM (device memory, the
 * PCI hole) are left out, and frames are given as RAM file page indexes (ram_layout.h).
 * No glib: the unit test compiles this file alone.
 */
#ifndef MEMTRACE_PT_WALK_H
#define MEMTRACE_PT_WALK_H

#include <stddef.h>
#include <stdint.h>

#include "ram_layout.h"

/* Same bits as the MAP record's flags. */
#define PT_PRESENT 1u
#define PT_WRITABLE 2u
#define PT_DIRTY 4u

struct pt_map {
    uint64_t vpn;     /* virtual address >> 12 */
    uint64_t frame;   /* RAM file offset >> 12 (ram_layout.h; below the PCI hole = guest
                       * physical address >> 12) */
    uint64_t flags;   /* PT_* */
};

/* Result of one walk: the mappings sorted by vpn and the frames holding the page tables. */
struct pt_walk {
    struct pt_map *maps;
    size_t nmaps, maps_cap;
    uint64_t *tables;   /* root first, then every lower-level table visited (RAM frames) */
    size_t ntables, tables_cap;
    int truncated;      /* the walk stopped at max_maps entries */
};

void pt_walk_init(struct pt_walk *w);
void pt_walk_free(struct pt_walk *w);
/* Empties w, keeping its buffers. */
void pt_walk_clear(struct pt_walk *w);

/*
 * Walks the user half of the tables whose root (PML4) is at guest physical address root (the
 * CR3 value; bits 0-11 and 52-63 are ignored) in guest RAM mem[0..ram->size), laid out as
 * ram says (the tables hold guest physical addresses). Stops after max_maps entries (sets
 * w->truncated). Returns 0, or -1 if the root is not in guest RAM (w left empty).
 */
int pt_walk_user(const uint8_t *mem, const struct ram_layout *ram, uint64_t root,
                 size_t max_maps, struct pt_walk *w);

/*
 * Calls fn once for each vpn whose mapping differs between old and new (both sorted by vpn):
 * new or changed entries with their frame and flags, entries gone from new with frame 0 and
 * flags 0. Returns the number of calls.
 */
typedef void (*pt_diff_fn)(void *ctx, uint64_t vpn, uint64_t frame, uint64_t flags);
size_t pt_diff(const struct pt_walk *old, const struct pt_walk *new, pt_diff_fn fn, void *ctx);

#endif
