# Deadlines: one min-heap of (when, fd, serial) entries (ext/c/elbasy_timers.h),
# checked lazily. A deadline that moves later is a plain store in the Slot;
# its heap entry is pushed again only when it fires early. An expired
# deadline goes to the state's expiry handler (dispatch.pxi) or, for a
# pooled upstream, drops it.


cdef void timer_push(Loop loop, int64_t when, int fd, uint64_t serial):
    if elb_timers_push(&loop.timers, when, fd, serial) < 0:
        raise MemoryError()


cdef void arm(Loop loop, Slot s, int64_t when):
    """Set the slot's deadline; push a heap entry only if it is sooner."""
    s.deadline = when
    if s.next_check == 0 or when < s.next_check:
        timer_push(loop, when, s.fd, s.serial)
        s.next_check = when


cdef int next_timeout_ms(Loop loop) noexcept:
    cdef int64_t wait
    if loop.timers.len == 0:
        return 1000
    wait = elb_timers_first(&loop.timers) - elb_now_ns()
    if wait <= 0:
        return 0
    return <int>(wait // 1000000) + 1


cdef void run_timers(Loop loop):
    cdef elb_timer t
    cdef object obj
    cdef Slot s
    while elb_timers_first(&loop.timers) <= loop.now:
        t = elb_timers_pop(&loop.timers)
        if t.fd >= len(loop.fdmap):
            continue
        obj = loop.fdmap[t.fd]
        if obj is None:
            continue
        s = <Slot>obj
        if s.serial != t.serial or s.next_check != t.when:
            continue
        s.next_check = 0
        if s.deadline == 0:
            continue
        if s.deadline > loop.now:
            timer_push(loop, s.deadline, s.fd, s.serial)
            s.next_check = s.deadline
            continue
        s.deadline = 0
        if type(s) is Conn:
            guarded_expiry(loop, <Conn>s)
        else:
            pool_drop(loop, <Pooled>s)
