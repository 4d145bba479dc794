# The objects fds map to (their fields are in elbasy._loop.pxd), and the
# counts of the live ones.
#
# Every Conn and every SSL* the loop owns is counted from creation to release
# (kernel pipes are counted by the loop that makes them: c_pipes_created and
# c_pipes_closed). /healthz shows the numbers under "live", and the fd tests
# check they come back to where they were: an object still counted after its
# connection ended is a leak.


cdef Py_ssize_t live_conns = 0


cdef class Ended:
    """How a request or tunnel ended (elbasy.seam: the policy's ``ended``).

    Made by the loop (``ending``), one per request: a compiled value costs
    a fraction of a named tuple's construction. Python may make one too
    (the tests), once; its fields are read-only.
    """

    def __init__(self, str kind not None, int status=0, uint64_t up=0, uint64_t down=0,
                 int64_t took_ns=0, str reason not None="", object error=None,
                 str client not None="", bint sent=False):
        if self.kind is not None:
            raise TypeError("an Ended is immutable")
        self.kind = kind
        self.status = status
        self.up = up
        self.down = down
        self.took_ns = took_ns
        self.reason = reason
        self.error = error
        self.client = client
        self.sent = sent

    def __repr__(self):
        return (f"Ended({self.kind!r}, status={self.status}, up={self.up}, down={self.down}, "
                f"took_ns={self.took_ns}, reason={self.reason!r}, error={self.error!r}, "
                f"client={self.client!r}, sent={self.sent})")


cdef inline Ended ending(str kind):
    """An Ended of `kind`, every other field at its default; the caller sets its own."""
    cdef Ended e = Ended.__new__(Ended)
    e.kind = kind
    e.reason = ""
    e.client = ""
    return e


cdef Py_ssize_t live_ssl = 0


cdef inline void ssl_adopt() noexcept:
    """The loop takes over an SSL* the binding made: it frees it from now on."""
    global live_ssl
    live_ssl += 1


cdef inline void ssl_release(SSL **ssl) noexcept:
    """Free an SSL* the loop owns (once: the pointer is cleared)."""
    global live_ssl
    if ssl[0] != NULL:
        SSL_free(ssl[0])
        ssl[0] = NULL
        live_ssl -= 1


cdef class Slot:
    """Anything the loop keeps a deadline for."""


@cython.final
cdef class Pooled(Slot):
    """An idle upstream connection waiting in the keep-alive pool."""


cdef inline void pooled_free_tls(Pooled p) noexcept:
    ssl_release(&p.ssl)


@cython.final
cdef class Conn(Slot):
    """A client connection and, while it has one, its upstream.

    The fields every phase shares are on the Conn itself; what belongs to
    one phase is in its own embedded struct: ``tunnel`` (TunnelState),
    ``exchange`` (ExchangeState: one forwarded request and its response)
    and ``tls`` (TlsState). No allocation beyond the object itself.
    """

    def __cinit__(self):
        global live_conns
        live_conns += 1
        self.ufd = -1
        self.client_bucket = -1
        self.cmask = -1
        self.umask = -1
        tunnel_init(&self.tunnel)

    def __dealloc__(self):
        # close_conn has freed all of this already; a Conn dropped some other
        # way (a loop torn down mid-run) gives its memory back here
        global live_conns
        live_conns -= 1
        ssl_release(&self.tls.cssl)
        ssl_release(&self.tls.outer)
        ssl_release(&self.tls.ussl)
        buf_free(&self.cin)
        buf_free(&self.cout)
        exchange_free(&self.exchange)
        buf_free(&self.tunnel.up.pend)
        buf_free(&self.tunnel.down.pend)


cdef inline int64_t seconds_ns(double s):
    return <int64_t>(s * 1e9)
