# CONNECT tunnels: S_TUNNEL.
#
# Two directions (TunnelState.up: client -> upstream, .down: upstream ->
# client), each a Dir. pump() moves what a source has to its destination and
# reports PUMP_OK, PUMP_SRC_FAILED or PUMP_DST_FAILED; it closes nothing: its
# caller aborts the tunnel with the failed side as the culprit, and a reset
# travels on to the other side. A flow copies through the loop's buffer
# until one read fills it, then splices (splice.pxi). A --listen-tls client's
# side is its TLS session (c.tls.cssl): that flow never splices, and its
# bytes are read and written through OpenSSL.


cdef inline void tunnel_init(TunnelState *t) noexcept nogil:
    """A new connection's tunnel: no pipe in either direction."""
    t.up.pipe_r = -1
    t.up.pipe_w = -1
    t.down.pipe_r = -1
    t.down.pipe_w = -1


cdef void tunnel_release(Loop loop, TunnelState *t):
    """The connection ends: pipes back to the pool (or closed), buffers freed."""
    release_pipe(loop, &t.up)
    release_pipe(loop, &t.down)
    buf_free(&t.up.pend)
    buf_free(&t.down.pend)


cdef inline bint dir_pending(Dir *d) noexcept nogil:
    """Bytes of this direction still on their way (in the pipe or parked)."""
    return d.in_pipe > 0 or buf_len(&d.pend) > 0


cdef void begin_tunnel(Loop loop, Conn c):
    cdef bytes ok = CONNECT_200
    cdef Py_ssize_t early = buf_len(&c.cin)
    cdef ssize_t sent
    cdef int rc
    c.state = S_TUNNEL
    loop.c.tunnels_open += 1
    loop.c.tunnels_total += 1
    c.bytes_up = 0
    c.bytes_down = 0
    # The "200" goes first; a client that did not wait for it (bytes after
    # the CONNECT head) has those bytes passed on before anything else. A
    # --transparent client sent no CONNECT: no "200", and its ClientHello,
    # still in cin, is what goes up first.
    if c.transparent:
        c.transparent = False
        sent = PyBytes_GET_SIZE(ok)
    elif c.tls.cssl != NULL:
        # a --listen-tls session: everything to the client goes through TLS,
        # the "200" too (the pump sends it), and no byte can be spliced
        buf_append(&c.tunnel.down.pend, c.cout.data + c.cout.start, buf_len(&c.cout))
        sent = 0
        c.tunnel.up.no_splice = True
        c.tunnel.down.no_splice = True
    elif buf_len(&c.cout):
        # a response to an earlier request is still on its way: it goes first
        buf_append(&c.tunnel.down.pend, c.cout.data + c.cout.start, buf_len(&c.cout))
        sent = 0
    else:
        sent = send(c.fd, PyBytes_AS_STRING(ok), PyBytes_GET_SIZE(ok), MSG_NOSIGNAL)
        if sent < 0:
            # EAGAIN, or a client already gone (EPIPE, ECONNRESET): the
            # "200" is parked, and the pump below finds out which
            sent = 0
    if sent < PyBytes_GET_SIZE(ok):
        buf_append(&c.tunnel.down.pend, PyBytes_AS_STRING(ok) + sent, PyBytes_GET_SIZE(ok) - sent)
    if early:
        buf_append(&c.tunnel.up.pend, c.cin.data + c.cin.start, early)
        c.bytes_up += early
    buf_free(&c.cin)
    buf_free(&c.cout)
    if loop.splice_mode == SPLICE_ALWAYS and c.tls.cssl == NULL:
        go_splice(loop, &c.tunnel.up)
        go_splice(loop, &c.tunnel.down)
    arm(loop, c, loop.now + loop.idle_ns)
    if early or c.tls.cssl != NULL:
        # (a TLS session may hold decrypted bytes epoll cannot see: read them now)
        rc = pump(loop, c, &c.tunnel.up, c.fd, c.ufd)
        if rc < 0:
            tunnel_abort(loop, c, c.fd if rc == PUMP_SRC_FAILED else c.ufd)
            return
    if buf_len(&c.tunnel.down.pend):
        rc = pump(loop, c, &c.tunnel.down, c.ufd, c.fd)
        if rc < 0:
            tunnel_abort(loop, c, c.ufd if rc == PUMP_SRC_FAILED else c.fd)
            return
    tunnel_masks(loop, c)


cdef void tunnel_event(Loop loop, Conn c, int fd, uint32_t ev):
    cdef int rc = 0
    cdef int other = c.ufd if fd == c.fd else c.fd
    cdef Dir *reading = &c.tunnel.up if fd == c.fd else &c.tunnel.down    # fd is its source
    cdef Dir *writing = &c.tunnel.down if fd == c.fd else &c.tunnel.up    # fd is its destination
    cdef uint64_t before = loop.c.copied + loop.c.spliced + c.bytes_up + c.bytes_down
    cdef epoll_event unused
    if ev & EPOLLERR:
        tunnel_abort(loop, c, fd)  # a reset (or another socket error) on fd
        return
    if ev & EPOLLOUT and fd == c.fd and c.tls.c_rw:
        c.tls.c_rw = 0  # a TLS read that had to write first goes on now
        ev |= EPOLLIN
    if ev & (EPOLLIN | EPOLLHUP):
        rc = pump(loop, c, reading, fd, other)
        if rc < 0:
            tunnel_abort(loop, c, fd if rc == PUMP_SRC_FAILED else other)
            return
    if ev & (EPOLLOUT | EPOLLHUP):
        rc = pump(loop, c, writing, other, fd)
        if rc < 0:
            tunnel_abort(loop, c, other if rc == PUMP_SRC_FAILED else fd)
            return
    if c.tunnel.up.shut and c.tunnel.down.shut:
        close_conn(loop, c, False)
        return
    if loop.c.copied + loop.c.spliced + c.bytes_up + c.bytes_down != before:
        c.deadline = loop.now + loop.idle_ns  # idle means no byte moved
    tunnel_masks(loop, c)
    if ev & EPOLLHUP:
        # A socket shut both ways reports HUP whatever it is asked for.
        # While it has nothing to do (its data waits on the other side)
        # it leaves epoll; tunnel_masks adds it back when it has.
        if fd == c.fd and c.cmask == 0:
            epoll_ctl(loop.epfd, EPOLL_CTL_DEL, fd, &unused)
            c.cmask = -1
        elif fd == c.ufd and c.umask == 0:
            epoll_ctl(loop.epfd, EPOLL_CTL_DEL, fd, &unused)
            c.umask = -1


cdef void tunnel_masks(Loop loop, Conn c):
    cdef int cw = 0, uw = 0
    if not c.tunnel.up.eof and not dir_pending(&c.tunnel.up):
        cw |= EPOLLIN
    if dir_pending(&c.tunnel.down) or c.tls.c_rw:
        cw |= EPOLLOUT
    if not c.tunnel.down.eof and not dir_pending(&c.tunnel.down):
        uw |= EPOLLIN
    if dir_pending(&c.tunnel.up):
        uw |= EPOLLOUT
    set_mask(loop, c.fd, &c.cmask, cw)
    set_mask(loop, c.ufd, &c.umask, uw)


cdef void tunnel_abort(Loop loop, Conn c, int culprit):
    """One side failed or reset: end both, passing a reset on."""
    if culprit == c.fd:
        loop.c.client_aborts += 1
        if c.ufd >= 0:
            loop.fdmap[c.ufd] = None
            retire_fd(loop, c.ufd, True)
            c.ufd = -1
    else:
        loop.c.upstream_aborts += 1
        if c.fd >= 0:
            loop.fdmap[c.fd] = None
            retire_fd(loop, c.fd, True)
            c.fd = -1
    close_conn(loop, c, False)


cdef int pump(Loop loop, Conn c, Dir *d, int src, int dst) except STEP_RAISED:
    """Move what src has to dst: PUMP_OK (progress, or a clean wait),
    PUMP_SRC_FAILED or PUMP_DST_FAILED. It closes nothing; the caller
    aborts the tunnel with the side that failed as the culprit.

    A flow starts in copy mode (recv/send through the loop's buffer:
    cheapest for small messages, one syscall each way) and moves to
    splice through a kernel pipe as soon as one read fills the buffer,
    the sign of a bulk flow. Backpressure: nothing is read while the
    destination still has bytes of ours to take.
    """
    cdef ssize_t n, k
    cdef int _rounds, rc
    cdef bint up = d == &c.tunnel.up
    # a --listen-tls client's side is its TLS session (never spliced: no_splice)
    cdef SSL *src_ssl = c.tls.cssl if src == c.fd else NULL
    cdef SSL *dst_ssl = c.tls.cssl if dst == c.fd else NULL
    # 1. bytes already on their way
    rc = buf_send(dst, dst_ssl, &d.pend, &loop.c.copied)
    if rc <= 0:
        return PUMP_DST_FAILED if rc < 0 else PUMP_OK
    if d.pend.cap:
        buf_free(&d.pend)  # an idle tunnel keeps no buffer
    rc = drain_pipe(loop, d, dst)
    if rc != 1:
        return rc  # PUMP_OK: dst is full; or PUMP_DST_FAILED
    # 2. read more, as long as the destination keeps up
    for _rounds in range(PUMP_ROUNDS):
        if d.eof:
            break
        if d.spliced:
            n = splice(src, NULL, d.pipe_w, NULL, SPLICE_CHUNK,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        else:
            n = elb_io_recv(src, src_ssl, loop.iobuf, IO_CHUNK, &c.tls.c_rw)
        if n < 0:
            if errno == EINTR:
                continue  # a signal first: nothing moved, read again
            if errno == EAGAIN:
                break  # src is empty (or, spliced, the pipe is full)
            if d.spliced and (errno == EINVAL or errno == ENOSYS or errno == EBADF):
                # this kernel or socket type cannot splice: copy instead
                stop_splicing(loop, d)
                continue
            return PUMP_SRC_FAILED  # ECONNRESET, ETIMEDOUT, EHOSTUNREACH...
        if n == 0:
            d.eof = True  # src sent its FIN
            break
        if up:
            c.bytes_up += n
            loop.c.bytes_up += n
        else:
            c.bytes_down += n
            loop.c.bytes_down += n
        if d.spliced:
            d.in_pipe = n
            rc = drain_pipe(loop, d, dst)
            if rc != 1:
                return rc
            continue
        k = elb_io_send(dst, dst_ssl, loop.iobuf, n)
        if k < 0:
            if errno != EAGAIN and errno != EINTR:
                return PUMP_DST_FAILED  # EPIPE, ECONNRESET: dst is gone
            k = 0  # dst is full (or a signal): the bytes are parked below
        loop.c.copied += k
        if n == IO_CHUNK and loop.splice_mode == SPLICE_AUTO and not d.no_splice:
            go_splice(loop, d)
        if k < n:
            buf_append(&d.pend, loop.iobuf + k, n - k)
            return PUMP_OK
        if n < IO_CHUNK and (src_ssl == NULL or SSL_pending(src_ssl) == 0):
            # a short read emptied the socket: another recv would
            # only say EAGAIN; the level-triggered poll will call again
            # (a TLS read gives one record: more may wait inside OpenSSL)
            return PUMP_OK
    # 3. the source is done and everything reached dst: pass the FIN on
    if d.eof and not d.shut and not dir_pending(d):
        # the FIN travels on; when the other way is already finished the
        # tunnel closes right after, and close() sends it for free
        if not (c.tunnel.down.shut if up else c.tunnel.up.shut):
            if dst_ssl != NULL:
                elb_tls_goodbye(dst_ssl)  # a TLS client hears the end as close_notify
            shutdown(dst, SHUT_WR)  # errors ignored: a dead dst shows on its next event
        d.shut = True
        release_pipe(loop, d)
    return PUMP_OK
