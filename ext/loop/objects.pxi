# The objects fds map to (their fields are in elbasy._loop.pxd), and the
# counts of the live ones.
#
# Every Conn and every SSL* the loop owns is counted from creation to release
# (kernel pipes are counted by the loop that makes them: c_pipes_created and
# c_pipes_closed). /healthz shows the numbers under "live", and the fd tests
# check they come back to where they were: an object still counted after its
# connection ended is a leak.


cdef Py_ssize_t live_conns = 0


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
        self.cmask = -1
        self.umask = -1
        tunnel_init(&self.tunnel)

    def __dealloc__(self):
        # close_conn has freed all of this already; a Conn dropped some other
        # way (a loop torn down mid-run) gives its memory back here
        global live_conns
        live_conns -= 1
        ssl_release(&self.tls.cssl)
        ssl_release(&self.tls.ussl)
        buf_free(&self.cin)
        buf_free(&self.cout)
        exchange_free(&self.exchange)
        buf_free(&self.tunnel.up.pend)
        buf_free(&self.tunnel.down.pend)


cdef inline int64_t seconds_ns(double s):
    return <int64_t>(s * 1e9)
