# Accept and the request head: S_HEAD.
#
# accept_batch makes a Conn per client (the listener defers accept until the
# client has sent something, so the head is usually already here and is read
# at once). A --reverse listener's connections carry its site (the policy's
# Reverse) from accept on: the policy sees it with every head, as it sees an
# interception's; the plain listener's pass None. read_head reads and
# dispatches heads while the connection waits for one; dispatch_head asks the
# policy once per head and carries out its verdict: a Reply (replies.pxi), a
# Forward (now, held, or its body shown to the policy first: hold.pxi), a
# Tunnel (upstream_connect.pxi) or an Intercept (intercept.pxi).


cdef void add_listener(Loop loop, int fd, object site) except *:
    """Poll a --reverse or --transparent listener (at start-up): its connections
    get ``site`` (its Reverse or Transparent)."""
    cdef Listener lst
    if site is None:
        raise ValueError("a reverse or transparent listener needs its site")
    if type(site) is Transparent and loop.p_on_hello is None:
        raise TypeError(f"the policy {type(loop.p_on_request.__self__).__name__} "
                        "has no method on_hello (a --transparent listener asks it)")
    lst = Listener.__new__(Listener)
    lst.fd = fd
    lst.site = site
    add_fd(loop, fd, EPOLLIN | (EPOLLEXCLUSIVE if loop.listen_exclusive else 0))
    map_fd(loop, fd, lst)
    loop.listeners.append(lst)


cdef void accept_batch(Loop loop, int lfd, object site):
    """Accept what waits on listener `lfd`; `site`: a --reverse or --transparent
    listener's (else None)."""
    cdef int _i, fd, err, bucket
    cdef sockaddr_storage ss
    cdef socklen_t slen
    cdef Conn c
    cdef object key
    for _i in range(ACCEPT_BATCH):
        slen = sizeof(ss)
        fd = accept4(lfd, <sockaddr *>&ss, &slen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            err = errno
            if err == EAGAIN or err == EINTR:
                return  # the queue is empty (or a signal): epoll says when there is more
            if err == ECONNABORTED:
                continue  # that client reset while queued: take the next one
            if err == EMFILE or err == ENFILE:
                # out of fds (ours or the system's): shed one client so the
                # listener does not stay readable forever
                loop.c.accept_emfile += 1
                shed_one_client(loop, lfd)
                return
            # ENOBUFS/ENOMEM (kernel memory), EPERM (a firewall rule),
            # EPROTO: counted; the next wake-up tries again
            loop.c.accept_errors += 1
            return
        key = client_key(&ss)
        if loop.p_client_allowed is not None and not client_allowed(loop, key):
            refuse_client(loop, fd)
            continue
        bucket = client_bucket(key)
        if not admitted(loop, bucket):
            refuse_busy(loop, fd)
            continue
        # TCP_NODELAY comes from the listener: accepted sockets inherit it
        c = Conn.__new__(Conn)  # no upstream, no pipes yet (Conn.__cinit__)
        c.fd = fd
        c.serial = new_serial(loop)
        c.started = loop.now
        c.peer = ss
        map_fd(loop, fd, c)
        loop.c.accepted += 1
        c.client_key = key
        c.client_bucket = bucket  # counted by admitted, with loop.c.open
        c.state = S_HEAD
        if site is not None:
            c.site = site
            c.reverse = True
            if type(site) is Transparent:
                c.transparent = True  # until its first bytes say it is plain HTTP
                c.state = S_HELLO
            elif type(site) is TLSListener:
                # the proxy over TLS: the session first, then heads as the plain
                # listener's (site None)
                c.site = None
                c.reverse = False
                if not listener_tls(loop, c, site):
                    continue
        arm(loop, c, loop.now + loop.head_ns)
        # The listener defers accept until the client has sent something,
        # so the head is usually already here: read before polling.
        guarded_event(loop, c, fd, EPOLLIN)


cdef bint listener_tls(Loop loop, Conn c, object site):
    """Begin a --listen-tls client's TLS session (S_TLS_ACCEPT); False when no
    SSL* could be made (counted, the connection closed)."""
    cdef uintptr_t ptr
    try:
        ptr = site.new_ssl(c.fd)
    except Exception:
        loop.c.policy_errors += 1
        close_conn(loop, c, False)
        return False
    c.tls.cssl = <SSL *>ptr
    ssl_adopt()
    c.state = S_TLS_ACCEPT
    return True


cdef inline object client_key(sockaddr_storage *ss):
    cdef unsigned char key[17]
    cdef int n = elb_peer_key(ss, key)
    return PyBytes_FromStringAndSize(<char *>key, n)


cdef bint client_allowed(Loop loop, object key):
    """--allow-clients: whether the client at ``key`` may be served. The policy
    decides (elbasy.access.ClientNetworks), asked once per address: its verdict
    is kept, at most CLIENT_VERDICTS_KEPT of them (all forgotten when full). A
    policy that raises refuses the client and counts a policy error."""
    cdef object known = loop.client_verdicts.get(key)
    if known is not None:
        return known is True
    try:
        known = True if loop.p_client_allowed(key) else False
    except Exception:
        loop.c.policy_errors += 1
        return False
    if len(loop.client_verdicts) >= CLIENT_VERDICTS_KEPT:
        loop.client_verdicts.clear()
    loop.client_verdicts[key] = known
    return known is True


cdef void refuse_client(Loop loop, int fd):
    """A client outside --allow-clients: closed at accept, nothing read or sent
    (its unread request makes the close a reset). Counted; the policy logged
    the address when it was first refused."""
    loop.c.clients_refused += 1
    close(fd)


cdef inline int client_bucket(object key):
    """Which of the CLIENT_COUNT_BUCKETS counts a client address (its key) is
    counted in: FNV-1a of the key. Two addresses that share a bucket share its
    limit (stricter for both, never looser); with 16,384 buckets that takes
    about a hundred busy addresses to be likely for any one pair."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(key)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(key)
    cdef uint32_t h = 2166136261u
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return <int>(h % CLIENT_COUNT_BUCKETS)


cdef inline bint admitted(Loop loop, int bucket):
    """Count a new client connection (loop.c.open, its address's bucket), then
    see whether it passed --max-connections or --max-client-connections: the
    instance's counts, every worker's summed (this loop's alone without instance
    memory). Past a limit it is uncounted again and refused. Counting first and
    looking after a fence means two workers taking connections at once both see
    both: at worst both refuse, never both admit past the limit."""
    loop.c.open += 1
    loop.clients[bucket] += 1
    if (loop.max_conns or loop.max_client_conns) and loop.peers != NULL:
        elb_fence()
    if over_limits(loop, bucket):
        loop.c.open -= 1
        loop.clients[bucket] -= 1
        return False
    return True


cdef inline bint over_limits(Loop loop, int bucket):
    """Whether the counts, this connection's included, are past a limit."""
    cdef Py_ssize_t s, total
    cdef unsigned char *slot
    if loop.max_conns:
        if loop.peers == NULL:
            total = <Py_ssize_t>loop.c.open
        else:
            total = 0
            for s in range(loop.peers_slots):
                slot = loop.peers + s * loop.peers_stride
                total += <Py_ssize_t>(<elb_loop_counters *>(slot + loop.peers_loop_at)).open
        if total > loop.max_conns:
            return True
    if loop.max_client_conns:
        if loop.peers == NULL:
            total = loop.clients[bucket]
        else:
            total = 0
            for s in range(loop.peers_slots):
                slot = loop.peers + s * loop.peers_stride + loop.peers_clients_at
                total += (<unsigned int *>slot)[bucket]
        return total > loop.max_client_conns
    return False


cdef void refuse_busy(Loop loop, int fd):
    """Answer 503 at once and close: the client's request (usually here already,
    the listener defers accept) is read and dropped first, so the close sends a
    FIN after the answer, not a reset that could destroy it."""
    loop.c.refused_busy += 1
    recv(fd, loop.iobuf, IO_CHUNK, MSG_DONTWAIT)
    send(fd, PyBytes_AS_STRING(loop.page_busy), PyBytes_GET_SIZE(loop.page_busy),
         MSG_NOSIGNAL | MSG_DONTWAIT)
    close(fd)


cdef void shed_one_client(Loop loop, int lfd):
    """Out of fds: close the spare, accept and drop one client of `lfd`, re-take it."""
    cdef int fd
    if loop.spare_fd >= 0:
        close(loop.spare_fd)
        loop.spare_fd = -1
    fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)
    if fd >= 0:
        close(fd)
    loop.spare_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)


cdef inline uint64_t new_serial(Loop loop) noexcept:
    loop.next_serial += 1
    return loop.next_serial


cdef object peer_of(Loop loop, Conn c):
    cdef char text[80]
    cdef int n
    if c.peer_text is None:
        n = elb_format_peer(&c.peer, text, sizeof(text))
        c.peer_text = text[:n].decode("ascii")
    return c.peer_text


cdef inline bint client_owes_reading(Conn c) noexcept:
    """The client has not read enough of its answers to send more requests:
    past OUT_HIGH bytes, or past PIPELINE_MAX answers, owed to it."""
    cdef Py_ssize_t owed = buf_len(&c.cout)
    if owed == 0:
        c.pipelined = 0
        return False
    return owed > OUT_HIGH or c.pipelined >= PIPELINE_MAX


cdef void update_head_mask(Loop loop, Conn c):
    cdef int want = 0
    if not client_owes_reading(c):
        want = EPOLLIN
    if buf_len(&c.cout) or c.tls.c_rw:
        want |= EPOLLOUT
    watch_client(loop, c, want)


cdef void read_head(Loop loop, Conn c):
    """Read and dispatch request heads while the connection waits for one.

    A loop, not a recursion: a client may pipeline any number of
    requests that elbasy answers itself, and each answer comes back here.
    Answers the client does not read pile up in cout; past OUT_HIGH bytes
    or PIPELINE_MAX answers (c.pipelined: heads dispatched since cout was
    last empty) no more heads are read or dispatched until it drains.
    """
    cdef ssize_t n
    cdef long end
    cdef Py_ssize_t have, scanned = 0, limit = loop.max_head + 1
    while True:
        if client_owes_reading(c):
            update_head_mask(loop, c)
            return
        have = buf_len(&c.cin)
        if have:
            end = elb_head_end(c.cin.data + c.cin.start, have, scanned)
            if end > loop.max_head or (end < 0 and have > loop.max_head):
                head_too_large(loop, c)
                return
            if end > 0:
                c.pipelined += 1
                dispatch_head(loop, c, end)
                if c.state != S_HEAD:
                    return
                scanned = 0
                continue
            scanned = have
        buf_reserve(&c.cin, limit - have if limit - have < 16384 else 16384)
        n = client_recv(c, c.cin.data + c.cin.end, c.cin.cap - c.cin.end)
        if n > 0:
            if have == 0 and c.requests > 0:
                # a keep-alive client began its next request
                arm(loop, c, loop.now + loop.head_ns)
            c.cin.end += n
            continue
        if n == 0:
            # the client is done (keep-alive close, or gave up mid-head);
            # what we still owe it is delivered before the close
            if buf_len(&c.cout):
                linger(loop, c)
            else:
                close_conn(loop, c, False)
            return
        if errno == EINTR:
            continue  # a signal first: read again
        if errno == EAGAIN:
            update_head_mask(loop, c)  # the rest of the head is on its way
            return
        # ECONNRESET (it reset mid-head), EPROTO (TLS garbage, an alert)
        client_lost(loop, c)
        return


cdef void head_too_large(Loop loop, Conn c):
    cdef object end = Ended(HEAD_TOO_LARGE, client=peer_of(loop, c))
    send_final(loop, c, ended_page(loop, None, end, loop.page_head_too_large))


cdef void dispatch_head(Loop loop, Conn c, long end):
    """A whole head is here: ask the policy once what to do with it."""
    cdef bytes head = PyBytes_FromStringAndSize(c.cin.data + c.cin.start, end)
    cdef object v
    cdef int64_t depart
    buf_consumed(&c.cin, end)
    c.requests += 1
    loop.c.requests += 1
    c.exchange_started = loop.now
    try:
        v = loop.p_on_request(head, peer_of(loop, c), c.site)
    except Exception as exc:
        policy_error(loop, c, exc)
        return
    if type(v) is Reply:
        reply(loop, c, (<object>v).data, (<object>v).close)
    elif type(v) is Forward:
        c.verdict = v
        c.ticket = field(v, FWD_TICKET)
        c.goal = GOAL_FORWARD
        c.exchange.retried = False
        if <Py_ssize_t>field(v, FWD_PEEK) > 0 and <int>field(v, FWD_BODY) != BODY_NONE:
            if field(v, FWD_EXPECT) and queue_client(
                    loop, c, CONTINUE_100, PyBytes_GET_SIZE(CONTINUE_100)) == STEP_ENDED:
                return
            begin_peek(loop, c, field(v, FWD_PEEK))
            return
        depart = hold_ns(loop, field(v, FWD_DEPART))
        if depart:
            hold(loop, c, depart)
        else:
            send_forward(loop, c)
    elif type(v) is Tunnel and c.site is None:
        c.verdict = v
        c.ticket = (<object>v).ticket
        c.goal = GOAL_TUNNEL
        start_upstream(loop, c, (<object>v).host, (<object>v).port)
    elif type(v) is Intercept and c.site is None:
        begin_intercept(loop, c, v)
    else:
        policy_error(loop, c, TypeError(f"unexpected verdict {v!r}"))
