# The end of a connection: S_CLOSED.
#
# close_conn is the one place a connection ends: it tells the policy how it
# ended (FINISHED; ABANDONED: held, or on its way to an upstream), releases
# the SSL*s, pipes and buffers, retires both fds and takes the connection off
# the books. It is idempotent.
# shutdown_all ends every connection and pooled upstream when run() stops.


cdef void close_conn(Loop loop, Conn c, bint reset):
    if c.state == S_CLOSED:
        return
    if c.state == S_TUNNEL:
        loop.c.tunnels_open -= 1
        tell_finished(loop, c, 200)
    elif c.state == S_FORWARD and c.ticket is not None:
        tell_finished(loop, c, c.exchange.status)
    elif c.state == S_WAIT:
        unhold(loop, c)
        tell_ended(loop, c.ticket, ending(ABANDONED))
    elif (c.goal == GOAL_FORWARD and c.ticket is not None
          and (c.state == S_DEPARTING or c.state == S_RESOLVE or c.state == S_CONNECT
               or c.state == S_TLS_CONNECT)):
        # left while its request was on its way to an upstream: the policy
        # hears it (a paced request's cost lands: it may have reached the server)
        tell_ended(loop, c.ticket, ending(ABANDONED))
    if c.site is not None:
        if not c.reverse:
            loop.c.intercepts_open -= 1
        c.site = None
    ssl_release(&c.tls.cssl)  # an intercepted session first: it writes through the outer one
    ssl_release(&c.tls.outer)
    c.state = S_CLOSED
    if c.fd >= 0:
        loop.fdmap[c.fd] = None
        retire_fd(loop, c.fd, reset)
        c.fd = -1
    drop_upstream(loop, c, reset)
    tunnel_release(loop, &c.tunnel)
    exchange_free(&c.exchange)
    buf_free(&c.cin)
    buf_free(&c.cout)
    c.deadline = 0
    c.ticket = None
    c.verdict = None
    c.pool_key = None
    c.addrs = None
    loop.c.open -= 1
    client_gone(loop, c)


cdef inline void client_gone(Loop loop, Conn c):
    """One connection fewer for its client address (the limits' count)."""
    if c.client_bucket < 0:
        return
    if loop.clients[c.client_bucket] > 0:
        loop.clients[c.client_bucket] -= 1
    c.client_bucket = -1
    c.client_key = None


cdef void shutdown_all(Loop loop):
    cdef object obj
    for obj in list(loop.fdmap):
        if obj is None:
            continue
        if type(obj) is Conn:
            close_conn(loop, <Conn>obj, False)
        elif type(obj) is Pooled:
            pool_drop(loop, <Pooled>obj)
        # a Listener stays: its socket is Python's
    loop.pool.clear()
    loop.c.pool_idle = 0
