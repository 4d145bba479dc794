# TLS read-ahead: input OpenSSL holds where epoll cannot see it.
#
# Intercepted clients and https upstreams read ahead (SSL_set_read_ahead):
# one read takes what the socket has, up to OpenSSL's buffer, where without
# it every record costs two (its 5-byte header, then its body). The price:
# records read past the one a TLS read returns wait in OpenSSL's buffer,
# and no epoll event ever says so. Hence two rules:
#
# - every TLS read of an exchange goes through client_recv / upstream_recv,
#   which remember whether it gave bytes: then more may wait in OpenSSL.
#   After an EAGAIN nothing whole does (the rest of a record is still on
#   its way, and the socket's event brings it);
# - every wait for an exchange's input goes through watch_client /
#   watch_upstream: when OpenSSL holds input for it, the connection is
#   posted, and run_posted reads it after this turn's events, as if epoll
#   had said so. The loop's next epoll_wait does not sleep while any is
#   posted.
#
# An intercepted session inside a --listen-tls one does not read ahead, but
# reads through the outer session, which decrypts a whole outer record at
# once: inner records it holds wait just as unseen, so the client side asks
# both (client_holds). Tunnels over TLS (--listen-tls) do not read ahead;
# they keep their own SSL_pending rule (tunnel.pxi).

cdef enum:
    POSTED_CLIENT = 1
    POSTED_UPSTREAM = 2


cdef inline ssize_t client_recv(Conn c, char *buf, size_t n) noexcept:
    """elb_io_recv on the client (TLS or not), remembering whether it gave bytes."""
    cdef ssize_t got = elb_io_recv(c.fd, c.tls.cssl, buf, n, &c.tls.c_rw)
    c.tls.c_more = got > 0
    return got


cdef inline ssize_t upstream_recv(Conn c, char *buf, size_t n) noexcept:
    """elb_io_recv on the upstream (TLS or not), remembering whether it gave bytes."""
    cdef ssize_t got = elb_io_recv(c.ufd, c.tls.ussl, buf, n, &c.tls.u_rw)
    c.tls.u_more = got > 0
    return got


cdef inline bint client_holds(Conn c) noexcept:
    """Whether OpenSSL holds client input: in its session, or in the --listen-tls
    session an intercepted one reads through."""
    return ((c.tls.cssl != NULL and SSL_has_pending(c.tls.cssl))
            or (c.tls.outer != NULL and SSL_has_pending(c.tls.outer)))


cdef void watch_client(Loop loop, Conn c, int want):
    """set_mask for the client, and a post when OpenSSL holds input it waits for."""
    set_mask(loop, c.fd, &c.cmask, want)
    if want & EPOLLIN and c.tls.c_more and client_holds(c):
        post(loop, c, POSTED_CLIENT)


cdef void watch_upstream(Loop loop, Conn c, int want):
    """set_mask for the upstream, and a post when OpenSSL holds input it waits for."""
    set_mask(loop, c.ufd, &c.umask, want)
    if want & EPOLLIN and c.tls.u_more and c.tls.ussl != NULL and SSL_has_pending(c.tls.ussl):
        post(loop, c, POSTED_UPSTREAM)


cdef int post(Loop loop, Conn c, int side) except -1:
    if not c.posted:
        loop.posted.append(c)
    c.posted |= side
    return 0


cdef void run_posted(Loop loop):
    """Read what OpenSSL holds for the connections posted since the last turn
    (each side once; one still waiting for that input afterwards posts again)."""
    cdef list batch = loop.posted
    cdef Conn c
    cdef int side
    loop.posted = []
    for obj in batch:
        c = <Conn>obj
        side = c.posted
        c.posted = 0
        if (side & POSTED_CLIENT and c.fd >= 0 and c.cmask > 0 and c.cmask & EPOLLIN
                and client_holds(c)):
            guarded_event(loop, c, c.fd, EPOLLIN)
        if (side & POSTED_UPSTREAM and c.ufd >= 0 and c.umask > 0 and c.umask & EPOLLIN
                and c.tls.ussl != NULL and SSL_has_pending(c.tls.ussl)):
            guarded_event(loop, c, c.ufd, EPOLLIN)
