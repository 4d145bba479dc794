/* elbasy data plane: the one timer structure of a worker's loop.
 *
 * Every deadline the loop keeps (head read, connect, idle tunnel, keep-alive,
 * response, a held request's departure) is an entry (when, fd, serial) in one
 * min-heap ordered by `when`. The loop checks entries lazily: a deadline that
 * moves later is a plain store in the connection, and an entry that fires
 * early (its connection is gone, its serial is stale, or its deadline moved)
 * is dropped or pushed again. So the heap sees one push and one pop per
 * deadline that actually comes due, whatever the churn in between.
 *
 * Plain C, no allocation but on growth, no Python. A timer costs O(log n):
 * bench/test_timers_bench.py measures it at 1,000 to 1,000,000 live entries.
 * The heap is binary; ELB_TIMERS_ARITY=4 builds a 4-ary one (half the levels,
 * siblings in one cache line), which measured no faster here at any of those
 * sizes, so the simpler shape stays.
 */
#ifndef ELBASY_TIMERS_H
#define ELBASY_TIMERS_H

#include <stdint.h>
#include <stdlib.h>

#ifndef ELB_TIMERS_ARITY
#define ELB_TIMERS_ARITY 2
#endif

typedef struct {
    int64_t when;     /* CLOCK_MONOTONIC ns */
    int fd;
    uint64_t serial;  /* which connection had the fd when the entry was made */
} elb_timer;

typedef struct {
    elb_timer *v;
    size_t len;
    size_t cap;
} elb_timers;

/* 0, or -1 when out of memory. */
static inline int elb_timers_init(elb_timers *t, size_t cap)
{
    t->len = 0;
    t->cap = cap ? cap : 1;
    t->v = (elb_timer *)malloc(sizeof(elb_timer) * t->cap);
    return t->v ? 0 : -1;
}

static inline void elb_timers_free(elb_timers *t)
{
    free(t->v);
    t->v = NULL;
    t->len = t->cap = 0;
}

/* The earliest `when`, or INT64_MAX when there is none. */
static inline int64_t elb_timers_first(const elb_timers *t)
{
    return t->len ? t->v[0].when : INT64_MAX;
}

/* 0, or -1 when the heap cannot grow (it is left as it was). */
static inline int elb_timers_push(elb_timers *t, int64_t when, int fd, uint64_t serial)
{
    size_t i, parent;
    elb_timer item;
    if (t->len == t->cap) {
        elb_timer *grown = (elb_timer *)realloc(t->v, sizeof(elb_timer) * t->cap * 2);
        if (grown == NULL)
            return -1;
        t->v = grown;
        t->cap *= 2;
    }
    item.when = when;
    item.fd = fd;
    item.serial = serial;
    i = t->len++;
    while (i > 0) {
        parent = (i - 1) / ELB_TIMERS_ARITY;
        if (t->v[parent].when <= when)
            break;
        t->v[i] = t->v[parent];
        i = parent;
    }
    t->v[i] = item;
    return 0;
}

/* Remove and return the earliest entry; the heap must not be empty. */
static inline elb_timer elb_timers_pop(elb_timers *t)
{
    elb_timer top = t->v[0];
    elb_timer last;
    size_t i = 0, child, best, end, n;
    n = --t->len;
    if (n == 0)
        return top;
    last = t->v[n];
    for (;;) {
        child = i * ELB_TIMERS_ARITY + 1;
        if (child >= n)
            break;
        best = child;
        end = child + ELB_TIMERS_ARITY < n ? child + ELB_TIMERS_ARITY : n;
        for (child = best + 1; child < end; child++)
            if (t->v[child].when < t->v[best].when)
                best = child;
        if (t->v[best].when >= last.when)
            break;
        t->v[i] = t->v[best];
        i = best;
    }
    t->v[i] = last;
    return top;
}

#endif
