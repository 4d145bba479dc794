# The forward exchange, request side: S_FORWARD.
#
# One request and its response over one upstream connection, the state in
# Conn.exchange (ExchangeState). The head goes first, then the request
# body by its framing (BODY_LENGTH counted, BODY_CHUNKED scanned in C);
# forward_event takes the events of both sides and hands upstream input to
# the response side (response.pxi).


cdef inline void exchange_free(ExchangeState *ex) noexcept nogil:
    """Give back an exchange's buffers (the connection ends)."""
    buf_free(&ex.uin)
    buf_free(&ex.uout)
    buf_free(&ex.captured)


cdef void begin_forward(Loop loop, Conn c, bint reused):
    """Send the request over c.ufd: fresh from connect (or TLS), or `reused`
    from the pool (which makes a failure before any answer retryable)."""
    cdef ExchangeState *ex = &c.exchange
    cdef object v = c.verdict  # a Forward
    cdef bytes head = field(v, FWD_HEAD)
    c.state = S_FORWARD
    ex.reused = reused
    ex.req_framing = field(v, FWD_BODY)
    ex.req_remaining = field(v, FWD_LENGTH)
    ex.req_chunks.state = 0
    ex.req_chunks.remaining = 0
    ex.req_done = ex.req_framing == BODY_NONE or (
        ex.req_framing == BODY_LENGTH and ex.req_remaining == 0)
    ex.resp_head_done = False
    ex.resp_done = False
    ex.status = 0
    c.bytes_up = PyBytes_GET_SIZE(head)
    c.bytes_down = 0
    ex.uout.start = 0
    ex.uout.end = 0
    ex.uin.start = 0
    ex.uin.end = 0
    loop.c.bytes_up += PyBytes_GET_SIZE(head)
    buf_append(&ex.uout, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    ex.ends_by = loop.now + loop.exchange_ns
    arm(loop, c, forward_deadline(loop, ex))
    if request_body_step(loop, c) == STEP_ENDED:
        return
    if flush_upstream(loop, c) == STEP_ENDED:
        return
    forward_masks(loop, c)


cdef inline int64_t forward_deadline(Loop loop, ExchangeState *ex) noexcept:
    """The next byte's deadline, held to the exchange's own end."""
    cdef int64_t per_byte = loop.now + loop.response_ns
    return per_byte if per_byte < ex.ends_by else ex.ends_by


cdef int request_body_step(Loop loop, Conn c) except STEP_RAISED:
    """Move the request body bytes we hold from cin to uout, by framing:
    STEP_DONE, or STEP_ENDED after a malformed chunked body (answered 400)."""
    cdef ExchangeState *ex = &c.exchange
    cdef Py_ssize_t avail = buf_len(&c.cin)
    cdef Py_ssize_t take
    cdef size_t passed
    cdef long got
    if ex.req_done or avail == 0:
        return STEP_DONE
    if ex.req_framing == BODY_LENGTH:
        take = avail if <uint64_t>avail < ex.req_remaining else <Py_ssize_t>ex.req_remaining
        passed = <size_t>take
        ex.req_remaining -= take
        if ex.req_remaining == 0:
            ex.req_done = True
    else:
        # the scanner leaves trailer lines out, in place: `passed` of the
        # `take` bytes it read go on
        got = elb_chunked_scan(&ex.req_chunks, c.cin.data + c.cin.start, avail, &passed)
        if got < 0:
            bad_request_body(loop, c)
            return STEP_ENDED
        take = got
        if ex.req_chunks.state == CH_DONE:
            ex.req_done = True
    buf_append(&ex.uout, c.cin.data + c.cin.start, <Py_ssize_t>passed)
    buf_consumed(&c.cin, take)
    c.bytes_up += passed
    loop.c.bytes_up += passed
    return STEP_DONE


cdef void bad_request_body(Loop loop, Conn c):
    cdef bytes data = ended_page(loop, c.ticket, Ended(BAD_BODY), loop.page_bad_body)
    # the upstream has a partial request: it can never be reused
    drop_upstream(loop, c, True)
    if c.exchange.resp_head_done:
        close_conn(loop, c, False)
    else:
        send_final(loop, c, data)


cdef int flush_upstream(Loop loop, Conn c) except STEP_RAISED:
    """Write the request bytes we hold to the upstream: STEP_DONE drained,
    STEP_WAIT some left (forward_masks asks for EPOLLOUT), STEP_ENDED the
    upstream failed and upstream_lost has answered, retried or closed."""
    cdef int rc = buf_send(c.ufd, c.tls.ussl, &c.exchange.uout, NULL)
    if rc < 0:
        loop.c.upstream_aborts += 1
        upstream_lost(loop, c)
        return STEP_ENDED
    return STEP_DONE if rc else STEP_WAIT


cdef void forward_masks(Loop loop, Conn c):
    """epoll interest during an exchange, chosen so that the common case
    never changes it: the client stays registered for input and the
    upstream for input and hang-up, from one request to the next and
    while pooled. Reading pauses only for backpressure, or once the
    client sends more than the request while the response is pending.
    """
    cdef ExchangeState *ex = &c.exchange
    cdef int cw = 0, uw = 0
    if not c.client_paused and (ex.req_done or buf_len(&ex.uout) == 0):
        cw |= EPOLLIN
    if buf_len(&c.cout) or c.tls.c_rw:
        cw |= EPOLLOUT
    if ex.resp_done or buf_len(&c.cout) == 0:
        uw |= EPOLLIN | EPOLLRDHUP
    if buf_len(&ex.uout) or c.tls.u_rw:
        uw |= EPOLLOUT
    watch_client(loop, c, cw)
    watch_upstream(loop, c, uw)


cdef void forward_event(Loop loop, Conn c, int fd, uint32_t ev):
    cdef ExchangeState *ex = &c.exchange
    cdef ssize_t n
    if fd == c.fd:
        if ev & EPOLLOUT:
            if flush_client(loop, c) == STEP_ENDED:
                return
        if ev & (EPOLLIN | EPOLLHUP) and ex.req_done:
            # bytes (a pipelined request) or the end, before our answer:
            # leave them in the kernel until the response is through
            c.client_paused = True
        elif ev & (EPOLLIN | EPOLLHUP):
            buf_reserve(&c.cin, IO_CHUNK)
            n = client_recv(c, c.cin.data + c.cin.end, IO_CHUNK)
            if n == 0 or (n < 0 and errno != EAGAIN and errno != EINTR):
                # 0: its FIN in the middle of its own request body;
                # ECONNRESET, EPROTO (TLS): it is gone. EAGAIN: nothing yet.
                client_lost(loop, c)
                return
            if n > 0:
                c.cin.end += n
                if request_body_step(loop, c) == STEP_ENDED:
                    return
                if flush_upstream(loop, c) == STEP_ENDED:
                    return
    else:
        if ev & EPOLLOUT:
            if flush_upstream(loop, c) == STEP_ENDED:
                return
        if ev & (EPOLLIN | EPOLLHUP | EPOLLRDHUP):
            if read_response(loop, c) == STEP_ENDED:
                return
    if c.state != S_FORWARD:
        return
    if ex.resp_done:
        finish_exchange(loop, c)
        return
    c.deadline = forward_deadline(loop, ex)  # never earlier than before: a plain store
    forward_masks(loop, c)
