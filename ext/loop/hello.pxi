# A --transparent listener's first bytes: S_HELLO.
#
# Its clients never sent a CONNECT: DNS, /etc/hosts or a REDIRECT rule sent
# the API's name here. read_hello keeps what the client sends in cin until
# its first bytes say what it is. A TLS ClientHello (a handshake record) is
# read whole and its server name goes to the policy's on_hello, whose
# verdict is carried out as a CONNECT's would be, with no "200": an
# Intercept accepts TLS with the ClientHello from memory (intercept.pxi), a
# Tunnel dials and then passes the ClientHello on before splicing
# (tunnel.pxi), a Reply (a TLS alert) is sent and the connection closed.
# Anything else is plain HTTP: the connection becomes an S_HEAD one whose
# heads the policy routes by their Host (the listener's site goes with them).
#
# Until its tunnel or TLS session begins such a client speaks TLS that
# nobody answered yet, so an HTTP page would be garbage to it: send_final
# sends it a TLS alert instead (c.transparent).

# the most a client may send before its ClientHello is whole: a hello in
# records of a byte each would need six times its length; twice is plenty
# for any real client
cdef Py_ssize_t HELLO_READ_MAX = 2 * ELB_HELLO_MAX

# fatal TLS alerts (RFC 8446 §6), in a TLS 1.0 record as a server sends
# before it chose a version: internal_error (an error of ours or the
# upstream's) and decode_error (first bytes that are a handshake record but
# not a ClientHello)
cdef bytes ALERT_INTERNAL_ERROR = b"\x15\x03\x01\x00\x02\x02\x50"
cdef bytes ALERT_DECODE_ERROR = b"\x15\x03\x01\x00\x02\x02\x32"


cdef void read_hello(Loop loop, Conn c):
    """Read a --transparent client's first bytes until they say what it is."""
    cdef ssize_t n
    cdef Py_ssize_t have
    cdef unsigned char name[256]
    cdef size_t name_len = 0
    cdef int rc
    while True:
        have = buf_len(&c.cin)
        if have:
            if <unsigned char>c.cin.data[c.cin.start] != 0x16:
                # not a TLS handshake record: plain HTTP, routed by Host
                c.transparent = False
                c.state = S_HEAD
                read_head(loop, c)
                return
            rc = elb_hello_name(<const unsigned char *>(c.cin.data + c.cin.start),
                                <size_t>have, name, &name_len)
            if rc == ELB_HELLO_BAD or (rc == ELB_HELLO_MORE and have >= HELLO_READ_MAX):
                loop.c.bad_hellos += 1
                hello_refused(loop, c, ALERT_DECODE_ERROR)
                return
            if rc != ELB_HELLO_MORE:
                dispatch_hello(loop, c, name[:name_len].decode("ascii")
                               if rc == ELB_HELLO_NAME else None)
                return
        buf_reserve(&c.cin, 16384)
        n = elb_io_recv(c.fd, NULL, c.cin.data + c.cin.end, c.cin.cap - c.cin.end, &c.tls.c_rw)
        if n > 0:
            c.cin.end += n
            continue
        if n == 0:
            close_conn(loop, c, False)  # gone before saying anything whole
            return
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            set_mask(loop, c.fd, &c.cmask, EPOLLIN)
            return
        client_lost(loop, c)
        return


cdef void dispatch_hello(Loop loop, Conn c, object name):
    """A whole ClientHello naming ``name`` (None: no server name): ask the policy."""
    cdef char text[80]
    cdef int n = elb_original_dst(c.fd, text, sizeof(text))
    cdef object original = text[:n].decode("ascii") if n > 0 else None
    cdef object v
    cdef object site = c.site
    c.site = None  # a TLS client's requests, if any, come in an interception's site
    c.reverse = False
    c.requests += 1
    loop.c.requests += 1
    c.exchange_started = loop.now
    try:
        v = loop.p_on_hello(name, peer_of(loop, c), site, original)
    except Exception as exc:
        policy_error(loop, c, exc)
        return
    if type(v) is Reply:
        hello_refused(loop, c, (<object>v).data)
    elif type(v) is Tunnel:
        c.verdict = v
        c.ticket = (<object>v).ticket
        c.goal = GOAL_TUNNEL
        start_upstream(loop, c, (<object>v).host, (<object>v).port)
    elif type(v) is Intercept:
        begin_intercept(loop, c, v)
    else:
        policy_error(loop, c, TypeError(f"unexpected verdict {v!r}"))


cdef void hello_refused(Loop loop, Conn c, bytes alert):
    """Close a --transparent TLS client with ``alert`` (a TLS alert record)."""
    c.transparent = False  # the alert is sent as it is
    send_final(loop, c, alert)
