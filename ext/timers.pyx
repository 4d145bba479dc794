# cython: language_level=3
"""The loop's timer heap (ext/c/elbasy_timers.h) as a Python object.

The loop calls the C functions directly; this module hands the same code to
the tests (ordering against a reference) and to bench/test_timers_bench.py
(the cost of a timer with 100,000 and more live), with no sockets, so the
structure is measured at sizes a process's fd limit would not let the loop
reach.
"""

from libc.stdint cimport int64_t, uint64_t

from timers cimport (
    elb_timer, elb_timers, elb_timers_first, elb_timers_free, elb_timers_init, elb_timers_pop,
    elb_timers_push,
)


cdef inline uint64_t xorshift(uint64_t *state) noexcept nogil:
    cdef uint64_t x = state[0]
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    state[0] = x
    return x


cdef class TimerHeap:
    """Entries (when, fd, serial), earliest first."""

    cdef elb_timers t

    def __cinit__(self, size_t capacity=1024):
        if elb_timers_init(&self.t, capacity) < 0:
            raise MemoryError()

    def __dealloc__(self):
        elb_timers_free(&self.t)

    def __len__(self):
        return self.t.len

    def push(self, int64_t when, int fd, uint64_t serial=0):
        if elb_timers_push(&self.t, when, fd, serial) < 0:
            raise MemoryError()

    def pop(self):
        """The earliest entry as (when, fd, serial); IndexError when empty."""
        cdef elb_timer e
        if self.t.len == 0:
            raise IndexError("pop from an empty TimerHeap")
        e = elb_timers_pop(&self.t)
        return (e.when, e.fd, e.serial)

    def first(self):
        """The earliest `when`, or None."""
        return elb_timers_first(&self.t) if self.t.len else None

    def hold(self, Py_ssize_t rounds, int64_t spread, uint64_t seed=88172645463325252):
        """The loop's steady state, ``rounds`` times: take the earliest entry
        and push one due up to ``spread`` ns after it (a connection served,
        its next deadline set). The heap keeps its size; returns the last
        `when` taken."""
        cdef uint64_t state = seed if seed else 1
        cdef elb_timer e
        cdef Py_ssize_t _round
        e.when = 0
        if self.t.len == 0 or spread <= 0:
            raise ValueError("hold needs a non-empty heap and spread > 0")
        with nogil:
            for _round in range(rounds):
                e = elb_timers_pop(&self.t)
                elb_timers_push(&self.t, e.when + <int64_t>(xorshift(&state) % <uint64_t>spread),
                                e.fd, e.serial)
        return e.when
