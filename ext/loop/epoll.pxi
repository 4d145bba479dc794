# The loop's fds in epoll, and their end.
#
# set_mask is the one way a connection's interest changes (one syscall only
# when it does). An fd is never closed in the middle of a wake-up: retire_fd
# queues it and close_retired closes the queue once every event of the batch
# is handled, so a number the kernel hands out again never receives an event
# meant for the connection that had it before.


cdef int add_fd(Loop loop, int fd, uint32_t mask) except -1:
    cdef epoll_event e
    e.events = mask
    e.data.u64 = 0
    e.data.fd = fd
    if epoll_ctl(loop.epfd, EPOLL_CTL_ADD, fd, &e) < 0:
        # only at start-up (the listener, the resolver's and the wake-up fd):
        # ENOMEM or ENOSPC there is fatal
        raise OSError(errno, os.strerror(errno))
    return 0


cdef inline void set_mask(Loop loop, int fd, int *current, int want) noexcept:
    """Ask epoll for `want` on fd; one syscall only when it changes.

    A failing epoll_ctl is not checked: EEXIST/ENOENT cannot happen (the
    mask tracks registration), and ENOMEM/ENOSPC (max_user_watches) leave
    the fd unwatched until its deadline closes it; every state has one.
    """
    cdef epoll_event e
    if current[0] == want:
        return
    e.events = <uint32_t>want
    e.data.u64 = 0
    e.data.fd = fd
    if current[0] < 0:
        epoll_ctl(loop.epfd, EPOLL_CTL_ADD, fd, &e)
    else:
        epoll_ctl(loop.epfd, EPOLL_CTL_MOD, fd, &e)
    current[0] = want


cdef void map_fd(Loop loop, int fd, object obj):
    cdef Py_ssize_t need = fd + 1 - len(loop.fdmap)
    if need > 0:
        loop.fdmap.extend([None] * (need + 64))
    loop.fdmap[fd] = obj


cdef void retire_fd(Loop loop, int fd, bint reset):
    """Close fd once this wake-up's events are all handled.

    Closing at once would let accept4 or socket hand the same number to
    a new connection while events for the old one are still queued in
    this batch; the new connection would then get the old one's error
    or hang-up. The caller has already unmapped fd, so those events are
    dropped, and the number cannot come back before the batch ends.
    """
    cdef int *grown
    if reset:
        elb_set_reset(fd)
    if loop.nretired == loop.retired_cap:
        grown = <int *>realloc(loop.retired, sizeof(int) * loop.retired_cap * 2)
        if grown == NULL:
            close(fd)  # out of memory: close now rather than leak
            return
        loop.retired = grown
        loop.retired_cap *= 2
    loop.retired[loop.nretired] = fd
    loop.nretired += 1


cdef void close_retired(Loop loop) noexcept:
    cdef Py_ssize_t i
    for i in range(loop.nretired):
        close(loop.retired[i])
    loop.nretired = 0


cdef void drain_wakeup(Loop loop):
    """Empty the signal wake-up fd (its bytes carry nothing): read until it
    says EAGAIN (or anything but data: the next signal writes again)."""
    cdef char scratch[64]
    while read(loop.wakeup_fd, scratch, sizeof(scratch)) > 0:
        pass


cdef void quota_moved(Loop loop):
    """The quota store's fd is readable: another worker gave room back on
    some accounts. The policy reads which (draining the fd) and moves the
    first of each line it holds there through Loop.wake; an error in it is
    the policy's, counted in policy_errors (and logged by its ended), and
    never stops the loop."""
    try:
        loop.p_quota_moved()
    except Exception as exc:
        loop.c.policy_errors += 1
        tell_ended(loop, None, Ended(INTERNAL_ERROR, error=exc))
