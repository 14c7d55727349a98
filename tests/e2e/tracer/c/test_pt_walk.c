/*
 * Unit test of tracer/pt_walk.c: builds x86-64 page tables in a file that stands for guest RAM,
 * maps it, walks it and compares the mappings with the expected list; then checks pt_diff, and
 * a walk over RAM split around a PCI hole (ram_layout.h).
 * Run by tests/e2e_tracer/test_unit_c.py (compiled with gcc in a temporary directory).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pt_walk.h"

#define RAM_SIZE (8u << 20) /* 8 MiB of "guest RAM": 2048 frames */
#define P 0x1ull
#define RW 0x2ull
#define US 0x4ull
#define A 0x20ull
#define D 0x40ull
#define PS 0x80ull
#define NX (1ull << 63)

#include "check.h"

static uint64_t *ram;

static void set_entry(uint64_t table_frame, unsigned idx, uint64_t val)
{
    ram[table_frame * 512 + idx] = val;
}

static uint64_t va(unsigned l4, unsigned l3, unsigned l2, unsigned l1)
{
    return ((uint64_t)l4 << 27) | ((uint64_t)l3 << 18) | ((uint64_t)l2 << 9) | l1;
}

static const struct pt_map *find(const struct pt_walk *w, uint64_t vpn)
{
    for (size_t i = 0; i < w->nmaps; i++) {
        if (w->maps[i].vpn == vpn) {
            return &w->maps[i];
        }
    }
    return NULL;
}

struct diff_rec {
    uint64_t vpn, frame, flags;
};
static struct diff_rec diffs[4096];
static size_t ndiffs;

static void diff_cb(void *ctx, uint64_t vpn, uint64_t frame, uint64_t flags)
{
    (void)ctx;
    if (ndiffs < 4096) {
        diffs[ndiffs++] = (struct diff_rec){ vpn, frame, flags };
    }
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "pt_test_ram.bin";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, RAM_SIZE) < 0) {
        perror(path);
        return 2;
    }
    ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ram == MAP_FAILED) {
        perror("mmap");
        return 2;
    }

    /* Frames: 1 = PML4 (root), 2 = PDPT, 3 = PD, 4 = PT, 5 = second PT, 6 = PDPT for the
     * kernel half, 7 = PD for a read-only branch, 8 = its PT. Data frames from 100. */
    const uint64_t root = 1, pdpt = 2, pd = 3, pt = 4, pt2 = 5, kpdpt = 6, pd_ro = 7, pt_ro = 8;
    set_entry(root, 0, (pdpt << 12) | P | RW | US | A);
    set_entry(pdpt, 0, (pd << 12) | P | RW | US | A);
    set_entry(pd, 0, (pt << 12) | P | RW | US);
    set_entry(pt, 0, (100ull << 12) | P | RW | US | A | D);           /* writable, dirty */
    set_entry(pt, 1, (101ull << 12) | P | US | A | NX);               /* read-only, NX */
    set_entry(pt, 2, (102ull << 12) | RW | US);                       /* not present */
    set_entry(pt, 3, (103ull << 12) | P | RW);                        /* supervisor: not user */
    set_entry(pt, 511, (104ull << 12) | P | RW | US | D);
    set_entry(pt, 4, (0x100000ull << 12) | P | RW | US);              /* outside RAM */
    set_entry(pd, 1, (pt2 << 12) | P | RW | US);
    set_entry(pt2, 7, (105ull << 12) | P | RW | US);
    set_entry(pd, 2, (1024ull << 12) | P | RW | US | PS | D);         /* 2 MiB page @ 4 MiB */
    set_entry(pd, 3, (0x7fff000ull << 12) | P | RW | US);             /* table outside RAM */
    /* a branch whose PDPT entry is read-only: nothing below it is writable */
    set_entry(pdpt, 5, (pd_ro << 12) | P | US);
    set_entry(pd_ro, 0, (pt_ro << 12) | P | RW | US);
    set_entry(pt_ro, 9, (106ull << 12) | P | RW | US | D);
    /* a 1 GiB page at physical 0: only the part inside RAM (2048 frames) is reported */
    set_entry(pdpt, 7, 0ull | P | RW | US | PS);
    /* kernel half: ignored */
    set_entry(root, 256, (kpdpt << 12) | P | RW | US);
    set_entry(kpdpt, 0, (0ull) | P | RW | US | PS);
    /* user PML4 entry without US: ignored */
    set_entry(root, 3, (pdpt << 12) | P | RW);

    /* the walker reads the file through a read-only mapping, as the plugin does */
    const uint8_t *mem = mmap(NULL, RAM_SIZE, PROT_READ, MAP_SHARED, fd, 0);
    const struct ram_layout flat = ram_layout_flat(RAM_SIZE);
    struct pt_walk w;
    pt_walk_init(&w);
    /* CR3-style root: low bits (PCID) must be ignored */
    CHECK(pt_walk_user(mem, &flat, (root << 12) | 0x5, 1u << 24, &w) == 0, "walk failed");

    const struct pt_map *m;
    m = find(&w, va(0, 0, 0, 0));
    CHECK(m && m->frame == 100 && m->flags == (PT_PRESENT | PT_WRITABLE | PT_DIRTY),
          "4K rw dirty: %p", (void *)m);
    m = find(&w, va(0, 0, 0, 1));
    CHECK(m && m->frame == 101 && m->flags == PT_PRESENT, "4K read-only");
    CHECK(!find(&w, va(0, 0, 0, 2)), "not-present entry reported");
    CHECK(!find(&w, va(0, 0, 0, 3)), "supervisor entry reported");
    CHECK(!find(&w, va(0, 0, 0, 4)), "frame outside RAM reported");
    m = find(&w, va(0, 0, 0, 511));
    CHECK(m && m->frame == 104 && m->flags == (PT_PRESENT | PT_WRITABLE | PT_DIRTY), "pte 511");
    m = find(&w, va(0, 0, 1, 7));
    CHECK(m && m->frame == 105 && m->flags == (PT_PRESENT | PT_WRITABLE), "second PT");
    for (unsigned i = 0; i < 512; i++) {
        m = find(&w, va(0, 0, 2, i));
        CHECK(m && m->frame == 1024 + i && m->flags == (PT_PRESENT | PT_WRITABLE | PT_DIRTY),
              "2M page entry %u", i);
    }
    m = find(&w, va(0, 5, 0, 9));
    CHECK(m && m->frame == 106 && m->flags == (PT_PRESENT | PT_DIRTY),
          "read-only upper level must clear writable");
    size_t n1g = 0;
    for (size_t i = 0; i < w.nmaps; i++) {
        if (w.maps[i].vpn >= va(0, 7, 0, 0) && w.maps[i].vpn < va(0, 8, 0, 0)) {
            CHECK(w.maps[i].frame == w.maps[i].vpn - va(0, 7, 0, 0), "1G page frame");
            n1g++;
        }
    }
    CHECK(n1g == RAM_SIZE / 4096, "1G page: %zu entries, want %u", n1g, RAM_SIZE / 4096);
    for (size_t i = 0; i < w.nmaps; i++) {
        CHECK(w.maps[i].vpn < (1ull << 35), "kernel-half vpn %" PRIx64, w.maps[i].vpn);
        CHECK(i == 0 || w.maps[i - 1].vpn < w.maps[i].vpn, "not sorted at %zu", i);
    }
    size_t want = 1 + 1 + 1 + 1 + 512 + 1 + RAM_SIZE / 4096;
    CHECK(w.nmaps == want, "nmaps %zu, want %zu", w.nmaps, want);
    /* tables: root, pdpt, pd, pt, pt2, pd_ro, pt_ro (the out-of-RAM table is not counted) */
    CHECK(w.ntables == 7, "ntables %zu", w.ntables);
    CHECK(w.tables[0] == root, "root first");

    /* truncation */
    struct pt_walk wt;
    pt_walk_init(&wt);
    pt_walk_user(mem, &flat, root << 12, 100, &wt);
    CHECK(wt.truncated && wt.nmaps == 100, "truncation: %d %zu", wt.truncated, wt.nmaps);
    pt_walk_free(&wt);

    /* root outside RAM */
    struct pt_walk wb;
    pt_walk_init(&wb);
    CHECK(pt_walk_user(mem, &flat, 0x40000000ull, 1u << 24, &wb) == -1, "bad root");
    pt_walk_free(&wb);

    /* diff: change one frame, drop one page, add one, set dirty on another */
    set_entry(pt, 0, (110ull << 12) | P | RW | US | A | D);
    set_entry(pt, 1, 0);
    set_entry(pt, 6, (111ull << 12) | P | US);
    set_entry(pt2, 7, (105ull << 12) | P | RW | US | D);
    struct pt_walk w2;
    pt_walk_init(&w2);
    pt_walk_user(mem, &flat, root << 12, 1u << 24, &w2);
    ndiffs = 0;
    size_t nd = pt_diff(&w, &w2, diff_cb, NULL);
    CHECK(nd == 4 && ndiffs == 4, "diffs %zu", nd);
    CHECK(diffs[0].vpn == va(0, 0, 0, 0) && diffs[0].frame == 110, "diff changed frame");
    CHECK(diffs[1].vpn == va(0, 0, 0, 1) && diffs[1].flags == 0, "diff gone");
    CHECK(diffs[2].vpn == va(0, 0, 0, 6) && diffs[2].frame == 111 &&
          diffs[2].flags == PT_PRESENT, "diff new");
    CHECK(diffs[3].vpn == va(0, 0, 1, 7) && diffs[3].flags == (PT_PRESENT | PT_WRITABLE |
                                                                 PT_DIRTY), "diff dirty");
    /* diff against nothing: everything is new / everything is gone */
    ndiffs = 0;
    CHECK(pt_diff(NULL, &w2, diff_cb, NULL) == w2.nmaps, "all new");
    CHECK(pt_diff(&w2, NULL, diff_cb, NULL) == w2.nmaps, "all gone");
    CHECK(pt_diff(&w2, &w2, diff_cb, NULL) == 0, "no change");

    pt_walk_free(&w);
    pt_walk_free(&w2);

    /* RAM split around the hole: the file's first 4 MiB at guest physical 0, the rest (file
     * frames 1024..2047) at guest physical 4 GiB. Tables hold guest physical addresses. */
    memset(ram, 0, RAM_SIZE);
    const struct ram_layout split = { RAM_SIZE, 4u << 20 };
    const uint64_t high = RAM_HIGH_BASE >> 12; /* guest frame of file frame 1024 */
    CHECK(ram_offset(&split, 0x3ff000) == 0x3ff000, "below");
    CHECK(ram_offset(&split, 0x400000) == RAM_NONE, "hole");
    CHECK(ram_offset(&split, RAM_HIGH_BASE + 0x1000) == (4u << 20) + 0x1000, "above");
    CHECK(ram_offset(&split, RAM_HIGH_BASE + (4u << 20)) == RAM_NONE, "beyond the end");
    /* root in low RAM (file frame 1); its PDPT in high RAM (file frame 1030 = guest frame
     * high + 6), PD at file frame 2, PT in high RAM (file frame 1031) */
    const uint64_t hpdpt = 1030, hpt = 1031;
    set_entry(root, 0, ((high + hpdpt - 1024) << 12) | P | RW | US);
    set_entry(hpdpt, 0, (pd << 12) | P | RW | US);
    set_entry(pd, 0, ((high + hpt - 1024) << 12) | P | RW | US);
    set_entry(hpt, 0, ((high + 40) << 12) | P | RW | US | D); /* high RAM: file frame 1064 */
    set_entry(hpt, 1, (200ull << 12) | P | US);                /* low RAM */
    set_entry(hpt, 2, (0x500ull << 12) | P | US);              /* in the hole (5 MiB) */
    set_entry(hpt, 3, ((high + 1024) << 12) | P | US);         /* past the end of RAM */
    /* a 2 MiB page at guest 4 GiB + 2 MiB: file frames 1536..2047 */
    set_entry(pd, 1, ((high + 512) << 12) | P | RW | US | PS);
    /* a 2 MiB page at guest 2 MiB: file frames 512..1023 (below the hole's start) */
    set_entry(pd, 2, (512ull << 12) | P | RW | US | PS);
    /* a 1 GiB page at guest 0: only its first 4 MiB are RAM */
    set_entry(hpdpt, 1, 0ull | P | RW | US | PS);
    struct pt_walk ws;
    pt_walk_init(&ws);
    CHECK(pt_walk_user(mem, &split, root << 12, 1u << 24, &ws) == 0, "split walk");
    CHECK(ws.ntables == 4 && ws.tables[0] == root && ws.tables[1] == hpdpt &&
          ws.tables[2] == pd && ws.tables[3] == hpt, "split tables (RAM frames)");
    m = find(&ws, va(0, 0, 0, 0));
    CHECK(m && m->frame == 1064 && m->flags == (PT_PRESENT | PT_WRITABLE | PT_DIRTY),
          "high frame -> file frame");
    m = find(&ws, va(0, 0, 0, 1));
    CHECK(m && m->frame == 200, "low frame");
    CHECK(!find(&ws, va(0, 0, 0, 2)), "frame in the hole reported");
    CHECK(!find(&ws, va(0, 0, 0, 3)), "frame past the end reported");
    for (unsigned i = 0; i < 512; i++) {
        m = find(&ws, va(0, 0, 1, i));
        CHECK(m && m->frame == 1536 + i, "high 2M page entry %u", i);
        m = find(&ws, va(0, 0, 2, i));
        CHECK(m && m->frame == 512 + i, "low 2M page entry %u", i);
    }
    n1g = 0;
    for (size_t i = 0; i < ws.nmaps; i++) {
        if (ws.maps[i].vpn >= va(0, 1, 0, 0) && ws.maps[i].vpn < va(0, 2, 0, 0)) {
            CHECK(ws.maps[i].frame == ws.maps[i].vpn - va(0, 1, 0, 0), "split 1G frame");
            n1g++;
        }
    }
    CHECK(n1g == 1024, "split 1G page: %zu entries, want 1024", n1g);
    CHECK(ws.nmaps == 2 + 512 + 512 + 1024, "split nmaps %zu", ws.nmaps);
    /* a root in the hole is not RAM */
    CHECK(pt_walk_user(mem, &split, 0x500000, 1u << 24, &ws) == -1, "root in the hole");
    pt_walk_free(&ws);
    unlink(path);
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("pt_walk: all checks passed\n");
    return 0;
}
