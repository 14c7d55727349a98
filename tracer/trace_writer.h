/*
 * Trace file writer, format version 1 (traces/FORMAT.md is the normative text).
 *
 * Threads: one producer at a time appends records (the plugin serialises its threads: see the
 * thread-ownership section of memtrace_plugin.c). Full chunks are handed to one writer thread that compresses them (one zstd frame per
 * chunk), computes the CRCs and appends them to the file with whole-chunk write() calls, so a
 * killed process leaves a file whose complete chunks are all readable. tw_close() writes the
 * index chunk and the trailer.
 *
 * Back-pressure: the queue between the two threads holds at most `queue_depth` chunks. When it
 * is full the producer waits for the writer thread (counted in tw_stats.stalls). We wait rather
 * than drop records because a dropped PAGE record silently corrupts every later content
 * figure; the wait cannot deadlock because the writer thread never waits for the producer.
 * If the file cannot be written (disk full, I/O error) the writer thread reports it once,
 * discards every later chunk and tw_close() returns the error.
 */
#ifndef MEMTRACE_TRACE_WRITER_H
#define MEMTRACE_TRACE_WRITER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TW_FORMAT_VERSION 1
#define TW_NO_STRING 0xffffffffu

enum tw_kind {
    TW_STRINGS = 1,
    TW_TIME = 2,
    TW_PAGE = 3,
    TW_WRITE = 4,
    TW_TASK = 5,
    TW_VMA = 6,
    TW_PAGECACHE = 7,
    TW_MAP = 8,
    TW_MARK = 9,
    TW_LOST = 10,
    TW_COUNTER = 11,
    TW_UNSEEN = 12,
    TW_VCPU = 13,
};

enum tw_chunk_type { TW_CHUNK_RECORDS = 1, TW_CHUNK_CONTENT = 2, TW_CHUNK_INDEX = 3 };

enum tw_task_op { TW_TASK_NEW = 1, TW_TASK_EXEC = 2, TW_TASK_EXIT = 3, TW_TASK_EXISTING = 4,
                  TW_TASK_COMM = 5 };
enum tw_mark_op { TW_MARK_START = 1, TW_MARK_STOP = 2, TW_MARK_PHASE = 3, TW_MARK_STATE_BEGIN = 4,
                  TW_MARK_STATE_END = 5, TW_MARK_INCOMPLETE = 6, TW_MARK_SNAPSHOT = 7 };
enum tw_lost_source { TW_LOST_AGENT_RING_FULL = 1, TW_LOST_AGENT_SEQ_GAP = 2,
                      TW_LOST_TRACER_BUFFER = 3 };

#define TW_MAP_PRESENT 1u
#define TW_MAP_WRITABLE 2u
#define TW_MAP_DIRTY 4u

/* Record layouts, exactly as in FORMAT.md (little-endian host assumed: x86-64). */
struct tw_rec_time { uint64_t t, epoch; };
struct tw_rec_page { uint64_t frame, hash_lo, hash_hi; };
struct tw_rec_write { uint64_t addr, value; };
struct tw_rec_task { uint32_t op, pid, tgid, ppid; uint64_t mm, pgd; uint32_t name, flags; };
struct tw_rec_vma {
    uint32_t op, pid;
    uint64_t mm, start, end, vm_flags, pgoff, ino;
    uint32_t dev, path;
};
struct tw_rec_pagecache { uint32_t op, dev; uint64_t ino, index, frame; };
struct tw_rec_map { uint64_t mm, vpn, frame, flags; };
struct tw_rec_mark { uint32_t op, name; uint64_t arg; };
struct tw_rec_lost { uint32_t source, pad; uint64_t count; };
struct tw_rec_counter { uint32_t name, pad; uint64_t value; };
struct tw_rec_vcpu { uint32_t vcpu, pad; };

/* the sizes FORMAT.md's record table gives (tests/unit/traces/test_format_doc.py checks that
 * this list and the table agree) */
_Static_assert(sizeof(struct tw_rec_time) == 16, "TIME is 16 bytes");
_Static_assert(sizeof(struct tw_rec_page) == 24, "PAGE is 24 bytes");
_Static_assert(sizeof(struct tw_rec_write) == 16, "WRITE is 16 bytes");
_Static_assert(sizeof(struct tw_rec_task) == 40, "TASK is 40 bytes");
_Static_assert(sizeof(struct tw_rec_vma) == 64, "VMA is 64 bytes");
_Static_assert(sizeof(struct tw_rec_pagecache) == 32, "PAGECACHE is 32 bytes");
_Static_assert(sizeof(struct tw_rec_map) == 32, "MAP is 32 bytes");
_Static_assert(sizeof(struct tw_rec_mark) == 16, "MARK is 16 bytes");
_Static_assert(sizeof(struct tw_rec_lost) == 16, "LOST is 16 bytes");
_Static_assert(sizeof(struct tw_rec_counter) == 16, "COUNTER is 16 bytes");
_Static_assert(sizeof(struct tw_rec_vcpu) == 8, "VCPU is 8 bytes");

struct tw_stats {
    uint64_t chunks;          /* records chunks handed to the writer thread */
    uint64_t records;         /* records appended (STRINGS not counted) */
    uint64_t raw_bytes;       /* decompressed payload bytes */
    uint64_t file_bytes;      /* bytes written to the file so far (writer thread's count) */
    uint64_t stalls;          /* times the producer waited for a free queue slot */
    uint64_t stall_ns;        /* total time spent waiting */
    uint64_t chunks_dropped;  /* chunks discarded after a write error */
};

typedef void (*tw_log_fn)(const char *msg);

/*
 * The producer-side state is public only so that tw_append() can be inlined into the per-store
 * callback; treat the fields as private.
 */
struct tw_writer {
    /* current chunk: record blocks (the STRINGS block is kept apart and put first on flush) */
    uint8_t *buf;
    size_t len, cap;
    size_t limit;             /* flush before the records + strings would pass this */
    size_t blk_off;           /* offset of the open block's header in buf */
    uint32_t blk_kind, blk_size, blk_count;
    char *strings;            /* NUL-terminated strings of this chunk */
    size_t strings_len, strings_cap;
    uint32_t nstrings;
    void *string_ids;         /* GHashTable: string -> id + 1 */
    uint64_t t_now, t_chunk_start, seq;
    uint32_t chunk_vcpu;      /* whose WRITE records follow in this chunk (VCPU record; 0 at start) */
    uint64_t chunk_records;
    size_t chunk_bytes;
    struct tw_shared *shared; /* queue, writer thread, file */
    struct tw_stats st;
};

/*
 * Creates `path` and writes the file header holding `header_json` (a JSON object, UTF-8, no
 * trailing padding needed). Returns NULL and sets *err (g_free it) on failure.
 */
struct tw_writer *tw_open(const char *path, const char *header_json, size_t chunk_bytes,
                          int zstd_level, unsigned queue_depth, tw_log_fn log, char **err);

/* Slow path of tw_append: closes the open block or the chunk. */
void *tw_append_slow(struct tw_writer *w, uint32_t kind, uint32_t size);

/* Space for one record of `kind` (size bytes, a multiple of 8) at the end of the current chunk. */
static inline void *tw_append(struct tw_writer *w, uint32_t kind, uint32_t size)
{
    if (__builtin_expect(w->blk_kind == kind && w->len + size <= w->limit, 1)) {
        void *p = w->buf + w->len;
        w->len += size;
        w->blk_count++;
        w->chunk_records++;
        return p;
    }
    return tw_append_slow(w, kind, size);
}

/* Id of `s` in the current chunk's string table; TW_NO_STRING for NULL or "". Call it after
 * tw_append() for the record that uses it (an append may start a new chunk). */
uint32_t tw_string(struct tw_writer *w, const char *s);

static inline void tw_store(struct tw_writer *w, uint32_t kind, uint64_t paddr, unsigned size,
                            uint64_t value)
{
    struct tw_rec_write *r = (struct tw_rec_write *)tw_append(w, kind, sizeof(*r));
    r->addr = paddr | ((uint64_t)size << 56);
    r->value = value;
}

/* Room for a WRITE record of `vcpu` in the current chunk, after a VCPU record if it needs one. */
void tw_vcpu_slow(struct tw_writer *w, uint32_t vcpu);

/* One store of `vcpu` (a piece of at most 8 bytes of it). With several vCPUs the chunk says whose
 * stores follow (FORMAT.md, VCPU): a VCPU record is written when the vCPU changes, and again at the
 * start of a chunk (where vCPU 0 is implied), so a one-vCPU trace has none. */
static inline void tw_write_vcpu(struct tw_writer *w, uint32_t vcpu, uint64_t paddr, unsigned size,
                                 uint64_t value)
{
    if (__builtin_expect(w->chunk_vcpu != vcpu || w->blk_kind != TW_WRITE ||
                         w->len + sizeof(struct tw_rec_write) > w->limit, 0)) {
        tw_vcpu_slow(w, vcpu);
    }
    tw_store(w, TW_WRITE, paddr, size, value);
}

/* One store of vCPU 0. */
static inline void tw_write(struct tw_writer *w, uint64_t paddr, unsigned size, uint64_t value)
{
    tw_write_vcpu(w, 0, paddr, size, value);
}

/* Bytes that changed with no WRITE record, found at the epoch's end (FORMAT.md, UNSEEN). */
static inline void tw_unseen(struct tw_writer *w, uint64_t paddr, unsigned size, uint64_t value)
{
    tw_store(w, TW_UNSEEN, paddr, size, value);
}

static inline void tw_page(struct tw_writer *w, uint64_t frame, uint64_t lo, uint64_t hi)
{
    struct tw_rec_page *r = (struct tw_rec_page *)tw_append(w, TW_PAGE, sizeof(*r));
    r->frame = frame;
    r->hash_lo = lo;
    r->hash_hi = hi;
}

static inline void tw_map(struct tw_writer *w, uint64_t mm, uint64_t vpn, uint64_t frame,
                          uint64_t flags)
{
    struct tw_rec_map *r = (struct tw_rec_map *)tw_append(w, TW_MAP, sizeof(*r));
    r->mm = mm;
    r->vpn = vpn;
    r->frame = frame;
    r->flags = flags;
}

/* TIME: t must not decrease (a smaller t is raised to the current time). */
void tw_time(struct tw_writer *w, uint64_t t, uint64_t epoch);
void tw_task(struct tw_writer *w, uint32_t op, uint32_t pid, uint32_t tgid, uint32_t ppid,
             uint64_t mm, uint64_t pgd, const char *name, uint32_t flags);
void tw_vma(struct tw_writer *w, uint32_t op, uint32_t pid, uint64_t mm, uint64_t start,
            uint64_t end, uint64_t vm_flags, uint64_t pgoff, uint64_t ino, uint32_t dev,
            const char *path);
void tw_pagecache(struct tw_writer *w, uint32_t op, uint32_t dev, uint64_t ino, uint64_t index,
                  uint64_t frame);
void tw_mark(struct tw_writer *w, uint32_t op, const char *name, uint64_t arg);
void tw_lost(struct tw_writer *w, uint32_t source, uint64_t count);
void tw_counter(struct tw_writer *w, const char *name, uint64_t value);

/* Hands the current chunk (if it holds records) to the writer thread. */
void tw_flush(struct tw_writer *w);

/* Current statistics (file_bytes is read from the writer thread under its lock). */
struct tw_stats tw_get_stats(struct tw_writer *w);

/*
 * Flushes, waits for the writer thread, writes the index chunk and the trailer and closes the
 * file. Frees w. Returns 0, or -1 with *err set (g_free it) if anything could not be written.
 */
int tw_close(struct tw_writer *w, char **err);

/* crc32 with the zlib polynomial (exposed for tests). */
uint32_t tw_crc32(uint32_t crc, const void *data, size_t len);

#endif
