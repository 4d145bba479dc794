# Idle upstream connections kept for the next request to (host, port, tls).
#
# A pooled connection is a Pooled slot in fdmap: any byte or FIN from it
# (an event) drops it, and sweep_pool closes those idle longer than the
# keep-alive timeout once a second. take_pooled peeks before reuse, so no
# byte from before is read as the next request's answer.


cdef bint take_pooled(Loop loop, Conn c, tuple key):
    """Reuse an idle upstream connection for key (host, port, tls), if a live one waits."""
    cdef list idle = loop.pool.get(key)
    cdef Pooled p
    cdef ssize_t n
    cdef char probe
    while idle:
        p = <Pooled>idle.pop()
        loop.c.pool_idle -= 1
        # An upstream that closed while idle is usually dropped by its
        # hang-up event, but one that closed (or sent stray bytes) a moment
        # ago may not be yet: a one-byte peek makes sure nothing waits on
        # it, so no byte from before is read as this request's answer.
        n = recv(p.fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT)
        # EAGAIN: nothing waits, the connection is live. A byte (n > 0), its
        # FIN (0) or an error (ECONNRESET...) all mean it cannot be reused.
        if n < 0 and errno == EAGAIN:
            c.ufd = p.fd
            c.umask = p.mask
            c.tls.ussl = p.ssl
            c.tls.u_more = False  # pooled with nothing in OpenSSL (pool_put)
            p.ssl = NULL
            map_fd(loop, p.fd, c)
            p.deadline = 0
            loop.c.pool_reused += 1
            begin_forward(loop, c, True)
            return True
        loop.c.pool_stale += 1
        loop.fdmap[p.fd] = None
        retire_fd(loop, p.fd, False)
        pooled_free_tls(p)
    return False


cdef void pool_put(Loop loop, Conn c):
    cdef object key = c.pool_key  # send_forward's, for this exchange's upstream
    cdef list idle = loop.pool.get(key)
    cdef Pooled p
    if idle is None:
        idle = []
        loop.pool[key] = idle
    if len(idle) >= POOL_PER_HOST or (c.tls.ussl != NULL and SSL_has_pending(c.tls.ussl)):
        # full; or bytes came after the answer (read ahead into OpenSSL, where
        # the pool's peek cannot see them): no next request may read them
        drop_upstream(loop, c, False)
        return
    p = Pooled.__new__(Pooled)
    p.fd = c.ufd
    p.serial = new_serial(loop)
    p.key = key
    p.mask = c.umask
    p.since = loop.now
    p.ssl = c.tls.ussl
    c.tls.ussl = NULL
    map_fd(loop, p.fd, p)
    # any byte or FIN from an idle upstream means it is no longer usable
    set_mask(loop, p.fd, &p.mask, EPOLLIN | EPOLLRDHUP)
    idle.append(p)
    loop.c.pool_idle += 1
    c.ufd = -1
    c.umask = -1


cdef void pool_drop(Loop loop, Pooled p):
    cdef list idle = loop.pool.get(p.key)
    if idle is not None:
        try:
            idle.remove(p)
            loop.c.pool_idle -= 1
        except ValueError:
            pass
    if loop.fdmap[p.fd] is p:
        loop.fdmap[p.fd] = None
        retire_fd(loop, p.fd, False)
    pooled_free_tls(p)
    p.deadline = 0


cdef void sweep_pool(Loop loop):
    """Close upstream connections idle longer than the keep-alive timeout.

    One pass a second over the pool (at most POOL_PER_HOST per host)
    instead of a timer per pooled connection: a connection is pooled and
    taken again on every request, and a timer each time would churn.
    """
    cdef list idle
    cdef Pooled p
    cdef int64_t oldest = loop.now - loop.keepalive_ns
    for key in list(loop.pool):
        idle = loop.pool[key]
        # oldest first: put() appends, take() pops the newest
        while idle and (<Pooled>idle[0]).since <= oldest:
            p = <Pooled>idle.pop(0)
            loop.c.pool_idle -= 1
            if loop.fdmap[p.fd] is p:
                loop.fdmap[p.fd] = None
                retire_fd(loop, p.fd, False)
            pooled_free_tls(p)
        if not idle:
            del loop.pool[key]
