/*
 * vcpu_stop.c with simulated vCPU threads, the way QEMU's MTTCG drives the plugin:
 *
 * - each thread "executes blocks" (in_block set while it does) and checks after every block
 *   (vs_pending -> vs_join); now and then it leads a stop (vs_stop) and, while the world is
 *   held, checks that no other thread is inside a block;
 * - now and then it goes idle the way QEMU does: idle callback with the "BQL" held (and, when
 *   vs_idle says every vCPU is idle, checks that no thread is in a block), sleeps outside it,
 *   resume callback with the BQL held;
 * - one thread now and then asks for an exclusive section the way QEMU's start_exclusive does:
 *   it waits until every other running thread has left its execution loop, which a thread
 *   stopped in vs_join never does: the leader must time out and let everybody go (aborts > 0),
 *   and the run must finish (no deadlock).
 *
 * Usage: test_vcpu_stop [threads] [milliseconds]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "vcpu_stop.h"

static struct vs_world W;
static int nthreads = 4;
static volatile int done;
static int in_block[VS_MAX_VCPUS];
static int held;                      /* a leader holds the world */
static uint64_t violations, held_checks, idle_all;
static pthread_mutex_t bql = PTHREAD_MUTEX_INITIALIZER;

/* QEMU's exclusive sections (cpus-common.c), reduced to what matters here */
static pthread_mutex_t excl_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t excl_cond = PTHREAD_COND_INITIALIZER;
static int pending_exclusive, in_exec[VS_MAX_VCPUS];
static uint64_t exclusives;

static void nudge(void *ctx, unsigned vcpu)
{
    (void)ctx;
    (void)vcpu; /* the threads check after every block */
}

static void cpu_exec_start(int v)
{
    pthread_mutex_lock(&excl_lock);
    while (pending_exclusive) {
        pthread_cond_wait(&excl_cond, &excl_lock);
    }
    in_exec[v] = 1;
    pthread_mutex_unlock(&excl_lock);
}

static void cpu_exec_end(int v)
{
    pthread_mutex_lock(&excl_lock);
    in_exec[v] = 0;
    pthread_cond_broadcast(&excl_cond);
    pthread_mutex_unlock(&excl_lock);
}

static void exclusive_section(int v)
{
    pthread_mutex_lock(&excl_lock);
    while (pending_exclusive) {
        pthread_cond_wait(&excl_cond, &excl_lock);
    }
    pending_exclusive = 1;
    for (;;) {
        int busy = 0;
        for (int u = 0; u < nthreads; u++) {
            busy |= u != v && in_exec[u];
        }
        if (!busy) {
            break;
        }
        pthread_cond_wait(&excl_cond, &excl_lock);
    }
    exclusives++;
    pending_exclusive = 0;
    pthread_cond_broadcast(&excl_cond);
    pthread_mutex_unlock(&excl_lock);
}

static void check_stopped(int self)
{
    for (int u = 0; u < nthreads; u++) {
        if (u != self && __atomic_load_n(&in_block[u], __ATOMIC_SEQ_CST)) {
            __atomic_fetch_add(&violations, 1, __ATOMIC_SEQ_CST);
        }
    }
}

static void *vcpu_thread(void *arg)
{
    int v = (int)(intptr_t)arg;
    unsigned seed = 12345u + (unsigned)v;
    vs_vcpu_init(&W, (unsigned)v);
    while (!done) {
        cpu_exec_start(v);
        for (int b = 0; b < 200 && !done; b++) {
            __atomic_store_n(&in_block[v], 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&held, __ATOMIC_SEQ_CST)) {
                __atomic_fetch_add(&violations, 1, __ATOMIC_SEQ_CST);
            }
            for (volatile int k = 0; k < 200; k++) {
            }
            __atomic_store_n(&in_block[v], 0, __ATOMIC_SEQ_CST);
            /* the check at the start of the next block */
            if (vs_pending(&W)) {
                vs_join(&W, (unsigned)v);
            }
            if (rand_r(&seed) % 400 == 0 && vs_stop(&W, (unsigned)v)) {
                __atomic_store_n(&held, 1, __ATOMIC_SEQ_CST);
                check_stopped(v);
                held_checks++;
                usleep(50);
                check_stopped(v);
                __atomic_store_n(&held, 0, __ATOMIC_SEQ_CST);
                vs_release(&W);
            }
        }
        cpu_exec_end(v);
        if (v == 0 && rand_r(&seed) % 4 == 0) {
            exclusive_section(v);
        }
        if (rand_r(&seed) % 3 == 0) {
            pthread_mutex_lock(&bql);
            if (vs_idle(&W, (unsigned)v)) {
                check_stopped(-1);
                idle_all++;
            }
            pthread_mutex_unlock(&bql);
            usleep((useconds_t)(rand_r(&seed) % 300));
            pthread_mutex_lock(&bql);
            vs_resume(&W, (unsigned)v);
            pthread_mutex_unlock(&bql);
        }
    }
    pthread_mutex_lock(&bql);
    vs_idle(&W, (unsigned)v);
    pthread_mutex_unlock(&bql);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        nthreads = atoi(argv[1]);
    }
    int ms = argc > 2 ? atoi(argv[2]) : 3000;
    /* short timeout: the simulated exclusive sections make a leader give up often */
    vs_init(&W, 2000000, 200000, nudge, NULL);
    pthread_t t[VS_MAX_VCPUS];
    for (int i = 0; i < nthreads; i++) {
        pthread_create(&t[i], NULL, vcpu_thread, (void *)(intptr_t)i);
    }
    usleep((useconds_t)ms * 1000);
    done = 1;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(t[i], NULL);
    }
    printf("threads %d: stops %llu (held checks %llu), aborts %llu, exclusive sections %llu, "
           "all-idle %llu, resume waits %llu, violations %llu, max gather %.3f ms\n", nthreads,
           (unsigned long long)W.stops, (unsigned long long)held_checks,
           (unsigned long long)W.aborts, (unsigned long long)exclusives,
           (unsigned long long)idle_all, (unsigned long long)W.resume_waits,
           (unsigned long long)violations, W.max_gather_ns / 1e6);
    CHECK(violations == 0, "a thread ran a block while the world was held");
    CHECK(W.stops > 10, "too few stops: %llu", (unsigned long long)W.stops);
    CHECK(W.stops == held_checks, "stops %llu != held %llu", (unsigned long long)W.stops,
          (unsigned long long)held_checks);
    CHECK(exclusives > 0, "no exclusive section got through");
    CHECK(W.running == 0, "running count %u after every thread went idle", W.running);
    if (nthreads > 1) {
        CHECK(W.aborts > 0, "no stop ever gave way to an exclusive section");
    }
    if (failures == 0) {
        printf("all checks passed\n");
    }
    return failures ? 1 : 0;
}
