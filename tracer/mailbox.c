/* Reader of the guest agent's mailbox ring: see mailbox.h and guest-agent/PROTOCOL.md. */
#include "mailbox.h"

#include <string.h>

/* Control block offsets (PROTOCOL.md, "Layout"). */
#define CB_MAGIC 0
#define CB_VERSION 8
#define CB_NSLOTS 12
#define CB_HEAD 16
#define CB_TAIL 24
#define CB_DROPPED 32

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

void mb_init(struct mb_reader *r, uint8_t *base, uint64_t size)
{
    memset(r, 0, sizeof(*r));
    r->base = base;
    r->size = size;
}

static int ready(const struct mb_reader *r, uint32_t *nslots)
{
    if (memcmp(r->base + CB_MAGIC, MB_MAGIC, 8) != 0) {
        return 0;
    }
    if (rd32(r->base + CB_VERSION) != MB_VERSION) {
        return 0;
    }
    uint32_t n = rd32(r->base + CB_NSLOTS);
    if (n == 0 || (n & (n - 1)) ||
        (uint64_t)MB_SLOTS_OFFSET + (uint64_t)n * MB_SLOT_SIZE > r->size) {
        return 0;
    }
    *nslots = n;
    return 1;
}

uint64_t mb_capacity(const struct mb_reader *r)
{
    uint32_t n;
    return ready(r, &n) ? n : 0;
}

uint64_t mb_pending_slots(const struct mb_reader *r)
{
    uint32_t n;
    if (!ready(r, &n)) {
        return 0;
    }
    uint64_t head = __atomic_load_n((const uint64_t *)(r->base + CB_HEAD), __ATOMIC_ACQUIRE);
    uint64_t tail = rd64(r->base + CB_TAIL);
    return head - tail;
}

/* Copies a NUL-terminated string of at most 255 bytes from [p, end) into out. */
static void get_string(char *out, const uint8_t *p, const uint8_t *end)
{
    size_t max = end > p ? (size_t)(end - p) : 0;
    if (max > MB_MAX_STRING - 1) {
        max = MB_MAX_STRING - 1;
    }
    size_t n = strnlen((const char *)p, max);
    memcpy(out, p, n);
    out[n] = 0;
}

static void get_comm(char *out, const uint8_t *p)
{
    size_t n = strnlen((const char *)p, 16);
    memcpy(out, p, n);
    out[n] = 0;
}

/* Decodes the payload of ev (header already filled); 0 if the event is too short. */
static int decode(struct mb_event *ev, const uint8_t *slot, size_t len)
{
    const uint8_t *p = slot + MB_HEADER_SIZE;
    const uint8_t *end = slot + len;
    size_t need;
    switch (ev->type) {
    case MB_TASK_NEW:
    case MB_TASK_EXISTING:
        need = 48;
        if (len < MB_HEADER_SIZE + need) {
            return 0;
        }
        ev->tgid = rd32(p);
        ev->ppid = rd32(p + 4);
        ev->clone_flags = rd64(p + 8);
        ev->mm = rd64(p + 16);
        ev->pgd = rd64(p + 24);
        get_comm(ev->name, p + 32);
        return 1;
    case MB_TASK_EXEC:
        need = 24;
        if (len < MB_HEADER_SIZE + need) {
            return 0;
        }
        ev->tgid = rd32(p);
        ev->mm = rd64(p + 8);
        ev->pgd = rd64(p + 16);
        get_string(ev->name, p + 24, end);
        return 1;
    case MB_TASK_EXIT:
        ev->tgid = rd32(p);
        return 1;
    case MB_VMA:
        need = 56;
        if (len < MB_HEADER_SIZE + need) {
            return 0;
        }
        ev->op = rd32(p);
        ev->dev = rd32(p + 4);
        ev->mm = rd64(p + 8);
        ev->start = rd64(p + 16);
        ev->end = rd64(p + 24);
        ev->vm_flags = rd64(p + 32);
        ev->pgoff = rd64(p + 40);
        ev->ino = rd64(p + 48);
        get_string(ev->name, p + 56, end);
        return 1;
    case MB_PAGECACHE:
        ev->op = rd32(p);
        ev->dev = rd32(p + 4);
        ev->ino = rd64(p + 8);
        ev->index = rd64(p + 16);
        ev->frame = rd64(p + 24);
        return 1;
    case MB_MARK:
        ev->op = rd32(p);
        ev->arg = rd64(p + 8);
        get_string(ev->name, p + 16, end);
        return 1;
    case MB_COUNTER:
        ev->value = rd64(p + 8);
        get_string(ev->name, p + 16, end);
        return 1;
    case MB_TASK_COMM:
        ev->tgid = rd32(p);
        get_comm(ev->name, p + 8);
        return 1;
    default:
        return 1; /* unknown type: passed on, the caller skips it */
    }
}

long mb_drain(struct mb_reader *r, mb_event_fn fn, void *ctx, struct mb_lost *lost)
{
    uint32_t n;
    if (!ready(r, &n)) {
        return -1;
    }
    r->seen_magic = 1;
    uint8_t *cb = r->base;
    uint64_t head = __atomic_load_n((uint64_t *)(cb + CB_HEAD), __ATOMIC_ACQUIRE);
    uint64_t tail = rd64(cb + CB_TAIL);
    uint64_t dropped = rd64(cb + CB_DROPPED);
    if (dropped > r->dropped_seen) {
        lost->ring_full += dropped - r->dropped_seen;
    }
    r->dropped_seen = dropped;

    long count = 0;
    if (head - tail > n) {
        r->bad++;
        r->last_error = "head - tail exceeds the slot count";
        tail = head;
    }
    struct mb_event ev;
    while (tail != head) {
        uint64_t idx = tail & (n - 1);
        const uint8_t *slot = cb + MB_SLOTS_OFFSET + idx * MB_SLOT_SIZE;
        memset(&ev, 0, offsetof(struct mb_event, name) + 1);
        ev.type = (uint16_t)(rd32(slot) & 0xffff);
        ev.nslots = (uint16_t)(rd32(slot) >> 16);
        ev.pid = rd32(slot + 4);
        ev.seq = rd64(slot + 8);
        if (ev.nslots == 0 || idx + ev.nslots > n || ev.nslots > head - tail) {
            r->bad++;
            r->last_error = "event with an invalid slot count";
            break;
        }
        tail += ev.nslots;
        if (ev.type == MB_PAD) {
            /* PROTOCOL.md does not say whether PAD consumes a sequence number: accept both */
            if (r->have_seq && ev.seq == r->next_seq) {
                r->next_seq++;
            }
            continue;
        }
        if (r->have_seq && ev.seq != r->next_seq) {
            if (ev.seq > r->next_seq) {
                lost->seq_gap += ev.seq - r->next_seq;
            } else {
                r->bad++;
                r->last_error = "sequence number went backwards";
            }
        }
        r->have_seq = 1;
        r->next_seq = ev.seq + 1;
        if (!decode(&ev, slot, (size_t)ev.nslots * MB_SLOT_SIZE)) {
            r->bad++;
            r->last_error = "event too short for its type";
            continue;
        }
        r->events++;
        count++;
        fn(ctx, &ev);
    }
    __atomic_store_n((uint64_t *)(cb + CB_TAIL), head, __ATOMIC_RELEASE);
    return count;
}
