/*
 * Reader of the guest agent's mailbox ring (guest-agent/PROTOCOL.md, version 1).
 *
 * The mailbox lies in guest RAM; the plugin maps that part of the RAM file read-write (the
 * tracer writes `tail`). The plugin calls mb_drain() with every vCPU stopped or idle
 * (vcpu_stop.h), but the ring is safe to read while the agent writes on other CPUs anyway: the
 * agent fills an event's slots, then a write barrier, then advances head, so head is read with
 * acquire ordering and only slots below it are decoded. mb_pending_slots() and mb_capacity()
 * are read by running vCPUs too (hints).
 */
#ifndef MEMTRACE_MAILBOX_H
#define MEMTRACE_MAILBOX_H

#include <stddef.h>
#include <stdint.h>

#define MB_MAGIC "MTAGENT1"
#define MB_VERSION 1
#define MB_CONTROL_SIZE 64
#define MB_SLOTS_OFFSET 4096
#define MB_SLOT_SIZE 64
#define MB_HEADER_SIZE 16
#define MB_MAX_STRING 256 /* 255 bytes + NUL */

enum mb_type {
    MB_PAD = 0,
    MB_TASK_NEW = 1,
    MB_TASK_EXEC = 2,
    MB_TASK_EXIT = 3,
    MB_TASK_EXISTING = 4,
    MB_VMA = 5,
    MB_PAGECACHE = 6,
    MB_MARK = 7,
    MB_COUNTER = 8,
    MB_TASK_COMM = 9,
};

/* One decoded event; which fields are meaningful depends on type (PROTOCOL.md's table). */
struct mb_event {
    uint16_t type, nslots;
    uint32_t pid;
    uint64_t seq;
    uint32_t op, tgid, ppid, dev;
    uint64_t clone_flags, mm, pgd, start, end, vm_flags, pgoff, ino, index, frame, arg, value;
    char name[MB_MAX_STRING]; /* comm, path or name; "" if none */
};

struct mb_reader {
    uint8_t *base;           /* the mailbox in the plugin's read-write mapping */
    uint64_t size;
    int seen_magic;
    int have_seq;
    uint64_t next_seq;       /* sequence number expected next */
    uint64_t dropped_seen;   /* agent's dropped counter at the last drain */
    uint64_t events;         /* events decoded */
    uint64_t bad;            /* malformed events or ring states (logged) */
    const char *last_error;
};

/* Lost-event counts found by one drain (deltas). */
struct mb_lost {
    uint64_t ring_full;      /* growth of the agent's dropped counter */
    uint64_t seq_gap;        /* sequence numbers skipped between consecutive events */
};

void mb_init(struct mb_reader *r, uint8_t *base, uint64_t size);

/* Slots written by the agent and not yet consumed (0 if the agent is not ready). */
uint64_t mb_pending_slots(const struct mb_reader *r);
/* Slot count N of the ring, 0 if the agent is not ready. */
uint64_t mb_capacity(const struct mb_reader *r);

/*
 * Decodes every event from tail to head in ring order, calling fn for each (PAD events are
 * skipped), then stores tail = head. Returns the number of events, or -1 if the agent has not
 * initialised the mailbox (magic missing) or uses another protocol version. Malformed events
 * end the drain early: the remaining slots are skipped (tail = head), r->bad is incremented,
 * r->last_error says why, and lost->seq_gap picks up the missing sequence numbers at the next
 * good event.
 */
typedef void (*mb_event_fn)(void *ctx, const struct mb_event *ev);
long mb_drain(struct mb_reader *r, mb_event_fn fn, void *ctx, struct mb_lost *lost);

#endif
