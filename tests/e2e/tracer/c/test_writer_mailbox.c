/*
 * Unit tests of tracer/mailbox.c (checked here) and tracer/trace_writer.c (this program writes
 * a trace with known contents; tests/e2e_tracer/test_unit_c.py reads it back with
 * traces/reader.py and compares). Usage: test_writer_mailbox OUT.mtr [close|noclose]
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "mailbox.h"
#include "trace_writer.h"

#include "check.h"

/* ---- mailbox ---------------------------------------------------------------------------- */

#define NSLOTS 16
static uint8_t mbox[4096 + NSLOTS * 64];
static uint64_t w_slot, w_seq;

static void put_event(uint16_t type, uint32_t pid, const void *payload, size_t len,
                      uint64_t seq_skip)
{
    uint16_t nslots = (uint16_t)((16 + len + 63) / 64);
    if ((w_slot % NSLOTS) + nslots > NSLOTS) {
        /* does not fit before the end: PAD the rest (PAD without its own seq number) */
        uint8_t *p = mbox + 4096 + (w_slot % NSLOTS) * 64;
        uint16_t pad = (uint16_t)(NSLOTS - w_slot % NSLOTS);
        memset(p, 0, 16);
        memcpy(p + 2, &pad, 2);
        w_slot += pad;
    }
    w_seq += seq_skip;
    uint8_t *p = mbox + 4096 + (w_slot % NSLOTS) * 64;
    memset(p, 0, nslots * 64u);
    memcpy(p, &type, 2);
    memcpy(p + 2, &nslots, 2);
    memcpy(p + 4, &pid, 4);
    memcpy(p + 8, &w_seq, 8);
    memcpy(p + 16, payload, len);
    w_slot += nslots;
    w_seq++;
}

static void publish(uint64_t dropped)
{
    memcpy(mbox + 16, &w_slot, 8);
    memcpy(mbox + 32, &dropped, 8);
}

static struct mb_event got[64];
static int ngot;

static void on_event(void *ctx, const struct mb_event *ev)
{
    (void)ctx;
    if (ngot < 64) {
        got[ngot++] = *ev;
    }
}

static void test_mailbox(void)
{
    struct mb_reader r;
    mb_init(&r, mbox, sizeof(mbox));
    struct mb_lost lost = { 0, 0 };
    CHECK(mb_drain(&r, on_event, NULL, &lost) == -1, "drain before the magic");

    uint32_t version = 1, n = NSLOTS;
    memcpy(mbox + 8, &version, 4);
    memcpy(mbox + 12, &n, 4);
    memcpy(mbox, "MTAGENT1", 8);
    CHECK(mb_capacity(&r) == NSLOTS, "capacity");

    struct {
        uint32_t tgid, ppid;
        uint64_t clone_flags, mm, pgd;
        char comm[16];
    } tn = { 10, 1, 0x11, 0xffff888000001000ull, 0x2000, "sixteen-chars-xx" };
    put_event(MB_TASK_NEW, 11, &tn, sizeof(tn), 0);
    uint8_t vma[56 + 40];
    memset(vma, 0, sizeof(vma));
    uint32_t op = 1, dev = 0x801;
    uint64_t v[6] = { 0xffff888000001000ull, 0x400000, 0x401000, 0x5, 2, 99 };
    memcpy(vma, &op, 4);
    memcpy(vma + 4, &dev, 4);
    memcpy(vma + 8, v, sizeof(v));
    strcpy((char *)vma + 56, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    put_event(MB_VMA, 11, vma, sizeof(vma), 0); /* 2 slots */
    publish(0);
    CHECK(mb_pending_slots(&r) == 3, "pending %" PRIu64, mb_pending_slots(&r));
    ngot = 0;
    CHECK(mb_drain(&r, on_event, NULL, &lost) == 2, "two events");
    CHECK(ngot == 2 && got[0].type == MB_TASK_NEW && got[0].pid == 11 && got[0].tgid == 10 &&
          got[0].ppid == 1 && got[0].clone_flags == 0x11 && got[0].pgd == 0x2000 &&
          !strcmp(got[0].name, "sixteen-chars-xx"), "TASK_NEW decoded (comm without NUL)");
    CHECK(got[1].type == MB_VMA && got[1].op == 1 && got[1].dev == 0x801 &&
          got[1].start == 0x400000 && got[1].end == 0x401000 && got[1].vm_flags == 5 &&
          got[1].pgoff == 2 && got[1].ino == 99 &&
          !strcmp(got[1].name, "/usr/lib/x86_64-linux-gnu/libc.so.6"), "VMA decoded");
    uint64_t tail;
    memcpy(&tail, mbox + 24, 8);
    CHECK(tail == 3, "tail written back: %" PRIu64, tail);
    CHECK(lost.ring_full == 0 && lost.seq_gap == 0, "no loss yet");

    /* fill towards the end so the next 2-slot event needs a PAD, skip a sequence number,
     * report 4 dropped events */
    uint8_t markp[16 + 8] = { 0 };
    uint32_t mop = 3;
    memcpy(markp, &mop, 4);
    strcpy((char *)markp + 16, "phase");
    for (int i = 0; i < 12; i++) {
        put_event(MB_MARK, 1, markp, sizeof(markp), 0);
    }
    put_event(MB_VMA, 11, vma, sizeof(vma), 1); /* slot 15 is too small: PAD, then wraps */
    uint8_t counter[16 + 32] = { 0 };
    uint64_t value = 1234;
    memcpy(counter + 8, &value, 8);
    strcpy((char *)counter + 16, "ksm.pages_sharing");
    put_event(MB_COUNTER, 0, counter, sizeof(counter), 0);
    publish(4);
    ngot = 0;
    memset(&lost, 0, sizeof(lost));
    CHECK(mb_drain(&r, on_event, NULL, &lost) == 14, "14 events after the wrap (got %d)", ngot);
    CHECK(ngot == 14 && got[12].type == MB_VMA && got[13].type == MB_COUNTER &&
          got[13].value == 1234 && !strcmp(got[13].name, "ksm.pages_sharing"), "after PAD");
    CHECK(got[0].type == MB_MARK && got[0].op == 3 && !strcmp(got[0].name, "phase"), "MARK");
    CHECK(lost.seq_gap == 1, "seq gap %" PRIu64, lost.seq_gap);
    CHECK(lost.ring_full == 4, "dropped %" PRIu64, lost.ring_full);
    CHECK(r.bad == 0, "no malformed events: %s", r.last_error ? r.last_error : "");

    /* a malformed event (nslots 0) ends the drain and is counted */
    uint8_t *p = mbox + 4096 + (w_slot % NSLOTS) * 64;
    memset(p, 0, 64);
    p[0] = MB_MARK;
    w_slot += 1;
    publish(4);
    memset(&lost, 0, sizeof(lost));
    CHECK(mb_drain(&r, on_event, NULL, &lost) == 0 && r.bad == 1, "malformed counted");
    CHECK(mb_pending_slots(&r) == 0, "ring consumed after a malformed event");
}

/* ---- trace writer ----------------------------------------------------------------------- */

static void write_trace(const char *path, int do_close)
{
    char *err = NULL;
    const char *hdr = "{\"format_version\": 1, \"page_size\": 4096, \"ram_size\": 1048576, "
                      "\"clock_unit\": \"instructions\", \"source\": \"recorded\", "
                      "\"mode\": \"writes\", \"hash\": \"xxh3_128\", \"test\": \"caf\\u00e9\"}";
    struct tw_writer *w = tw_open(path, hdr, 65536, 3, 2, NULL, &err);
    if (!w) {
        fprintf(stderr, "tw_open: %s\n", err);
        exit(2);
    }
    tw_time(w, 100, 1);
    for (uint64_t i = 0; i < 10000; i++) {
        tw_page(w, i, i * 3, i * 5);
    }
    tw_task(w, TW_TASK_NEW, 7, 7, 1, 0xffff1000, 0x1000, "comm-7", 0x11);
    tw_vma(w, 1, 7, 0xffff1000, 0x400000, 0x401000, 5, 0, 99, 0x801, "/bin/x");
    tw_pagecache(w, 1, 0x801, 99, 0, 1234);
    tw_map(w, 0xffff1000, 0x400, 1234, 7);
    tw_mark(w, TW_MARK_PHASE, "phase-x", 9);
    tw_lost(w, TW_LOST_AGENT_SEQ_GAP, 5);
    tw_counter(w, "c.one", 77);
    tw_task(w, TW_TASK_EXIT, 8, 8, 1, 0, 0, NULL, 0);
    tw_time(w, 50, 2); /* time never decreases: written as 100 */
    tw_time(w, 200, 3);
    for (uint64_t i = 0; i < 20000; i++) {
        tw_write(w, i * 8, 8, i);
    }
    /* runs of three vCPUs' stores across chunk boundaries: value = vcpu << 32 | index */
    for (uint64_t r = 0; r < 30; r++) {
        uint32_t vcpu = (uint32_t)(r % 3);
        for (uint64_t i = 0; i < 1000; i++) {
            tw_write_vcpu(w, vcpu, 0x100000 + i * 8, 8, ((uint64_t)vcpu << 32) | (r * 1000 + i));
        }
    }
    tw_mark(w, TW_MARK_PHASE, "phase-x", 10); /* same string, a later chunk */
    tw_write(w, 0x1000, 3, 0xabcdef);
    tw_unseen(w, 0x2008, 8, 0x1122334455667788ull);
    if (!do_close) {
        tw_flush(w);
        /* give the writer thread time to write the queued chunks, then leave without index
         * and trailer, as a killed QEMU would */
        struct tw_stats s;
        for (int i = 0; i < 500; i++) {
            usleep(10000);
            s = tw_get_stats(w);
            if (s.file_bytes > 16 && s.chunks > 0 && i > 20) {
                break;
            }
        }
        _exit(failures ? 1 : 0);
    }
    if (tw_close(w, &err) < 0) {
        fprintf(stderr, "tw_close: %s\n", err);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.mtr [close|noclose]\n", argv[0]);
        return 2;
    }
    /* crc32 of "123456789" with the zlib polynomial */
    CHECK(tw_crc32(0, "123456789", 9) == 0xcbf43926u, "crc32");
    test_mailbox();
    write_trace(argv[1], argc < 3 || strcmp(argv[2], "noclose") != 0);
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("writer+mailbox: all checks passed\n");
    return 0;
}
