/*
 * Written-frame tracking without per-store callbacks: userfaultfd in asynchronous write-protect
 * mode over QEMU's own mapping of the guest RAM file, read and re-armed with one
 * ioctl(/proc/self/pagemap, PAGEMAP_SCAN) per epoch (Linux 6.7 or newer).
 *
 * With UFFD_FEATURE_WP_ASYNC the kernel resolves a write fault on a write-protected page by
 * itself (no fault message, no handler thread): it clears the page's uffd-wp bit and lets the
 * write proceed. PAGEMAP_SCAN with category PAGE_IS_WRITTEN reports exactly the pages whose bit
 * is clear, and PM_SCAN_WP_MATCHING write-protects them again in the same page-table walk, so
 * no write can fall between reporting and re-arming. Writes from every thread of the process
 * (vCPU stores, the TCG page walker's accessed/dirty updates, device DMA) go through the same
 * mapping and are all seen. Writes through other mappings of the file (the plugin's own) are
 * not.
 */
#ifndef MEMTRACE_WP_TRACK_H
#define MEMTRACE_WP_TRACK_H

#include <stddef.h>
#include <stdint.h>

/* One mapping of the RAM file: [addr, addr+len) maps file offsets [offset, offset+len). */
struct wp_range {
    uint64_t addr, len, offset;
};

struct wp_tracker {
    int uffd;
    int pagemap_fd;
    struct wp_range ranges[8];
    unsigned nranges;
    void *vec;          /* struct page_region[vec_len] */
    size_t vec_len;
    uint64_t scans, regions;
};

/*
 * Checks that the running kernel supports asynchronous write-protect tracking on a shared
 * memory mapping, with a private memfd test mapping: write-protect, write one page, scan,
 * expect exactly that page, scan again, expect nothing. Returns 0, or -1 with a reason in err.
 */
int wp_probe(char *err, size_t errlen);

/*
 * Finds the mappings of the file `path` (matched by device and inode) in /proc/self/maps that
 * are shared and writable, skipping [skip_addr, skip_addr+skip_len). Returns how many were
 * stored in out (at most max), or -1 with a reason in err.
 */
int wp_find_mappings(const char *path, uint64_t skip_addr, uint64_t skip_len,
                     struct wp_range *out, unsigned max, char *err, size_t errlen);

/* Registers the ranges with a new userfaultfd in WP-async mode and write-protects them. */
int wp_start(struct wp_tracker *t, const struct wp_range *ranges, unsigned n, char *err,
             size_t errlen);

/* Write-protects every range again (forgets what was written so far). */
int wp_rearm(struct wp_tracker *t, char *err, size_t errlen);

/*
 * Reports the file-offset ranges [start, end) written since the last scan (or rearm) and
 * write-protects them again. Returns 0, or -1 with a reason in err.
 */
typedef void (*wp_written_fn)(void *ctx, uint64_t off_start, uint64_t off_end);
int wp_collect(struct wp_tracker *t, wp_written_fn fn, void *ctx, char *err, size_t errlen);

void wp_stop(struct wp_tracker *t);

#endif
