# The loop's counters (ext/c/elbasy_counters.h, which names them once; the C
# compiler checks every field below against it).

from libc.stdint cimport uint64_t


cdef extern from "elbasy_counters.h" nogil:
    ctypedef struct elb_loop_counters:
        uint64_t accepted
        uint64_t open
        uint64_t tunnels_open
        uint64_t tunnels_total
        uint64_t requests
        uint64_t bytes_up
        uint64_t bytes_down
        uint64_t spliced
        uint64_t copied
        uint64_t head_timeouts
        uint64_t idle_timeouts
        uint64_t keepalive_closed
        uint64_t accept_emfile
        uint64_t accept_errors
        uint64_t connect_failures
        uint64_t connect_timeouts
        uint64_t response_timeouts
        uint64_t client_aborts
        uint64_t upstream_aborts
        uint64_t pool_reused
        uint64_t pool_stale
        uint64_t retries
        uint64_t policy_errors
        uint64_t pipes_created
        uint64_t pipes_closed
        uint64_t splice_fallbacks
        uint64_t internal_errors
        uint64_t intercepts_open
        uint64_t intercepts_total
        uint64_t tls_accepted
        uint64_t tls_accept_failures
        uint64_t tls_upstream
        uint64_t tls_upstream_failures
        uint64_t held
        uint64_t waiting
        uint64_t held_left
        uint64_t throttle_retries
        uint64_t drain_refused
        uint64_t drain_closed
        uint64_t pool_idle
        uint64_t exchange_timeouts
        uint64_t refused_busy
        uint64_t clients_refused
        uint64_t bad_hellos
    const char *const elb_loop_counter_names[]
    const char *const elb_loop_gauge_names[]
    void elb_loop_gauges_zero(elb_loop_counters *c)
