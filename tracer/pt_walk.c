/* x86-64 4-level page-table walker: see pt_walk.h. */
#include "pt_walk.h"

#include <stdlib.h>
#include <string.h>

/* Page-table entry bits (Intel SDM vol. 3A, tables 4-15 to 4-20). */
#define PTE_P (1ull << 0)     /* present */
#define PTE_RW (1ull << 1)    /* writable */
#define PTE_US (1ull << 2)    /* user/supervisor */
#define PTE_D (1ull << 6)     /* dirty (leaf entries) */
#define PTE_PS (1ull << 7)    /* page size: the PDPTE / PDE maps a 1 GiB / 2 MiB page */
#define ADDR_4K 0x000ffffffffff000ull
#define ADDR_2M 0x000fffffffe00000ull
#define ADDR_1G 0x000fffffc0000000ull

#define USER_PML4_ENTRIES 256 /* entries 256..511 map the kernel half */

struct walk_ctx {
    const uint8_t *mem;
    const struct ram_layout *ram;
    size_t max_maps;
    struct pt_walk *w;
};

void pt_walk_init(struct pt_walk *w)
{
    memset(w, 0, sizeof(*w));
}

void pt_walk_free(struct pt_walk *w)
{
    free(w->maps);
    free(w->tables);
    pt_walk_init(w);
}

void pt_walk_clear(struct pt_walk *w)
{
    w->nmaps = 0;
    w->ntables = 0;
    w->truncated = 0;
}

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return p;
    }
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        n *= 2;
    }
    void *q = realloc(p, n * elem);
    if (!q) {
        abort();
    }
    *cap = n;
    return q;
}

static void add_table(struct walk_ctx *c, uint64_t frame)
{
    struct pt_walk *w = c->w;
    w->tables = grow(w->tables, &w->tables_cap, w->ntables + 1, sizeof(*w->tables));
    w->tables[w->ntables++] = frame;
}

/*
 * Adds the mappings of n consecutive 4 KiB pages starting at vpn -> guest physical frame gfn,
 * the part of them that is guest RAM (a large page may reach into the PCI hole or past the end
 * of RAM), as RAM frames. Returns 0 when max_maps is hit.
 */
static int add_maps(struct walk_ctx *c, uint64_t vpn, uint64_t gfn, uint64_t n,
                    uint64_t flags)
{
    struct pt_walk *w = c->w;
    while (n > 0) {
        uint64_t gpa = gfn << 12;
        uint64_t run = ram_contiguous(c->ram, gpa) >> 12;
        if (run == 0) { /* not RAM: skip to where RAM resumes (above the hole), if within n */
            uint64_t skip = n;
            if (gpa < RAM_HIGH_BASE && c->ram->size > c->ram->below_4g) {
                skip = (RAM_HIGH_BASE - gpa) >> 12;
            }
            if (skip >= n) {
                return 1;
            }
            vpn += skip;
            gfn += skip;
            n -= skip;
            continue;
        }
        if (run > n) {
            run = n;
        }
        if (w->nmaps + run > c->max_maps) {
            run = c->max_maps > w->nmaps ? c->max_maps - w->nmaps : 0;
            w->truncated = 1;
        }
        uint64_t frame = ram_offset(c->ram, gpa) >> 12;
        w->maps = grow(w->maps, &w->maps_cap, w->nmaps + run, sizeof(*w->maps));
        for (uint64_t i = 0; i < run; i++) {
            w->maps[w->nmaps++] = (struct pt_map){ vpn + i, frame + i, flags };
        }
        if (w->truncated) {
            return 0;
        }
        vpn += run;
        gfn += run;
        n -= run;
    }
    return 1;
}

/* The table at guest physical address phys, or NULL if it is not in guest RAM. */
static const uint64_t *table_at(struct walk_ctx *c, uint64_t phys, uint64_t *frame)
{
    uint64_t off = ram_offset(c->ram, phys);
    if (off == RAM_NONE || off + 4096 > c->ram->size) {
        return NULL;
    }
    *frame = off >> 12;
    return (const uint64_t *)(c->mem + off);
}

static uint64_t leaf_flags(uint64_t e, int writable_above)
{
    uint64_t f = PT_PRESENT;
    if (writable_above && (e & PTE_RW)) {
        f |= PT_WRITABLE;
    }
    if (e & PTE_D) {
        f |= PT_DIRTY;
    }
    return f;
}

static int walk_pt(struct walk_ctx *c, uint64_t phys, uint64_t vpn_base, int wr)
{
    uint64_t tf;
    const uint64_t *pt = table_at(c, phys, &tf);
    if (!pt) {
        return 1;
    }
    add_table(c, tf);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e = pt[i];
        if ((e & (PTE_P | PTE_US)) != (PTE_P | PTE_US)) {
            continue;
        }
        if (!add_maps(c, vpn_base + i, (e & ADDR_4K) >> 12, 1, leaf_flags(e, wr))) {
            return 0;
        }
    }
    return 1;
}

static int walk_pd(struct walk_ctx *c, uint64_t phys, uint64_t vpn_base, int wr)
{
    uint64_t tf;
    const uint64_t *pd = table_at(c, phys, &tf);
    if (!pd) {
        return 1;
    }
    add_table(c, tf);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e = pd[i];
        if ((e & (PTE_P | PTE_US)) != (PTE_P | PTE_US)) {
            continue;
        }
        uint64_t vpn = vpn_base + ((uint64_t)i << 9);
        int ok;
        if (e & PTE_PS) {
            ok = add_maps(c, vpn, (e & ADDR_2M) >> 12, 512, leaf_flags(e, wr));
        } else {
            ok = walk_pt(c, e & ADDR_4K, vpn, wr && (e & PTE_RW));
        }
        if (!ok) {
            return 0;
        }
    }
    return 1;
}

static int walk_pdpt(struct walk_ctx *c, uint64_t phys, uint64_t vpn_base, int wr)
{
    uint64_t tf;
    const uint64_t *pdpt = table_at(c, phys, &tf);
    if (!pdpt) {
        return 1;
    }
    add_table(c, tf);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e = pdpt[i];
        if ((e & (PTE_P | PTE_US)) != (PTE_P | PTE_US)) {
            continue;
        }
        uint64_t vpn = vpn_base + ((uint64_t)i << 18);
        int ok;
        if (e & PTE_PS) {
            ok = add_maps(c, vpn, (e & ADDR_1G) >> 12, 1ull << 18, leaf_flags(e, wr));
        } else {
            ok = walk_pd(c, e & ADDR_4K, vpn, wr && (e & PTE_RW));
        }
        if (!ok) {
            return 0;
        }
    }
    return 1;
}

int pt_walk_user(const uint8_t *mem, const struct ram_layout *ram, uint64_t root,
                 size_t max_maps, struct pt_walk *w)
{
    struct walk_ctx c = { mem, ram, max_maps, w };
    pt_walk_clear(w);
    uint64_t tf;
    const uint64_t *pml4 = table_at(&c, root & ADDR_4K, &tf);
    if (!pml4) {
        return -1;
    }
    add_table(&c, tf);
    for (unsigned i = 0; i < USER_PML4_ENTRIES; i++) {
        uint64_t e = pml4[i];
        if ((e & (PTE_P | PTE_US)) != (PTE_P | PTE_US)) {
            continue;
        }
        /* PS is reserved in PML4 entries */
        if (!walk_pdpt(&c, e & ADDR_4K, (uint64_t)i << 27, (e & PTE_RW) != 0)) {
            break;
        }
    }
    return 0;
}

size_t pt_diff(const struct pt_walk *old, const struct pt_walk *new, pt_diff_fn fn, void *ctx)
{
    size_t i = 0, j = 0, n = 0;
    const size_t no = old ? old->nmaps : 0, nn = new ? new->nmaps : 0;
    while (i < no || j < nn) {
        if (j == nn || (i < no && old->maps[i].vpn < new->maps[j].vpn)) {
            fn(ctx, old->maps[i].vpn, 0, 0);
            i++;
            n++;
        } else if (i == no || new->maps[j].vpn < old->maps[i].vpn) {
            fn(ctx, new->maps[j].vpn, new->maps[j].frame, new->maps[j].flags);
            j++;
            n++;
        } else {
            if (old->maps[i].frame != new->maps[j].frame ||
                old->maps[i].flags != new->maps[j].flags) {
                fn(ctx, new->maps[j].vpn, new->maps[j].frame, new->maps[j].flags);
                n++;
            }
            i++;
            j++;
        }
    }
    return n;
}
