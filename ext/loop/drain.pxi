# The graceful end of a worker: Loop.drain.
#
# drain() only records the request (it is called from a signal handler);
# run() carries it out between two turns, in three steps:
#
# * drain_begin, at once: the listener leaves this loop's epoll (the socket
#   itself stays open: the supervisor and the other workers share it, so
#   connections waiting in its queue go to them), idle keep-alive clients
#   are closed (lingering, so a TLS client gets its close_notify), and
#   tunnels get a short idle deadline. From here on every answer carries
#   `Connection: close` (drain_close_reply, and response_step for forwarded
#   answers) and no connection goes back to S_HEAD for another request
#   (back_to_head lingers instead). Held requests depart as the quota allows.
#   A request waiting for DNS gets DRAIN_RESOLVE_NS for its answer, then the
#   503 (conn_expired): a name that never answers must not hold the drain
#   for its whole deadline, and nothing of the request has gone anywhere.
# * drain_expire, at the deadline: every request still held, still reading
#   its body, resolving, connecting or waiting for its upstream's response
#   head is answered 503 with Retry-After (the policy spells it and gives a
#   reservation back); tunnels, TLS handshakes and responses cut mid-body
#   are closed (nothing else can be said to them).
# * run() returns once no connection is left (c_open == 0); lingering
#   closes end within LINGER_NS.


cdef void drain_begin(Loop loop):
    cdef epoll_event e
    cdef Conn c
    cdef Py_ssize_t i
    cdef object obj
    loop.drain_begun = True
    loop.now = elb_now_ns()
    if loop.listening:
        epoll_ctl(loop.epfd, EPOLL_CTL_DEL, loop.listen_fd, &e)
        for obj in loop.listeners:
            epoll_ctl(loop.epfd, EPOLL_CTL_DEL, (<Listener>obj).fd, &e)
        loop.listening = False
    if loop.idle_ns > DRAIN_TUNNEL_IDLE_NS:
        loop.idle_ns = DRAIN_TUNNEL_IDLE_NS  # a byte moved pushes a tunnel's end this far only
    for i, obj in enumerate(list(loop.fdmap)):
        if type(obj) is not Conn or (<Conn>obj).fd != i:
            continue  # empty, pooled, or the upstream fd of a Conn seen at its client fd
        c = <Conn>obj
        if c.state == S_HEAD and c.requests > 0 and not buf_len(&c.cin) and not buf_len(&c.cout):
            loop.c.drain_closed += 1
            linger(loop, c)  # idle between requests: a clean close now
        elif c.state == S_TUNNEL and (c.deadline == 0 or c.deadline > loop.now + loop.idle_ns):
            arm(loop, c, loop.now + loop.idle_ns)
        elif c.state == S_RESOLVE and c.deadline > loop.now + DRAIN_RESOLVE_NS:
            arm(loop, c, loop.now + DRAIN_RESOLVE_NS)


cdef void drain_expire(Loop loop):
    cdef Conn c
    cdef Py_ssize_t i
    cdef object obj
    cdef int st
    loop.drain_expired = True
    loop.now = elb_now_ns()
    for i, obj in enumerate(list(loop.fdmap)):
        if type(obj) is not Conn or (<Conn>obj).fd != i:
            continue
        c = <Conn>obj
        st = c.state
        try:
            if st == S_WAIT:
                unhold(loop, c)
                c.state = S_DEPARTING  # no longer held: it leaves with the 503
                drain_refuse(loop, c, False)
            elif st == S_RESOLVE or st == S_CONNECT or st == S_TLS_CONNECT or st == S_BODY:
                drop_upstream(loop, c, False)
                drain_refuse(loop, c, False)
            elif st == S_FORWARD:
                drop_upstream(loop, c, True)  # mid-exchange: never reused
                if not c.exchange.resp_head_done:
                    drain_refuse(loop, c, True)
                else:
                    loop.c.drain_closed += 1
                    close_conn(loop, c, False)  # mid-body: a close is all that is left
            elif st == S_HEAD:
                if c.requests == 0 or buf_len(&c.cin):
                    drain_refuse(loop, c, False)  # a head on its way: it gets an answer
                else:
                    linger(loop, c)  # idle, or still taking its last answer
            elif st == S_TUNNEL or st == S_TLS_ACCEPT or st == S_HELLO:
                loop.c.drain_closed += 1
                close_conn(loop, c, False)
            # S_LINGER ends by itself within LINGER_NS
        except Exception as exc:
            conn_crashed(loop, c, exc)


cdef void drain_refuse(Loop loop, Conn c, bint sent):
    """503 + Retry-After for a request the drain's deadline caught (never a bare close)."""
    cdef bytes data = ended_page(loop, c.ticket, Ended(DRAINED, sent=sent), loop.page_drained)
    loop.c.drain_refused += 1
    send_final(loop, c, data)


cdef bytes drain_close_reply(bytes data):
    """One of elbasy's own answers, now with `Connection: close` (the worker is draining)."""
    cdef Py_ssize_t end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    return data[:end + 2] + b"Connection: close\r\n" + data[end + 2:]


cdef int drain_timeout_ms(Loop loop) noexcept:
    """How long epoll may sleep before the drain's deadline (at most 1 s)."""
    cdef int64_t wait = loop.drain_deadline - elb_now_ns()
    if wait <= 0:
        return 0
    if wait > 1000000000:
        return 1000
    return <int>(wait // 1000000) + 1
