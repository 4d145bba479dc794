# Before a request leaves: S_BODY, S_BODY_READ, S_WAIT, S_DEPARTING.
#
# A Forward with `peek` has its body read first (S_BODY) and shown to the
# policy (S_BODY_READ, while on_body runs); a Forward with a departure time
# is held (S_WAIT) on the timer heap, watched only for the client leaving.
# At its time the policy confirms it (S_DEPARTING: on its way) or moves it
# later; Loop.wake re-arms it from the pacer through the `held` dict.


cdef void begin_peek(Loop loop, Conn c, Py_ssize_t limit):
    """Read the request body (up to `limit` bytes) before the policy sets a departure.

    Only a Content-Length body that fits is read whole; a chunked or
    larger one shows the policy its first `limit` bytes. The bytes stay in
    cin and are forwarded from there as usual.
    """
    cdef object v = c.verdict
    if v.body == BODY_LENGTH and <Py_ssize_t>v.length < limit:
        limit = <Py_ssize_t>v.length
    c.exchange.peek = limit
    c.state = S_BODY
    arm(loop, c, loop.now + loop.head_ns)
    peek_step(loop, c)


cdef void peek_step(Loop loop, Conn c):
    cdef ssize_t n
    cdef object again
    cdef int64_t depart
    if buf_len(&c.cout) and flush_client(loop, c) == STEP_ENDED:
        return  # (a "100 Continue" still on its way)
    while buf_len(&c.cin) < c.exchange.peek:
        buf_reserve(&c.cin, IO_CHUNK)
        n = client_recv(c, c.cin.data + c.cin.end, IO_CHUNK)
        if n > 0:
            c.cin.end += n
            continue
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            # the rest of the body is on its way (or a signal came first)
            watch_client(loop, c, EPOLLIN | (EPOLLOUT if c.tls.c_rw or buf_len(&c.cout) else 0))
            return
        # 0: its FIN before the body it announced; < 0: ECONNRESET, EPROTO
        client_lost(loop, c)
        return
    c.state = S_BODY_READ  # nothing more is read while the policy looks at it
    try:
        again = loop.p_on_body(
            c.ticket, PyBytes_FromStringAndSize(c.cin.data + c.cin.start, c.exchange.peek))
    except Exception as exc:
        policy_error(loop, c, exc)
        return
    if type(again) is Reply:
        send_final(loop, c, (<object>again).data)
        return
    depart = hold_ns(loop, again)
    if depart:
        hold(loop, c, depart)
    else:
        send_forward(loop, c)


cdef int64_t hold_ns(Loop loop, double until) noexcept:
    """The loop time a hold-until (elbasy.verdicts.NOW) holds a request
    until, or 0 for NOW: it leaves at once. noexcept: no value of it is
    reserved for an exception (a policy's answer that is not a number
    fails in its caller's conversion, before this is called).

    A time the policy gave is always kept, even one already past by the
    time the loop reads it (its clocks are read a moment after the
    loop's): the policy confirms every hold in ``departing``, so such a
    request waits for the next turn of the loop, not for nothing.
    """
    cdef int64_t t
    if until == HOLD_NOW:
        return 0
    t = seconds_ns(until)
    return t if t > loop.now else loop.now + 1


cdef void hold(Loop loop, Conn c, int64_t depart):
    """Keep a request until its departure time, on the timer heap.

    Nothing is read from the client meanwhile (a body waits in the
    kernel); it is watched only for leaving, which gives the
    reservation back to the policy.
    """
    c.state = S_WAIT
    if not buf_len(&c.cin):
        # the head is consumed and nothing is read until departure: the
        # read buffer (16 KiB, its first page resident) is most of what a
        # queued request would cost (bench/queued.py: 6.1 -> 1.7 KiB each)
        buf_free(&c.cin)
    else:
        # a body read before departure (a GraphQL query, priced from its
        # text) waits in a buffer sized for reading (64 KiB): only its
        # bytes are kept while it is held
        buf_shrink(&c.cin)
    loop.c.held += 1
    loop.c.waiting += 1
    if c.ticket is not None:
        loop.held[c.ticket] = c
    arm(loop, c, depart)
    wait_mask(loop, c)


cdef void unhold(Loop loop, Conn c):
    """A held request leaves S_WAIT (departs, or its connection ends)."""
    loop.c.waiting -= 1
    if c.ticket is not None:
        loop.held.pop(c.ticket, None)


cdef void wait_mask(Loop loop, Conn c):
    set_mask(loop, c.fd, &c.cmask, EPOLLRDHUP | (EPOLLOUT if buf_len(&c.cout) else 0))


cdef void departure(Loop loop, Conn c):
    """A held request's time has come: the policy confirms it, moves it
    later, or answers it instead (a Reply: elbasy's 429 when the quota
    store's late answer shed it), which closes the connection: its body,
    if any, is unread."""
    cdef object got
    cdef double again
    cdef int64_t when
    try:
        got = loop.p_departing(c.ticket)
        if type(got) is not Reply:
            again = got  # a hold-until that is not a number: its error
    except Exception as exc:
        unhold(loop, c)
        c.state = S_DEPARTING  # no longer held: it leaves with the policy's error page
        policy_error(loop, c, exc)
        return
    if type(got) is Reply:
        unhold(loop, c)
        c.state = S_DEPARTING
        send_final(loop, c, (<object>got).data)
        return
    when = hold_ns(loop, again)
    if when:
        arm(loop, c, when)
        return
    unhold(loop, c)
    c.state = S_DEPARTING  # no longer held; on its way to an upstream
    send_forward(loop, c)


cdef void send_forward(Loop loop, Conn c):
    cdef object v = c.verdict  # a Forward
    cdef object host = field(v, FWD_HOST), port = field(v, FWD_PORT)
    # the pool's key for this upstream, kept for pool_put when the answer is in
    c.pool_key = (host, port, field(v, FWD_TLS))
    if not take_pooled(loop, c, c.pool_key):
        start_upstream(loop, c, host, port)
