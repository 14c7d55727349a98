/* Trace file writer, format version 1: see trace_writer.h and traces/FORMAT.md. */
#define _GNU_SOURCE
#include "trace_writer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <zstd.h>

#define CHUNK_HEADER_SIZE 48
#define BLOCK_HEADER_SIZE 8
#define INDEX_ENTRY_SIZE 40
#define TRAILER_SIZE 24

/* One chunk travelling from the producer to the writer thread. */
struct tw_job {
    uint16_t type, flags;
    uint64_t t_first, t_last, seq;
    char *strings;            /* STRINGS block contents (may be NULL) */
    size_t strings_len;
    uint8_t *records;         /* record blocks */
    size_t records_len;
    int stop;                 /* last job: the writer thread exits after it */
};

struct tw_index_entry {
    uint64_t offset, t_first, t_last, seq;
    uint16_t type, flags;
};

/*
 * State shared by the producer and the writer thread. Every field below `lock` is guarded by
 * it, except fd/zctx/index/offset, which only the writer thread touches until it has been
 * joined (tw_close then uses them from the producer thread).
 */
struct tw_shared {
    pthread_mutex_t lock;
    pthread_cond_t not_empty, not_full;
    struct tw_job **queue;
    unsigned qcap, qhead, qlen;
    uint64_t file_bytes;
    uint64_t chunks_dropped;
    int failed_errno;         /* first write error, 0 if none */
    char *failed_what;

    pthread_t thread;
    int fd;
    ZSTD_CCtx *zctx;
    uint64_t offset;          /* file offset of the next chunk */
    struct tw_index_entry *index;
    size_t nindex, index_cap;
    tw_log_fn log;
};

/* ---- CRC32 (zlib polynomial, reflected) ---------------------------------------------------- */

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            uint32_t c = crc_table[t - 1][i];
            crc_table[t][i] = crc_table[0][c & 0xff] ^ (c >> 8);
        }
    }
}

uint32_t tw_crc32(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    crc = ~crc;
    /* slicing-by-8 */
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^
              crc_table[5][(v >> 16) & 0xff] ^ crc_table[4][(v >> 24) & 0xff] ^
              crc_table[3][(v >> 32) & 0xff] ^ crc_table[2][(v >> 40) & 0xff] ^
              crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][v >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) {
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    }
    return ~crc;
}

/* ---- little-endian helpers ------------------------------------------------------------------ */

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static size_t pad8(size_t n) { return (n + 7) & ~(size_t)7; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ---- writer thread -------------------------------------------------------------------------- */

static void shared_fail(struct tw_shared *sh, int err, const char *what)
{
    pthread_mutex_lock(&sh->lock);
    if (!sh->failed_errno) {
        sh->failed_errno = err ? err : EIO;
        sh->failed_what = g_strdup(what);
        pthread_mutex_unlock(&sh->lock);
        char *msg = g_strdup_printf("memtrace: trace writer: %s: %s; later chunks are discarded",
                                    what, g_strerror(err ? err : EIO));
        sh->log(msg);
        g_free(msg);
        return;
    }
    pthread_mutex_unlock(&sh->lock);
}

/* Compresses one chunk's payload (strings block + records) into a whole chunk and appends it. */
static int emit_chunk(struct tw_shared *sh, const struct tw_job *job)
{
    size_t raw_len = job->records_len;
    size_t strings_block = 0;
    if (job->strings_len) {
        strings_block = BLOCK_HEADER_SIZE + pad8(job->strings_len);
        raw_len += strings_block;
    }
    if (raw_len > 0xffffffffu) {
        shared_fail(sh, EFBIG, "chunk larger than 4 GiB");
        return -1;
    }
    size_t bound = ZSTD_compressBound(raw_len);
    uint8_t *out = g_malloc(CHUNK_HEADER_SIZE + bound + 8);
    uint8_t *payload = out + CHUNK_HEADER_SIZE;

    ZSTD_CCtx_reset(sh->zctx, ZSTD_reset_session_only);
    ZSTD_CCtx_setPledgedSrcSize(sh->zctx, raw_len);
    ZSTD_outBuffer ob = { payload, bound, 0 };
    size_t rc = 0;
    if (strings_block) {
        uint8_t hdr[BLOCK_HEADER_SIZE];
        put16(hdr, TW_STRINGS);
        put16(hdr + 2, 1);
        put32(hdr + 4, (uint32_t)job->strings_len);
        ZSTD_inBuffer ib = { hdr, sizeof(hdr), 0 };
        rc = ZSTD_compressStream2(sh->zctx, &ob, &ib, ZSTD_e_continue);
        if (!ZSTD_isError(rc)) {
            /* the producer allocated the table with room for the zero padding */
            ZSTD_inBuffer is = { job->strings, pad8(job->strings_len), 0 };
            rc = ZSTD_compressStream2(sh->zctx, &ob, &is, ZSTD_e_continue);
        }
    }
    if (!ZSTD_isError(rc)) {
        ZSTD_inBuffer ir = { job->records, job->records_len, 0 };
        do {
            rc = ZSTD_compressStream2(sh->zctx, &ob, &ir, ZSTD_e_end);
        } while (!ZSTD_isError(rc) && rc != 0);
    }
    if (ZSTD_isError(rc)) {
        char *what = g_strdup_printf("zstd: %s", ZSTD_getErrorName(rc));
        shared_fail(sh, EIO, what);
        g_free(what);
        g_free(out);
        return -1;
    }
    size_t plen = ob.pos;
    size_t padded = pad8(plen);
    memset(payload + plen, 0, padded - plen);

    memcpy(out, "CHNK", 4);
    put16(out + 4, job->type);
    put16(out + 6, job->flags);
    put32(out + 8, (uint32_t)plen);
    put32(out + 12, (uint32_t)raw_len);
    put64(out + 16, job->t_first);
    put64(out + 24, job->t_last);
    put64(out + 32, job->seq);
    put32(out + 40, tw_crc32(0, payload, plen));
    put32(out + 44, tw_crc32(0, out, 44));

    size_t total = CHUNK_HEADER_SIZE + padded;
    int ret = 0;
    if (write_all(sh->fd, out, total) < 0) {
        shared_fail(sh, errno, "write");
        ret = -1;
    } else {
        if (sh->nindex == sh->index_cap) {
            sh->index_cap = sh->index_cap ? sh->index_cap * 2 : 256;
            sh->index = g_realloc(sh->index, sh->index_cap * sizeof(*sh->index));
        }
        sh->index[sh->nindex++] = (struct tw_index_entry){
            sh->offset, job->t_first, job->t_last, job->seq, job->type, job->flags };
        sh->offset += total;
        pthread_mutex_lock(&sh->lock);
        sh->file_bytes = sh->offset;
        pthread_mutex_unlock(&sh->lock);
    }
    g_free(out);
    return ret;
}

static void job_free(struct tw_job *job)
{
    g_free(job->strings);
    g_free(job->records);
    g_free(job);
}

static void *writer_main(void *arg)
{
    struct tw_shared *sh = arg;
    for (;;) {
        pthread_mutex_lock(&sh->lock);
        while (sh->qlen == 0) {
            pthread_cond_wait(&sh->not_empty, &sh->lock);
        }
        struct tw_job *job = sh->queue[sh->qhead];
        sh->qhead = (sh->qhead + 1) % sh->qcap;
        sh->qlen--;
        int failed = sh->failed_errno != 0;
        pthread_cond_signal(&sh->not_full);
        pthread_mutex_unlock(&sh->lock);

        int stop = job->stop;
        if (!stop) {
            if (failed) {
                pthread_mutex_lock(&sh->lock);
                sh->chunks_dropped++;
                pthread_mutex_unlock(&sh->lock);
            } else {
                emit_chunk(sh, job);
            }
        }
        job_free(job);
        if (stop) {
            return NULL;
        }
    }
}

/* Queues a job; waits while the queue is full (see the header comment). */
static void enqueue(struct tw_writer *w, struct tw_job *job)
{
    struct tw_shared *sh = w->shared;
    pthread_mutex_lock(&sh->lock);
    if (sh->qlen == sh->qcap) {
        uint64_t t0 = now_ns();
        w->st.stalls++;
        while (sh->qlen == sh->qcap) {
            pthread_cond_wait(&sh->not_full, &sh->lock);
        }
        w->st.stall_ns += now_ns() - t0;
    }
    sh->queue[(sh->qhead + sh->qlen) % sh->qcap] = job;
    sh->qlen++;
    pthread_cond_signal(&sh->not_empty);
    pthread_mutex_unlock(&sh->lock);
}

/* ---- producer side ---------------------------------------------------------------------------- */

static void default_log(const char *msg)
{
    fprintf(stderr, "%s\n", msg);
}

static void chunk_reset(struct tw_writer *w)
{
    w->buf = g_malloc(w->cap);
    w->len = 0;
    w->blk_kind = 0;
    w->blk_count = 0;
    w->blk_size = 0;
    w->strings = NULL;
    w->strings_len = w->strings_cap = 0;
    w->nstrings = 0;
    g_hash_table_remove_all(w->string_ids);
    w->limit = w->chunk_bytes;
    w->chunk_records = 0;
    w->chunk_vcpu = 0;
    w->t_chunk_start = w->t_now;
}

static void close_block(struct tw_writer *w)
{
    if (w->blk_kind) {
        put32(w->buf + w->blk_off + 4, w->blk_count);
        w->blk_kind = 0;
    }
}

struct tw_writer *tw_open(const char *path, const char *header_json, size_t chunk_bytes,
                          int zstd_level, unsigned queue_depth, tw_log_fn log, char **err)
{
    if (chunk_bytes < 4096) {
        chunk_bytes = 4096;
    }
    if (queue_depth < 1) {
        queue_depth = 1;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        *err = g_strdup_printf("cannot create trace file %s: %s", path, g_strerror(errno));
        return NULL;
    }
    size_t hlen = strlen(header_json);
    size_t total = pad8(16 + hlen);
    uint8_t *hdr = g_malloc0(total);
    memcpy(hdr, "MEMTRACE", 8);
    put16(hdr + 8, TW_FORMAT_VERSION);
    put16(hdr + 10, 0);
    put32(hdr + 12, (uint32_t)hlen);
    memcpy(hdr + 16, header_json, hlen);
    if (write_all(fd, hdr, total) < 0) {
        *err = g_strdup_printf("cannot write trace file %s: %s", path, g_strerror(errno));
        g_free(hdr);
        close(fd);
        return NULL;
    }
    g_free(hdr);

    struct tw_shared *sh = g_new0(struct tw_shared, 1);
    pthread_mutex_init(&sh->lock, NULL);
    pthread_cond_init(&sh->not_empty, NULL);
    pthread_cond_init(&sh->not_full, NULL);
    sh->qcap = queue_depth;
    sh->queue = g_new0(struct tw_job *, queue_depth);
    sh->fd = fd;
    sh->offset = total;
    sh->file_bytes = total;
    sh->log = log ? log : default_log;
    sh->zctx = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(sh->zctx, ZSTD_c_compressionLevel, zstd_level);
    ZSTD_CCtx_setParameter(sh->zctx, ZSTD_c_checksumFlag, 0);
    ZSTD_CCtx_setParameter(sh->zctx, ZSTD_c_contentSizeFlag, 1);

    struct tw_writer *w = g_new0(struct tw_writer, 1);
    w->shared = sh;
    w->chunk_bytes = chunk_bytes;
    w->cap = chunk_bytes + 256;
    w->string_ids = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    chunk_reset(w);
    w->st.file_bytes = total;

    int rc = pthread_create(&sh->thread, NULL, writer_main, sh);
    if (rc) {
        *err = g_strdup_printf("cannot start the trace writer thread: %s", g_strerror(rc));
        close(fd);
        return NULL;
    }
    return w;
}

void tw_flush(struct tw_writer *w)
{
    close_block(w);
    if (w->len == 0 && w->strings_len == 0) {
        return;
    }
    struct tw_job *job = g_new0(struct tw_job, 1);
    job->type = TW_CHUNK_RECORDS;
    job->t_first = w->t_chunk_start;
    job->t_last = w->t_now;
    job->seq = w->seq++;
    job->strings = w->strings;
    job->strings_len = w->strings_len;
    job->records = w->buf;
    job->records_len = w->len;
    w->st.chunks++;
    w->st.raw_bytes += w->len + (w->strings_len ? BLOCK_HEADER_SIZE + pad8(w->strings_len) : 0);
    w->st.records += w->chunk_records;
    chunk_reset(w);
    enqueue(w, job);
}

void *tw_append_slow(struct tw_writer *w, uint32_t kind, uint32_t size)
{
    size_t need = size + (w->blk_kind == kind ? 0 : BLOCK_HEADER_SIZE);
    if (w->len + need > w->limit && (w->len > 0 || w->strings_len > 0)) {
        tw_flush(w);
        need = size + BLOCK_HEADER_SIZE;
    }
    if (w->blk_kind != kind) {
        close_block(w);
        w->blk_off = w->len;
        put16(w->buf + w->len, (uint16_t)kind);
        put16(w->buf + w->len + 2, (uint16_t)size);
        put32(w->buf + w->len + 4, 0);
        w->len += BLOCK_HEADER_SIZE;
        w->blk_kind = kind;
        w->blk_size = size;
        w->blk_count = 0;
    }
    if (w->len + size > w->cap) {
        /* only reachable if a huge string table shrank the limit below a record */
        w->cap = w->len + size + 256;
        w->buf = g_realloc(w->buf, w->cap);
    }
    void *p = w->buf + w->len;
    w->len += size;
    w->blk_count++;
    w->chunk_records++;
    return p;
}

void tw_vcpu_slow(struct tw_writer *w, uint32_t vcpu)
{
    /* the VCPU record and the WRITE after it must share a chunk */
    size_t need = sizeof(struct tw_rec_write) + BLOCK_HEADER_SIZE;
    if (w->chunk_vcpu != vcpu) {
        need += sizeof(struct tw_rec_vcpu) + BLOCK_HEADER_SIZE;
    }
    if (w->len + need > w->limit && (w->len > 0 || w->strings_len > 0)) {
        tw_flush(w); /* the new chunk starts with vCPU 0 implied */
    }
    if (w->chunk_vcpu != vcpu) {
        struct tw_rec_vcpu *r = tw_append(w, TW_VCPU, sizeof(*r));
        r->vcpu = vcpu;
        r->pad = 0;
        w->chunk_vcpu = vcpu;
    }
}

uint32_t tw_string(struct tw_writer *w, const char *s)
{
    if (!s || !*s) {
        return TW_NO_STRING;
    }
    gpointer v = g_hash_table_lookup(w->string_ids, s);
    if (v) {
        return (uint32_t)(GPOINTER_TO_UINT(v) - 1);
    }
    size_t n = strlen(s) + 1;
    /* keep room for the zero padding to 8 bytes that the STRINGS block needs */
    if (w->strings_len + n + 8 > w->strings_cap) {
        w->strings_cap = MAX(w->strings_cap * 2, w->strings_len + n + 8 + 1024);
        w->strings = g_realloc(w->strings, w->strings_cap);
    }
    memcpy(w->strings + w->strings_len, s, n);
    w->strings_len += n;
    memset(w->strings + w->strings_len, 0, 8);
    uint32_t id = w->nstrings++;
    g_hash_table_insert(w->string_ids, g_strdup(s), GUINT_TO_POINTER(id + 1));
    /* strings count toward the chunk size */
    w->limit = w->chunk_bytes > w->strings_len + 512 ? w->chunk_bytes - w->strings_len : 512;
    return id;
}

void tw_time(struct tw_writer *w, uint64_t t, uint64_t epoch)
{
    if (t < w->t_now) {
        t = w->t_now;
    }
    struct tw_rec_time *r = tw_append(w, TW_TIME, sizeof(*r));
    r->t = t;
    r->epoch = epoch;
    w->t_now = t;
}

void tw_task(struct tw_writer *w, uint32_t op, uint32_t pid, uint32_t tgid, uint32_t ppid,
             uint64_t mm, uint64_t pgd, const char *name, uint32_t flags)
{
    struct tw_rec_task *r = tw_append(w, TW_TASK, sizeof(*r));
    *r = (struct tw_rec_task){ op, pid, tgid, ppid, mm, pgd, TW_NO_STRING, flags };
    r->name = tw_string(w, name);
}

void tw_vma(struct tw_writer *w, uint32_t op, uint32_t pid, uint64_t mm, uint64_t start,
            uint64_t end, uint64_t vm_flags, uint64_t pgoff, uint64_t ino, uint32_t dev,
            const char *path)
{
    struct tw_rec_vma *r = tw_append(w, TW_VMA, sizeof(*r));
    *r = (struct tw_rec_vma){ op, pid, mm, start, end, vm_flags, pgoff, ino, dev, TW_NO_STRING };
    r->path = tw_string(w, path);
}

void tw_pagecache(struct tw_writer *w, uint32_t op, uint32_t dev, uint64_t ino, uint64_t index,
                  uint64_t frame)
{
    struct tw_rec_pagecache *r = tw_append(w, TW_PAGECACHE, sizeof(*r));
    *r = (struct tw_rec_pagecache){ op, dev, ino, index, frame };
}

void tw_mark(struct tw_writer *w, uint32_t op, const char *name, uint64_t arg)
{
    struct tw_rec_mark *r = tw_append(w, TW_MARK, sizeof(*r));
    *r = (struct tw_rec_mark){ op, TW_NO_STRING, arg };
    r->name = tw_string(w, name);
}

void tw_lost(struct tw_writer *w, uint32_t source, uint64_t count)
{
    struct tw_rec_lost *r = tw_append(w, TW_LOST, sizeof(*r));
    *r = (struct tw_rec_lost){ source, 0, count };
}

void tw_counter(struct tw_writer *w, const char *name, uint64_t value)
{
    struct tw_rec_counter *r = tw_append(w, TW_COUNTER, sizeof(*r));
    *r = (struct tw_rec_counter){ TW_NO_STRING, 0, value };
    r->name = tw_string(w, name);
}

struct tw_stats tw_get_stats(struct tw_writer *w)
{
    struct tw_stats s = w->st;
    pthread_mutex_lock(&w->shared->lock);
    s.file_bytes = w->shared->file_bytes;
    s.chunks_dropped = w->shared->chunks_dropped;
    pthread_mutex_unlock(&w->shared->lock);
    return s;
}

int tw_close(struct tw_writer *w, char **err)
{
    struct tw_shared *sh = w->shared;
    tw_flush(w);
    struct tw_job *stop = g_new0(struct tw_job, 1);
    stop->stop = 1;
    enqueue(w, stop);
    pthread_join(sh->thread, NULL);

    /* the writer thread has exited: its fields are ours now */
    int ret = 0;
    if (!sh->failed_errno) {
        size_t n = sh->nindex;
        uint8_t *raw = g_malloc0(n * INDEX_ENTRY_SIZE + 1);
        uint64_t t_last = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t *e = raw + i * INDEX_ENTRY_SIZE;
            put64(e, sh->index[i].offset);
            put64(e + 8, sh->index[i].t_first);
            put64(e + 16, sh->index[i].t_last);
            put64(e + 24, sh->index[i].seq);
            put16(e + 32, sh->index[i].type);
            put16(e + 34, sh->index[i].flags);
            put32(e + 36, 0);
            t_last = MAX(t_last, sh->index[i].t_last);
        }
        uint64_t index_offset = sh->offset;
        struct tw_job job = { .type = TW_CHUNK_INDEX, .t_first = 0, .t_last = t_last, .seq = 0,
                              .records = raw, .records_len = n * INDEX_ENTRY_SIZE };
        if (emit_chunk(sh, &job) == 0) {
            uint8_t tr[TRAILER_SIZE];
            memcpy(tr, "MTINDEX\0", 8);
            put64(tr + 8, index_offset);
            put32(tr + 16, tw_crc32(0, tr, 16));
            put32(tr + 20, 0);
            if (write_all(sh->fd, tr, sizeof(tr)) < 0) {
                shared_fail(sh, errno, "write trailer");
            }
        }
        g_free(raw);
    }
    if (close(sh->fd) < 0) {
        shared_fail(sh, errno, "close");
    }
    if (sh->failed_errno) {
        *err = g_strdup_printf("%s: %s (%" PRIu64 " chunks discarded)", sh->failed_what,
                               g_strerror(sh->failed_errno), sh->chunks_dropped);
        ret = -1;
    }
    ZSTD_freeCCtx(sh->zctx);
    g_free(sh->index);
    g_free(sh->queue);
    g_free(sh->failed_what);
    pthread_mutex_destroy(&sh->lock);
    pthread_cond_destroy(&sh->not_empty);
    pthread_cond_destroy(&sh->not_full);
    g_free(sh);
    g_free(w->buf);
    g_free(w->strings);
    g_hash_table_destroy(w->string_ids);
    g_free(w);
    return ret;
}
