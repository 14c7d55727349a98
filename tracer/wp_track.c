/* Written-frame tracking with userfaultfd WP-async and PAGEMAP_SCAN: see wp_track.h. */
#define _GNU_SOURCE
#include "wp_track.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <linux/fs.h>
#include <linux/userfaultfd.h>

/*
 * Kernel ABI missing from older linux-libc-dev (Debian 12 ships 6.1 headers). Values from the
 * Linux 6.7 UAPI headers include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h.
 */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)

struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#define WP_FEATURES \
    (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED)
#define VEC_LEN 4096

static void seterr(char *err, size_t errlen, const char *fmt, const char *what, int e)
{
    snprintf(err, errlen, fmt, what, strerror(e));
}

/* Opens a userfaultfd with the WP-async features; -1 with err on failure. */
static int uffd_open(char *err, size_t errlen)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM) {
        /* vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: user-mode faults only, which
         * covers guest stores (made by QEMU in user mode) but not kernel writes such as read()
         * into guest RAM. */
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    }
    if (fd < 0) {
        seterr(err, errlen, "%s: %s", "userfaultfd()", errno);
        return -1;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = WP_FEATURES };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        seterr(err, errlen, "%s: %s (the host kernel needs Linux 6.7 or newer)",
               "UFFDIO_API with UFFD_FEATURE_WP_ASYNC", errno);
        close(fd);
        return -1;
    }
    if ((api.features & WP_FEATURES) != WP_FEATURES) {
        snprintf(err, errlen, "userfaultfd lacks WP_ASYNC/WP_HUGETLBFS_SHMEM/WP_UNPOPULATED "
                 "(features 0x%llx)", (unsigned long long)api.features);
        close(fd);
        return -1;
    }
    return fd;
}

static int uffd_register_wp(int uffd, uint64_t addr, uint64_t len, char *err, size_t errlen)
{
    struct uffdio_register reg = {
        .range = { .start = addr, .len = len },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        seterr(err, errlen, "%s: %s", "UFFDIO_REGISTER (write-protect mode)", errno);
        return -1;
    }
    return 0;
}

static int uffd_protect(int uffd, uint64_t addr, uint64_t len, char *err, size_t errlen)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = addr, .len = len },
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        seterr(err, errlen, "%s: %s", "UFFDIO_WRITEPROTECT", errno);
        return -1;
    }
    return 0;
}

/* One PAGEMAP_SCAN pass over [addr, addr+len); fn gets host-address ranges. */
static int scan_range(int pagemap_fd, struct page_region *vec, size_t vec_len, uint64_t addr,
                      uint64_t len, void (*fn)(void *, uint64_t, uint64_t), void *ctx,
                      uint64_t *nregions, char *err, size_t errlen)
{
    uint64_t start = addr, end = addr + len;
    while (start < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = start,
            .end = end,
            .vec = (uintptr_t)vec,
            .vec_len = vec_len,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            seterr(err, errlen, "%s: %s", "ioctl(PAGEMAP_SCAN)", errno);
            return -1;
        }
        for (long i = 0; i < n; i++) {
            fn(ctx, vec[i].start, vec[i].end);
        }
        *nregions += (uint64_t)n;
        if (arg.walk_end <= start) {
            break; /* no progress: should not happen, but never loop forever */
        }
        start = arg.walk_end;
    }
    return 0;
}

struct probe_ctx {
    uint64_t base;
    int count;
    int bad;
};

static void probe_cb(void *opaque, uint64_t s, uint64_t e)
{
    struct probe_ctx *p = opaque;
    if (s != p->base + 3 * 4096 || e != p->base + 4 * 4096) {
        p->bad = 1;
    }
    p->count++;
}

int wp_probe(char *err, size_t errlen)
{
    const size_t len = 16 * 4096;
    int ret = -1, uffd = -1, pm = -1;
    uint8_t *map = MAP_FAILED;
    struct page_region *vec = calloc(16, sizeof(*vec));
    int mfd = memfd_create("memtrace-probe", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, len) < 0) {
        seterr(err, errlen, "%s: %s", "memfd_create", errno);
        goto out;
    }
    map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (map == MAP_FAILED) {
        seterr(err, errlen, "%s: %s", "mmap", errno);
        goto out;
    }
    map[0] = 1; /* one populated page before protection, the rest unpopulated */
    uffd = uffd_open(err, errlen);
    if (uffd < 0) {
        goto out;
    }
    if (uffd_register_wp(uffd, (uintptr_t)map, len, err, errlen) < 0 ||
        uffd_protect(uffd, (uintptr_t)map, len, err, errlen) < 0) {
        goto out;
    }
    pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        seterr(err, errlen, "%s: %s", "/proc/self/pagemap", errno);
        goto out;
    }
    map[3 * 4096 + 5] = 42;
    struct probe_ctx p = { (uintptr_t)map, 0, 0 };
    uint64_t nreg = 0;
    if (scan_range(pm, vec, 16, (uintptr_t)map, len, probe_cb, &p, &nreg, err, errlen) < 0) {
        if (errno == ENOTTY || errno == EINVAL) {
            snprintf(err + strlen(err), errlen - strlen(err),
                     " (PAGEMAP_SCAN needs Linux 6.7 or newer)");
        }
        goto out;
    }
    if (p.count != 1 || p.bad) {
        snprintf(err, errlen, "PAGEMAP_SCAN reported %d unexpected written ranges", p.count);
        goto out;
    }
    p.count = 0;
    if (scan_range(pm, vec, 16, (uintptr_t)map, len, probe_cb, &p, &nreg, err, errlen) < 0) {
        goto out;
    }
    if (p.count != 0) {
        snprintf(err, errlen, "PAGEMAP_SCAN did not re-arm write protection");
        goto out;
    }
    ret = 0;
out:
    if (pm >= 0) {
        close(pm);
    }
    if (uffd >= 0) {
        close(uffd);
    }
    if (map != MAP_FAILED) {
        munmap(map, len);
    }
    if (mfd >= 0) {
        close(mfd);
    }
    free(vec);
    return ret;
}

int wp_find_mappings(const char *path, uint64_t skip_addr, uint64_t skip_len,
                     struct wp_range *out, unsigned max, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) < 0) {
        seterr(err, errlen, "stat %s: %s", path, errno);
        return -1;
    }
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) {
        seterr(err, errlen, "%s: %s", "/proc/self/maps", errno);
        return -1;
    }
    char line[4096];
    unsigned n = 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned long long start, end, offset, inode;
        unsigned int dmaj, dmin;
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &offset, &dmaj,
                   &dmin, &inode) != 7) {
            continue;
        }
        if (inode != (unsigned long long)st.st_ino || makedev(dmaj, dmin) != st.st_dev) {
            continue;
        }
        if (perms[1] != 'w' || perms[3] != 's') {
            continue;
        }
        if (start < skip_addr + skip_len && end > skip_addr) {
            continue;
        }
        if (n < max) {
            out[n++] = (struct wp_range){ start, end - start, offset };
        }
    }
    fclose(f);
    return (int)n;
}

int wp_start(struct wp_tracker *t, const struct wp_range *ranges, unsigned n, char *err,
             size_t errlen)
{
    memset(t, 0, sizeof(*t));
    t->uffd = t->pagemap_fd = -1;
    if (n > sizeof(t->ranges) / sizeof(t->ranges[0])) {
        snprintf(err, errlen, "the RAM file is mapped in %u pieces (at most 8 supported)", n);
        return -1;
    }
    memcpy(t->ranges, ranges, n * sizeof(*ranges));
    t->nranges = n;
    t->uffd = uffd_open(err, errlen);
    if (t->uffd < 0) {
        return -1;
    }
    for (unsigned i = 0; i < n; i++) {
        if (uffd_register_wp(t->uffd, ranges[i].addr, ranges[i].len, err, errlen) < 0) {
            wp_stop(t);
            return -1;
        }
    }
    t->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (t->pagemap_fd < 0) {
        seterr(err, errlen, "%s: %s", "/proc/self/pagemap", errno);
        wp_stop(t);
        return -1;
    }
    t->vec_len = VEC_LEN;
    t->vec = calloc(t->vec_len, sizeof(struct page_region));
    return wp_rearm(t, err, errlen);
}

int wp_rearm(struct wp_tracker *t, char *err, size_t errlen)
{
    for (unsigned i = 0; i < t->nranges; i++) {
        if (uffd_protect(t->uffd, t->ranges[i].addr, t->ranges[i].len, err, errlen) < 0) {
            return -1;
        }
    }
    return 0;
}

struct collect_ctx {
    const struct wp_range *r;
    wp_written_fn fn;
    void *ctx;
};

static void collect_cb(void *opaque, uint64_t s, uint64_t e)
{
    struct collect_ctx *c = opaque;
    c->fn(c->ctx, s - c->r->addr + c->r->offset, e - c->r->addr + c->r->offset);
}

int wp_collect(struct wp_tracker *t, wp_written_fn fn, void *ctx, char *err, size_t errlen)
{
    for (unsigned i = 0; i < t->nranges; i++) {
        struct collect_ctx c = { &t->ranges[i], fn, ctx };
        if (scan_range(t->pagemap_fd, t->vec, t->vec_len, t->ranges[i].addr, t->ranges[i].len,
                       collect_cb, &c, &t->regions, err, errlen) < 0) {
            return -1;
        }
    }
    t->scans++;
    return 0;
}

void wp_stop(struct wp_tracker *t)
{
    if (t->pagemap_fd >= 0) {
        close(t->pagemap_fd);
    }
    if (t->uffd >= 0) {
        close(t->uffd);
    }
    free(t->vec);
    t->vec = NULL;
    t->uffd = t->pagemap_fd = -1;
    t->nranges = 0;
}
