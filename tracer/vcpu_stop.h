/*
 * Stopping every vCPU at an epoch end (multi-threaded TCG, several vCPUs). Prefix vs_.
 *
 * Under MTTCG each vCPU runs on its own host thread and calls the plugin concurrently. At an
 * epoch end the tracer reads guest memory (the frames written, their contents, page tables, the
 * agent's mailbox) and wants the memory of one instant, so every vCPU that executes guest code
 * stops at a translation-block boundary while one of them, the leader, does the epoch's work:
 *
 * - A halted vCPU (idle: HLT, or stopped by QEMU) executes nothing and calls nothing until it
 *   wakes, so no one waits for it: the leader waits only for the vCPUs that are running. QEMU's
 *   idle and resume callbacks keep that count; QEMU calls both with its global lock (the BQL)
 *   held, and a vCPU cannot leave its idle wait without taking the BQL.
 * - The running vCPUs notice the request at their next check (the leader nudges them: see
 *   `nudge` below) and wait in vs_join() until the leader releases them.
 * - A vCPU that wakes while the world is held waits in its resume callback until the release:
 *   it holds the BQL there, which neither the leader nor the stopped vCPUs need. One that wakes
 *   while the leader is still gathering is counted at once and stops at its first block (before
 *   that it may deliver the interrupt that woke it; the world is not held yet).
 * - QEMU's own exclusive sections (an atomic instruction it cannot emulate in parallel, a flush
 *   of the translation cache) wait for every vCPU to leave its execution loop, which a vCPU
 *   waiting here never does while the leader waits for the vCPU that asked for exclusivity.
 *   So the leader gives up after `timeout_ns`, releases everybody and tries again no sooner than
 *   `retry_ns` later (counted in `aborts`): a held world is never a partial one.
 * - When the last running vCPU goes idle, the whole guest is stopped: its idle callback holds
 *   the BQL, without which no vCPU can resume, so vs_idle() tells it to do pending work itself.
 *
 * Threads: every function may be called from any vCPU thread; vs_vcpu_init() also from QEMU's
 * main thread (QEMU 7.2 initialises vCPUs there). All fields are guarded by `lock`, except
 * `phase`, which vs_pending() reads without it (a hint: the caller then takes the lock).
 */
#ifndef MEMTRACE_VCPU_STOP_H
#define MEMTRACE_VCPU_STOP_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#define VS_MAX_VCPUS 64

enum vs_phase { VS_OPEN = 0, VS_GATHERING = 1, VS_HELD = 2 };

/* Makes `vcpu` reach its next check soon (e.g. raises its check counter). Called with the lock
 * held; must not block. */
typedef void (*vs_nudge_fn)(void *ctx, unsigned vcpu);

struct vs_world {
    GMutex lock;
    GCond changed;            /* arrivals, vCPUs going idle, releases */
    int phase;                /* enum vs_phase */
    unsigned leader;
    unsigned running;         /* known vCPUs between init/resume and idle */
    unsigned arrived;         /* running vCPUs stopped for the leader (the leader included) */
    uint64_t generation;      /* +1 at every release or abort */
    bool known[VS_MAX_VCPUS], is_running[VS_MAX_VCPUS];
    uint64_t timeout_ns, retry_ns, not_before;
    vs_nudge_fn nudge;
    void *ctx;
    /* statistics */
    uint64_t stops, aborts, gather_ns, max_gather_ns, resume_waits;
};

void vs_init(struct vs_world *w, uint64_t timeout_ns, uint64_t retry_ns, vs_nudge_fn nudge,
             void *ctx);

/* A vCPU exists and may run (waits while the world is held). */
void vs_vcpu_init(struct vs_world *w, unsigned vcpu);

/*
 * The vCPU stops executing guest code (QEMU's idle callback, BQL held). Returns true when no
 * vCPU is running any more and no stop is under way: the guest is stopped until this callback
 * returns, and the caller may read and change what the leader of a stop would.
 */
bool vs_idle(struct vs_world *w, unsigned vcpu);

/* The vCPU is about to execute guest code again (QEMU's resume callback, BQL held). */
void vs_resume(struct vs_world *w, unsigned vcpu);

/* A stop is being gathered or held (read without the lock: a hint for the per-block checks). */
static inline bool vs_pending(struct vs_world *w)
{
    return __atomic_load_n(&w->phase, __ATOMIC_RELAXED) != VS_OPEN;
}

/* At a check of a running vCPU: if a stop is under way, wait until it is released. */
void vs_join(struct vs_world *w, unsigned vcpu);

/*
 * Stops every running vCPU, `vcpu` (running, at a check) leading. Returns true when the world is
 * held: the caller does its work and calls vs_release(). Returns false when another vCPU led a
 * stop meanwhile (this one took part in it), when the gathering timed out, or when it is too
 * soon after a timeout.
 */
bool vs_stop(struct vs_world *w, unsigned vcpu);

void vs_release(struct vs_world *w);

/* Lets every waiting vCPU go, whatever the phase (the plugin is giving up: fatal error). */
void vs_abandon(struct vs_world *w);

#endif
