# splice(2) and the pipe pool.
#
# A bulk flow takes a kernel pipe pair from the loop's pool (or makes one)
# and gives it back when its FIN has passed; a pipe with bytes still in it
# is closed instead. drain_pipe reports like pump (1 emptied, PUMP_OK the
# destination is full, PUMP_DST_FAILED) and closes nothing. A flow that
# splice(2) refuses copies from then on.


cdef int drain_pipe(Loop loop, Dir *d, int dst) except STEP_RAISED:
    """Move what the pipe holds to dst: 1 emptied, PUMP_OK (0) dst is
    full, PUMP_DST_FAILED dst failed."""
    cdef ssize_t k
    while d.in_pipe > 0:
        k = splice(d.pipe_r, NULL, dst, NULL, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if k < 0:
            if errno == EINTR:
                continue  # a signal first: nothing moved
            if errno == EAGAIN:
                return PUMP_OK  # dst's socket buffer is full
            if errno == EINVAL or errno == ENOSYS or errno == EBADF:
                # dst cannot take spliced pages: its bytes leave by copy
                stop_splicing(loop, d)
                return 1 if buf_len(&d.pend) == 0 else flush_pend(loop, d, dst)
            return PUMP_DST_FAILED  # EPIPE, ECONNRESET: dst is gone
        d.in_pipe -= k
        loop.c.spliced += k
    return 1


cdef int flush_pend(Loop loop, Dir *d, int dst) except STEP_RAISED:
    """Send d.pend to dst: 1 all sent, PUMP_OK dst is full, PUMP_DST_FAILED."""
    cdef int rc = buf_send(dst, NULL, &d.pend, &loop.c.copied)
    if rc < 0:
        return PUMP_DST_FAILED
    return 1 if rc else PUMP_OK


cdef void stop_splicing(Loop loop, Dir *d):
    """splice(2) refused this flow (EINVAL, ENOSYS, EBADF: an old kernel,
    a socket type without splice support): the bytes already in the pipe
    move to the copy buffer, and the flow copies from now on."""
    cdef ssize_t k
    loop.c.splice_fallbacks += 1
    d.no_splice = True
    while d.in_pipe > 0:
        buf_reserve(&d.pend, d.in_pipe)
        k = read(d.pipe_r, d.pend.data + d.pend.end, d.in_pipe)
        if k <= 0:
            if k < 0 and errno == EINTR:
                continue  # a signal first: nothing was read, read again
            break  # cannot happen for a pipe we filled; give up on those bytes
        d.pend.end += k
        d.in_pipe -= k
    d.in_pipe = 0
    release_pipe(loop, d)


cdef void go_splice(Loop loop, Dir *d):
    cdef int p[2]
    if d.spliced:
        return
    if loop.pipes.idle > 0:
        loop.pipes.idle -= 1
        d.pipe_r = loop.pipes.ends[loop.pipes.idle][0]
        d.pipe_w = loop.pipes.ends[loop.pipes.idle][1]
    else:
        if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
            return  # EMFILE/ENFILE: out of fds, this flow stays in copy mode
        # EPERM past fs.pipe-user-pages-soft: ignored, the pipe keeps its size
        fcntl(p[1], F_SETPIPE_SZ, <int>PIPE_SIZE)
        d.pipe_r = p[0]
        d.pipe_w = p[1]
        loop.c.pipes_created += 1
    d.spliced = True


cdef void release_pipe(Loop loop, Dir *d):
    """Give a flow's pipe back to the pool (or close it if bytes remain in it)."""
    if d.pipe_r < 0:
        return
    if d.in_pipe == 0 and loop.pipes.idle < PIPE_POOL_MAX:
        loop.pipes.ends[loop.pipes.idle][0] = d.pipe_r
        loop.pipes.ends[loop.pipes.idle][1] = d.pipe_w
        loop.pipes.idle += 1
    else:
        close(d.pipe_r)
        close(d.pipe_w)
        loop.c.pipes_closed += 1
    d.pipe_r = -1
    d.pipe_w = -1
    d.in_pipe = 0
    d.spliced = False
