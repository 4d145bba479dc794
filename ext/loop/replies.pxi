# Answers from elbasy itself, and the lingering close: S_LINGER.
#
# queue_client and flush_client are the client's outbox (cout): STEP_DONE,
# STEP_WAIT, or STEP_ENDED when the client is gone and the connection was
# closed inside. send_final answers and lingers: send, shut our side, read
# and discard briefly, close, so an answer is not lost to a reset.


cdef void policy_error(Loop loop, Conn c, object exc):
    """A policy call that decides (on_request, on_body, departing, or a TLS
    factory's new_ssl) raised, or answered what the loop cannot use: counted
    once, and the client gets the policy's INTERNAL_ERROR page."""
    cdef bytes data
    loop.c.policy_errors += 1
    data = ended_page(loop, c.ticket, Ended(INTERNAL_ERROR, error=exc), loop.page_internal_error)
    drop_upstream(loop, c, False)
    send_final(loop, c, data)


# Every ending goes to the policy's one ``ended`` (elbasy.seam), through
# these two: ended_page when the client is still owed an answer, tell_ended
# when not. A raising ``ended`` is counted once in policy_errors; where an
# answer was owed, the LoopPages page stands in for it.


cdef bytes ended_page(Loop loop, object ticket, object end, bytes fallback):
    """The policy's answer for an ending that owes the client one, or
    ``fallback`` (a LoopPages page) when ``ended`` raised or gave no bytes."""
    cdef object data
    try:
        data = loop.p_ended(ticket, end)
    except Exception:
        loop.c.policy_errors += 1
        return fallback
    if type(data) is not bytes:
        loop.c.policy_errors += 1
        return fallback
    return <bytes>data


cdef void tell_ended(Loop loop, object ticket, object end):
    """An ending that owes the client nothing: the policy logs and counts it."""
    try:
        loop.p_ended(ticket, end)
    except Exception:
        loop.c.policy_errors += 1


cdef void tell_finished(Loop loop, Conn c, int status):
    """c's exchange (answered `status`) or tunnel (200) ended after it was carried out."""
    cdef Ended end = ending(FINISHED)  # once per request: no Python-level constructor
    end.status = status
    end.up = c.bytes_up
    end.down = c.bytes_down
    end.took_ns = loop.now - c.exchange_started
    tell_ended(loop, c.ticket, end)


cdef int queue_client(Loop loop, Conn c, const char *data, Py_ssize_t n) except STEP_RAISED:
    """Send to the client now and park what its socket does not take.

    STEP_DONE: sent or parked (flush_client sends the rest). STEP_ENDED:
    the client is gone (reset, or closed and then reset our bytes), and
    the connection has been closed here, its upstream included.
    """
    cdef ssize_t sent = 0
    if buf_len(&c.cout) == 0:
        sent = elb_io_send(c.fd, c.tls.cssl, data, n)
        if sent < 0:
            if errno != EAGAIN and errno != EINTR:
                # EPIPE, ECONNRESET, EPROTO (TLS): nobody will read it
                client_lost(loop, c)
                return STEP_ENDED
            sent = 0  # EAGAIN: the socket is full; EINTR: nothing went out
    if sent < n:
        buf_append(&c.cout, data + sent, n - sent)
    return STEP_DONE


cdef int flush_client(Loop loop, Conn c) except STEP_RAISED:
    """Write parked bytes to the client: STEP_DONE drained, STEP_WAIT some
    still parked (EPOLLOUT is the caller's to ask for), STEP_ENDED the
    client is gone and the connection was closed here."""
    cdef int rc = buf_send(c.fd, c.tls.cssl, &c.cout, NULL)
    if rc < 0:
        client_lost(loop, c)
        return STEP_ENDED
    return STEP_DONE if rc else STEP_WAIT


cdef void client_lost(Loop loop, Conn c):
    """The client's socket failed (a reset, or writes to a closed peer):
    count it and end the connection; an upstream mid-exchange is reset,
    since it can never be reused."""
    loop.c.client_aborts += 1
    drop_upstream(loop, c, True)
    close_conn(loop, c, False)


cdef void reply(Loop loop, Conn c, bytes data, bint close_after):
    if close_after:
        send_final(loop, c, data)
        return
    if loop.draining:
        send_final(loop, c, drain_close_reply(data))  # its last answer says so
        return
    if queue_client(loop, c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == STEP_ENDED:
        return
    back_to_head(loop, c, False)


cdef void send_final(Loop loop, Conn c, bytes data):
    """Answer and close, lingering so the answer is not lost to a reset.

    Closing a socket with unread input makes the kernel send RST, which
    can destroy the answer in flight (a 431 after a big head, say). So:
    send, shut our side, read and discard for a moment, then close.

    ``data`` is the policy's last word on this exchange (or the loop's own
    page): the ticket is dropped, so the close does not tell it again. A
    --transparent TLS client before its tunnel or TLS session (it sent a
    ClientHello nobody answered) gets a TLS alert instead of the page.
    """
    drop_upstream(loop, c, False)
    c.ticket = None
    if c.transparent:
        c.transparent = False
        data = ALERT_INTERNAL_ERROR
    if queue_client(loop, c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == STEP_ENDED:
        return
    linger(loop, c)


cdef void linger(Loop loop, Conn c):
    """Deliver what the client is owed, then close without a reset."""
    c.state = S_LINGER
    buf_free(&c.cin)
    arm(loop, c, loop.now + LINGER_NS)
    linger_event(loop, c, 0)


cdef void linger_event(Loop loop, Conn c, uint32_t ev):
    cdef ssize_t n
    cdef int _i, rc
    cdef Py_ssize_t owed = buf_len(&c.cout)
    if owed:
        rc = flush_client(loop, c)
        if rc == STEP_ENDED:
            return
        if buf_len(&c.cout) < owed:
            c.deadline = loop.now + LINGER_NS  # a slow reader that reads is no staller
        if rc == STEP_WAIT:
            set_mask(loop, c.fd, &c.cmask, EPOLLOUT)
            return
    if not c.client_shut:
        if c.tls.cssl != NULL:
            elb_tls_goodbye(c.tls.cssl)
        shutdown(c.fd, SHUT_WR)
        c.client_shut = True
    for _i in range(16):
        n = recv(c.fd, loop.iobuf, IO_CHUNK, 0)
        if n > 0:
            continue  # what the client still sends is read and dropped
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            set_mask(loop, c.fd, &c.cmask, EPOLLIN)
            return  # nothing more yet: wait for its FIN within the linger deadline
        # 0: its FIN, our answer is through; < 0: ECONNRESET and the like,
        # nothing more to deliver either way
        close_conn(loop, c, False)
        return
    # still more input: read it on the next wake-up, within the deadline
    set_mask(loop, c.fd, &c.cmask, EPOLLIN)


cdef void fail(Loop loop, Conn c, int status, str reason):
    """An upstream could not be reached or did not answer: say why."""
    cdef object end = Ended(FAILED, status, reason=reason)
    send_final(loop, c, ended_page(loop, c.ticket, end, loop.page_bad_gateway))


cdef void back_to_head(Loop loop, Conn c, bint resume):
    """Keep-alive: wait for the next request on this client connection.

    With resume, pipelined bytes already here are read at once; without
    it the caller is read_head itself, whose loop goes on.
    """
    c.state = S_HEAD
    c.client_paused = False
    c.verdict = None
    c.pool_key = None
    c.ticket = None
    c.goal = GOAL_NONE
    if loop.draining and not buf_len(&c.cin):
        # no next request while draining (an answer whose head left before
        # the drain began did not say `Connection: close`: the close says it)
        linger(loop, c)
        return
    if buf_len(&c.cin):
        arm(loop, c, loop.now + loop.head_ns)
        if resume:
            read_head(loop, c)
    else:
        arm(loop, c, loop.now + loop.keepalive_ns)
        update_head_mask(loop, c)
