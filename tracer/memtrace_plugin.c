/*
 * memtrace: a QEMU TCG plugin that records how guest physical memory changes over time, for
 * memory-deduplication research. Output: one trace file in the format of traces/FORMAT.md.
 *
 * Usage (x86-64 system emulation, 1 to 64 vCPUs, RAM backed by a shared file):
 *   qemu-system-x86_64 -accel tcg -smp 4 -m 512M \
 *     -object memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/NAME,share=on \
 *     -machine memory-backend=ram \
 *     -plugin build/tracer/libmemtrace.so,out=trace.mtr,ram=/dev/shm/NAME,ram_size=512M ...
 * Arguments: see usage_text below (also printed when an argument is rejected).
 *
 * How it works
 * - Time is retired guest instructions, summed over the vCPUs: every translation block adds its
 *   instruction count to its vCPU's counter when it starts (so a block left early by an exception
 *   counts a few instructions too many). API 3+: an inline add to a per-vCPU scoreboard entry and
 *   a conditional call that QEMU makes only when that entry passes the check interval, so no C
 *   call per block; API 1: a small call per block that adds and compares. At a check a vCPU looks
 *   whether an epoch end (or a drain of the agent's ring) is due.
 * - Epoch ends stop the world (vcpu_stop.h): the vCPU whose check finds one due stops every other
 *   running vCPU at a block boundary, does the epoch's work below, and lets them go, so the
 *   epoch's records describe the memory of one instant. Halted vCPUs are not waited for.
 * - pages mode: at each epoch end the frames written during the epoch are found (see
 *   wp_track.h: userfaultfd WP-async + PAGEMAP_SCAN over QEMU's own mapping of the RAM file; or,
 *   on old host kernels, a per-store callback that marks frames in a bitmap), hashed with
 *   xxh3_128 from the plugin's read-only mapping of the RAM file, and a PAGE record is written
 *   for each frame whose hash changed.
 * - writes mode: additionally a per-store callback records each store, with its value read
 *   back from the RAM file (QEMU stores before it calls; see vcpu_store()), in its vCPU's buffer, which goes to the trace when full and at every stop, after a
 *   VCPU record (FORMAT.md); at each epoch end an UNSEEN record per 8-byte word that changed
 *   without a store record (found by comparing the written frames with a shadow of RAM that
 *   the records update in trace order; see reconcile_frame()).
 * - The guest agent's mailbox (mailbox.h) is drained at every epoch end, and in between as soon
 *   as it is half full or the vCPU goes idle; its events become TASK/VMA/PAGECACHE/MARK/COUNTER/
 *   LOST records. Records from a drain between epoch ends get a TIME record of their own (the
 *   instruction count at the drain) with the current epoch number. A MARK PHASE is preceded by
 *   the epoch's changes so far (as MARK STOP is), so a phase starts with the memory state of
 *   that instant.
 * - MAP records: for every live address space (the mm and pgd of TASK events) the user half of
 *   its page tables is walked in the RAM file (pt_walk.h) when one of its page-table frames was
 *   written in the epoch, and the differences to the previous walk are written.
 * - Traced region: with start=marker nothing is written until the agent's MARK START (before it
 *   the mailbox is still drained and the latest state dump kept); start=now starts at the first
 *   instruction. Every start writes a complete state, see emit_state().
 *
 * State brackets (MARK STATE_BEGIN(reset) ... STATE_END)
 *   The tracer writes a bracket at every start of the traced region and whenever the agent
 *   finishes a state dump while tracing. Each holds, in this order: the agent's latest dump
 *   (TASK EXISTING, VMA EXISTING, PAGECACHE ADD... as the agent sent them, if there is one), a
 *   PAGE record for every frame of guest RAM except the mailbox, and the MAP records of every
 *   address space known from the dump. The bracket always has the reset bit, so a reader may
 *   drop all earlier state. The agent's own STATE_BEGIN/STATE_END events are not copied: their
 *   name and arg are carried by the tracer's (arg | 1). Agent events that arrive after the dump
 *   but before START are written right after STATE_END, then MARK START.
 *
 * Threads (who owns what)
 *   QEMU calls qemu_plugin_install and the atexit callback on its main thread while no vCPU
 *   runs (at exit QEMU has stopped them); vCPU init on the main thread (QEMU 7.2) or on each
 *   vCPU's thread (QEMU 10), with QEMU's global lock (BQL) held either way; everything else on
 *   the vCPU threads, concurrently under multi-threaded TCG. So:
 *   - `S` (tasks, address spaces, hashes, the written-frame list, the mailbox reader, the clock
 *     of the trace) is touched only by the thread that holds the world: the leader of a stop
 *     (vcpu_stop.h), the idle callback of the last vCPU to go idle (it holds the BQL, without
 *     which no vCPU can resume), or the main thread at install and exit. The world lock in
 *     vcpu_stop.c orders these hand-overs.
 *   - Each `struct vcpu` is written by its own thread while it runs (instruction counter, store
 *     buffer, marked frames) and read by the holder of the world while it is stopped. Counters
 *     read without stopping (to decide whether to stop) are hints.
 *   - The trace writer and the writes-mode shadow are also written by a vCPU thread whose store
 *     buffer is full: `S.trace_lock` serialises that with the holder of the world.
 *   - The written-frame bitmap is set by store callbacks (callback tracking) with atomic ORs.
 *   The trace writer's own thread shares only trace_writer.c's locked queue.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <qemu-plugin.h>
#include <xxhash.h>

#include "json_min.h"
#include "mailbox.h"
#include "pt_walk.h"
#include "ram_layout.h"
#include "trace_writer.h"
#include "vcpu_stop.h"
#include "wp_track.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define PLUGIN_VERSION "0.1.0"
#define PAGE_SHIFT 12
#define PAGE_SIZE 4096u
#define MAX_RAM (64ull << 30)         /* frames of RAM: 16 bytes of hashes each */
#define DEFAULT_MAILBOX 0x1f000000ull /* PROTOCOL.md defaults */
#define DEFAULT_MAILBOX_SIZE (1ull << 20)
#define MAX_CHECK_INTERVAL 1000000ull /* look at the mailbox at least this often (all vCPUs) */
#define MIN_CHECK_INTERVAL 10000ull
#define STOP_TIMEOUT_NS 20000000ull   /* a stop gives way to QEMU's exclusive sections after this */
#define STOP_RETRY_NS 2000000ull      /* ... and is tried again no sooner than this */
#define WBUF_RECORDS 4096u            /* writes mode: store records buffered per vCPU */
#define PENDING_CAP (64u << 20)       /* bytes of agent events kept while not tracing */
#define MAX_MAPS_PER_MM (1u << 24)

/* API 3 and later (QEMU 9.0+) replaced the global inline counters by per-vCPU scoreboards. */
#ifdef qemu_plugin_scoreboard_u64
#define HAVE_SCOREBOARD 1
#else
#define HAVE_SCOREBOARD 0
#endif
/* API 3+: added to a vCPU's check counter to make it check at its next block (a count of
 * instructions never reaches it, so the low bits stay the count). */
#define NUDGE (1ull << 40)

static const char usage_text[] =
    "memtrace plugin arguments (key=value, comma separated after the .so path):\n"
    "  out=PATH            trace file to write (required)\n"
    "  ram=PATH            the guest RAM file (mem-path of memory-backend-file, share=on; required)\n"
    "  ram_size=BYTES      guest RAM size, e.g. 512M (required, at most 64G, the RAM file's size)\n"
    "  ram_below_4g=BYTES  how much of it the machine maps below the PCI hole (the rest is at\n"
    "                      4G): the machine's max-ram-below-4g; default QEMU's pc rule (all\n"
    "                      of it below 3.5G of RAM, else 3G)\n"
    "  hwaddr=auto|offset|gpa  what QEMU's qemu_plugin_hwaddr_phys_addr returns for RAM: the\n"
    "                      RAM offset (QEMU 7.2, plugin API 1) or the guest physical address\n"
    "                      (plugin API 2 and later); auto (default) goes by the running API\n"
    "  mode=pages|writes   PAGE records per epoch (default), or also a WRITE record per store\n"
    "  epoch=N             epoch length in guest instructions (default 10000000)\n"
    "  mailbox=PHYS|none   guest physical address of the agent mailbox (default 0x1f000000)\n"
    "  mailbox_size=BYTES  mailbox size (default 1M)\n"
    "  track=auto|pagemap|callbacks  how written frames are found (default auto: pagemap if\n"
    "                      the host kernel supports it, else store callbacks)\n"
    "  header=PATH         JSON object merged into the trace header (command, guest_image, ...)\n"
    "  start=marker|now    start at the agent's MARK START (default) or at once\n"
    "  stats=PATH          write run statistics as JSON at exit\n"
    "  chunk=BYTES zstd=LEVEL queue=N   writer tuning (defaults 4M; zstd 3 in pages mode, 1 in\n"
    "                      writes mode, where level 3 cannot keep up with one core; queue 16)\n"
    "  probe=on            check that QEMU loads this build with these -smp settings, print\n"
    "                      one line and refuse to install (trace-record asks before it boots)\n";

enum track_kind { TRACK_AUTO, TRACK_PAGEMAP, TRACK_CALLBACKS };
enum hwaddr_kind { HWADDR_AUTO, HWADDR_OFFSET, HWADDR_GPA };

struct config {
    char *out, *ram, *header_path, *stats_path;
    char *stop_image; /* copy of guest RAM written when tracing stops (for --verify) */
    uint64_t ram_size;
    uint64_t ram_below_4g; /* 0: QEMU's default rule */
    enum hwaddr_kind hwaddr;
    bool writes_mode;
    uint64_t epoch;
    bool mailbox_on;
    uint64_t mailbox_phys, mailbox_size;
    enum track_kind track;
    bool start_now;
    uint64_t chunk_bytes;
    int zstd_level;
    unsigned queue_depth;
    bool probe;
};

/* A task known from agent events. */
struct task_info {
    uint64_t mm, pgd;
    uint32_t tgid, ppid;
};

/* An address space: the tasks using it and its last page-table walk. */
struct mm_info {
    uint64_t mm, pgd;
    unsigned refs;
    bool need_walk;
    struct pt_walk walk;
};

/* Agent events kept while not tracing or inside a dump: packed struct mb_event + name. */
struct evbuf {
    GByteArray *bytes;
    uint64_t count;
};

/* Synthetic event type for lost counts kept in an evbuf. */
#define EV_LOST 0xff01

/*
 * One vCPU. Written by its own thread while it runs guest code; read (and the buffers emptied)
 * by the holder of the world while it is stopped (see the file comment).
 */
struct vcpu {
    uint64_t icount;       /* API 1: instructions retired (added by the per-block call) */
    uint64_t next_check;   /* API 1: icount of the next check */
    uint64_t total;        /* API 3+: instructions counted at this vCPU's checks so far */
    bool known;            /* initialised (QEMU has its scoreboard entry) */
    struct tw_rec_write *wbuf; /* writes mode: store records not yet in the trace */
    unsigned wlen;
    GArray *marked;        /* callback tracking: frames this vCPU was first to mark (uint64) */
    uint64_t n_write_records;
} __attribute__((aligned(64)));


/*
 * The agent's events drive two small state machines (on_agent_event).
 *
 * The traced region, opened by the agent's MARK START (or start=now) and closed by its MARK STOP:
 *
 *   REGION_BEFORE --START--> REGION_ACTIVE --STOP--> REGION_STOPPING --drain ends--> REGION_AFTER
 *                                  ^                                                     |
 *                                  +-----------------------START-------------------------+
 *
 * REGION_STOPPING: STOP was seen in the current drain; the region ends when the drain does,
 * after the events that follow STOP in the ring (finish_stop). Outside the region (BEFORE,
 * AFTER) events wait in `pending` until a START applies them.
 *
 * The agent's state dump, bracketed by MARK STATE_BEGIN and STATE_END:
 *
 *   DUMP_NONE --STATE_BEGIN--> DUMP_OPEN --STATE_END--> DUMP_NONE (in the region: written at once)
 *                                                  \--> DUMP_HELD (outside: kept for the next START)
 */
enum region { REGION_BEFORE, REGION_ACTIVE, REGION_STOPPING, REGION_AFTER };
enum dump { DUMP_NONE, DUMP_OPEN, DUMP_HELD };

/*
 * All plugin state. Owned by whichever single thread runs plugin code (see the file comment).
 */
static struct {
    struct config cfg;
    qemu_plugin_id_t id;
    bool use_pagemap;     /* written frames from PAGEMAP_SCAN, else from store callbacks */
    bool store_cbs;       /* instrument stores */
    struct tw_writer *tw;
    GMutex trace_lock;    /* the writer and the shadow: see the file comment */

    /* vCPUs */
    unsigned max_vcpus;
    struct vcpu *vcpus;
    struct vs_world world;
    GMutex setup_lock;

    /* guest RAM */
    struct ram_layout layout; /* guest physical address -> RAM file offset (ram_layout.h) */
    bool hwaddr_is_gpa;   /* qemu_plugin_hwaddr_phys_addr gives guest physical addresses */
    bool setup_done;
    int ram_fd;
    const uint8_t *ram;   /* read-only mapping of the whole RAM file */
    uint8_t *mbox;        /* read-write mapping of the mailbox */
    uint64_t frames;
    uint64_t mb_first, mb_end; /* mailbox frames [first, end), excluded from PAGE records */
    struct wp_tracker wp;
    uint64_t *hashes;     /* last hash written per frame: lo, hi */
    uint8_t *shadow;      /* writes mode: RAM as the trace's WRITE and UNSEEN records leave it */
    uint8_t *written;     /* bitmap of frames written in the epoch */
    GArray *written_list; /* the same frames as a list (uint64) */

    /* time */
    uint64_t next_epoch, check_interval; /* next_epoch: read by vCPUs at checks (a hint) */
    uint64_t now, epoch_no;
    bool time_written;    /* TIME(now) already written */
#if HAVE_SCOREBOARD
    struct qemu_plugin_scoreboard *sb;
    qemu_plugin_u64 sb_since;  /* per vCPU: instructions since its last check (+ NUDGE) */
#endif

    /* traced region: see enum region; `active` mirrors it for the store callbacks, which
     * read it relaxed (set_region; changed only under trace_lock) */
    enum region region;
    bool active;
    bool dead;            /* fatal() closed the trace: callbacks do nothing */
    bool stop_image_saved;
    uint64_t start_icount;  /* guest instructions and host time at START, for clock_hz */
    int64_t start_host_us;

    /* agent */
    struct mb_reader mb;
    enum dump dump_state;
    struct mb_event dump_begin, dump_end;
    struct mb_event stop_ev; /* the MARK STOP of REGION_STOPPING */
    struct evbuf dump, pending;
    uint64_t pending_overflow; /* events discarded from `pending` (PENDING_CAP) */
    GHashTable *tasks;    /* pid -> struct task_info */
    GHashTable *mms;      /* mm -> struct mm_info */
    const char *last_mb_error;

    /* statistics */
    uint64_t n_epochs, n_page_records, n_pages_hashed, n_map_records, n_walks, n_events;
    uint64_t n_write_records, n_unseen_records, n_drains, n_early_drains, n_idle_drains, n_states;
    uint64_t lost_ring_full, lost_seq_gap;
    uint64_t n_pagecache_not_ram; /* PAGECACHE events naming a frame outside guest RAM */
    uint64_t scan_ns, hash_ns, walk_ns;
    uint64_t zero_lo, zero_hi;
} S;

/* ---- small helpers ------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void log_msg(const char *msg)
{
    fprintf(stderr, "%s\n", msg);
}

static void G_GNUC_PRINTF(1, 2) warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    fprintf(stderr, "memtrace: %s\n", s);
    g_free(s);
}

/*
 * Stops QEMU after an error the plugin cannot continue from: the trace gets MARK INCOMPLETE
 * with the reason and is closed (index and trailer), so the records so far stay usable; the
 * atexit callback then finds S.tw == NULL and does nothing.
 */
static void G_GNUC_NORETURN G_GNUC_PRINTF(1, 2) fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    fprintf(stderr, "memtrace: fatal: %s\n", s);
    __atomic_store_n(&S.active, false, __ATOMIC_RELAXED);
    __atomic_store_n(&S.dead, true, __ATOMIC_RELAXED);
    if (S.tw) {
        struct tw_writer *w = S.tw;
        char *err = NULL;
        S.tw = NULL;
        tw_mark(w, TW_MARK_INCOMPLETE, s, 0);
        if (tw_close(w, &err) < 0) {
            g_free(err);
        }
    }
    g_free(s);
    vs_abandon(&S.world); /* vCPUs waiting for a release must not hold up QEMU's exit */
    exit(1);
}

static inline bool in_mailbox(uint64_t frame)
{
    return frame - S.mb_first < S.mb_end - S.mb_first;
}

static inline void hash_frame(uint64_t frame, uint64_t *lo, uint64_t *hi)
{
    XXH128_hash_t h = XXH3_128bits(S.ram + (frame << PAGE_SHIFT), PAGE_SIZE);
    *lo = h.low64;
    *hi = h.high64;
}

/* Holder of the world: frame joins the epoch's written frames. */
static inline void mark_written(uint64_t frame)
{
    uint8_t bit = (uint8_t)(1u << (frame & 7));
    if (!(S.written[frame >> 3] & bit)) {
        S.written[frame >> 3] |= bit;
        g_array_append_val(S.written_list, frame);
    }
}

/* A store callback (callback tracking): the first vCPU to mark a frame lists it. */
static inline void mark_written_by(struct vcpu *c, uint64_t frame)
{
    uint8_t bit = (uint8_t)(1u << (frame & 7));
    uint8_t *b = &S.written[frame >> 3];
    if (!(__atomic_load_n(b, __ATOMIC_RELAXED) & bit) &&
        !(__atomic_fetch_or(b, bit, __ATOMIC_RELAXED) & bit)) {
        g_array_append_val(c->marked, frame);
    }
}

/* Holder of the world: the frames the vCPUs marked join the epoch's list. */
static void merge_marked(void)
{
    for (unsigned v = 0; v < S.max_vcpus; v++) {
        GArray *m = S.vcpus[v].marked;
        if (m && m->len) {
            g_array_append_vals(S.written_list, m->data, m->len);
            g_array_set_size(m, 0);
        }
    }
}

/* Writes TIME(now) once before the first record written at the current time. */
static void ensure_time(void)
{
    if (!S.time_written) {
        tw_time(S.tw, S.now, S.epoch_no);
        S.time_written = true;
    }
}

/* ---- event buffers ------------------------------------------------------------------------- */

#define EV_FIXED offsetof(struct mb_event, name)

static void evbuf_init(struct evbuf *e)
{
    e->bytes = g_byte_array_new();
    e->count = 0;
}

static void evbuf_clear(struct evbuf *e)
{
    g_byte_array_set_size(e->bytes, 0);
    e->count = 0;
}

static void evbuf_push(struct evbuf *e, const struct mb_event *ev)
{
    uint16_t n = (uint16_t)strnlen(ev->name, MB_MAX_STRING - 1);
    g_byte_array_append(e->bytes, (const guint8 *)ev, EV_FIXED);
    g_byte_array_append(e->bytes, (const guint8 *)&n, sizeof(n));
    g_byte_array_append(e->bytes, (const guint8 *)ev->name, n);
    e->count++;
}

typedef void (*ev_fn)(const struct mb_event *ev);

static void evbuf_foreach(const struct evbuf *e, ev_fn fn)
{
    struct mb_event ev;
    size_t pos = 0;
    while (pos < e->bytes->len) {
        uint16_t n;
        memcpy(&ev, e->bytes->data + pos, EV_FIXED);
        memcpy(&n, e->bytes->data + pos + EV_FIXED, sizeof(n));
        memcpy(ev.name, e->bytes->data + pos + EV_FIXED + sizeof(n), n);
        ev.name[n] = 0;
        pos += EV_FIXED + sizeof(n) + n;
        fn(&ev);
    }
}

/* ---- address spaces and MAP records -------------------------------------------------------- */

static void emit_map_cb(void *ctx, uint64_t vpn, uint64_t frame, uint64_t flags)
{
    struct mm_info *m = ctx;
    tw_map(S.tw, m->mm, vpn, frame, flags);
    S.n_map_records++;
}

static void mm_free(gpointer p)
{
    struct mm_info *m = p;
    pt_walk_free(&m->walk);
    g_free(m);
}

static void mm_ref(uint64_t mm, uint64_t pgd)
{
    if (!mm) {
        return;
    }
    struct mm_info *m = g_hash_table_lookup(S.mms, &mm);
    if (!m) {
        m = g_new0(struct mm_info, 1);
        m->mm = mm;
        pt_walk_init(&m->walk);
        g_hash_table_insert(S.mms, &m->mm, m);
        m->pgd = pgd;
        m->need_walk = true;
    } else if (pgd && pgd != m->pgd) {
        /* a new address space at the address of a freed mm_struct whose exit we missed */
        m->pgd = pgd;
        m->need_walk = true;
    }
    m->refs++;
}

static void mm_unref(uint64_t mm)
{
    if (!mm) {
        return;
    }
    struct mm_info *m = g_hash_table_lookup(S.mms, &mm);
    if (!m) {
        return;
    }
    if (--m->refs == 0) {
        /* the address space is gone: say so for every page it mapped */
        pt_diff(&m->walk, NULL, emit_map_cb, m);
        g_hash_table_remove(S.mms, &mm);
    }
}

/* Records that task pid now uses address space mm (0: none). */
static void task_set(uint32_t pid, uint32_t tgid, uint32_t ppid, uint64_t mm, uint64_t pgd)
{
    struct task_info *t = g_hash_table_lookup(S.tasks, GUINT_TO_POINTER(pid));
    if (!t) {
        t = g_new0(struct task_info, 1);
        g_hash_table_insert(S.tasks, GUINT_TO_POINTER(pid), t);
        mm_ref(mm, pgd);
    } else if (t->mm != mm) {
        mm_unref(t->mm);
        mm_ref(mm, pgd);
    } else if (mm && pgd && pgd != t->pgd) {
        /* same mm value, other page tables: a reused mm_struct address (missed exit) */
        struct mm_info *m = g_hash_table_lookup(S.mms, &mm);
        if (m) {
            m->pgd = pgd;
            m->need_walk = true;
        }
    }
    t->mm = mm;
    t->pgd = pgd;
    t->tgid = tgid;
    if (ppid) {
        t->ppid = ppid;
    }
}

static void task_exit(uint32_t pid)
{
    struct task_info *t = g_hash_table_lookup(S.tasks, GUINT_TO_POINTER(pid));
    if (t) {
        mm_unref(t->mm);
        g_hash_table_remove(S.tasks, GUINT_TO_POINTER(pid));
    }
}

/* Forgets every task and address space without writing anything (a reset bracket follows). */
static void spaces_reset(void)
{
    g_hash_table_remove_all(S.tasks);
    g_hash_table_remove_all(S.mms);
}

/*
 * Re-walks the address spaces that are new, were asked for, or had a page-table frame written
 * in the epoch (all of them with `all`) and writes the differences as MAP records.
 */
static void walk_spaces(bool all)
{
    uint64_t t0 = now_ns();
    GHashTableIter it;
    gpointer key, value;
    struct pt_walk fresh;
    pt_walk_init(&fresh);
    g_hash_table_iter_init(&it, S.mms);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        struct mm_info *m = value;
        bool need = all || m->need_walk || !S.use_pagemap;
        for (size_t i = 0; !need && i < m->walk.ntables; i++) {
            uint64_t f = m->walk.tables[i];
            need = f < S.frames && (S.written[f >> 3] & (1u << (f & 7)));
        }
        if (!need) {
            continue;
        }
        if (pt_walk_user(S.ram, &S.layout, m->pgd, MAX_MAPS_PER_MM, &fresh) < 0) {
            warn("address space 0x%" PRIx64 ": page-table root 0x%" PRIx64
                 " is outside guest RAM", m->mm, m->pgd);
        }
        if (fresh.truncated) {
            warn("address space 0x%" PRIx64 ": more than %u mappings, rest ignored", m->mm,
                 MAX_MAPS_PER_MM);
        }
        pt_diff(&m->walk, &fresh, emit_map_cb, m);
        struct pt_walk tmp = m->walk;
        m->walk = fresh;
        fresh = tmp;
        m->need_walk = false;
        S.n_walks++;
    }
    pt_walk_free(&fresh);
    S.walk_ns += now_ns() - t0;
}

/* ---- written frames and PAGE records ------------------------------------------------------- */

static void written_range_cb(void *ctx, uint64_t start, uint64_t end)
{
    (void)ctx;
    for (uint64_t f = start >> PAGE_SHIFT; f < (end + PAGE_SIZE - 1) >> PAGE_SHIFT; f++) {
        if (f < S.frames) {
            mark_written(f);
        }
    }
}

/* Adds the frames written since the last call to S.written / S.written_list. */
static void collect_written(void)
{
    if (S.use_pagemap) {
        uint64_t t0 = now_ns();
        char err[256];
        if (wp_collect(&S.wp, written_range_cb, NULL, err, sizeof(err)) < 0) {
            fatal("%s", err);
        }
        S.scan_ns += now_ns() - t0;
    } else {
        merge_marked();
        /* Store callbacks miss the accessed/dirty bits that QEMU's page walker sets in page
         * tables: look at every known page-table frame too. Kernel page tables and DMA remain
         * invisible in this mode. */
        GHashTableIter it;
        gpointer key, value;
        g_hash_table_iter_init(&it, S.mms);
        while (g_hash_table_iter_next(&it, &key, &value)) {
            struct mm_info *m = value;
            for (size_t i = 0; i < m->walk.ntables; i++) {
                if (m->walk.tables[i] < S.frames) {
                    mark_written(m->walk.tables[i]);
                }
            }
        }
    }
}

/*
 * Writes mode: UNSEEN records for the 8-byte words of `frame` that differ from the shadow, which
 * holds what the WRITE records so far put there. Plugins are not called for stores the CPU makes
 * outside an instruction's own accesses: the interrupt and exception frames x86 pushes on a
 * kernel stack (seen in our tests: a timer interrupt in the idle loop), the accessed/dirty bits
 * QEMU's page walker sets, and device DMA. Without these records a replay of the WRITE stream
 * drifts from the guest's memory.
 */
static void reconcile_frame(uint64_t frame)
{
    const uint64_t *ram = (const uint64_t *)(S.ram + (frame << PAGE_SHIFT));
    uint64_t *shadow = (uint64_t *)(S.shadow + (frame << PAGE_SHIFT));
    if (memcmp(ram, shadow, PAGE_SIZE) == 0) {
        return;
    }
    for (unsigned i = 0; i < PAGE_SIZE / 8; i++) {
        uint64_t v = ram[i];
        if (v != shadow[i]) {
            shadow[i] = v;
            tw_unseen(S.tw, (frame << PAGE_SHIFT) + 8 * i, 8, v);
            S.n_unseen_records++;
        }
    }
}

/* Writes mode: UNSEEN records for the collected frames (they stay collected for their PAGE). */
static void reconcile_written(void)
{
    GArray *l = S.written_list;
    for (guint i = 0; i < l->len; i++) {
        uint64_t f = g_array_index(l, uint64_t, i);
        if (!in_mailbox(f)) {
            reconcile_frame(f);
        }
    }
}

/* PAGE records for the collected frames whose content changed (UNSEEN before them in writes
 * mode, so that the epoch's records end with the bytes the PAGE hashes describe). */
static void emit_changed_pages(void)
{
    uint64_t t0 = now_ns();
    GArray *l = S.written_list;
    for (guint i = 0; i < l->len; i++) {
        uint64_t f = g_array_index(l, uint64_t, i);
        if (in_mailbox(f)) {
            continue;
        }
        if (S.cfg.writes_mode) {
            reconcile_frame(f);
        }
        uint64_t lo, hi;
        hash_frame(f, &lo, &hi);
        S.n_pages_hashed++;
        if (lo != S.hashes[2 * f] || hi != S.hashes[2 * f + 1]) {
            S.hashes[2 * f] = lo;
            S.hashes[2 * f + 1] = hi;
            tw_page(S.tw, f, lo, hi);
            S.n_page_records++;
        }
    }
    S.hash_ns += now_ns() - t0;
}

static void clear_written(void)
{
    merge_marked(); /* their bits are set too */
    GArray *l = S.written_list;
    for (guint i = 0; i < l->len; i++) {
        uint64_t f = g_array_index(l, uint64_t, i);
        S.written[f >> 3] = 0;
    }
    g_array_set_size(l, 0);
}

/* PAGE records of this epoch, then MAP records of the address spaces whose tables changed. */
static void flush_epoch_changes(void)
{
    ensure_time();
    emit_changed_pages();
    walk_spaces(false);
    clear_written();
}

/*
 * A PAGE record for every frame (holes in the RAM file are zero pages, not read). In writes mode
 * the shadow takes the same contents: data frames are copied, holes are dropped (they read back
 * as zeros without taking memory).
 */
static void emit_all_pages(void)
{
    uint64_t t0 = now_ns();
    off_t off = 0, size = (off_t)S.cfg.ram_size;
    while (off < size) {
        off_t data = lseek(S.ram_fd, off, SEEK_DATA);
        off_t hole;
        if (data < 0 && errno != ENXIO) {
            data = off;  /* no SEEK_DATA on this file system: read everything */
            hole = size;
        } else {
            if (data < 0 || data > size) {
                data = size; /* ENXIO: no data after off */
            }
            hole = data < size ? lseek(S.ram_fd, data, SEEK_HOLE) : size;
            if (hole < 0 || hole > size) {
                hole = size;
            }
        }
        /* align: a partially filled page counts as data */
        uint64_t hole_first = (uint64_t)off >> PAGE_SHIFT;
        uint64_t data_first = (uint64_t)data >> PAGE_SHIFT;
        uint64_t data_end = ((uint64_t)hole + PAGE_SIZE - 1) >> PAGE_SHIFT;
        if (S.cfg.writes_mode && data_first > hole_first) {
            madvise(S.shadow + (hole_first << PAGE_SHIFT), (data_first - hole_first) << PAGE_SHIFT,
                    MADV_DONTNEED);
        }
        for (uint64_t f = hole_first; f < data_first; f++) {
            if (!in_mailbox(f)) {
                S.hashes[2 * f] = S.zero_lo;
                S.hashes[2 * f + 1] = S.zero_hi;
                tw_page(S.tw, f, S.zero_lo, S.zero_hi);
                S.n_page_records++;
            }
        }
        for (uint64_t f = data_first; f < data_end && f < S.frames; f++) {
            if (!in_mailbox(f)) {
                uint64_t lo, hi;
                hash_frame(f, &lo, &hi);
                if (S.cfg.writes_mode) {
                    memcpy(S.shadow + (f << PAGE_SHIFT), S.ram + (f << PAGE_SHIFT), PAGE_SIZE);
                }
                S.n_pages_hashed++;
                S.hashes[2 * f] = lo;
                S.hashes[2 * f + 1] = hi;
                tw_page(S.tw, f, lo, hi);
                S.n_page_records++;
            }
        }
        off_t next = (off_t)(data_end << PAGE_SHIFT);
        off = next > off ? next : off + PAGE_SIZE; /* always make progress */
    }
    S.hash_ns += now_ns() - t0;
}

/* ---- agent events -> records --------------------------------------------------------------- */

/* Writes the record for one agent event (not START/STOP/STATE_*) and updates task state. */
static void apply_event(const struct mb_event *ev)
{
    struct task_info *t;
    S.n_events++;
    switch (ev->type) {
    case MB_TASK_NEW:
    case MB_TASK_EXISTING:
        tw_task(S.tw, ev->type == MB_TASK_NEW ? TW_TASK_NEW : TW_TASK_EXISTING, ev->pid,
                ev->tgid, ev->ppid, ev->mm, ev->pgd, ev->name, (uint32_t)ev->clone_flags);
        task_set(ev->pid, ev->tgid, ev->ppid, ev->mm, ev->pgd);
        break;
    case MB_TASK_EXEC:
        t = g_hash_table_lookup(S.tasks, GUINT_TO_POINTER(ev->pid));
        tw_task(S.tw, TW_TASK_EXEC, ev->pid, ev->tgid, t ? t->ppid : 0, ev->mm, ev->pgd,
                ev->name, 0);
        task_set(ev->pid, ev->tgid, 0, ev->mm, ev->pgd);
        break;
    case MB_TASK_EXIT:
        t = g_hash_table_lookup(S.tasks, GUINT_TO_POINTER(ev->pid));
        tw_task(S.tw, TW_TASK_EXIT, ev->pid, ev->tgid, t ? t->ppid : 0, t ? t->mm : 0,
                t ? t->pgd : 0, NULL, 0);
        task_exit(ev->pid);
        break;
    case MB_TASK_COMM:
        t = g_hash_table_lookup(S.tasks, GUINT_TO_POINTER(ev->pid));
        tw_task(S.tw, TW_TASK_COMM, ev->pid, ev->tgid, t ? t->ppid : 0, t ? t->mm : 0,
                t ? t->pgd : 0, ev->name, 0);
        break;
    case MB_VMA:
        tw_vma(S.tw, ev->op, ev->pid, ev->mm, ev->start, ev->end, ev->vm_flags, ev->pgoff,
               ev->ino, ev->dev, ev->name);
        break;
    case MB_PAGECACHE: {
        /* the agent reports guest page frame numbers; the trace has RAM frames */
        uint64_t off = ram_offset(&S.layout, ev->frame << PAGE_SHIFT);
        if (off == RAM_NONE) {
            S.n_pagecache_not_ram++;
            break;
        }
        tw_pagecache(S.tw, ev->op, ev->dev, ev->ino, ev->index, off >> PAGE_SHIFT);
        break;
    }
    case MB_MARK:
        tw_mark(S.tw, ev->op, ev->name, ev->arg);
        break;
    case MB_COUNTER:
        tw_counter(S.tw, ev->name, ev->value);
        break;
    case EV_LOST:
        tw_lost(S.tw, ev->op, ev->value);
        break;
    default:
        S.n_events--;
        break;
    }
}

/*
 * A complete state: MARK STATE_BEGIN(reset), the agent's dump (if any), PAGE for every frame,
 * MAP for every address space, MARK STATE_END. See the file comment.
 */
static void emit_state(const struct evbuf *dump, const struct mb_event *begin,
                       const struct mb_event *end)
{
    ensure_time();
    tw_mark(S.tw, TW_MARK_STATE_BEGIN, begin ? begin->name : NULL, (begin ? begin->arg : 0) | 1);
    spaces_reset();
    if (dump) {
        evbuf_foreach(dump, apply_event);
    }
    emit_all_pages();
    walk_spaces(true);
    tw_mark(S.tw, TW_MARK_STATE_END, end ? end->name : NULL, end ? end->arg : 0);
    S.n_states++;
}

static void rearm_tracking(void)
{
    if (S.use_pagemap) {
        char err[256];
        if (wp_rearm(&S.wp, err, sizeof(err)) < 0) {
            fatal("%s", err);
        }
    }
    clear_written();
}

/* Starts the traced region (at the agent's MARK START, or at once with start=now). */
/*
 * Ends of the traced region: the guest's RAM at that instant is what the trace's final state must
 * equal, so trace-record --verify asks for a copy of it (the guest keeps running afterwards).
 * Also records how fast the guest ran, so analyses can turn instructions into seconds.
 */
static void save_stop_image(void)
{
    if (!S.cfg.stop_image || S.stop_image_saved) {
        return;
    }
    S.stop_image_saved = true;
    /* guest RAM is private: owner-only whatever the umask, never through a planted symlink, and
     * a name that exists already is someone else's (trace-record picks a fresh one) */
    int fd = open(S.cfg.stop_image, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        warn("stop_image=%s: %s", S.cfg.stop_image, strerror(errno));
        return;
    }
    /* sparse: only the RAM file's data ranges are copied (holes read back as zeros), so a
     * large guest that touched little costs little disk */
    const off_t size = (off_t)S.cfg.ram_size;
    if (ftruncate(fd, size) < 0) {
        warn("stop_image=%s: %s", S.cfg.stop_image, strerror(errno));
        close(fd);
        return;
    }
    off_t off = 0;
    while (off < size) {
        off_t data = lseek(S.ram_fd, off, SEEK_DATA);
        off_t hole;
        if (data < 0 && errno != ENXIO) {
            data = off; /* no SEEK_DATA here: copy everything */
            hole = size;
        } else {
            if (data < 0 || data > size) {
                break; /* ENXIO: no data after off */
            }
            hole = lseek(S.ram_fd, data, SEEK_HOLE);
            if (hole < 0 || hole > size) {
                hole = size;
            }
        }
        while (data < hole) {
            ssize_t n = pwrite(fd, S.ram + data, (size_t)(hole - data), data);
            if (n <= 0) {
                warn("stop_image=%s: %s", S.cfg.stop_image,
                     n < 0 ? strerror(errno) : "short write");
                close(fd);
                return;
            }
            data += n;
        }
        off = hole > off ? hole : off + PAGE_SIZE;
    }
    close(fd);
}

static void emit_clock_rate(void)
{
    int64_t us = g_get_monotonic_time() - S.start_host_us;
    if (us > 0 && S.now > S.start_icount) {
        tw_counter(S.tw, "tracer.clock_hz",
                   (uint64_t)((double)(S.now - S.start_icount) * 1e6 / (double)us));
    }
}

/* Moves the traced region on; `active` follows for the store callbacks (true in ACTIVE and
 * STOPPING: the region's stores count until it ends). */
static void set_region(enum region r)
{
    __atomic_store_n(&S.region, r, __ATOMIC_RELAXED);
    __atomic_store_n(&S.active, r == REGION_ACTIVE || r == REGION_STOPPING, __ATOMIC_RELAXED);
}

static void activate(const char *name, uint64_t arg)
{
    rearm_tracking();
    set_region(REGION_ACTIVE);
    S.start_icount = S.now;
    S.start_host_us = g_get_monotonic_time();
    ensure_time();
    if (S.dump_state == DUMP_HELD) {
        emit_state(&S.dump, &S.dump_begin, &S.dump_end);
        S.dump_state = DUMP_NONE;
        evbuf_clear(&S.dump);
    } else {
        emit_state(NULL, NULL, NULL);
        if (S.dump_state == DUMP_NONE) {
            evbuf_clear(&S.dump);
        }
    }
    if (S.pending_overflow) {
        tw_lost(S.tw, TW_LOST_TRACER_BUFFER, S.pending_overflow);
        S.pending_overflow = 0;
    }
    evbuf_foreach(&S.pending, apply_event);
    evbuf_clear(&S.pending);
    walk_spaces(false);
    tw_mark(S.tw, TW_MARK_START, name, arg);
}

/* Ends the traced region: this epoch's changes so far, then MARK STOP. */
static void deactivate(const char *name, uint64_t arg)
{
    ensure_time();
    collect_written();
    flush_epoch_changes();
    emit_clock_rate();
    tw_mark(S.tw, TW_MARK_STOP, name, arg);
    save_stop_image();
    set_region(REGION_AFTER);
    evbuf_clear(&S.pending);
    if (S.dump_state == DUMP_HELD) {
        S.dump_state = DUMP_NONE;
    }
}

static void keep_pending(const struct mb_event *ev)
{
    if (ev->type == MB_MARK && (ev->op == TW_MARK_STOP || ev->op == TW_MARK_STATE_END)) {
        return; /* meaningless outside the traced region / outside a dump */
    }
    if (S.pending.bytes->len > PENDING_CAP) {
        /* only matters if no state dump follows before START (the agent always sends one) */
        S.pending_overflow += S.pending.count;
        evbuf_clear(&S.pending);
    }
    evbuf_push(&S.pending, ev);
}

/*
 * A drain reads the ring up to where the agent had written at that instant, and the RAM the
 * tracer hashes and walks is RAM at that instant too. So the traced region ends when the drain
 * that saw MARK STOP ends, with the events that followed STOP in the ring applied first: they
 * happened before the instant the state is taken at (a shell that wrote STOP and then exited
 * has its EXIT recorded; without it the walk saw its page tables torn down while the trace
 * still had it alive).
 */
static void finish_stop(void)
{
    if (S.region == REGION_STOPPING) {
        deactivate(S.stop_ev.name, S.stop_ev.arg);
    }
}

static void on_agent_event(void *ctx, const struct mb_event *ev)
{
    (void)ctx;
    bool mark = ev->type == MB_MARK;
    if (S.region == REGION_STOPPING && mark &&
        (ev->op == TW_MARK_START || ev->op == TW_MARK_STATE_BEGIN)) {
        finish_stop(); /* a new region or dump begins after the old region's end */
    }
    if (mark && ev->op == TW_MARK_STATE_BEGIN) {
        if (S.dump_state == DUMP_OPEN) {
            warn("agent state dump restarted before it ended");
        }
        evbuf_clear(&S.dump);
        S.dump_state = DUMP_OPEN;
        S.dump_begin = *ev;
        if (!S.active) {
            evbuf_clear(&S.pending); /* the dump supersedes everything before it */
            S.pending_overflow = 0;
        }
        return;
    }
    if (S.dump_state == DUMP_OPEN &&
        !(mark && (ev->op == TW_MARK_STATE_END || ev->op == TW_MARK_START))) {
        evbuf_push(&S.dump, ev);
        return;
    }
    if (S.dump_state == DUMP_OPEN) {
        if (ev->op == TW_MARK_START) {
            warn("agent MARK START inside a state dump; using the dump as it is");
        }
        S.dump_state = DUMP_NONE;
        S.dump_end = *ev;
        if (ev->op == TW_MARK_START) {
            S.dump_end.op = TW_MARK_STATE_END;
            S.dump_end.name[0] = 0;
        }
        if (S.active) {
            ensure_time();
            if (S.cfg.writes_mode) {
                /* the bracket reloads the shadow: first the changes so far the stores missed */
                collect_written();
                reconcile_written();
            }
            emit_state(&S.dump, &S.dump_begin, &S.dump_end);
            evbuf_clear(&S.dump);
        } else {
            S.dump_state = DUMP_HELD;
        }
        if (ev->op != TW_MARK_START) {
            return;
        }
    }
    if (!S.active) {
        if (mark && ev->op == TW_MARK_START) {
            activate(ev->name, ev->arg);
        } else {
            keep_pending(ev);
        }
        return;
    }
    ensure_time();
    if (mark && ev->op == TW_MARK_STOP) {
        if (S.region == REGION_ACTIVE) {
            S.region = REGION_STOPPING;
            S.stop_ev = *ev;
        }
        return;
    }
    if (mark && ev->op == TW_MARK_STATE_END) {
        warn("agent STATE_END without STATE_BEGIN ignored");
        return;
    }
    if (mark && ev->op == TW_MARK_PHASE) {
        /* a phase starts with memory as it is: the epoch's changes so far (PAGE, and MAP of
         * the page tables written) go before the mark, not up to an epoch later */
        collect_written();
        flush_epoch_changes();
    }
    apply_event(ev);
}

static void drain_mailbox(void)
{
    if (!S.cfg.mailbox_on) {
        return;
    }
    struct mb_lost lost = { 0, 0 };
    uint64_t bad = S.mb.bad;
    long n = mb_drain(&S.mb, on_agent_event, NULL, &lost);
    if (n < 0) {
        return;
    }
    S.n_drains++;
    if (S.mb.bad != bad && S.mb.last_error != S.last_mb_error) {
        warn("agent mailbox: %s", S.mb.last_error);
        S.last_mb_error = S.mb.last_error;
    }
    S.lost_ring_full += lost.ring_full;
    S.lost_seq_gap += lost.seq_gap;
    /* lost counts apply where the drain ends: after the events it decoded */
    struct mb_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.type = EV_LOST;
    for (int i = 0; i < 2; i++) {
        ev.op = i == 0 ? TW_LOST_AGENT_RING_FULL : TW_LOST_AGENT_SEQ_GAP;
        ev.value = i == 0 ? lost.ring_full : lost.seq_gap;
        if (!ev.value) {
            continue;
        }
        if (S.active) {
            ensure_time();
            apply_event(&ev);
        } else {
            keep_pending(&ev);
        }
    }
    finish_stop();
}

/* ---- the clock ----------------------------------------------------------------------------- */

/* Instructions vCPU v has retired (exact while it is stopped or idle, a hint otherwise). */
static uint64_t vcpu_icount(unsigned v)
{
    const struct vcpu *c = &S.vcpus[v];
    if (!c->known) {
        return 0;
    }
#if HAVE_SCOREBOARD
    uint64_t since = qemu_plugin_u64_get(S.sb_since, v) & (NUDGE - 1);
    return __atomic_load_n(&c->total, __ATOMIC_RELAXED) + since;
#else
    return __atomic_load_n(&c->icount, __ATOMIC_RELAXED);
#endif
}

/* The trace's clock: instructions retired by all vCPUs (exact when the world is held). */
static uint64_t clock_now(void)
{
    uint64_t sum = 0;
    for (unsigned v = 0; v < S.max_vcpus; v++) {
        sum += vcpu_icount(v);
    }
    return sum;
}

/* ---- writes mode: store records per vCPU --------------------------------------------------- */

/* A vCPU's buffered store records go to the trace and the shadow, in order (caller: the holder
 * of the world, or the vCPU itself, with trace_lock either way). */
static void write_vcpu_stores(unsigned v)
{
    struct vcpu *c = &S.vcpus[v];
    for (unsigned i = 0; i < c->wlen; i++) {
        const struct tw_rec_write *r = &c->wbuf[i];
        uint64_t pa = r->addr & ((1ull << 56) - 1);
        unsigned n = (unsigned)(r->addr >> 56);
        memcpy(S.shadow + pa, &r->value, n);
        tw_write_vcpu(S.tw, v, pa, n, r->value);
    }
    c->n_write_records += c->wlen;
    c->wlen = 0;
}

/* Holder of the world: every vCPU's buffered stores, before any record of the stop. */
static void write_all_stores(void)
{
    if (!S.cfg.writes_mode) {
        return;
    }
    for (unsigned v = 0; v < S.max_vcpus; v++) {
        if (S.vcpus[v].wlen) {
            write_vcpu_stores(v);
        }
    }
}

/* ---- epochs -------------------------------------------------------------------------------- */

static void epoch_end(uint64_t now)
{
    S.now = MAX(S.now, now);
    S.epoch_no++;
    S.n_epochs++;
    S.time_written = false;
    if (S.active) {
        ensure_time();
        collect_written();
    }
    drain_mailbox();
    if (S.active) {
        flush_epoch_changes();
    }
}

static bool mailbox_half_full(void)
{
    if (!S.cfg.mailbox_on) {
        return false;
    }
    uint64_t cap = mb_capacity(&S.mb);
    return cap && mb_pending_slots(&S.mb) * 2 >= cap;
}

/* Whether a check should stop the world (read while vCPUs run: hints, looked at again when
 * the world is held). */
static bool stop_due(void)
{
    if (S.cfg.start_now && __atomic_load_n(&S.region, __ATOMIC_RELAXED) == REGION_BEFORE) {
        return true;
    }
    if (clock_now() >= __atomic_load_n(&S.next_epoch, __ATOMIC_RELAXED)) {
        return true;
    }
    return mailbox_half_full();
}

/* The work of a stop, with the world held. */
static void held_work(void)
{
    g_mutex_lock(&S.trace_lock);
    if (S.dead) {
        g_mutex_unlock(&S.trace_lock);
        return;
    }
    write_all_stores(); /* stores made before this instant, before its TIME record */
    uint64_t icount = clock_now();
    if (S.region == REGION_BEFORE && S.cfg.start_now) {
        S.now = MAX(S.now, icount);
        S.time_written = false;
        activate("start=now", 0);
    }
    if (icount >= S.next_epoch) {
        epoch_end(icount);
        __atomic_store_n(&S.next_epoch, (icount / S.cfg.epoch + 1) * S.cfg.epoch,
                         __ATOMIC_RELAXED);
    } else if (mailbox_half_full()) {
        /* drain early so the agent does not drop events; records get a TIME of their own */
        S.now = MAX(S.now, icount);
        S.time_written = false;
        S.n_early_drains++;
        drain_mailbox();
    }
    g_mutex_unlock(&S.trace_lock);
}

/* A vCPU's check (at least every check_interval of its instructions, and when nudged). */
static void on_check(unsigned vcpu)
{
    if (__atomic_load_n(&S.dead, __ATOMIC_RELAXED)) {
        return;
    }
    if (vs_pending(&S.world)) {
        vs_join(&S.world, vcpu);
    }
    if (stop_due() && vs_stop(&S.world, vcpu)) {
        held_work();
        vs_release(&S.world);
    }
}

#if HAVE_SCOREBOARD
/* QEMU calls this only when the vCPU's `since` entry reached check_interval (or was nudged). */
static void vcpu_tb_check(unsigned int vcpu_index, void *udata)
{
    (void)udata;
    struct vcpu *c = &S.vcpus[vcpu_index];
    uint64_t since = qemu_plugin_u64_get(S.sb_since, vcpu_index);
    qemu_plugin_u64_set(S.sb_since, vcpu_index, 0);
    __atomic_store_n(&c->total, c->total + (since & (NUDGE - 1)), __ATOMIC_RELAXED);
    on_check(vcpu_index);
}

/* Makes a running vCPU check at its next block (called by vcpu_stop.c, world lock held). The
 * owner's non-atomic inline add may overwrite it: the leader nudges again until it comes. */
static void nudge_vcpu(void *ctx, unsigned vcpu)
{
    (void)ctx;
    if (vcpu < S.max_vcpus && S.vcpus[vcpu].known) {
        uint64_t *since = qemu_plugin_scoreboard_find(S.sb, vcpu);
        __atomic_fetch_add(since, NUDGE, __ATOMIC_RELAXED);
    }
}
#else
/* API 1: a call per block; udata is the block's instruction count. */
static void vcpu_tb_exec(unsigned int vcpu_index, void *udata)
{
    struct vcpu *c = &S.vcpus[vcpu_index];
    uint64_t n = c->icount + (uintptr_t)udata;
    __atomic_store_n(&c->icount, n, __ATOMIC_RELAXED);
    if (__builtin_expect(n < c->next_check, 1) && !vs_pending(&S.world)) {
        return;
    }
    c->next_check = n + S.check_interval;
    on_check(vcpu_index);
}

static void nudge_vcpu(void *ctx, unsigned vcpu)
{
    (void)ctx;
    (void)vcpu; /* every block looks at vs_pending() */
}
#endif

/*
 * A vCPU halted (guest idle) or was stopped by QEMU. When it is the last one running, the guest
 * is stopped (this thread holds the BQL, see vcpu_stop.h), so the agent's events are drained
 * here: a state dump waits for ring space while the guest idles, and an idle guest runs few
 * instructions. With vCPUs still running, their checks drain it.
 */
static void vcpu_idle(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if (!S.setup_done || vcpu_index >= S.max_vcpus || !vs_idle(&S.world, vcpu_index)) {
        return;
    }
    if (S.cfg.mailbox_on && mb_pending_slots(&S.mb) > 0) {
        g_mutex_lock(&S.trace_lock);
        if (!S.dead) {
            write_all_stores();
            S.now = MAX(S.now, clock_now());
            S.time_written = false;
            S.n_idle_drains++;
            drain_mailbox();
        }
        g_mutex_unlock(&S.trace_lock);
    }
}

static void vcpu_resume(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if (vcpu_index < S.max_vcpus) {
        vs_resume(&S.world, vcpu_index);
    }
}

/* ---- stores -------------------------------------------------------------------------------- */

/* One store (of at most a page's rest) by vCPU v, its bytes read back from RAM; pa: what
 * qemu_plugin_hwaddr_phys_addr said (see hwaddr= in usage_text). */
static inline void record_store(unsigned v, uint64_t pa, unsigned size)
{
    if (S.hwaddr_is_gpa) {
        pa = ram_offset(&S.layout, pa);
    }
    if (pa >= S.cfg.ram_size || in_mailbox(pa >> PAGE_SHIFT)) {
        return;
    }
    struct vcpu *c = &S.vcpus[v];
    if (!S.use_pagemap) {
        mark_written_by(c, pa >> PAGE_SHIFT);
    }
    if (S.cfg.writes_mode) {
        const uint8_t *src = S.ram + pa;
        while (size) {
            unsigned n = size > 8 ? 8 : size;
            uint64_t val = 0;
            memcpy(&val, src, n);
            if (c->wlen == WBUF_RECORDS) {
                g_mutex_lock(&S.trace_lock);
                if (!S.dead) {
                    write_vcpu_stores(v);
                }
                c->wlen = 0;
                g_mutex_unlock(&S.trace_lock);
            }
            c->wbuf[c->wlen++] = (struct tw_rec_write){ pa | ((uint64_t)n << 56), val };
            pa += n;
            src += n;
            size -= n;
        }
    }
}

static void vcpu_store(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr,
                       void *udata)
{
    (void)udata;
    /* QEMU 7.2 also calls callbacks registered for QEMU_PLUGIN_MEM_W on loads (plugin-gen.c's
     * op_rw() tests cb->rw & (rw + 1), and a load's rw + 1 is QEMU_PLUGIN_MEM_W): without this
     * test every load became a WRITE record of the value in memory */
    if (!__atomic_load_n(&S.active, __ATOMIC_RELAXED) || !qemu_plugin_mem_is_store(info)) {
        return;
    }
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
        return;
    }
    uint64_t pa = qemu_plugin_hwaddr_phys_addr(hw);
    unsigned size = 1u << qemu_plugin_mem_size_shift(info);
    /* The value is read back from RAM (QEMU stores before it calls), not taken from
     * qemu_plugin_mem_get_value (API 4): under multi-threaded TCG QEMU 10's atomic helpers
     * report a failed cmpxchg as a store of its new value, which never reached memory
     * (the single scenario on 2 vCPUs: 91,602 UNSEEN words instead of 1,281). With several
     * vCPUs the bytes read back may already be another vCPU's; the epoch's UNSEEN records set
     * them right. */
    unsigned in_page = PAGE_SIZE - (unsigned)(vaddr & (PAGE_SIZE - 1));
    if (size <= in_page) {
        record_store(vcpu_index, pa, size);
        return;
    }
    /* a store across a page boundary: the second page has its own physical address (both
     * pages are in the TLB after the store) */
    record_store(vcpu_index, pa, in_page);
    hw = qemu_plugin_get_hwaddr(info, vaddr + in_page);
    if (hw && !qemu_plugin_hwaddr_is_io(hw)) {
        record_store(vcpu_index, qemu_plugin_hwaddr_phys_addr(hw), size - in_page);
    }
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
#if HAVE_SCOREBOARD
    /* no C call per block: one inline add, and a call only when the count passes the check
     * interval (the add is registered first, so the check sees this block counted) */
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, S.sb_since,
                                                      n);
    qemu_plugin_register_vcpu_tb_exec_cond_cb(tb, vcpu_tb_check, QEMU_PLUGIN_CB_NO_REGS,
                                              QEMU_PLUGIN_COND_GE, S.sb_since, S.check_interval,
                                              NULL);
#else
    /* API 1 inline adds are not atomic and shared by every vCPU: count in the call instead */
    qemu_plugin_register_vcpu_tb_exec_cb(tb, vcpu_tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)n);
#endif
    if (S.store_cbs) {
        for (size_t i = 0; i < n; i++) {
            qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), vcpu_store,
                                             QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_W, NULL);
        }
    }
}

/* ---- setup (first vCPU init: QEMU has mapped guest RAM by then) ---------------------------- */

static void setup_ram(void)
{
    char err[512];
    struct config *c = &S.cfg;
    S.ram_fd = open(c->ram, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (S.ram_fd < 0) {
        fatal("cannot open RAM file %s: %s (is ram= the mem-path of the memory backend?)",
              c->ram, strerror(errno));
    }
    struct stat st;
    if (fstat(S.ram_fd, &st) < 0 || (uint64_t)st.st_size != c->ram_size) {
        fatal("RAM file %s is %lld bytes, ram_size=%" PRIu64 " (they must be equal)", c->ram,
              (long long)st.st_size, c->ram_size);
    }
    if (S.use_pagemap) {
        struct wp_range r[8];
        int n = wp_find_mappings(c->ram, 0, 0, r, 8, err, sizeof(err));
        if (n < 0) {
            fatal("%s", err);
        }
        if (n == 0) {
            fatal("QEMU has no shared writable mapping of %s: back guest RAM with "
                  "-object memory-backend-file,mem-path=%s,share=on -machine memory-backend=...",
                  c->ram, c->ram);
        }
        uint64_t covered = 0;
        for (int i = 0; i < n; i++) {
            covered += r[i].len;
        }
        if (covered < c->ram_size) {
            fatal("QEMU maps only %" PRIu64 " of the %" PRIu64 " bytes of %s", covered,
                  c->ram_size, c->ram);
        }
        if (wp_start(&S.wp, r, (unsigned)n, err, sizeof(err)) < 0) {
            fatal("write-protect tracking of QEMU's RAM mapping: %s", err);
        }
    }
    void *p = mmap(NULL, c->ram_size, PROT_READ, MAP_SHARED, S.ram_fd, 0);
    if (p == MAP_FAILED) {
        fatal("mmap %s: %s", c->ram, strerror(errno));
    }
    S.ram = p;
    if (c->writes_mode) {
        /* filled at START from RAM; only the frames with data take memory */
        p = mmap(NULL, c->ram_size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fatal("mmap of %" PRIu64 " bytes for the writes-mode shadow of RAM: %s", c->ram_size,
                  strerror(errno));
        }
        S.shadow = p;
    }
    if (c->mailbox_on) {
        p = mmap(NULL, c->mailbox_size, PROT_READ | PROT_WRITE, MAP_SHARED, S.ram_fd,
                 (off_t)ram_offset(&S.layout, c->mailbox_phys));
        if (p == MAP_FAILED) {
            fatal("mmap of the mailbox in %s: %s", c->ram, strerror(errno));
        }
        S.mbox = p;
        mb_init(&S.mb, S.mbox, c->mailbox_size);
    }
    S.setup_done = true;
}

/* QEMU 7.2: on the main thread at realize; QEMU 10: on the vCPU's thread before it runs guest
 * code. The BQL is held either way. */
static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if (vcpu_index >= S.max_vcpus) {
        fatal("vCPU %u: QEMU was started with at most %u", vcpu_index, S.max_vcpus);
    }
    g_mutex_lock(&S.setup_lock);
    if (!S.setup_done) {
        setup_ram();
    }
    g_mutex_unlock(&S.setup_lock);
    struct vcpu *c = &S.vcpus[vcpu_index];
#if HAVE_SCOREBOARD
    /* make the first block check at once (start=now starts before the first instruction) */
    qemu_plugin_u64_set(S.sb_since, vcpu_index, S.check_interval);
#else
    c->next_check = 0;
#endif
    if (S.cfg.writes_mode) {
        c->wbuf = g_new(struct tw_rec_write, WBUF_RECORDS);
    }
    c->marked = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    c->known = true;
    vs_vcpu_init(&S.world, vcpu_index);
}

/* ---- exit ---------------------------------------------------------------------------------- */

static void write_stats(const char *path, const struct tw_stats *ts, uint64_t icount)
{
    GString *s = g_string_new("{");
    g_string_append_printf(
        s,
        "\"instructions\": %" PRIu64 ", \"epochs\": %" PRIu64 ", \"epoch_length\": %" PRIu64
        ", \"tracking\": \"%s\", \"mode\": \"%s\", \"started\": %s"
        ", \"page_records\": %" PRIu64 ", \"pages_hashed\": %" PRIu64
        ", \"write_records\": %" PRIu64 ", \"unseen_records\": %" PRIu64
        ", \"map_records\": %" PRIu64 ", \"walks\": %" PRIu64
        ", \"agent_events\": %" PRIu64 ", \"state_brackets\": %" PRIu64
        ", \"mailbox_drains\": %" PRIu64 ", \"early_drains\": %" PRIu64
        ", \"idle_drains\": %" PRIu64
        ", \"lost_ring_full\": %" PRIu64 ", \"lost_seq_gap\": %" PRIu64
        ", \"pagecache_not_ram\": %" PRIu64
        ", \"mailbox_errors\": %" PRIu64 ", \"scan_seconds\": %.6f, \"hash_seconds\": %.6f"
        ", \"walk_seconds\": %.6f, \"chunks\": %" PRIu64 ", \"records\": %" PRIu64
        ", \"raw_bytes\": %" PRIu64 ", \"file_bytes\": %" PRIu64 ", \"writer_stalls\": %" PRIu64
        ", \"writer_stall_seconds\": %.6f, \"chunks_dropped\": %" PRIu64
        ", \"vcpus\": %u, \"stops\": %" PRIu64 ", \"stop_aborts\": %" PRIu64
        ", \"stop_gather_seconds\": %.6f, \"stop_gather_max_seconds\": %.6f"
        ", \"resume_waits\": %" PRIu64 "}\n",
        icount, S.n_epochs, S.cfg.epoch, S.use_pagemap ? "pagemap-scan" : "store-callbacks",
        S.cfg.writes_mode ? "writes" : "pages", S.region != REGION_BEFORE ? "true" : "false",
        S.n_page_records, S.n_pages_hashed, S.n_write_records, S.n_unseen_records,
        S.n_map_records, S.n_walks, S.n_events, S.n_states, S.n_drains, S.n_early_drains, S.n_idle_drains, S.lost_ring_full,
        S.lost_seq_gap, S.n_pagecache_not_ram,
        S.mb.bad, S.scan_ns / 1e9, S.hash_ns / 1e9, S.walk_ns / 1e9, ts->chunks, ts->records,
        ts->raw_bytes, ts->file_bytes, ts->stalls, ts->stall_ns / 1e9, ts->chunks_dropped,
        S.max_vcpus, S.world.stops, S.world.aborts, S.world.gather_ns / 1e9,
        S.world.max_gather_ns / 1e9, S.world.resume_waits);
    GError *gerr = NULL;
    if (!g_file_set_contents(path, s->str, (gssize)s->len, &gerr)) {
        warn("cannot write stats file: %s", gerr->message);
        g_error_free(gerr);
    }
    g_string_free(s, TRUE);
}

static void plugin_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    if (!S.tw) {
        return; /* fatal() already closed the trace */
    }
    /* every vCPU has stopped: this thread holds the world */
    uint64_t icount = S.setup_done ? clock_now() : 0;
    /* QEMU gave up before the guest ran (e.g. a missing -initrd file): stay quiet so that
     * QEMU's own error remains the last line on stderr */
    bool quiet = icount == 0;
    if (S.setup_done) {
        write_all_stores();
        epoch_end(icount);
        if (S.active) {
            emit_clock_rate();
            save_stop_image();
        }
    }
    if (S.dump_state == DUMP_OPEN) {
        warn("the agent's last state dump never ended; it was not written");
    }
    if (S.region == REGION_BEFORE && !quiet) {
        warn("no MARK START from the guest agent: the trace holds no records "
             "(use start=now to trace from the first instruction)");
    }
    for (unsigned v = 0; v < S.max_vcpus; v++) {
        S.n_write_records += S.vcpus[v].n_write_records;
    }
    tw_flush(S.tw);
    struct tw_stats ts = tw_get_stats(S.tw);
    char *err = NULL;
    if (tw_close(S.tw, &err) < 0) {
        warn("trace %s is incomplete: %s", S.cfg.out, err);
        g_free(err);
    }
    S.tw = NULL;
    /* file_bytes after close includes the index and trailer */
    struct stat st;
    if (stat(S.cfg.out, &st) == 0) {
        ts.file_bytes = (uint64_t)st.st_size;
    }
    if (!quiet) {
        warn("%" PRIu64 " instructions, %" PRIu64 " epochs, %" PRIu64 " PAGE, %" PRIu64
             " WRITE, %" PRIu64 " UNSEEN, %" PRIu64 " MAP records, %" PRIu64
             " agent events; trace %s: %" PRIu64 " bytes (%" PRIu64 " raw), writer waited %"
             PRIu64 " times",
             icount, S.n_epochs, S.n_page_records, S.n_write_records, S.n_unseen_records,
             S.n_map_records,
             S.n_events, S.cfg.out, ts.file_bytes, ts.raw_bytes, ts.stalls);
    }
    if (S.cfg.stats_path) {
        write_stats(S.cfg.stats_path, &ts, icount);
    }
    if (S.use_pagemap && S.setup_done) {
        wp_stop(&S.wp);
    }
}

/* ---- arguments and header ------------------------------------------------------------------ */

static bool parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (!*s || *s == '-') {
        return false;
    }
    uint64_t v = g_ascii_strtoull(s, &end, 0);
    if (errno) {
        return false;
    }
    uint64_t mul = 1;
    switch (*end) {
    case 0:
        break;
    case 'k': case 'K': mul = 1ull << 10; end++; break;
    case 'm': case 'M': mul = 1ull << 20; end++; break;
    case 'g': case 'G': mul = 1ull << 30; end++; break;
    default:
        return false;
    }
    if (*end || (v && mul > UINT64_MAX / v)) {
        return false;
    }
    *out = v * mul;
    return true;
}

/* An ordered JSON object under construction: keys and raw value texts. */
struct jobj {
    GPtrArray *keys, *values;
};

static void jobj_init(struct jobj *o)
{
    o->keys = g_ptr_array_new_with_free_func(g_free);
    o->values = g_ptr_array_new_with_free_func(g_free);
}

static void jobj_free(struct jobj *o)
{
    g_ptr_array_free(o->keys, TRUE);
    g_ptr_array_free(o->values, TRUE);
}

static int jobj_find(const struct jobj *o, const char *key)
{
    for (guint i = 0; i < o->keys->len; i++) {
        if (!strcmp(g_ptr_array_index(o->keys, i), key)) {
            return (int)i;
        }
    }
    return -1;
}

/* Sets key (raw, as between JSON quotes) to a raw JSON value, keeping the key's position. */
static void jobj_set_raw(struct jobj *o, const char *key, const char *raw)
{
    int i = jobj_find(o, key);
    if (i >= 0) {
        g_free(o->values->pdata[i]);
        o->values->pdata[i] = g_strdup(raw);
    } else {
        g_ptr_array_add(o->keys, g_strdup(key));
        g_ptr_array_add(o->values, g_strdup(raw));
    }
}

static void jobj_set_str(struct jobj *o, const char *key, const char *s)
{
    GString *g = g_string_new(NULL);
    json_append_string(g, s);
    jobj_set_raw(o, key, g->str);
    g_string_free(g, TRUE);
}

static void jobj_set_u64(struct jobj *o, const char *key, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%" PRIu64, v);
    jobj_set_raw(o, key, buf);
}

static char *jobj_text(const struct jobj *o)
{
    GString *g = g_string_new("{");
    for (guint i = 0; i < o->keys->len; i++) {
        g_string_append_printf(g, "%s\"%s\": %s", i ? ", " : "",
                               (char *)g_ptr_array_index(o->keys, i),
                               (char *)g_ptr_array_index(o->values, i));
    }
    g_string_append_c(g, '}');
    return g_string_free(g, FALSE);
}

static void jobj_member_cb(void *ctx, const char *key, size_t klen, const char *value,
                           size_t vlen)
{
    struct jobj *o = ctx;
    char *k = g_strndup(key, klen);
    char *v = g_strndup(value, vlen);
    jobj_set_raw(o, k, v);
    g_free(k);
    g_free(v);
}

/* Keys the plugin alone may set: they describe what this file contains. */
static const char *const protected_keys[] = {
    "format_version", "page_size", "ram_size", "ram_layout", "clock_unit", "source", "mode",
    "tracking", "epoch_length", "hash", "vcpus", NULL,
};

static bool merge_header_file(struct jobj *hdr, const char *path, char **err)
{
    gchar *text = NULL;
    gsize len = 0;
    GError *gerr = NULL;
    if (!g_file_get_contents(path, &text, &len, &gerr)) {
        *err = g_strdup_printf("header=%s: %s", path, gerr->message);
        g_error_free(gerr);
        return false;
    }
    if (!g_utf8_validate(text, (gssize)len, NULL)) {
        *err = g_strdup_printf("header=%s: not UTF-8", path);
        g_free(text);
        return false;
    }
    struct jobj user;
    jobj_init(&user);
    if (json_object_members(text, text + len, jobj_member_cb, &user) < 0) {
        *err = g_strdup_printf("header=%s: not a JSON object", path);
        jobj_free(&user);
        g_free(text);
        return false;
    }
    for (guint i = 0; i < user.keys->len; i++) {
        const char *k = g_ptr_array_index(user.keys, i);
        const char *v = g_ptr_array_index(user.values, i);
        bool prot = false;
        for (const char *const *p = protected_keys; *p; p++) {
            prot |= !strcmp(*p, k);
        }
        int mine = jobj_find(hdr, k);
        if (prot) {
            if (mine < 0 || strcmp(g_ptr_array_index(hdr->values, mine), v)) {
                warn("header=%s: key \"%s\" is set by the plugin; the file's value is ignored",
                     path, k);
            }
            continue;
        }
        if (mine >= 0 && *v == '{' && *(char *)g_ptr_array_index(hdr->values, mine) == '{') {
            /* both objects (tool_versions): merge one level, the file's members win */
            struct jobj inner;
            jobj_init(&inner);
            const char *mv = g_ptr_array_index(hdr->values, mine);
            json_object_members(mv, mv + strlen(mv), jobj_member_cb, &inner);
            json_object_members(v, v + strlen(v), jobj_member_cb, &inner);
            char *t = jobj_text(&inner);
            jobj_set_raw(hdr, k, t);
            g_free(t);
            jobj_free(&inner);
        } else {
            jobj_set_raw(hdr, k, v);
        }
    }
    jobj_free(&user);
    g_free(text);
    return true;
}

static char *qemu_command_line(void)
{
    gchar *buf = NULL;
    gsize len = 0;
    if (!g_file_get_contents("/proc/self/cmdline", &buf, &len, NULL)) {
        return g_strdup("");
    }
    GString *s = g_string_new(NULL);
    for (gsize pos = 0; pos < len;) {
        const char *arg = buf + pos;
        char *q = g_shell_quote(arg);
        if (s->len) {
            g_string_append_c(s, ' ');
        }
        /* g_shell_quote quotes everything; keep plain words readable */
        if (arg[strspn(arg, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                            "-_./=,:+@%")] == 0 && *arg) {
            g_string_append(s, arg);
        } else {
            g_string_append(s, q);
        }
        g_free(q);
        pos += strlen(arg) + 1;
    }
    g_free(buf);
    return g_string_free(s, FALSE);
}

static char *build_header(const qemu_info_t *info, char **err)
{
    struct config *c = &S.cfg;
    struct jobj h;
    jobj_init(&h);
    jobj_set_u64(&h, "format_version", TW_FORMAT_VERSION);
    jobj_set_u64(&h, "page_size", PAGE_SIZE);
    jobj_set_u64(&h, "ram_size", c->ram_size);
    char *layout = g_strdup_printf("{\"below_4g\": %" PRIu64 ", \"high_base\": %" PRIu64 "}",
                                   c->ram_below_4g, (uint64_t)RAM_HIGH_BASE);
    jobj_set_raw(&h, "ram_layout", layout);
    g_free(layout);
    jobj_set_str(&h, "clock_unit", "instructions");
    jobj_set_str(&h, "source", "recorded");
    jobj_set_str(&h, "mode", c->writes_mode ? "writes" : "pages");
    jobj_set_str(&h, "tracking", S.use_pagemap ? "pagemap-scan" : "store-callbacks");
    jobj_set_u64(&h, "epoch_length", c->epoch);
    jobj_set_u64(&h, "vcpus", S.max_vcpus);
    jobj_set_str(&h, "hash", "xxh3_128");
    char *cmd = qemu_command_line();
    jobj_set_str(&h, "command", cmd);
    g_free(cmd);
    char *tv = g_strdup_printf(
        "{\"memtrace_plugin\": \"%s\", \"qemu_plugin_api\": \"%d\", "
        "\"qemu_plugin_api_running\": \"%d\", \"xxhash\": \"%u.%u.%u\"}",
        PLUGIN_VERSION, QEMU_PLUGIN_VERSION, info->version.cur, XXH_VERSION_MAJOR,
        XXH_VERSION_MINOR, XXH_VERSION_RELEASE);
    jobj_set_raw(&h, "tool_versions", tv);
    g_free(tv);
    GString *rec = g_string_new(NULL);
    g_string_append_printf(rec, "{\"start\": \"%s\", \"mailbox_phys\": ",
                           c->start_now ? "now" : "marker");
    if (c->mailbox_on) {
        g_string_append_printf(rec, "%" PRIu64 ", \"mailbox_size\": %" PRIu64,
                               c->mailbox_phys, c->mailbox_size);
    } else {
        g_string_append(rec, "null, \"mailbox_size\": 0");
    }
    g_string_append_printf(rec, ", \"hwaddr\": \"%s\"", S.hwaddr_is_gpa ? "gpa" : "offset");
    g_string_append_printf(rec, ", \"state_brackets\": \"tracer STATE_BEGIN(reset), agent dump, "
                           "PAGE all frames, MAP all spaces, STATE_END\", \"zstd_level\": %d, "
                           "\"chunk_bytes\": %" PRIu64 "}", c->zstd_level, c->chunk_bytes);
    jobj_set_raw(&h, "recorder", rec->str);
    g_string_free(rec, TRUE);
    if (c->header_path && !merge_header_file(&h, c->header_path, err)) {
        jobj_free(&h);
        return NULL;
    }
    char *text = jobj_text(&h);
    jobj_free(&h);
    return text;
}

static int reject(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static int reject(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    fprintf(stderr, "memtrace: %s\n%s", s, usage_text);
    g_free(s);
    return -1;
}

static int parse_args(int argc, char **argv)
{
    struct config *c = &S.cfg;
    c->epoch = 10000000;
    c->mailbox_on = true;
    c->mailbox_phys = DEFAULT_MAILBOX;
    c->mailbox_size = DEFAULT_MAILBOX_SIZE;
    c->chunk_bytes = 4u << 20;
    c->zstd_level = 0; /* 0: by mode, set below */
    c->queue_depth = 16;
    bool have_ram_size = false;
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            return reject("argument \"%s\" is not key=value", argv[i]);
        }
        g_autofree char *key = g_strndup(argv[i], (gsize)(eq - argv[i]));
        const char *val = eq + 1;
        uint64_t v;
        if (!strcmp(key, "out")) {
            c->out = g_strdup(val);
        } else if (!strcmp(key, "ram")) {
            c->ram = g_strdup(val);
        } else if (!strcmp(key, "header")) {
            c->header_path = g_strdup(val);
        } else if (!strcmp(key, "stats")) {
            c->stats_path = g_strdup(val);
        } else if (!strcmp(key, "stop_image")) {
            c->stop_image = g_strdup(val);
        } else if (!strcmp(key, "ram_size")) {
            if (!parse_size(val, &c->ram_size)) {
                return reject("ram_size=%s is not a size", val);
            }
            have_ram_size = true;
        } else if (!strcmp(key, "ram_below_4g")) {
            if (!parse_size(val, &c->ram_below_4g) || c->ram_below_4g == 0) {
                return reject("ram_below_4g=%s is not a size", val);
            }
        } else if (!strcmp(key, "hwaddr")) {
            if (!strcmp(val, "auto")) {
                c->hwaddr = HWADDR_AUTO;
            } else if (!strcmp(val, "offset")) {
                c->hwaddr = HWADDR_OFFSET;
            } else if (!strcmp(val, "gpa")) {
                c->hwaddr = HWADDR_GPA;
            } else {
                return reject("hwaddr=%s: expected auto, offset or gpa", val);
            }
        } else if (!strcmp(key, "mode")) {
            if (!strcmp(val, "pages")) {
                c->writes_mode = false;
            } else if (!strcmp(val, "writes")) {
                c->writes_mode = true;
            } else {
                return reject("mode=%s: expected pages or writes", val);
            }
        } else if (!strcmp(key, "epoch")) {
            if (!parse_size(val, &c->epoch) || c->epoch == 0) {
                return reject("epoch=%s: expected a positive instruction count", val);
            }
        } else if (!strcmp(key, "mailbox")) {
            if (!strcmp(val, "none")) {
                c->mailbox_on = false;
            } else if (!parse_size(val, &c->mailbox_phys)) {
                return reject("mailbox=%s: expected a physical address or none", val);
            }
        } else if (!strcmp(key, "mailbox_size")) {
            if (!parse_size(val, &c->mailbox_size)) {
                return reject("mailbox_size=%s is not a size", val);
            }
        } else if (!strcmp(key, "track")) {
            if (!strcmp(val, "auto")) {
                c->track = TRACK_AUTO;
            } else if (!strcmp(val, "pagemap")) {
                c->track = TRACK_PAGEMAP;
            } else if (!strcmp(val, "callbacks")) {
                c->track = TRACK_CALLBACKS;
            } else {
                return reject("track=%s: expected auto, pagemap or callbacks", val);
            }
        } else if (!strcmp(key, "start")) {
            if (!strcmp(val, "marker")) {
                c->start_now = false;
            } else if (!strcmp(val, "now")) {
                c->start_now = true;
            } else {
                return reject("start=%s: expected marker or now", val);
            }
        } else if (!strcmp(key, "chunk")) {
            if (!parse_size(val, &c->chunk_bytes) || c->chunk_bytes < 65536 ||
                c->chunk_bytes > (1u << 30)) {
                return reject("chunk=%s: expected 64K..1G", val);
            }
        } else if (!strcmp(key, "zstd")) {
            if (!parse_size(val, &v) || v < 1 || v > 19) {
                return reject("zstd=%s: expected a level 1..19", val);
            }
            c->zstd_level = (int)v;
        } else if (!strcmp(key, "probe")) {
            if (strcmp(val, "on")) {
                return reject("probe=%s: expected on", val);
            }
            c->probe = true;
        } else if (!strcmp(key, "queue")) {
            if (!parse_size(val, &v) || v < 1 || v > 1024) {
                return reject("queue=%s: expected 1..1024 chunks", val);
            }
            c->queue_depth = (unsigned)v;
        } else {
            return reject("unknown argument \"%s\"", key);
        }
    }
    if (c->zstd_level == 0) {
        c->zstd_level = c->writes_mode ? 1 : 3;
    }
    if (c->probe) {
        return 0;
    }
    if (!c->out || !*c->out) {
        return reject("out=PATH is required");
    }
    if (!c->ram || !*c->ram) {
        return reject("ram=PATH is required (the mem-path of the guest RAM backend)");
    }
    if (!have_ram_size) {
        return reject("ram_size=BYTES is required");
    }
    if (c->ram_size == 0 || c->ram_size % PAGE_SIZE || c->ram_size > MAX_RAM) {
        return reject("ram_size=%" PRIu64 ": expected a multiple of 4096, at most 64G",
                      c->ram_size);
    }
    if (!c->ram_below_4g) {
        c->ram_below_4g = ram_default_below_4g(c->ram_size);
    }
    if (c->ram_below_4g > c->ram_size) {
        c->ram_below_4g = c->ram_size; /* all of it below the hole */
    }
    if (c->ram_below_4g % PAGE_SIZE || c->ram_below_4g > RAM_HIGH_BASE) {
        return reject("ram_below_4g=%" PRIu64 ": expected a multiple of 4096, at most 4G",
                      c->ram_below_4g);
    }
    S.layout = (struct ram_layout){ c->ram_size, c->ram_below_4g };
    if (c->mailbox_on) {
        if (c->mailbox_phys % PAGE_SIZE || c->mailbox_size % PAGE_SIZE ||
            c->mailbox_size < 2 * PAGE_SIZE ||
            ram_contiguous(&S.layout, c->mailbox_phys) < c->mailbox_size) {
            return reject("mailbox=0x%" PRIx64 " mailbox_size=%" PRIu64 ": expected page-aligned, "
                          "at least 8K, inside one piece of guest RAM", c->mailbox_phys,
                          c->mailbox_size);
        }
    }
    return 0;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    memset(&S, 0, sizeof(S));
    S.id = id;
    S.ram_fd = -1;
    if (parse_args(argc, argv) < 0) {
        return -1;
    }
    struct config *c = &S.cfg;
    if (!info->system_emulation) {
        return reject("system emulation only (qemu-system-x86_64)");
    }
    if (strcmp(info->target_name, "x86_64") != 0) {
        return reject("target %s: only x86_64 is supported (page tables, RAM layout)",
                      info->target_name);
    }
    if (info->system.max_vcpus < 1 || info->system.max_vcpus > VS_MAX_VCPUS) {
        return reject("-smp %d (maxcpus %d): this build of memtrace supports 1 to %d vCPUs",
                      info->system.smp_vcpus, info->system.max_vcpus, VS_MAX_VCPUS);
    }
    S.max_vcpus = (unsigned)info->system.max_vcpus;
    if (c->probe) {
        /* one line for trace-record, then refuse, so QEMU stops before it builds a machine */
        fprintf(stderr, "memtrace: probe ok: plugin API %d (QEMU accepts %d to %d), %u vCPUs\n",
                QEMU_PLUGIN_VERSION, info->version.min, info->version.cur, S.max_vcpus);
        return -1;
    }

    /* QEMU 7.2 (API 1) computes the "physical address" of a RAM access from its RAM block
     * (block offset + offset in the block): the RAM file offset. Since QEMU 8.1 it is the
     * guest physical address from the TLB. The two agree below the PCI hole. */
    S.hwaddr_is_gpa = c->hwaddr == HWADDR_GPA ||
                      (c->hwaddr == HWADDR_AUTO && info->version.cur >= 2);

    /* how to find written frames */
    char err[512] = "";
    if (c->track != TRACK_CALLBACKS) {
        if (wp_probe(err, sizeof(err)) == 0) {
            S.use_pagemap = true;
        } else if (c->track == TRACK_PAGEMAP) {
            return reject("track=pagemap: the host kernel cannot do it: %s", err);
        } else {
            warn("write-protect tracking unavailable (%s); using store callbacks", err);
        }
    }
    S.store_cbs = c->writes_mode || !S.use_pagemap;

    char *herr = NULL;
    char *header = build_header(info, &herr);
    if (!header) {
        int r = reject("%s", herr);
        g_free(herr);
        return r;
    }
    S.tw = tw_open(c->out, header, c->chunk_bytes, c->zstd_level, c->queue_depth, log_msg,
                   &herr);
    g_free(header);
    if (!S.tw) {
        int r = reject("%s", herr);
        g_free(herr);
        return r;
    }

    S.frames = c->ram_size >> PAGE_SHIFT;
    if (c->mailbox_on) {
        uint64_t off = ram_offset(&S.layout, c->mailbox_phys);
        S.mb_first = off >> PAGE_SHIFT;
        S.mb_end = (off + c->mailbox_size) >> PAGE_SHIFT;
    }
    S.hashes = g_new0(uint64_t, 2 * S.frames);
    S.written = g_new0(uint8_t, (S.frames + 7) / 8);
    S.written_list = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    static const uint8_t zero_page[PAGE_SIZE];
    XXH128_hash_t z = XXH3_128bits(zero_page, PAGE_SIZE);
    S.zero_lo = z.low64;
    S.zero_hi = z.high64;
    evbuf_init(&S.dump);
    evbuf_init(&S.pending);
    S.tasks = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    S.mms = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, mm_free);

    /* each vCPU checks every check_interval of its own instructions: all of them together at
     * least every MAX_CHECK_INTERVAL (or epoch) instructions */
    uint64_t every = c->epoch < MAX_CHECK_INTERVAL ? c->epoch : MAX_CHECK_INTERVAL;
    S.check_interval = MAX(every / S.max_vcpus, MIN(every, MIN_CHECK_INTERVAL));
    S.next_epoch = c->epoch;
    S.vcpus = aligned_alloc(64, S.max_vcpus * sizeof(struct vcpu));
    memset(S.vcpus, 0, S.max_vcpus * sizeof(struct vcpu));
    g_mutex_init(&S.trace_lock);
    g_mutex_init(&S.setup_lock);
    vs_init(&S.world, STOP_TIMEOUT_NS, STOP_RETRY_NS, nudge_vcpu, NULL);
#if HAVE_SCOREBOARD
    S.sb = qemu_plugin_scoreboard_new(sizeof(uint64_t));
    S.sb_since = (qemu_plugin_u64){ S.sb, 0 };
#endif

    qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    qemu_plugin_register_vcpu_idle_cb(id, vcpu_idle);
    qemu_plugin_register_vcpu_resume_cb(id, vcpu_resume);
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
