# TLS interception: S_TLS_ACCEPT (with the client) and S_TLS_CONNECT (with an
# https upstream).
#
# The SSL* objects come from elbasy._tls as integers; the loop owns them
# from ssl_adopt on and frees them with ssl_release (objects.pxi). Each
# handshake step reports 1 done, 0 wait for what it wants, -1 failed; the
# step that sees the failure ends the connection.


cdef void begin_intercept(Loop loop, Conn c, object v):
    """Answer the CONNECT, then accept TLS as the host it named.

    The leaf is chosen by SNI in the binding's C table (the CONNECT host
    when the client sends no SNI). A ClientHello that came with the
    CONNECT head goes to OpenSSL from memory first; a --transparent
    client's (read_hello) is all it sent, and it gets no "200". Inside a
    --listen-tls session the new session reads and writes through that one
    (which becomes c.tls.outer), the "200" too.
    """
    cdef bytes ok = CONNECT_200
    cdef bytes early = PyBytes_FromStringAndSize(c.cin.data + c.cin.start, buf_len(&c.cin))
    cdef uintptr_t ptr
    cdef bint nested = c.tls.cssl != NULL
    if loop.s_new_ssl is None:
        policy_error(loop, c, RuntimeError("interception is not configured in this loop"))
        return
    c.verdict = v
    c.ticket = v.ticket
    try:
        if nested:
            if PyBytes_GET_SIZE(early):
                raise RemoteProtocolError(
                    "a ClientHello sent before the CONNECT's answer inside a TLS proxy "
                    "connection (wait for the 200)")
            ptr = loop.s_new_ssl_over(<uintptr_t>c.tls.cssl, v.host)
        else:
            ptr = loop.s_new_ssl(c.fd, v.host, early)
    except Exception as exc:
        policy_error(loop, c, exc)
        return
    if nested:
        c.tls.outer = c.tls.cssl
    c.tls.cssl = <SSL *>ptr
    ssl_adopt()
    if not nested:
        # each read takes what the socket has, not a record's header, then
        # its body (readahead.pxi: what that leaves in OpenSSL is read too)
        SSL_set_read_ahead(c.tls.cssl, 1)
    c.tls.early_tls = PyBytes_GET_SIZE(early) > 0
    buf_free(&c.cin)
    c.site = v
    c.state = S_TLS_ACCEPT
    loop.c.intercepts_open += 1
    loop.c.intercepts_total += 1
    # The "200" leaves in plain text before any TLS byte: parked in cout,
    # it goes out first in client_tls_step, which sends cout without TLS.
    # A client already gone is seen there, with the SSL* owned by c (and
    # freed with it) and the intercept counted as opened and aborted.
    if c.transparent:
        c.transparent = False  # from here on, what fails is told inside TLS
    else:
        buf_append(&c.cout, PyBytes_AS_STRING(ok), PyBytes_GET_SIZE(ok))
    arm(loop, c, loop.now + loop.head_ns)
    client_tls_step(loop, c)


cdef void client_tls_step(Loop loop, Conn c):
    cdef int rc, want = EPOLLIN
    if buf_len(&c.cout):
        # the "200" (plain text, or inside a --listen-tls session through it)
        # goes before any TLS byte of the intercepted session
        rc = buf_send(c.fd, c.tls.outer, &c.cout, NULL)
        if rc < 0:
            client_lost(loop, c)  # gone before the "200": an abort, SSL* freed
            return
        if rc == 0:
            set_mask(loop, c.fd, &c.cmask, EPOLLOUT)
            return
    while True:
        rc = elb_tls_handshake(c.tls.cssl, &want)
        if rc == 0 and c.tls.early_tls:
            # the early ClientHello is used up: read from the socket now
            # (-1: no memory for the socket BIO, the handshake fails)
            rc = elb_tls_settle(c.tls.cssl, c.fd)
            if rc > 0:
                c.tls.early_tls = False
                continue
        break
    if rc == 0:
        set_mask(loop, c.fd, &c.cmask, want)
        return
    if rc < 0:
        client_tls_failed(loop, c, None)
        return
    loop.c.tls_accepted += 1
    c.verdict = None
    c.ticket = None
    c.state = S_HEAD
    arm(loop, c, loop.now + loop.head_ns)
    read_head(loop, c)  # the first request usually follows the handshake at once


cdef void client_tls_failed(Loop loop, Conn c, object reason):
    """The client's handshake failed: counted, told to the policy, closed."""
    cdef object error
    loop.c.tls_accept_failures += 1
    if reason is None:
        try:
            reason = loop.s_failure(<uintptr_t>c.tls.cssl)
        except Exception as exc:
            reason = f"TLS handshake failed ({exc})"
    error = reason if isinstance(reason, BaseException) else None
    tell_ended(loop, c.ticket, Ended(TLS_FAILED, reason=str(reason), error=error))
    close_conn(loop, c, False)


cdef void begin_upstream_tls(Loop loop, Conn c):
    cdef object v = c.verdict
    cdef uintptr_t ptr
    try:
        if loop.u_new_ssl is None:
            raise RuntimeError("upstream TLS is not configured in this loop")
        ptr = loop.u_new_ssl(c.ufd, v.host)
    except Exception as exc:
        drop_upstream(loop, c, False)
        loop.c.tls_upstream_failures += 1
        fail(loop, c, 502, f"cannot start TLS with {v.host}: {exc}")
        return
    c.tls.ussl = <SSL *>ptr
    ssl_adopt()
    SSL_set_read_ahead(c.tls.ussl, 1)  # as the client's (readahead.pxi)
    c.tls.u_more = False
    c.state = S_TLS_CONNECT
    arm(loop, c, loop.now + loop.connect_ns)
    upstream_tls_step(loop, c)


cdef void upstream_tls_step(Loop loop, Conn c):
    cdef int want = EPOLLIN
    cdef int rc = elb_tls_handshake(c.tls.ussl, &want)
    cdef object reason
    if rc == 0:
        set_mask(loop, c.ufd, &c.umask, want)
        return
    if rc < 0:
        loop.c.tls_upstream_failures += 1
        try:
            reason = str(loop.u_failure(<uintptr_t>c.tls.ussl))
        except Exception as exc:
            reason = f"TLS handshake failed ({exc})"
        drop_upstream(loop, c, False)
        fail(loop, c, 502, f"TLS with {(<object>c.verdict).host} failed: {reason}")
        return
    loop.c.tls_upstream += 1
    begin_forward(loop, c, False)
