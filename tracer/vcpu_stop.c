/* Stopping every vCPU at an epoch end: see vcpu_stop.h. */
#include "vcpu_stop.h"

#include <time.h>

#define NUDGE_EVERY_NS 1000000 /* a nudge can be lost in a race with the vCPU's own update */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void vs_init(struct vs_world *w, uint64_t timeout_ns, uint64_t retry_ns, vs_nudge_fn nudge,
             void *ctx)
{
    g_mutex_init(&w->lock);
    g_cond_init(&w->changed);
    w->phase = VS_OPEN;
    w->timeout_ns = timeout_ns;
    w->retry_ns = retry_ns;
    w->nudge = nudge;
    w->ctx = ctx;
}

static void set_phase(struct vs_world *w, int phase)
{
    __atomic_store_n(&w->phase, phase, __ATOMIC_RELAXED);
}

/* With the lock held: waits until the current stop (if any) has been released. */
static void wait_release(struct vs_world *w)
{
    uint64_t gen = w->generation;
    while (w->generation == gen) {
        g_cond_wait(&w->changed, &w->lock);
    }
}

/* With the lock held: a vCPU starts running; it must not run guest code while the world is
 * held, and must stop at its first block while the leader gathers. */
static void start_running(struct vs_world *w, unsigned vcpu)
{
    if (!w->is_running[vcpu]) {
        w->is_running[vcpu] = true;
        w->running++;
    }
    while (w->phase == VS_HELD) {
        w->resume_waits++;
        wait_release(w);
    }
    if (w->phase == VS_GATHERING && w->nudge) {
        w->nudge(w->ctx, vcpu);
    }
}

void vs_vcpu_init(struct vs_world *w, unsigned vcpu)
{
    if (vcpu >= VS_MAX_VCPUS) {
        return;
    }
    g_mutex_lock(&w->lock);
    w->known[vcpu] = true;
    start_running(w, vcpu);
    g_mutex_unlock(&w->lock);
}

void vs_resume(struct vs_world *w, unsigned vcpu)
{
    if (vcpu >= VS_MAX_VCPUS) {
        return;
    }
    g_mutex_lock(&w->lock);
    if (w->known[vcpu]) {  /* QEMU 10 may resume a vCPU before its (asynchronous) init */
        start_running(w, vcpu);
    }
    g_mutex_unlock(&w->lock);
}

bool vs_idle(struct vs_world *w, unsigned vcpu)
{
    if (vcpu >= VS_MAX_VCPUS) {
        return false;
    }
    g_mutex_lock(&w->lock);
    if (w->is_running[vcpu]) {
        w->is_running[vcpu] = false;
        w->running--;
        if (w->phase == VS_GATHERING) {
            g_cond_broadcast(&w->changed); /* the leader may have all it waits for now */
        }
    }
    bool all_idle = w->known[vcpu] && w->running == 0 && w->phase == VS_OPEN;
    g_mutex_unlock(&w->lock);
    return all_idle;
}

/* With the lock held: take part in the stop under way as one of the stopped vCPUs. */
static void arrive(struct vs_world *w)
{
    w->arrived++;
    if (w->arrived >= w->running) {
        g_cond_broadcast(&w->changed);
    }
    wait_release(w);
}

void vs_join(struct vs_world *w, unsigned vcpu)
{
    (void)vcpu;
    g_mutex_lock(&w->lock);
    if (w->phase != VS_OPEN) {
        arrive(w);
    }
    g_mutex_unlock(&w->lock);
}

bool vs_stop(struct vs_world *w, unsigned vcpu)
{
    uint64_t t0 = now_ns();
    if (t0 < __atomic_load_n(&w->not_before, __ATOMIC_RELAXED)) {
        return false;
    }
    g_mutex_lock(&w->lock);
    if (w->phase != VS_OPEN) {
        arrive(w);  /* another vCPU leads: be stopped, then look again at the next check */
        g_mutex_unlock(&w->lock);
        return false;
    }
    set_phase(w, VS_GATHERING);
    w->leader = vcpu;
    w->arrived = 1;
    uint64_t deadline = t0 + w->timeout_ns;
    uint64_t now = t0;
    while (w->arrived < w->running) {
        if (now >= deadline) {
            /* someone cannot come (an exclusive section waits for us): let everybody go */
            w->aborts++;
            __atomic_store_n(&w->not_before, now + w->retry_ns, __ATOMIC_RELAXED);
            set_phase(w, VS_OPEN);
            w->arrived = 0;
            w->generation++;
            g_cond_broadcast(&w->changed);
            g_mutex_unlock(&w->lock);
            return false;
        }
        if (w->nudge) {
            for (unsigned v = 0; v < VS_MAX_VCPUS; v++) {
                if (v != vcpu && w->is_running[v]) {
                    w->nudge(w->ctx, v);
                }
            }
        }
        uint64_t until = MIN(deadline, now + NUDGE_EVERY_NS);
        gint64 end = g_get_monotonic_time() + (gint64)((until - now) / 1000) + 1;
        g_cond_wait_until(&w->changed, &w->lock, end);
        now = now_ns();
    }
    set_phase(w, VS_HELD);
    w->stops++;
    uint64_t took = now_ns() - t0;
    w->gather_ns += took;
    w->max_gather_ns = MAX(w->max_gather_ns, took);
    g_mutex_unlock(&w->lock);
    return true;
}

void vs_release(struct vs_world *w)
{
    g_mutex_lock(&w->lock);
    set_phase(w, VS_OPEN);
    w->arrived = 0;
    w->generation++;
    g_cond_broadcast(&w->changed);
    g_mutex_unlock(&w->lock);
}

void vs_abandon(struct vs_world *w)
{
    vs_release(w);
}
