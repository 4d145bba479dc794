# The forward exchange, response side: S_FORWARD.
#
# read_response reads the upstream and response_step relays: interim and
# final heads (each shown to the policy's on_response once), then the body
# by its framing. A response the policy refuses becomes a held retry; the
# end of the exchange (finish_exchange) pools the upstream when it may and
# keeps the client for its next request when it may.


cdef int read_response(Loop loop, Conn c) except STEP_RAISED:
    """Read what the upstream sent and relay it: STEP_DONE (or a wait:
    epoll calls again) or STEP_ENDED when the connection was answered,
    retried or closed inside."""
    cdef ExchangeState *ex = &c.exchange
    cdef ssize_t n
    cdef int _rounds
    for _rounds in range(PUMP_ROUNDS):
        buf_reserve(&ex.uin, IO_CHUNK)
        n = upstream_recv(c, ex.uin.data + ex.uin.end, IO_CHUNK)
        if n < 0:
            if errno == EINTR:
                continue  # a signal first: read again
            if errno == EAGAIN:
                return STEP_WAIT  # nothing more yet (or TLS wants to write: u_rw)
            # ECONNRESET, ETIMEDOUT, EPROTO (a TLS alert or garbage)
            loop.c.upstream_aborts += 1
            upstream_lost(loop, c)
            return STEP_ENDED
        if n == 0:
            if ex.resp_head_done and ex.resp_framing == BODY_CLOSE:
                ex.resp_done = True  # a body delimited by the close: complete
                ex.reuse_upstream = False
                return STEP_DONE
            # a FIN before the response was whole
            loop.c.upstream_aborts += 1
            upstream_lost(loop, c)
            return STEP_ENDED
        ex.uin.end += n
        if response_step(loop, c) == STEP_ENDED:
            return STEP_ENDED
        if ex.resp_done or buf_len(&c.cout) or (n < IO_CHUNK and c.tls.ussl == NULL):
            # (a TLS read returns one record at most: read on until EAGAIN)
            return STEP_DONE
    return STEP_DONE


cdef int response_step(Loop loop, Conn c) except STEP_RAISED:
    """Handle what uin holds: heads (interim and final), then body bytes.

    STEP_DONE, STEP_WAIT (the client's socket is full), or STEP_ENDED.
    """
    cdef ExchangeState *ex = &c.exchange
    cdef long end
    cdef Py_ssize_t avail, take
    cdef size_t passed
    cdef Py_ssize_t parked = 0  # bytes of a final head parked in this call, not yet sent
    cdef long got
    cdef bytes head
    cdef object plan
    cdef double retry_at
    cdef bint interim, keep_client
    while not ex.resp_head_done:
        avail = buf_len(&ex.uin)
        end = elb_head_end(ex.uin.data + ex.uin.start, avail, 0)
        if end > loop.max_head or (end < 0 and avail > loop.max_head):
            # held to --max-head-bytes as a request head is, wherever it
            # ends: a read may bring the end of a head far past the limit
            bad_response(loop, c, RemoteProtocolError(
                f"response head larger than --max-head-bytes ({loop.max_head})", 502))
            return STEP_ENDED
        if end < 0:
            return STEP_WAIT  # the rest of the head is still on its way
        head = PyBytes_FromStringAndSize(ex.uin.data + ex.uin.start, end)
        buf_consumed(&ex.uin, end)
        try:
            plan = loop.p_on_response(c.ticket, head)
        except Exception as exc:
            # the policy's refusal of this response (not a policy error): a 502
            bad_response(loop, c, exc)
            return STEP_ENDED
        if type(plan) is not ResponsePlan:
            raise TypeError(f"on_response returned {plan!r}, not a ResponsePlan")
        interim = field(plan, PLAN_INTERIM)
        retry_at = field(plan, PLAN_RETRY_AT)
        if retry_at != HOLD_NOW and not interim:
            retry_later(loop, c, retry_at)
            return STEP_ENDED
        head = field(plan, PLAN_HEAD)
        keep_client = field(plan, PLAN_KEEP_CLIENT)
        if loop.draining and not interim and keep_client:
            # the worker is draining: this answer is the connection's last
            head = head[:PyBytes_GET_SIZE(head) - 2] + b"Connection: close\r\n\r\n"
        c.bytes_down += PyBytes_GET_SIZE(head)
        loop.c.bytes_down += PyBytes_GET_SIZE(head)
        # parked, not sent: the body bytes that came with it leave in the
        # same send (one segment, one wake-up for the client)
        buf_append(&c.cout, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        if interim:
            continue
        parked = PyBytes_GET_SIZE(head)
        ex.resp_head_done = True
        ex.status = field(plan, PLAN_STATUS)
        ex.resp_framing = field(plan, PLAN_BODY)
        ex.resp_remaining = field(plan, PLAN_LENGTH)
        ex.resp_chunks.state = 0
        ex.resp_chunks.remaining = 0
        ex.keep_client = keep_client and not loop.draining
        ex.reuse_upstream = field(plan, PLAN_REUSE_UPSTREAM)
        ex.capture = field(plan, PLAN_CAPTURE)
        if ex.resp_framing == BODY_NONE or (
                ex.resp_framing == BODY_LENGTH and ex.resp_remaining == 0):
            ex.resp_done = True
    avail = buf_len(&ex.uin)
    if ex.resp_done or avail == 0:
        if ex.resp_done and avail:
            ex.reuse_upstream = False  # bytes past the response: not trusted
        return flush_client(loop, c)
    if ex.resp_framing == BODY_LENGTH:
        take = avail if <uint64_t>avail < ex.resp_remaining else <Py_ssize_t>ex.resp_remaining
        passed = <size_t>take
        ex.resp_remaining -= take
        if ex.resp_remaining == 0:
            ex.resp_done = True
    elif ex.resp_framing == BODY_CHUNKED:
        # trailer lines are left out in place: `passed` of the `take` go on
        got = elb_chunked_scan(&ex.resp_chunks, ex.uin.data + ex.uin.start, avail, &passed)
        if got < 0:
            loop.c.upstream_aborts += 1
            drop_upstream(loop, c, True)
            if parked and buf_len(&c.cout) >= parked:
                # nothing of this response has reached the client yet: the
                # head parked above is taken back and the client hears why
                c.cout.end -= parked
                fail(loop, c, 502, "the upstream sent a malformed chunked body")
            else:
                close_conn(loop, c, False)  # mid-body: a close is all that is left
            return STEP_ENDED
        take = got
        if ex.resp_chunks.state == CH_DONE:
            ex.resp_done = True
    else:
        take = avail
        passed = <size_t>take
    if ex.resp_done and take < avail:
        ex.reuse_upstream = False
    if ex.capture > buf_len(&ex.captured):
        buf_append(&ex.captured, ex.uin.data + ex.uin.start,
                   min(<Py_ssize_t>passed, ex.capture - buf_len(&ex.captured)))
    c.bytes_down += passed
    loop.c.bytes_down += passed
    if buf_len(&c.cout):
        buf_append(&c.cout, ex.uin.data + ex.uin.start, <Py_ssize_t>passed)
        ex.uin.start = 0
        ex.uin.end = 0
        return flush_client(loop, c)
    if queue_client(loop, c, ex.uin.data + ex.uin.start, <Py_ssize_t>passed) == STEP_ENDED:
        return STEP_ENDED
    ex.uin.start = 0
    ex.uin.end = 0
    return STEP_DONE


cdef void bad_response(Loop loop, Conn c, object error):
    """The upstream's response head is not one to relay (too large, or the
    policy refused it): the upstream goes and the client hears a 502."""
    drop_upstream(loop, c, True)
    send_final(loop, c, ended_page(
        loop, c.ticket, Ended(BAD_RESPONSE, error=error), loop.page_bad_gateway))


cdef void forward_expired(Loop loop, Conn c):
    """The response deadline came: a 504 before the response head, else a close.
    When it was the exchange's own end (a trickled body or answer), the 504
    says so."""
    cdef bint whole = loop.now >= c.exchange.ends_by
    if whole:
        loop.c.exchange_timeouts += 1
    else:
        loop.c.response_timeouts += 1
    if not c.exchange.resp_head_done:
        drop_upstream(loop, c, False)
        if whole:
            fail(loop, c, 504, "the exchange took longer than its deadline allows")
        else:
            fail(loop, c, 504, "the upstream did not answer in time")
    else:
        close_conn(loop, c, False)  # mid-body: a close is all that is left


cdef void upstream_lost(Loop loop, Conn c):
    """The upstream closed or failed mid-exchange."""
    cdef ExchangeState *ex = &c.exchange
    cdef object v = c.verdict
    if (c.state == S_FORWARD and not ex.resp_head_done and buf_len(&ex.uin) == 0
            and ex.reused and not ex.retried and v.retryable):
        # A pooled connection the server had closed as we reused it: the
        # request never reached an application, and it is idempotent with
        # no body, so one fresh attempt is safe.
        loop.c.retries += 1
        ex.retried = True
        drop_upstream(loop, c, False)
        buf_free(&ex.uout)
        c.goal = GOAL_FORWARD
        start_upstream(loop, c, v.host, v.port)
        return
    drop_upstream(loop, c, True)
    if c.state == S_TLS_CONNECT:
        fail(loop, c, 502, "the upstream closed the connection during the TLS handshake")
    elif c.state == S_FORWARD and not ex.resp_head_done:
        fail(loop, c, 502, "the upstream closed the connection before answering")
    else:
        close_conn(loop, c, False)


cdef void retry_later(Loop loop, Conn c, double at):
    """The server refused a request the policy may send again: hold it until
    `at` (a hold-until other than NOW)

    The refusal is not read further, so its upstream connection goes.
    """
    cdef ExchangeState *ex = &c.exchange
    loop.c.throttle_retries += 1
    drop_upstream(loop, c, True)
    ex.uin.start = 0
    ex.uin.end = 0
    buf_free(&ex.uout)
    hold(loop, c, hold_ns(loop, at))


cdef void finish_exchange(Loop loop, Conn c):
    cdef ExchangeState *ex = &c.exchange
    if ex.capture:
        try:
            loop.p_on_response_body(
                c.ticket, PyBytes_FromStringAndSize(ex.captured.data + ex.captured.start,
                                                    buf_len(&ex.captured)))
        except Exception:
            loop.c.policy_errors += 1
        buf_free(&ex.captured)
        ex.capture = 0
    tell_finished(loop, c, ex.status)
    if ex.reuse_upstream and ex.req_done and buf_len(&ex.uout) == 0:
        pool_put(loop, c)
    else:
        drop_upstream(loop, c, False)
    buf_free(&ex.uin)
    buf_free(&ex.uout)
    c.ticket = None
    if ex.keep_client and ex.req_done:
        back_to_head(loop, c, True)
    else:
        linger(loop, c)
