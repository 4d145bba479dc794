# The shared-memory quota table's C interface (ext/c/elbasy_shm.h), for ext/shm.pyx.

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "elbasy_shm.h" nogil:
    enum:
        ELB_SHM_SLOTS
        ELB_SHM_WINDOW_SLOTS
        ELB_SHM_MAX_LIMITS
        ELB_SHM_MOVED
        ELB_OK
        ELB_SHED
        ELB_LATER
        ELB_FULL
        ELB_ELOCK
        ELB_EJOURNAL
        ELB_EARG
        ELB_BUCKET
        ELB_WINDOW
        ELB_ROLLING

    ctypedef struct elb_limit:
        int kind
        int span
        double interval
        double room
        double quota
        double period
        double guard
        double capacity

    ctypedef struct elb_wslot:
        int64_t tag
        double reserved
        double departed
        double extra

    ctypedef struct elb_bstate:
        double sent
        double interval
        double queued
        double enq
        double deq
        double flying
        double q[32]
        double f[32]

    ctypedef union elb_rec_u:
        elb_bstate b
        elb_wslot w[13]

    ctypedef struct elb_rec:
        uint64_t hash
        double blocked
        double live
        uint32_t kind
        elb_rec_u u

    ctypedef struct elb_counters:
        uint64_t used
        uint64_t evictions
        uint64_t moved_seq

    ctypedef struct elb_shm:
        uint64_t size
        uint32_t capacity
        uint32_t index_size
        uint32_t fact_sets
        uint32_t window_slots
        elb_counters c
        uint64_t recovered
        uint64_t dropped
        uint32_t attached
        int efd[32]

    uint64_t elb_fnv1a(const char *p, size_t n)
    void elb_shm_test_die_inside(int after)
    elb_shm *elb_shm_create(uint32_t capacity, uint32_t facts, int *err)
    void elb_shm_unmap(elb_shm *t, int close_fds)
    void elb_shm_attach(elb_shm *t, int slot)
    void elb_shm_drain(elb_shm *t, int slot)
    uint64_t elb_shm_facts_generation(elb_shm *t)
    uint64_t elb_shm_moved_seq(elb_shm *t)
    uint64_t elb_shm_bytes_per_bucket(const elb_shm *t)
    int elb_shm_reserve(elb_shm *t, int slot, int n, const uint64_t *h, const elb_limit *l,
                        const double *cost, double now, double max_wait, double *depart,
                        int *which, double *slots, double *pos, int *evicted)
    int elb_shm_earliest(elb_shm *t, int n, const uint64_t *h, const elb_limit *l,
                         const double *cost, const double *slots, const double *pos, double now,
                         double *out)
    int elb_shm_confirm(elb_shm *t, int slot, int n, const uint64_t *h, const elb_limit *l,
                        const double *cost, double *slots, const double *pos, double now,
                        double *later)
    int elb_shm_give_back(elb_shm *t, int slot, int n, const uint64_t *h, const elb_limit *l,
                          const double *cost, const double *slots, double now)
    int elb_shm_settle(elb_shm *t, int slot, int n, const uint64_t *h, const elb_limit *l,
                       const double *refund, double now)
    int elb_shm_observe(elb_shm *t, int n, const uint64_t *h, const elb_limit *l, int m,
                        const int *idx, const double *val, const double *block, double now)
    int elb_shm_throttled(elb_shm *t, int n, const uint64_t *h, const elb_limit *l, double now,
                          double until)
    int64_t elb_shm_release_slot(elb_shm *t, int slot, double now)
    int elb_shm_landed(elb_shm *t, int slot, int n, const uint64_t *h, const elb_limit *l,
                       const double *slots, double now)
    int elb_shm_moved(elb_shm *t, int slot, uint64_t *last, uint64_t *out)
    int elb_shm_fact(elb_shm *t, uint64_t h, double *a, double *b)
    int elb_shm_put_fact(elb_shm *t, uint64_t h, double a, double b)
    int elb_shm_peek(elb_shm *t, uint64_t h, elb_rec *out)
