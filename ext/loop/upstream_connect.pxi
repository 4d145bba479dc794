# Resolve and connect: S_RESOLVE and S_CONNECT.
#
# start_upstream stops reading the client (a reset is still reported) and
# asks the resolver; each address is tried in turn under the connect
# deadline; connected() goes on to the tunnel, upstream TLS or the forward
# exchange, by the connection's goal. drop_upstream is the one way an
# upstream fd leaves a connection.


cdef void start_upstream(Loop loop, Conn c, str host, int port):
    cdef object res
    c.state = S_RESOLVE
    c.addrs = None
    c.addr_i = 0
    c.last_err = 0
    # Stop reading the client (pipelined bytes wait in the kernel), but
    # keep it in epoll with no interest: a reset (EPOLLERR, EPOLLHUP) is
    # still reported, so a client that leaves while DNS or the connect
    # takes its time is closed at once, not when the answer is ready. A
    # half-close (FIN) raises nothing: that client still gets its answer.
    set_mask(loop, c.fd, &c.cmask, 0)
    if loop.drain_begun and loop.connect_ns > DRAIN_RESOLVE_NS:
        arm(loop, c, loop.now + DRAIN_RESOLVE_NS)  # drain_begin says why
    else:
        arm(loop, c, loop.now + loop.connect_ns)
    try:
        res = loop.r_lookup(host, port, (c.fd, c.serial))
    except Exception as exc:
        policy_error(loop, c, exc)
        return
    if res is not None:
        resolved(loop, c, res)


cdef void resolved_batch(Loop loop):
    cdef object obj
    cdef Conn c
    for token, res in loop.r_completed():
        fd, serial = token
        if fd >= len(loop.fdmap):
            continue
        obj = loop.fdmap[fd]
        if type(obj) is not Conn:
            continue
        c = <Conn>obj
        if c.serial != serial or c.state != S_RESOLVE:
            continue
        try:
            resolved(loop, c, res)
        except Exception as exc:
            conn_crashed(loop, c, exc)


cdef void resolved(Loop loop, Conn c, object res):
    cdef int status
    if isinstance(res, str):
        # the resolver's Failure says what to answer: 502 for a name that did
        # not resolve, 403 when the guard left no address (elbasy.resolver)
        status = getattr(res, "status", 502)
        if status != 403:
            loop.c.connect_failures += 1
        fail(loop, c, status, str(res))
        return
    c.addrs = res
    c.addr_i = 0
    try_connect(loop, c)


cdef void try_connect(Loop loop, Conn c):
    cdef int fd = -1, err = 0, at_once = 0
    cdef bytes ip
    while c.addr_i < len(c.addrs):
        family, host, port = c.addrs[c.addr_i]
        c.addr_i += 1
        ip = host.encode("ascii")
        err = elb_connect(family, ip, port, &fd, &at_once)
        if err == 0:
            c.ufd = fd
            c.umask = -1
            map_fd(loop, fd, c)
            c.state = S_CONNECT
            if at_once:
                connected(loop, c)
                return
            set_mask(loop, fd, &c.umask, EPOLLOUT)
            arm(loop, c, loop.now + loop.connect_ns)
            return
        c.last_err = err
        if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
            # out of fds or kernel memory: every other address would fail too
            fail(loop, c, 503, "elbasy is out of sockets; try again shortly")
            return
        # ECONNREFUSED, ENETUNREACH, EINVAL (an address that does not parse)
        # and the like: this address failed, the next one may not
    loop.c.connect_failures += 1
    fail(loop, c, 502, connect_reason(loop, c))


cdef str connect_reason(Loop loop, Conn c):
    target = f"{(<object>c.verdict).host}:{(<object>c.verdict).port}"
    if c.last_err:
        return f"cannot connect to {target}: {os.strerror(c.last_err)}"
    return f"cannot connect to {target}"


cdef void connect_ready(Loop loop, Conn c):
    cdef int err = elb_socket_error(c.ufd)
    if err != 0:
        # the connect failed (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH...):
        # remembered for the 502's reason, and the next address is tried
        c.last_err = err
        drop_upstream(loop, c, False)
        try_connect(loop, c)
        return
    connected(loop, c)


cdef void connected(Loop loop, Conn c):
    c.addrs = None
    if c.goal == GOAL_TUNNEL:
        begin_tunnel(loop, c)
    elif (<object>c.verdict).tls:
        begin_upstream_tls(loop, c)
    else:
        begin_forward(loop, c, False)


cdef void drop_upstream(Loop loop, Conn c, bint reset):
    ssl_release(&c.tls.ussl)
    c.tls.u_rw = 0
    if c.ufd >= 0:
        loop.fdmap[c.ufd] = None
        if reset:
            retire_fd(loop, c.ufd, True)
        else:
            retire_fd(loop, c.ufd, False)
        c.ufd = -1
        c.umask = -1
