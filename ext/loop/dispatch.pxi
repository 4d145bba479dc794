# Events and expiries, by state: the two dispatches of the state table at
# the top of loop.pyx. Each names every state (tests/test_loop_states.py
# checks it) and hands over to the room that state belongs to.
#
# guarded_event and guarded_expiry are the connection boundary: a Python
# exception (STEP_RAISED: out of memory, a bug) stops there, and only the
# one connection it came from ends (conn_crashed).


cdef void guarded_event(Loop loop, Conn c, int fd, uint32_t ev):
    """conn_event, with a Python exception stopped at this one connection."""
    try:
        conn_event(loop, c, fd, ev)
    except Exception as exc:
        conn_crashed(loop, c, exc)


cdef void guarded_expiry(Loop loop, Conn c):
    """conn_expired, with a Python exception stopped at this one connection."""
    try:
        conn_expired(loop, c)
    except Exception as exc:
        conn_crashed(loop, c, exc)


cdef void conn_crashed(Loop loop, Conn c, object exc):
    """A Python exception escaped a step (out of memory, a bug): this
    connection ends with a reset, since what it was owed is unknown; the
    loop and every other connection go on."""
    loop.c.internal_errors += 1
    tell_ended(loop, c.ticket, Ended(INTERNAL_ERROR, error=exc))  # logs it; no page is sent
    drop_upstream(loop, c, True)
    close_conn(loop, c, True)


cdef void conn_event(Loop loop, Conn c, int fd, uint32_t ev):
    """An epoll event on one of c's fds, by c's state (the "events" column)."""
    cdef int st = c.state
    if st == S_TUNNEL:
        tunnel_event(loop, c, fd, ev)
        return
    if ev & EPOLLOUT:
        # a TLS read that had to write first goes on now
        if fd == c.fd and c.tls.c_rw:
            c.tls.c_rw = 0
            ev |= EPOLLIN
        elif fd == c.ufd and c.tls.u_rw:
            c.tls.u_rw = 0
            ev |= EPOLLIN
    if st == S_WAIT:
        # held before departure: the client is only watched for leaving
        if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            loop.c.held_left += 1
            close_conn(loop, c, False)
        elif flush_client(loop, c) != STEP_ENDED:
            wait_mask(loop, c)
        return
    if ev & EPOLLERR:
        if fd == c.ufd:
            if st == S_CONNECT:
                connect_ready(loop, c)
                return
            loop.c.upstream_aborts += 1
            upstream_lost(loop, c)
        elif st == S_TLS_ACCEPT:
            # a reset instead of the rest of the handshake (a client that
            # rejected our certificate, often): the handshake failed
            client_tls_failed(loop, c, HANDSHAKE_RESET)
        else:
            client_lost(loop, c)
        return
    if st == S_HEAD:
        if ev & EPOLLOUT:
            if flush_client(loop, c) == STEP_ENDED:
                return
        if ev & (EPOLLIN | EPOLLHUP) or buf_len(&c.cin):
            read_head(loop, c)
        else:
            update_head_mask(loop, c)
    elif st == S_HELLO:
        if ev & (EPOLLIN | EPOLLHUP):
            read_hello(loop, c)
    elif st == S_CONNECT or st == S_TLS_CONNECT:
        if fd != c.ufd:
            if ev & EPOLLHUP:
                client_lost(loop, c)  # it left while we connect for it
        elif st == S_CONNECT:
            connect_ready(loop, c)
        else:
            upstream_tls_step(loop, c)
    elif st == S_TLS_ACCEPT:
        client_tls_step(loop, c)
    elif st == S_BODY:
        peek_step(loop, c)
    elif st == S_FORWARD:
        forward_event(loop, c, fd, ev)
    elif st == S_LINGER:
        linger_event(loop, c, ev)
    elif st == S_RESOLVE or st == S_BODY_READ or st == S_DEPARTING:
        # nothing is read from the client meanwhile: only its leaving counts
        if ev & EPOLLHUP:
            client_lost(loop, c)
    elif st == S_CLOSED:
        pass  # its fds are unmapped: nothing more arrives for it


cdef void conn_expired(Loop loop, Conn c):
    """c's deadline came, by c's state (the "expiry" column)."""
    cdef int st = c.state
    if st == S_HEAD:
        if c.requests > 0 and buf_len(&c.cin) == 0:
            loop.c.keepalive_closed += 1
        else:
            loop.c.head_timeouts += 1
        close_conn(loop, c, False)
    elif st == S_RESOLVE:
        if loop.drain_begun:
            drain_refuse(loop, c, False)  # draining: a lookup is not waited for
        else:
            loop.c.connect_timeouts += 1
            fail(loop, c, 504, "timed out resolving the upstream host")
    elif st == S_CONNECT:
        drop_upstream(loop, c, False)
        if c.addrs is not None and c.addr_i < len(c.addrs):
            try_connect(loop, c)
        else:
            loop.c.connect_timeouts += 1
            fail(loop, c, 504, "timed out connecting to the upstream")
    elif st == S_TUNNEL:
        loop.c.idle_timeouts += 1
        close_conn(loop, c, False)
    elif st == S_WAIT:
        departure(loop, c)
    elif st == S_TLS_ACCEPT or st == S_BODY or st == S_HELLO:
        loop.c.head_timeouts += 1
        close_conn(loop, c, False)
    elif st == S_TLS_CONNECT:
        loop.c.connect_timeouts += 1
        drop_upstream(loop, c, False)
        fail(loop, c, 504, "timed out in the TLS handshake with the upstream")
    elif st == S_FORWARD:
        forward_expired(loop, c)
    elif st == S_LINGER:
        close_conn(loop, c, False)  # the client did not take its answer in time
    elif st == S_BODY_READ or st == S_DEPARTING:
        # left within the step that set it, before the loop turns: a
        # deadline firing here is a bug, and the connection ends
        loop.c.internal_errors += 1
        close_conn(loop, c, False)
    elif st == S_CLOSED:
        pass  # close_conn cleared its deadline
    else:
        close_conn(loop, c, False)  # not a state of the table: cannot happen
