# The timer heap's C interface (ext/c/elbasy_timers.h), for the loop (ext/loop/)
# and ext/timers.pyx.

from libc.stdint cimport int64_t, uint64_t


cdef extern from "elbasy_timers.h" nogil:
    ctypedef struct elb_timer:
        int64_t when
        int fd
        uint64_t serial
    ctypedef struct elb_timers:
        size_t len
    int elb_timers_init(elb_timers *t, size_t cap)
    void elb_timers_free(elb_timers *t)
    int64_t elb_timers_first(const elb_timers *t)
    int elb_timers_push(elb_timers *t, int64_t when, int fd, uint64_t serial)
    elb_timer elb_timers_pop(elb_timers *t)
