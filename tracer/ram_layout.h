/*
 * Where guest physical memory lives in the RAM file (QEMU's x86 `pc` machine).
 *
 * QEMU keeps guest RAM in one block (our memory-backend-file) and maps it into the guest's
 * physical address space in two pieces around the PCI hole (hw/i386/pc_piix.c, pc_init1):
 * RAM file [0, below_4g) at guest physical [0, below_4g), and RAM file [below_4g, size) at
 * guest physical [4 GiB, 4 GiB + size - below_4g). below_4g is the machine's
 * max-ram-below-4g (default 3.5 GiB, lowered to 3 GiB when the RAM does not fit under it);
 * trace-record sets max-ram-below-4g=2G and tells the plugin the same.
 *
 * The trace's frames are RAM-file page indexes (traces/FORMAT.md), so that every frame of a
 * trace lies in [0, ram_size / page_size) whatever the guest's physical memory map; below the
 * hole a frame is also the guest physical page number. Header-only, no glib: the walker and its
 * unit test include it too. Pure functions: thread-safe.
 */
#ifndef MEMTRACE_RAM_LAYOUT_H
#define MEMTRACE_RAM_LAYOUT_H

#include <stdint.h>

#define RAM_HIGH_BASE (4ull << 30) /* guest physical address of the RAM above the hole */
#define RAM_NONE UINT64_MAX        /* not guest RAM (the hole, device memory, beyond the end) */

struct ram_layout {
    uint64_t size;     /* bytes of guest RAM = size of the RAM file */
    uint64_t below_4g; /* bytes of it mapped below the PCI hole (<= size) */
};

/* A layout without a hole: guest physical address == RAM file offset. */
static inline struct ram_layout ram_layout_flat(uint64_t size)
{
    struct ram_layout l = { size, size };
    return l;
}

/* QEMU's default split for `pc` machines of 2.x and later without max-ram-below-4g. */
static inline uint64_t ram_default_below_4g(uint64_t size)
{
    if (size < 0xe0000000ull) {
        return size;
    }
    return 0xc0000000ull;
}

/* RAM file offset of guest physical address gpa, or RAM_NONE. */
static inline uint64_t ram_offset(const struct ram_layout *l, uint64_t gpa)
{
    if (gpa < l->below_4g) {
        return gpa;
    }
    if (gpa >= RAM_HIGH_BASE && gpa - RAM_HIGH_BASE < l->size - l->below_4g) {
        return gpa - RAM_HIGH_BASE + l->below_4g;
    }
    return RAM_NONE;
}

/*
 * How many bytes from gpa on are RAM contiguous in the file (0 if gpa is not RAM): a range of
 * guest physical memory that crosses the end of a piece continues elsewhere in the file.
 */
static inline uint64_t ram_contiguous(const struct ram_layout *l, uint64_t gpa)
{
    if (gpa < l->below_4g) {
        return l->below_4g - gpa;
    }
    if (gpa >= RAM_HIGH_BASE && gpa - RAM_HIGH_BASE < l->size - l->below_4g) {
        return l->size - l->below_4g - (gpa - RAM_HIGH_BASE);
    }
    return 0;
}

#endif
