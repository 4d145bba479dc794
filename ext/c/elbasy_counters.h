/* elbasy data plane: the counters of one worker's loop, in one struct.
 *
 * The list below is the one place a loop counter is named. The struct lives
 * where its Loop is told to keep it: in a slot of the instance's shared
 * metrics memory (elbasy/metrics.py maps it before the workers fork), so
 * one scrape of /metrics reads every worker's counters as they are, with no
 * copy and no message; a Loop given no memory keeps it in itself.
 * elb_loop_counter_names gives Python the same names in the same order.
 *
 * Gauges (values that go down, listed in ELB_LOOP_GAUGES) describe a live
 * process: a restarted worker's Loop sets them to zero in its slot before
 * it takes a connection.
 */
#ifndef ELBASY_COUNTERS_H
#define ELBASY_COUNTERS_H

#include <stdint.h>

#define ELB_LOOP_COUNTERS(X) \
    X(accepted) \
    X(open) \
    X(tunnels_open) \
    X(tunnels_total) \
    X(requests) \
    X(bytes_up) \
    X(bytes_down) \
    X(spliced) \
    X(copied) \
    X(head_timeouts) \
    X(idle_timeouts) \
    X(keepalive_closed) \
    X(accept_emfile) \
    X(accept_errors) \
    X(connect_failures) \
    X(connect_timeouts) \
    X(response_timeouts) \
    X(client_aborts) \
    X(upstream_aborts) \
    X(pool_reused) \
    X(pool_stale) \
    X(retries) \
    X(policy_errors) \
    X(pipes_created) \
    X(pipes_closed) \
    X(splice_fallbacks) \
    X(internal_errors) \
    X(intercepts_open) \
    X(intercepts_total) \
    X(tls_accepted) \
    X(tls_accept_failures) \
    X(tls_upstream) \
    X(tls_upstream_failures) \
    X(held) \
    X(waiting) \
    X(held_left) \
    X(throttle_retries) \
    X(drain_refused) \
    X(drain_closed) \
    X(pool_idle) \
    X(exchange_timeouts) \
    X(refused_busy) \
    X(clients_refused) \
    X(bad_hellos)

#define ELB_LOOP_GAUGES(X) X(open) X(tunnels_open) X(intercepts_open) X(waiting) X(pool_idle)

typedef struct {
#define ELB_FIELD(name) uint64_t name;
    ELB_LOOP_COUNTERS(ELB_FIELD)
#undef ELB_FIELD
} elb_loop_counters;

#define ELB_NAME(name) #name,
static const char *const elb_loop_counter_names[] = {ELB_LOOP_COUNTERS(ELB_NAME) NULL};
static const char *const elb_loop_gauge_names[] = {ELB_LOOP_GAUGES(ELB_NAME) NULL};
#undef ELB_NAME

static inline void elb_loop_gauges_zero(elb_loop_counters *c)
{
#define ELB_ZERO(name) c->name = 0;
    ELB_LOOP_GAUGES(ELB_ZERO)
#undef ELB_ZERO
}

#endif
