# cython: language_level=3
"""elbasy's data plane: one epoll loop per worker process.

The loop owns every fd: the listener, client connections, upstream
connections (in use and pooled), kernel pipes for splice(2), the resolver's
eventfd and the signal wake-up fd. It makes no policy decision: a complete
request head goes to the policy object once (``on_request``), a complete
response head once (``on_response``), and the verdicts that come back say
what to do. Bodies and tunnel bytes never enter Python.

Reading order follows a connection: accept -> head -> verdict -> (resolve ->
connect) -> tunnel or forward exchange -> keep-alive or close. Deadlines live
in one min-heap of (when, fd, serial) entries (elbasy_timers.h) checked
lazily: an idle deadline moves forward with a plain store, and the heap
entry is pushed again only when it fires early.

Return convention of the connection steps. Every method that does I/O for
a connection, or calls one that does, returns an ``int`` step result and
is declared ``except STEP_RAISED``:

* ``STEP_DONE`` (1): the work it was asked for is done; the caller goes on;
* ``STEP_WAIT`` (0): a socket would block; epoll (or a timer) calls again;
* ``STEP_ENDED`` (-1): the connection was finished inside the step (closed,
  or answered and lingering, or handed to a retry): the caller returns at
  once and touches it no more. The step that sees a failure is the one that
  ends the connection, so no caller can forget to close it;
* ``STEP_RAISED`` (-99) is never returned on purpose: it is the value
  Cython uses for "a Python exception is in flight" (a MemoryError). Such
  an exception stops at the connection boundary (``guarded_event``,
  ``guarded_expiry``), which closes that one connection and counts it.

An ``except`` value is never a value a function returns on purpose: a -1
that means "the send failed" under ``except -1`` skips every caller's error
branch (the reset-before-reply fd leak of 0.1). The raw helpers below the
steps (``buf_send``, ``pump``, ``drain_pipe``) report what failed and leave
the decision to their caller; they never close anything.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EBADF, EINTR, EINVAL, EMFILE, ENFILE, ENOSYS, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

# the timer heap: one min-heap of (when, fd, serial), in elbasy_timers.h
from elbasy_timers cimport (
    elb_timer, elb_timers, elb_timers_first, elb_timers_free, elb_timers_init, elb_timers_pop,
    elb_timers_push,
)

import os

from elbasy.verdicts import Forward, Intercept, Reply, Tunnel


cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass

    struct sockaddr_storage:
        unsigned short ss_family

    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        MSG_PEEK
        MSG_DONTWAIT
        SHUT_WR
        ECONNABORTED
        ENOBUFS
        ENOMEM


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t n,
                   unsigned int flags)
    int pipe2(int *fds, int flags)
    int fcntl(int fd, int cmd, ...)
    int open(const char *path, int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        O_RDONLY


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t n)


cdef extern from "elbasy_io.h" nogil:
    ctypedef struct elb_chunked:
        int state
        uint64_t remaining
    enum:
        CH_DONE
    int64_t elb_now_ns()
    void elb_nodelay(int fd)
    void elb_set_reset(int fd)
    int elb_connect(int family, const char *ip, int port, int *out_fd, int *connected)
    int elb_socket_error(int fd)
    int elb_format_peer(const sockaddr_storage *ss, char *out, size_t cap)
    long elb_head_end(const char *buf, size_t length, size_t start)
    long elb_chunked_scan(elb_chunked *st, const char *buf, size_t length)


cdef extern from "elbasy_tls.h" nogil:
    ctypedef struct SSL:
        pass
    void SSL_free(SSL *ssl)
    ssize_t elb_io_recv(int fd, SSL *ssl, char *buf, size_t n, int *want_write)
    ssize_t elb_io_send(int fd, SSL *ssl, const char *buf, size_t n)
    int elb_tls_handshake(SSL *ssl, int *want)
    int elb_tls_settle(SSL *ssl, int fd)
    void elb_tls_goodbye(SSL *ssl)


# ---- sizes ------------------------------------------------------------------

DEF MAX_EVENTS = 256
DEF ACCEPT_BATCH = 64
DEF IO_CHUNK = 65536          # one recv; a full read marks a bulk flow
DEF SPLICE_CHUNK = 1048576    # bytes asked of one splice(2)
# Bulk flows move up to 1 MiB per splice pair: fewer wake-ups and syscalls
# per GB (measured: 0.50 s of CPU per GB against 0.59 with 256 KiB). An
# unprivileged user past fs.pipe-user-pages-soft gets smaller pipes; the
# F_SETPIPE_SZ failure is ignored and splice works with what it has.
DEF PIPE_SIZE = 1048576
DEF PIPE_POOL_MAX = 64
DEF POOL_PER_HOST = 256
DEF PUMP_ROUNDS = 8           # bounds the work one wake-up does for one flow
DEF OUT_HIGH = 262144         # bytes owed to a client beyond which its input waits

# connection states (mirrors elbasy/protocol/states.py)
DEF S_HEAD = 1
DEF S_RESOLVE = 2
DEF S_CONNECT = 3
DEF S_TUNNEL = 4
DEF S_FORWARD = 5
DEF S_LINGER = 6
DEF S_CLOSED = 7
DEF S_TLS_ACCEPT = 8     # intercepted: TLS handshake with the client
DEF S_TLS_CONNECT = 9    # TLS handshake with the upstream
DEF S_WAIT = 10          # a request held until its departure time
DEF S_BODY = 11          # reading a request body the policy asked to see first

# body framings (mirrors elbasy.verdicts)
DEF BODY_NONE = 0
DEF BODY_LENGTH = 1
DEF BODY_CHUNKED = 2
DEF BODY_CLOSE = 3

# what a connection waits for after resolving and connecting
DEF GOAL_TUNNEL = 1
DEF GOAL_FORWARD = 2

DEF LINGER_NS = 2000000000

# how tunnels move bytes (index into elbasy.config.SPLICE_MODES)
DEF SPLICE_AUTO = 0
DEF SPLICE_ALWAYS = 1
DEF SPLICE_NEVER = 2


# ---- step results (see "Return convention" above) -------------------------------

cdef enum:
    STEP_WAIT = 0
    STEP_DONE = 1
    STEP_ENDED = -1
    STEP_RAISED = -99

# what pump() and drain_pipe() report (they close nothing themselves)
cdef enum:
    PUMP_OK = 0            # progress, or a clean wait
    PUMP_SRC_FAILED = -1   # reading the source failed (reset, error)
    PUMP_DST_FAILED = -2   # writing the destination failed


# ---- byte buffers -----------------------------------------------------------

cdef struct Buf:
    char *data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t cap


cdef inline Py_ssize_t buf_len(Buf *b) noexcept nogil:
    return b.end - b.start


cdef int buf_reserve(Buf *b, Py_ssize_t room) except -1:
    """Make room for `room` more bytes after b.end, compacting first.

    Returns 0; -1 only with MemoryError raised (never on purpose).
    """
    cdef Py_ssize_t used = b.end - b.start
    cdef Py_ssize_t cap
    cdef char *p
    if b.cap - b.end >= room:
        return 0
    if b.start > 0:
        if used:
            memmove(b.data, b.data + b.start, used)
        b.start = 0
        b.end = used
        if b.cap - b.end >= room:
            return 0
    cap = b.cap if b.cap else 4096
    while cap - used < room:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef int buf_append(Buf *b, const char *src, Py_ssize_t n) except -1:
    """Copy n bytes to the end of b. Returns 0; -1 only with MemoryError raised."""
    buf_reserve(b, n)
    memcpy(b.data + b.end, src, n)
    b.end += n
    return 0


cdef inline void buf_consumed(Buf *b, Py_ssize_t n) noexcept nogil:
    b.start += n
    if b.start >= b.end:
        b.start = 0
        b.end = 0


cdef int buf_send(int fd, SSL *ssl, Buf *b, uint64_t *counter) noexcept nogil:
    """Send what b holds (through TLS if ssl): 1 all sent, 0 the socket is
    full, -1 failed (errno). A TLS write that could not finish is retried
    with the same bytes at the front of b, as OpenSSL requires."""
    cdef ssize_t sent
    while buf_len(b):
        sent = elb_io_send(fd, ssl, b.data + b.start, buf_len(b))
        if sent < 0:
            if errno == EINTR:
                continue  # a signal came first: nothing was sent, send again
            if errno == EAGAIN:
                return 0  # the socket buffer is full (or TLS wants the other way)
            return -1  # EPIPE, ECONNRESET, EPROTO (TLS): the peer is gone
        buf_consumed(b, sent)
        if counter != NULL:
            counter[0] += sent
    return 1


cdef void buf_shrink(Buf *b) noexcept nogil:
    """Give back what b has beyond the bytes it holds (kept as they are if realloc fails)."""
    cdef Py_ssize_t used = b.end - b.start
    cdef char *p
    if used == 0 or b.cap - used < 512:
        return
    if b.start > 0:
        memmove(b.data, b.data + b.start, used)
        b.start = 0
        b.end = used
    p = <char *>realloc(b.data, used)
    if p != NULL:
        b.data = p
        b.cap = used


cdef inline void buf_free(Buf *b) noexcept nogil:
    if b.data != NULL:
        free(b.data)
    b.data = NULL
    b.start = 0
    b.end = 0
    b.cap = 0


# ---- one direction of a tunnel -------------------------------------------------

cdef struct Dir:
    int pipe_r
    int pipe_w
    Py_ssize_t in_pipe     # bytes parked in the kernel pipe
    bint spliced           # bulk flow: bytes go through the pipe
    bint eof               # source sent FIN
    bint shut              # FIN passed on to the destination
    bint no_splice         # splice(2) refused this flow: it copies to the end
    Buf pend               # copy mode: bytes the destination did not take yet


cdef inline bint dir_pending(Dir *d) noexcept nogil:
    return d.in_pipe > 0 or buf_len(&d.pend) > 0


# ---- live objects ----------------------------------------------------------------

# Every Conn and every SSL* the loop owns is counted from creation to release
# (kernel pipes are counted by the loop that makes them). /healthz shows the
# numbers under "live", and the fd tests check they come back to where they
# were: an object still counted after its connection ended is a leak.
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


# ---- the objects fds map to ---------------------------------------------------

cdef class Slot:
    """Anything the loop keeps a deadline for."""
    cdef int fd
    cdef uint64_t serial
    cdef int64_t deadline       # 0: none
    cdef int64_t next_check     # when this slot's earliest heap entry fires


@cython.final
cdef class Pooled(Slot):
    """An idle upstream connection waiting in the keep-alive pool."""
    cdef object key
    cdef int mask
    cdef int64_t since          # when it went idle
    cdef SSL *ssl               # its TLS session, for an https upstream


@cython.final
cdef class Conn(Slot):
    """A client connection and, while it has one, its upstream."""
    cdef int ufd
    cdef int state
    cdef int goal
    cdef int cmask
    cdef int umask
    cdef int requests
    cdef int64_t started
    cdef int64_t exchange_started
    cdef Buf cin                # from the client: head bytes, then body bytes
    cdef Buf cout               # to the client, not yet taken by its socket
    cdef Buf uin                # from upstream
    cdef Buf uout               # to upstream, not yet taken by its socket
    cdef Dir up                 # tunnel: client -> upstream
    cdef Dir down               # tunnel: upstream -> client
    cdef sockaddr_storage peer
    cdef object peer_text
    cdef object ticket          # the policy's handle for this request or tunnel
    cdef object verdict         # the Tunnel or Forward being carried out
    cdef object addrs
    cdef int addr_i
    cdef int last_err
    # forward exchange
    cdef int req_framing
    cdef int resp_framing
    cdef uint64_t req_remaining
    cdef uint64_t resp_remaining
    cdef elb_chunked req_chunks
    cdef elb_chunked resp_chunks
    cdef bint req_done
    cdef bint resp_head_done
    cdef bint resp_done
    cdef bint keep_client
    cdef bint reuse_upstream
    cdef bint reused
    cdef bint retried
    cdef bint client_shut       # our FIN to the client went out (lingering close)
    cdef bint client_paused     # client input waits until the response is through
    cdef int status
    cdef Py_ssize_t peek        # request body bytes the policy sees before departure
    cdef Py_ssize_t capture     # response body bytes the policy sees at the end (0: none)
    cdef Buf captured           # the response body so far, up to `capture` bytes
    cdef uint64_t bytes_up
    cdef uint64_t bytes_down
    # TLS
    cdef SSL *cssl              # intercepted: our TLS session with the client
    cdef SSL *ussl              # our TLS session with an https upstream
    cdef object site            # intercepted: the Intercept verdict (host, port)
    cdef bint early_tls         # the ClientHello came with the CONNECT head
    cdef int c_rw               # a TLS read on the client needs it writable
    cdef int u_rw               # a TLS read on the upstream needs it writable

    def __cinit__(self):
        global live_conns
        live_conns += 1

    def __dealloc__(self):
        # close_conn has freed all of this already; a Conn dropped some other
        # way (a loop torn down mid-run) gives its memory back here
        global live_conns
        live_conns -= 1
        ssl_release(&self.cssl)
        ssl_release(&self.ussl)
        buf_free(&self.cin)
        buf_free(&self.cout)
        buf_free(&self.uin)
        buf_free(&self.uout)
        buf_free(&self.up.pend)
        buf_free(&self.down.pend)
        buf_free(&self.captured)


cdef inline void pooled_free_tls(Pooled p) noexcept:
    ssl_release(&p.ssl)


cdef inline int64_t seconds_ns(double s):
    return <int64_t>(s * 1e9)


@cython.final
cdef class Loop:
    """The epoll loop of one worker. See the module docstring."""

    cdef int epfd
    cdef int listen_fd
    cdef int spare_fd
    cdef int resolver_fd
    cdef int wakeup_fd
    cdef bint stopping
    cdef object policy
    cdef object resolver
    cdef object server_tls      # mints leaves and makes client-side SSL*s (interception)
    cdef object client_tls      # makes verified upstream SSL*s
    cdef list fdmap
    cdef dict pool
    cdef dict held              # ticket -> Conn, for every request held in S_WAIT
    cdef uint64_t next_serial
    cdef int64_t now
    cdef int64_t started_ns
    cdef int64_t next_sweep
    cdef epoll_event *events
    cdef char *iobuf
    cdef elb_timers timers
    cdef int *retired
    cdef Py_ssize_t nretired
    cdef Py_ssize_t retired_cap
    cdef int pipes[PIPE_POOL_MAX][2]
    cdef int npipes
    # deadlines, ns
    cdef int64_t head_ns
    cdef int64_t connect_ns
    cdef int64_t idle_ns
    cdef int64_t keepalive_ns
    cdef int64_t response_ns
    cdef Py_ssize_t max_head
    cdef int splice_mode
    # counters for /healthz
    cdef uint64_t c_accepted
    cdef uint64_t c_open
    cdef uint64_t c_tunnels_open
    cdef uint64_t c_tunnels_total
    cdef uint64_t c_requests
    cdef uint64_t c_bytes_up
    cdef uint64_t c_bytes_down
    cdef uint64_t c_spliced
    cdef uint64_t c_copied
    cdef uint64_t c_head_timeouts
    cdef uint64_t c_idle_timeouts
    cdef uint64_t c_keepalive_closed
    cdef uint64_t c_accept_emfile
    cdef uint64_t c_accept_errors
    cdef uint64_t c_connect_failures
    cdef uint64_t c_connect_timeouts
    cdef uint64_t c_response_timeouts
    cdef uint64_t c_client_aborts
    cdef uint64_t c_upstream_aborts
    cdef uint64_t c_pool_reused
    cdef uint64_t c_pool_stale
    cdef uint64_t c_retries
    cdef uint64_t c_policy_errors
    cdef uint64_t c_pipes_created
    cdef uint64_t c_pipes_closed
    cdef uint64_t c_splice_fallbacks
    cdef uint64_t c_internal_errors
    cdef uint64_t c_intercepts_open
    cdef uint64_t c_intercepts_total
    cdef uint64_t c_tls_accepted
    cdef uint64_t c_tls_accept_failures
    cdef uint64_t c_tls_upstream
    cdef uint64_t c_tls_upstream_failures
    cdef uint64_t c_held
    cdef uint64_t c_waiting
    cdef uint64_t c_abandoned
    cdef uint64_t c_throttle_retries

    def __cinit__(self):
        self.epfd = -1
        self.listen_fd = -1
        self.spare_fd = -1
        self.resolver_fd = -1
        self.wakeup_fd = -1
        self.events = NULL
        self.iobuf = NULL
        self.retired = NULL

    def __init__(self, policy, resolver, int listen_fd, int wakeup_fd=-1, *,
                 double head_timeout=10.0, double connect_timeout=10.0,
                 double idle_timeout=300.0, double keepalive_timeout=60.0,
                 double response_timeout=60.0, Py_ssize_t max_head_bytes=65536,
                 int splice=SPLICE_AUTO, server_tls=None, client_tls=None):
        self.policy = policy
        self.resolver = resolver
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.fdmap = []
        self.pool = {}
        self.held = {}
        self.head_ns = seconds_ns(head_timeout)
        self.connect_ns = seconds_ns(connect_timeout)
        self.idle_ns = seconds_ns(idle_timeout)
        self.keepalive_ns = seconds_ns(keepalive_timeout)
        self.response_ns = seconds_ns(response_timeout)
        self.max_head = max_head_bytes
        self.splice_mode = splice
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * MAX_EVENTS)
        self.iobuf = <char *>malloc(IO_CHUNK)
        self.retired_cap = 256
        self.retired = <int *>malloc(sizeof(int) * self.retired_cap)
        if (self.events == NULL or self.iobuf == NULL or self.retired == NULL
                or elb_timers_init(&self.timers, 1024) < 0):
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        # One fd held in reserve: when accept4 hits EMFILE, give it up, accept
        # and close the waiting client, take it back. No busy loop.
        self.spare_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
        self.listen_fd = listen_fd
        self.add_fd(listen_fd, EPOLLIN)
        self.resolver_fd = resolver.fileno()
        self.add_fd(self.resolver_fd, EPOLLIN)
        self.wakeup_fd = wakeup_fd
        if wakeup_fd >= 0:
            self.add_fd(wakeup_fd, EPOLLIN)
        self.now = elb_now_ns()
        self.started_ns = self.now

    def __dealloc__(self):
        cdef int i
        if self.epfd >= 0:
            close(self.epfd)
        if self.spare_fd >= 0:
            close(self.spare_fd)
        for i in range(self.npipes):
            close(self.pipes[i][0])
            close(self.pipes[i][1])
            self.c_pipes_closed += 1
        self.close_retired()
        free(self.events)
        free(self.iobuf)
        elb_timers_free(&self.timers)
        free(self.retired)

    # ---- public, from Python -----------------------------------------------------

    def stop(self):
        """Leave run() at the next wake-up (safe from a signal handler)."""
        self.stopping = True

    def run(self):
        """Serve until stop(); then close every connection this loop owns."""
        cdef int n, i, fd, timeout
        cdef uint32_t ev
        cdef object obj
        while not self.stopping:
            timeout = self.next_timeout_ms()
            with nogil:
                n = epoll_wait(self.epfd, self.events, MAX_EVENTS, timeout)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                raise OSError(errno, os.strerror(errno))
            self.now = elb_now_ns()
            for i in range(n):
                fd = self.events[i].data.fd
                ev = self.events[i].events
                if fd == self.listen_fd:
                    self.accept_batch()
                elif fd == self.resolver_fd:
                    self.resolved_batch()
                elif fd == self.wakeup_fd:
                    self.drain_wakeup()
                    PyErr_CheckSignals()
                elif fd < len(self.fdmap):
                    obj = self.fdmap[fd]
                    if obj is None:
                        continue
                    if type(obj) is Conn:
                        self.guarded_event(<Conn>obj, fd, ev)
                    else:
                        self.pool_drop(<Pooled>obj)
            obj = None  # a connection closed in this batch is freed now, not next turn
            self.run_timers()
            if self.now >= self.next_sweep:
                self.sweep_pool()
                self.next_sweep = self.now + 1000000000
            self.close_retired()
        self.shutdown_all()
        self.close_retired()

    def wake(self, ticket, double when):
        """Move a held request's departure to ``when`` (monotonic seconds).

        The policy calls it when a line moves (a refund, a client ahead that
        left, the one ahead that departed). A ticket no longer held (sent,
        closed) is ignored. It only re-arms a timer: the request leaves from
        the timer, never from inside the policy call that woke it.
        """
        cdef object obj = self.held.get(ticket)
        cdef Conn c
        if obj is None:
            return
        c = <Conn>obj
        if c.state != S_WAIT:
            return
        self.arm(c, self.departure_ns(when))

    def stats(self):
        """Counters for /healthz; cheap enough to call per status request."""
        return {
            "uptime_seconds": (elb_now_ns() - self.started_ns) / 1e9,
            "connections": {
                "open": self.c_open,
                "accepted": self.c_accepted,
                "tunnels_open": self.c_tunnels_open,
                "tunnels_total": self.c_tunnels_total,
                "requests_total": self.c_requests,
                "upstream_idle": sum(len(v) for v in self.pool.values()),
            },
            "bytes_up": self.c_bytes_up,
            "bytes_down": self.c_bytes_down,
            "bytes_spliced": self.c_spliced,
            "bytes_copied": self.c_copied,
            "counters": {
                "head_timeouts": self.c_head_timeouts,
                "idle_timeouts": self.c_idle_timeouts,
                "keepalive_closed": self.c_keepalive_closed,
                "accept_emfile": self.c_accept_emfile,
                "accept_errors": self.c_accept_errors,
                "connect_failures": self.c_connect_failures,
                "connect_timeouts": self.c_connect_timeouts,
                "response_timeouts": self.c_response_timeouts,
                "client_aborts": self.c_client_aborts,
                "upstream_aborts": self.c_upstream_aborts,
                "upstream_reused": self.c_pool_reused,
                "upstream_stale": self.c_pool_stale,
                "retries": self.c_retries,
                "policy_errors": self.c_policy_errors,
                "pipes_created": self.c_pipes_created,
                "splice_fallbacks": self.c_splice_fallbacks,
                "internal_errors": self.c_internal_errors,
                "timers": self.timers.len,
                "abandoned_while_held": self.c_abandoned,
            },
            "tls": {
                "intercepts_open": self.c_intercepts_open,
                "intercepts_total": self.c_intercepts_total,
                "client_handshakes": self.c_tls_accepted,
                "client_handshake_failures": self.c_tls_accept_failures,
                "upstream_handshakes": self.c_tls_upstream,
                "upstream_handshake_failures": self.c_tls_upstream_failures,
            },
            "live": {
                # objects this process owns right now (the /healthz request's
                # own connection included): each returns to its baseline when
                # the connections that used it have ended
                "conns": live_conns,
                "ssl": live_ssl,
                "pipes": self.c_pipes_created - self.c_pipes_closed,
                "pipes_pooled": self.npipes,
            },
            "held": {
                "total": self.c_held,
                "waiting": self.c_waiting,
                "retried_after_refusal": self.c_throttle_retries,
            },
        }

    # ---- epoll registration ----------------------------------------------------------

    cdef int add_fd(self, int fd, uint32_t mask) except -1:
        cdef epoll_event e
        e.events = mask
        e.data.u64 = 0
        e.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &e) < 0:
            raise OSError(errno, os.strerror(errno))
        return 0

    cdef inline void set_mask(self, int fd, int *current, int want) noexcept:
        """Ask epoll for `want` on fd; one syscall only when it changes.

        A failing epoll_ctl is not checked: EEXIST/ENOENT cannot happen (the
        mask tracks registration), and ENOMEM/ENOSPC (max_user_watches) leave
        the fd unwatched until its deadline closes it; every state has one.
        """
        cdef epoll_event e
        if current[0] == want:
            return
        e.events = <uint32_t>want
        e.data.u64 = 0
        e.data.fd = fd
        if current[0] < 0:
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &e)
        else:
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &e)
        current[0] = want

    cdef void retire_fd(self, int fd, bint reset):
        """Close fd once this wake-up's events are all handled.

        Closing at once would let accept4 or socket hand the same number to
        a new connection while events for the old one are still queued in
        this batch; the new connection would then get the old one's error
        or hang-up. The caller has already unmapped fd, so those events are
        dropped, and the number cannot come back before the batch ends.
        """
        cdef int *grown
        if reset:
            elb_set_reset(fd)
        if self.nretired == self.retired_cap:
            grown = <int *>realloc(self.retired, sizeof(int) * self.retired_cap * 2)
            if grown == NULL:
                close(fd)  # out of memory: close now rather than leak
                return
            self.retired = grown
            self.retired_cap *= 2
        self.retired[self.nretired] = fd
        self.nretired += 1

    cdef void close_retired(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.nretired):
            close(self.retired[i])
        self.nretired = 0

    cdef void map_fd(self, int fd, object obj):
        cdef Py_ssize_t need = fd + 1 - len(self.fdmap)
        if need > 0:
            self.fdmap.extend([None] * (need + 64))
        self.fdmap[fd] = obj

    # ---- deadlines ------------------------------------------------------------------

    cdef void timer_push(self, int64_t when, int fd, uint64_t serial):
        if elb_timers_push(&self.timers, when, fd, serial) < 0:
            raise MemoryError()

    cdef void arm(self, Slot s, int64_t when):
        """Set the slot's deadline; push a heap entry only if it is sooner."""
        s.deadline = when
        if s.next_check == 0 or when < s.next_check:
            self.timer_push(when, s.fd, s.serial)
            s.next_check = when

    cdef int next_timeout_ms(self) noexcept:
        cdef int64_t wait
        if self.timers.len == 0:
            return 1000
        wait = elb_timers_first(&self.timers) - elb_now_ns()
        if wait <= 0:
            return 0
        return <int>(wait // 1000000) + 1

    cdef void run_timers(self):
        cdef elb_timer t
        cdef object obj
        cdef Slot s
        while elb_timers_first(&self.timers) <= self.now:
            t = elb_timers_pop(&self.timers)
            if t.fd >= len(self.fdmap):
                continue
            obj = self.fdmap[t.fd]
            if obj is None:
                continue
            s = <Slot>obj
            if s.serial != t.serial or s.next_check != t.when:
                continue
            s.next_check = 0
            if s.deadline == 0:
                continue
            if s.deadline > self.now:
                self.timer_push(s.deadline, s.fd, s.serial)
                s.next_check = s.deadline
                continue
            s.deadline = 0
            if type(s) is Conn:
                self.guarded_expiry(<Conn>s)
            else:
                self.pool_drop(<Pooled>s)

    # ---- accept -------------------------------------------------------------------------

    cdef void accept_batch(self):
        cdef int _i, fd, err
        cdef sockaddr_storage ss
        cdef socklen_t slen
        cdef Conn c
        for _i in range(ACCEPT_BATCH):
            slen = sizeof(ss)
            fd = accept4(self.listen_fd, <sockaddr *>&ss, &slen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN or err == EINTR:
                    return  # the queue is empty (or a signal): epoll says when there is more
                if err == ECONNABORTED:
                    continue  # that client reset while queued: take the next one
                if err == EMFILE or err == ENFILE:
                    # out of fds (ours or the system's): shed one client so the
                    # listener does not stay readable forever
                    self.c_accept_emfile += 1
                    self.shed_one_client()
                    return
                # ENOBUFS/ENOMEM (kernel memory), EPERM (a firewall rule),
                # EPROTO: counted; the next wake-up tries again
                self.c_accept_errors += 1
                return
            # TCP_NODELAY comes from the listener: accepted sockets inherit it
            c = Conn.__new__(Conn)
            c.fd = fd
            c.ufd = -1
            c.cmask = -1
            c.umask = -1
            c.serial = self.new_serial()
            c.started = self.now
            c.peer = ss
            c.up.pipe_r = -1
            c.up.pipe_w = -1
            c.down.pipe_r = -1
            c.down.pipe_w = -1
            self.map_fd(fd, c)
            self.c_accepted += 1
            self.c_open += 1
            c.state = S_HEAD
            self.arm(c, self.now + self.head_ns)
            # The listener defers accept until the client has sent something,
            # so the head is usually already here: read before polling.
            self.guarded_event(c, fd, EPOLLIN)

    cdef void shed_one_client(self):
        """Out of fds: close the spare, accept and drop one client, re-take it."""
        cdef int fd
        if self.spare_fd >= 0:
            close(self.spare_fd)
            self.spare_fd = -1
        fd = accept4(self.listen_fd, NULL, NULL, SOCK_CLOEXEC)
        if fd >= 0:
            close(fd)
        self.spare_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)

    cdef inline uint64_t new_serial(self) noexcept:
        self.next_serial += 1
        return self.next_serial

    cdef object peer_of(self, Conn c):
        cdef char text[80]
        cdef int n
        if c.peer_text is None:
            n = elb_format_peer(&c.peer, text, sizeof(text))
            c.peer_text = text[:n].decode("ascii")
        return c.peer_text

    # ---- events on a connection ------------------------------------------------------

    cdef void guarded_event(self, Conn c, int fd, uint32_t ev):
        """conn_event, with a Python exception stopped at this one connection."""
        try:
            self.conn_event(c, fd, ev)
        except Exception as exc:
            self.conn_crashed(c, exc)

    cdef void guarded_expiry(self, Conn c):
        """conn_expired, with a Python exception stopped at this one connection."""
        try:
            self.conn_expired(c)
        except Exception as exc:
            self.conn_crashed(c, exc)

    cdef void conn_crashed(self, Conn c, object exc):
        """A Python exception escaped a step (out of memory, a bug): this
        connection ends with a reset, since what it was owed is unknown; the
        loop and every other connection go on."""
        self.c_internal_errors += 1
        try:
            self.policy.internal_error(c.ticket, exc)  # logs it; its page is not sent
        except Exception:
            pass
        self.drop_upstream(c, True)
        self.close_conn(c, True)

    cdef void conn_event(self, Conn c, int fd, uint32_t ev):
        cdef int st = c.state
        if st == S_TUNNEL:
            self.tunnel_event(c, fd, ev)
            return
        if ev & EPOLLOUT:
            # a TLS read that had to write first goes on now
            if fd == c.fd and c.c_rw:
                c.c_rw = 0
                ev |= EPOLLIN
            elif fd == c.ufd and c.u_rw:
                c.u_rw = 0
                ev |= EPOLLIN
        if st == S_WAIT:
            # held before departure: the client is only watched for leaving
            if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.c_abandoned += 1
                self.close_conn(c, False)
            elif self.flush_client(c) != STEP_ENDED:
                self.wait_mask(c)
            return
        if ev & EPOLLERR:
            if fd == c.ufd:
                if st == S_CONNECT:
                    self.connect_ready(c)
                    return
                self.c_upstream_aborts += 1
                self.upstream_lost(c)
            elif st == S_TLS_ACCEPT:
                # a reset instead of the rest of the handshake (a client that
                # rejected our certificate, often): the handshake failed
                self.client_tls_failed(c, "the client reset the connection during the handshake")
            else:
                self.client_lost(c)
            return
        if st == S_HEAD:
            if ev & EPOLLOUT:
                if self.flush_client(c) == STEP_ENDED:
                    return
            if ev & (EPOLLIN | EPOLLHUP) or buf_len(&c.cin):
                self.read_head(c)
            else:
                self.update_head_mask(c)
        elif st == S_CONNECT or st == S_TLS_CONNECT:
            if fd != c.ufd:
                if ev & EPOLLHUP:
                    self.client_lost(c)  # it left while we connect for it
            elif st == S_CONNECT:
                self.connect_ready(c)
            else:
                self.upstream_tls_step(c)
        elif st == S_TLS_ACCEPT:
            self.client_tls_step(c)
        elif st == S_BODY:
            self.peek_step(c)
        elif st == S_FORWARD:
            self.forward_event(c, fd, ev)
        elif st == S_LINGER:
            self.linger_event(c, ev)
        elif ev & EPOLLHUP:
            # resolving: the client went away meanwhile
            self.client_lost(c)

    cdef void conn_expired(self, Conn c):
        cdef int st = c.state
        if st == S_HEAD:
            if c.requests > 0 and buf_len(&c.cin) == 0:
                self.c_keepalive_closed += 1
            else:
                self.c_head_timeouts += 1
            self.close_conn(c, False)
        elif st == S_RESOLVE:
            self.c_connect_timeouts += 1
            self.fail(c, 504, "timed out resolving the upstream host")
        elif st == S_CONNECT:
            self.drop_upstream(c, False)
            if c.addrs is not None and c.addr_i < len(c.addrs):
                self.try_connect(c)
            else:
                self.c_connect_timeouts += 1
                self.fail(c, 504, "timed out connecting to the upstream")
        elif st == S_TUNNEL:
            self.c_idle_timeouts += 1
            self.close_conn(c, False)
        elif st == S_WAIT:
            self.departure(c)
        elif st == S_TLS_ACCEPT or st == S_BODY:
            self.c_head_timeouts += 1
            self.close_conn(c, False)
        elif st == S_TLS_CONNECT:
            self.c_connect_timeouts += 1
            self.drop_upstream(c, False)
            self.fail(c, 504, "timed out in the TLS handshake with the upstream")
        elif st == S_FORWARD:
            self.c_response_timeouts += 1
            if not c.resp_head_done:
                self.drop_upstream(c, False)
                self.fail(c, 504, "the upstream did not answer in time")
            else:
                self.close_conn(c, False)
        else:
            self.close_conn(c, False)

    # ---- request head ---------------------------------------------------------------------

    cdef void update_head_mask(self, Conn c):
        cdef int want = 0
        if buf_len(&c.cout) <= OUT_HIGH:
            want = EPOLLIN
        if buf_len(&c.cout) or c.c_rw:
            want |= EPOLLOUT
        self.set_mask(c.fd, &c.cmask, want)

    cdef void read_head(self, Conn c):
        """Read and dispatch request heads while the connection waits for one.

        A loop, not a recursion: a client may pipeline any number of
        requests that elbasy answers itself, and each answer comes back here.
        Answers the client does not read pile up in cout; past OUT_HIGH no
        more heads are read or dispatched until it drains.
        """
        cdef ssize_t n
        cdef long end
        cdef Py_ssize_t have, scanned = 0, limit = self.max_head + 1
        while True:
            if buf_len(&c.cout) > OUT_HIGH:
                self.update_head_mask(c)
                return
            have = buf_len(&c.cin)
            if have:
                end = elb_head_end(c.cin.data + c.cin.start, have, scanned)
                if end > self.max_head or (end < 0 and have > self.max_head):
                    self.head_too_large(c)
                    return
                if end > 0:
                    self.dispatch_head(c, end)
                    if c.state != S_HEAD:
                        return
                    scanned = 0
                    continue
                scanned = have
            buf_reserve(&c.cin, limit - have if limit - have < 16384 else 16384)
            n = elb_io_recv(c.fd, c.cssl, c.cin.data + c.cin.end, c.cin.cap - c.cin.end,
                            &c.c_rw)
            if n > 0:
                if have == 0 and c.requests > 0:
                    # a keep-alive client began its next request
                    self.arm(c, self.now + self.head_ns)
                c.cin.end += n
                continue
            if n == 0:
                # the client is done (keep-alive close, or gave up mid-head);
                # what we still owe it is delivered before the close
                if buf_len(&c.cout):
                    self.linger(c)
                else:
                    self.close_conn(c, False)
                return
            if errno == EINTR:
                continue  # a signal first: read again
            if errno == EAGAIN:
                self.update_head_mask(c)  # the rest of the head is on its way
                return
            # ECONNRESET (it reset mid-head), EPROTO (TLS garbage, an alert)
            self.client_lost(c)
            return

    cdef void head_too_large(self, Conn c):
        cdef bytes data
        try:
            data = self.policy.head_too_large(self.peer_of(c))
        except Exception:
            data = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"
        self.send_final(c, data)

    cdef void dispatch_head(self, Conn c, long end):
        """A whole head is here: ask the policy once what to do with it."""
        cdef bytes head = PyBytes_FromStringAndSize(c.cin.data + c.cin.start, end)
        cdef object v
        cdef int64_t depart
        buf_consumed(&c.cin, end)
        c.requests += 1
        self.c_requests += 1
        c.exchange_started = self.now
        try:
            if c.site is None:
                v = self.policy.on_request(head, self.peer_of(c))
            else:
                v = self.policy.on_intercepted(head, self.peer_of(c), c.site)
        except Exception as exc:
            self.policy_error(c, exc)
            return
        if type(v) is Reply:
            self.reply(c, (<object>v).data, (<object>v).close)
        elif type(v) is Forward:
            c.verdict = v
            c.ticket = (<object>v).ticket
            c.goal = GOAL_FORWARD
            c.retried = False
            if (<object>v).peek > 0 and (<object>v).body != BODY_NONE:
                if (<object>v).expect and self.queue_client(
                        c, b"HTTP/1.1 100 Continue\r\n\r\n", 25) == STEP_ENDED:
                    return
                self.begin_peek(c, (<object>v).peek)
                return
            depart = self.departure_ns((<object>v).depart)
            if depart:
                self.hold(c, depart)
            else:
                self.send_forward(c)
        elif type(v) is Tunnel and c.site is None:
            c.verdict = v
            c.ticket = (<object>v).ticket
            c.goal = GOAL_TUNNEL
            self.start_upstream(c, (<object>v).host, (<object>v).port)
        elif type(v) is Intercept and c.site is None:
            self.begin_intercept(c, v)
        else:
            self.policy_error(c, TypeError(f"unexpected verdict {v!r}"))

    # ---- request bodies the policy sees first (a GraphQL query's cost) ---------------

    cdef void begin_peek(self, Conn c, Py_ssize_t limit):
        """Read the request body (up to `limit` bytes) before the policy sets a departure.

        Only a Content-Length body that fits is read whole; a chunked or
        larger one shows the policy its first `limit` bytes. The bytes stay in
        cin and are forwarded from there as usual.
        """
        cdef object v = c.verdict
        if v.body == BODY_LENGTH and <Py_ssize_t>v.length < limit:
            limit = <Py_ssize_t>v.length
        c.peek = limit
        c.state = S_BODY
        self.arm(c, self.now + self.head_ns)
        self.peek_step(c)

    cdef void peek_step(self, Conn c):
        cdef ssize_t n
        cdef object again
        cdef int64_t depart
        if buf_len(&c.cout) and self.flush_client(c) == STEP_ENDED:
            return  # (a "100 Continue" still on its way)
        while buf_len(&c.cin) < c.peek:
            buf_reserve(&c.cin, IO_CHUNK)
            n = elb_io_recv(c.fd, c.cssl, c.cin.data + c.cin.end, IO_CHUNK, &c.c_rw)
            if n > 0:
                c.cin.end += n
                continue
            if n < 0 and (errno == EAGAIN or errno == EINTR):
                # the rest of the body is on its way (or a signal came first)
                self.set_mask(c.fd, &c.cmask,
                              EPOLLIN | (EPOLLOUT if c.c_rw or buf_len(&c.cout) else 0))
                return
            # 0: its FIN before the body it announced; < 0: ECONNRESET, EPROTO
            self.client_lost(c)
            return
        c.state = S_RESOLVE  # not reading any more; on its way (or held)
        try:
            again = self.policy.on_body(
                c.ticket, PyBytes_FromStringAndSize(c.cin.data + c.cin.start, c.peek))
        except Exception as exc:
            self.policy_error(c, exc)
            return
        if type(again) is Reply:
            self.send_final(c, (<object>again).data)
            return
        depart = self.departure_ns(again)
        if depart:
            self.hold(c, depart)
        else:
            self.send_forward(c)

    # ---- held requests: "forward at T" -------------------------------------------------

    cdef int64_t departure_ns(self, object when) except -1:
        """The loop time to hold a request until, or 0 to send it now
        (never -1: that is Cython's mark of an exception in flight).

        A departure the policy gave is always kept, even one already past
        by the time the loop reads it (its clocks are read a moment after
        the loop's): the policy confirms every departure it set in
        ``departing``, so such a request waits for the next turn of the loop,
        not for nothing.
        """
        cdef int64_t t
        if not when:
            return 0
        t = seconds_ns(when)
        return t if t > self.now else self.now + 1

    cdef void hold(self, Conn c, int64_t depart):
        """Keep a request until its departure time, on the timer heap.

        Nothing is read from the client meanwhile (a body waits in the
        kernel); it is watched only for leaving, which gives the
        reservation back to the policy.
        """
        c.state = S_WAIT
        if not buf_len(&c.cin):
            # the head is consumed and nothing is read until departure: the
            # read buffer (16 KiB, its first page resident) is most of what a
            # queued request would cost (bench/queued.py: 6.1 -> 1.7 KiB each)
            buf_free(&c.cin)
        else:
            # a body read before departure (a GraphQL query, priced from its
            # text) waits in a buffer sized for reading (64 KiB): only its
            # bytes are kept while it is held
            buf_shrink(&c.cin)
        self.c_held += 1
        self.c_waiting += 1
        if c.ticket is not None:
            self.held[c.ticket] = c
        self.arm(c, depart)
        self.wait_mask(c)

    cdef void unhold(self, Conn c):
        """A held request leaves S_WAIT (departs, or its connection ends)."""
        self.c_waiting -= 1
        if c.ticket is not None:
            self.held.pop(c.ticket, None)

    cdef void wait_mask(self, Conn c):
        self.set_mask(c.fd, &c.cmask, EPOLLRDHUP | (EPOLLOUT if buf_len(&c.cout) else 0))

    cdef void departure(self, Conn c):
        """A held request's time has come: the policy confirms it or moves it later."""
        cdef object again
        cdef int64_t when
        try:
            again = self.policy.departing(c.ticket)
        except Exception as exc:
            self.unhold(c)
            c.state = S_RESOLVE  # no longer held
            self.policy_error(c, exc)
            return
        when = self.departure_ns(again)
        if when:
            self.arm(c, when)
            return
        self.unhold(c)
        c.state = S_RESOLVE  # no longer held; on its way
        self.send_forward(c)

    cdef void send_forward(self, Conn c):
        cdef object v = c.verdict
        if not self.take_pooled(c, v.host, v.port, v.tls):
            self.start_upstream(c, v.host, v.port)

    # ---- interception: TLS with the client ----------------------------------------------

    cdef void begin_intercept(self, Conn c, object v):
        """Answer the CONNECT, then accept TLS as the host it named.

        The leaf is chosen by SNI in the binding's C table (the CONNECT host
        when the client sends no SNI). A ClientHello that came with the
        CONNECT head goes to OpenSSL from memory first.
        """
        cdef bytes ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
        cdef bytes early = PyBytes_FromStringAndSize(c.cin.data + c.cin.start, buf_len(&c.cin))
        cdef uintptr_t ptr
        if self.server_tls is None:
            self.policy_error(c, RuntimeError("interception is not configured in this loop"))
            return
        c.verdict = v
        c.ticket = v.ticket
        try:
            ptr = self.server_tls.new_ssl(c.fd, v.host, early)
        except Exception as exc:
            self.policy_error(c, exc)
            return
        c.cssl = <SSL *>ptr
        ssl_adopt()
        c.early_tls = PyBytes_GET_SIZE(early) > 0
        buf_free(&c.cin)
        c.site = v
        c.state = S_TLS_ACCEPT
        self.c_intercepts_open += 1
        self.c_intercepts_total += 1
        # The "200" leaves in plain text before any TLS byte: parked in cout,
        # it goes out first in client_tls_step, which sends cout without TLS.
        # A client already gone is seen there, with the SSL* owned by c (and
        # freed with it) and the intercept counted as opened and aborted.
        buf_append(&c.cout, PyBytes_AS_STRING(ok), PyBytes_GET_SIZE(ok))
        self.arm(c, self.now + self.head_ns)
        self.client_tls_step(c)

    cdef void client_tls_step(self, Conn c):
        cdef int rc, want = EPOLLIN
        if buf_len(&c.cout):
            # the "200" (plain text) goes before any TLS byte
            rc = buf_send(c.fd, NULL, &c.cout, NULL)
            if rc < 0:
                self.client_lost(c)  # gone before the "200": an abort, SSL* freed
                return
            if rc == 0:
                self.set_mask(c.fd, &c.cmask, EPOLLOUT)
                return
        while True:
            rc = elb_tls_handshake(c.cssl, &want)
            if rc == 0 and c.early_tls:
                # the early ClientHello is used up: read from the socket now
                # (-1: no memory for the socket BIO, the handshake fails)
                rc = elb_tls_settle(c.cssl, c.fd)
                if rc > 0:
                    c.early_tls = False
                    continue
            break
        if rc == 0:
            self.set_mask(c.fd, &c.cmask, want)
            return
        if rc < 0:
            self.client_tls_failed(c, None)
            return
        self.c_tls_accepted += 1
        c.verdict = None
        c.ticket = None
        c.state = S_HEAD
        self.arm(c, self.now + self.head_ns)
        self.read_head(c)  # the first request usually follows the handshake at once

    cdef void client_tls_failed(self, Conn c, object reason):
        """The client's handshake failed: counted, told to the policy, closed."""
        self.c_tls_accept_failures += 1
        try:
            if reason is None:
                reason = self.server_tls.failure(<uintptr_t>c.cssl)
            self.policy.tls_failed(c.ticket, reason)
        except Exception:
            self.c_policy_errors += 1
        self.close_conn(c, False)

    # ---- interception: TLS with the upstream --------------------------------------------

    cdef void begin_upstream_tls(self, Conn c):
        cdef object v = c.verdict
        cdef uintptr_t ptr
        try:
            ptr = self.client_tls.new_ssl(c.ufd, v.host)
        except Exception as exc:
            self.drop_upstream(c, False)
            self.c_tls_upstream_failures += 1
            self.fail(c, 502, f"cannot start TLS with {v.host}: {exc}")
            return
        c.ussl = <SSL *>ptr
        ssl_adopt()
        c.state = S_TLS_CONNECT
        self.arm(c, self.now + self.connect_ns)
        self.upstream_tls_step(c)

    cdef void upstream_tls_step(self, Conn c):
        cdef int want = EPOLLIN
        cdef int rc = elb_tls_handshake(c.ussl, &want)
        cdef object reason
        if rc == 0:
            self.set_mask(c.ufd, &c.umask, want)
            return
        if rc < 0:
            self.c_tls_upstream_failures += 1
            try:
                reason = str(self.client_tls.failure(<uintptr_t>c.ussl))
            except Exception as exc:
                reason = f"TLS handshake failed ({exc})"
            self.drop_upstream(c, False)
            self.fail(c, 502, f"TLS with {(<object>c.verdict).host} failed: {reason}")
            return
        self.c_tls_upstream += 1
        c.reused = False
        self.begin_forward(c)

    cdef void policy_error(self, Conn c, object exc):
        self.c_policy_errors += 1
        try:
            data = self.policy.internal_error(c.ticket, exc)
        except Exception:
            data = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
        self.drop_upstream(c, False)
        self.send_final(c, data)

    # ---- replies from elbasy itself ------------------------------------------------------

    cdef int queue_client(self, Conn c, const char *data, Py_ssize_t n) except STEP_RAISED:
        """Send to the client now and park what its socket does not take.

        STEP_DONE: sent or parked (flush_client sends the rest). STEP_ENDED:
        the client is gone (reset, or closed and then reset our bytes), and
        the connection has been closed here, its upstream included.
        """
        cdef ssize_t sent = 0
        if buf_len(&c.cout) == 0:
            sent = elb_io_send(c.fd, c.cssl, data, n)
            if sent < 0:
                if errno != EAGAIN and errno != EINTR:
                    # EPIPE, ECONNRESET, EPROTO (TLS): nobody will read it
                    self.client_lost(c)
                    return STEP_ENDED
                sent = 0  # EAGAIN: the socket is full; EINTR: nothing went out
        if sent < n:
            buf_append(&c.cout, data + sent, n - sent)
        return STEP_DONE

    cdef int flush_client(self, Conn c) except STEP_RAISED:
        """Write parked bytes to the client: STEP_DONE drained, STEP_WAIT some
        still parked (EPOLLOUT is the caller's to ask for), STEP_ENDED the
        client is gone and the connection was closed here."""
        cdef int rc = buf_send(c.fd, c.cssl, &c.cout, NULL)
        if rc < 0:
            self.client_lost(c)
            return STEP_ENDED
        return STEP_DONE if rc else STEP_WAIT

    cdef void client_lost(self, Conn c):
        """The client's socket failed (a reset, or writes to a closed peer):
        count it and end the connection; an upstream mid-exchange is reset,
        since it can never be reused."""
        self.c_client_aborts += 1
        self.drop_upstream(c, True)
        self.close_conn(c, False)

    cdef void reply(self, Conn c, bytes data, bint close_after):
        if close_after:
            self.send_final(c, data)
            return
        if self.queue_client(c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == STEP_ENDED:
            return
        self.back_to_head(c, False)

    cdef void send_final(self, Conn c, bytes data):
        """Answer and close, lingering so the answer is not lost to a reset.

        Closing a socket with unread input makes the kernel send RST, which
        can destroy the answer in flight (a 431 after a big head, say). So:
        send, shut our side, read and discard for a moment, then close.
        """
        self.drop_upstream(c, False)
        if self.queue_client(c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == STEP_ENDED:
            return
        self.linger(c)

    cdef void linger(self, Conn c):
        """Deliver what the client is owed, then close without a reset."""
        c.state = S_LINGER
        buf_free(&c.cin)
        self.arm(c, self.now + LINGER_NS)
        self.linger_event(c, 0)

    cdef void linger_event(self, Conn c, uint32_t ev):
        cdef ssize_t n
        cdef int _i, rc
        cdef Py_ssize_t owed = buf_len(&c.cout)
        if owed:
            rc = self.flush_client(c)
            if rc == STEP_ENDED:
                return
            if buf_len(&c.cout) < owed:
                c.deadline = self.now + LINGER_NS  # a slow reader that reads is no staller
            if rc == STEP_WAIT:
                self.set_mask(c.fd, &c.cmask, EPOLLOUT)
                return
        if not c.client_shut:
            if c.cssl != NULL:
                elb_tls_goodbye(c.cssl)
            shutdown(c.fd, SHUT_WR)
            c.client_shut = True
        for _i in range(16):
            n = recv(c.fd, self.iobuf, IO_CHUNK, 0)
            if n > 0:
                continue  # what the client still sends is read and dropped
            if n < 0 and (errno == EAGAIN or errno == EINTR):
                self.set_mask(c.fd, &c.cmask, EPOLLIN)
                return  # nothing more yet: wait for its FIN within the linger deadline
            # 0: its FIN, our answer is through; < 0: ECONNRESET and the like,
            # nothing more to deliver either way
            self.close_conn(c, False)
            return
        # still more input: read it on the next wake-up, within the deadline
        self.set_mask(c.fd, &c.cmask, EPOLLIN)

    cdef void fail(self, Conn c, int status, str reason):
        """An upstream could not be reached or did not answer: say why."""
        cdef bytes data
        try:
            data = self.policy.failed(c.ticket, status, reason)
        except Exception:
            data = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
        self.send_final(c, data)

    cdef void back_to_head(self, Conn c, bint resume):
        """Keep-alive: wait for the next request on this client connection.

        With resume, pipelined bytes already here are read at once; without
        it the caller is read_head itself, whose loop goes on.
        """
        c.state = S_HEAD
        c.client_paused = False
        c.verdict = None
        c.ticket = None
        c.goal = 0
        if buf_len(&c.cin):
            self.arm(c, self.now + self.head_ns)
            if resume:
                self.read_head(c)
        else:
            self.arm(c, self.now + self.keepalive_ns)
            self.update_head_mask(c)

    # ---- resolve and connect ------------------------------------------------------------------

    cdef void start_upstream(self, Conn c, str host, int port):
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
        self.set_mask(c.fd, &c.cmask, 0)
        self.arm(c, self.now + self.connect_ns)
        try:
            res = self.resolver.lookup(host, port, (c.fd, c.serial))
        except Exception as exc:
            self.policy_error(c, exc)
            return
        if res is not None:
            self.resolved(c, res)

    cdef void resolved_batch(self):
        cdef object obj
        cdef Conn c
        for token, res in self.resolver.completed():
            fd, serial = token
            if fd >= len(self.fdmap):
                continue
            obj = self.fdmap[fd]
            if type(obj) is not Conn:
                continue
            c = <Conn>obj
            if c.serial != serial or c.state != S_RESOLVE:
                continue
            try:
                self.resolved(c, res)
            except Exception as exc:
                self.conn_crashed(c, exc)

    cdef void resolved(self, Conn c, object res):
        if isinstance(res, str):
            self.c_connect_failures += 1
            self.fail(c, 502, res)
            return
        c.addrs = res
        c.addr_i = 0
        self.try_connect(c)

    cdef void try_connect(self, Conn c):
        cdef int fd = -1, err = 0, connected = 0
        cdef bytes ip
        while c.addr_i < len(c.addrs):
            family, host, port = c.addrs[c.addr_i]
            c.addr_i += 1
            ip = host.encode("ascii")
            err = elb_connect(family, ip, port, &fd, &connected)
            if err == 0:
                c.ufd = fd
                c.umask = -1
                self.map_fd(fd, c)
                c.state = S_CONNECT
                if connected:
                    self.connected(c)
                    return
                self.set_mask(fd, &c.umask, EPOLLOUT)
                self.arm(c, self.now + self.connect_ns)
                return
            c.last_err = err
            if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                self.fail(c, 503, "elbasy is out of sockets; try again shortly")
                return
        self.c_connect_failures += 1
        self.fail(c, 502, self.connect_reason(c))

    cdef str connect_reason(self, Conn c):
        target = f"{(<object>c.verdict).host}:{(<object>c.verdict).port}"
        if c.last_err:
            return f"cannot connect to {target}: {os.strerror(c.last_err)}"
        return f"cannot connect to {target}"

    cdef void connect_ready(self, Conn c):
        cdef int err = elb_socket_error(c.ufd)
        if err != 0:
            c.last_err = err
            self.drop_upstream(c, False)
            self.try_connect(c)
            return
        self.connected(c)

    cdef void connected(self, Conn c):
        c.addrs = None
        if c.goal == GOAL_TUNNEL:
            self.begin_tunnel(c)
        elif (<object>c.verdict).tls:
            self.begin_upstream_tls(c)
        else:
            c.reused = False
            self.begin_forward(c)

    cdef void drop_upstream(self, Conn c, bint reset):
        ssl_release(&c.ussl)
        c.u_rw = 0
        if c.ufd >= 0:
            self.fdmap[c.ufd] = None
            if reset:
                self.retire_fd(c.ufd, True)
            else:
                self.retire_fd(c.ufd, False)
            c.ufd = -1
            c.umask = -1

    # ---- tunnels ----------------------------------------------------------------------------

    cdef void begin_tunnel(self, Conn c):
        cdef bytes ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
        cdef Py_ssize_t early = buf_len(&c.cin)
        cdef ssize_t sent
        cdef int rc
        c.state = S_TUNNEL
        self.c_tunnels_open += 1
        self.c_tunnels_total += 1
        c.bytes_up = 0
        c.bytes_down = 0
        # The "200" goes first; a client that did not wait for it (bytes after
        # the CONNECT head) has those bytes passed on before anything else.
        if buf_len(&c.cout):
            # a response to an earlier request is still on its way: it goes first
            buf_append(&c.down.pend, c.cout.data + c.cout.start, buf_len(&c.cout))
            sent = 0
        else:
            sent = send(c.fd, PyBytes_AS_STRING(ok), PyBytes_GET_SIZE(ok), MSG_NOSIGNAL)
            if sent < 0:
                # EAGAIN, or a client already gone (EPIPE, ECONNRESET): the
                # "200" is parked, and the pump below finds out which
                sent = 0
        if sent < PyBytes_GET_SIZE(ok):
            buf_append(&c.down.pend, PyBytes_AS_STRING(ok) + sent, PyBytes_GET_SIZE(ok) - sent)
        if early:
            buf_append(&c.up.pend, c.cin.data + c.cin.start, early)
            c.bytes_up += early
        buf_free(&c.cin)
        buf_free(&c.cout)
        if self.splice_mode == SPLICE_ALWAYS:
            self.go_splice(&c.up)
            self.go_splice(&c.down)
        self.arm(c, self.now + self.idle_ns)
        if early:
            rc = self.pump(c, &c.up, c.fd, c.ufd)
            if rc < 0:
                self.tunnel_abort(c, c.fd if rc == PUMP_SRC_FAILED else c.ufd)
                return
        if buf_len(&c.down.pend):
            rc = self.pump(c, &c.down, c.ufd, c.fd)
            if rc < 0:
                self.tunnel_abort(c, c.ufd if rc == PUMP_SRC_FAILED else c.fd)
                return
        self.tunnel_masks(c)

    cdef void tunnel_event(self, Conn c, int fd, uint32_t ev):
        cdef int rc = 0
        cdef int other = c.ufd if fd == c.fd else c.fd
        cdef Dir *reading = &c.up if fd == c.fd else &c.down    # fd is its source
        cdef Dir *writing = &c.down if fd == c.fd else &c.up    # fd is its destination
        cdef uint64_t before = self.c_copied + self.c_spliced + c.bytes_up + c.bytes_down
        cdef epoll_event unused
        if ev & EPOLLERR:
            self.tunnel_abort(c, fd)  # a reset (or another socket error) on fd
            return
        if ev & (EPOLLIN | EPOLLHUP):
            rc = self.pump(c, reading, fd, other)
            if rc < 0:
                self.tunnel_abort(c, fd if rc == PUMP_SRC_FAILED else other)
                return
        if ev & (EPOLLOUT | EPOLLHUP):
            rc = self.pump(c, writing, other, fd)
            if rc < 0:
                self.tunnel_abort(c, other if rc == PUMP_SRC_FAILED else fd)
                return
        if c.up.shut and c.down.shut:
            self.close_conn(c, False)
            return
        if self.c_copied + self.c_spliced + c.bytes_up + c.bytes_down != before:
            c.deadline = self.now + self.idle_ns  # idle means no byte moved
        self.tunnel_masks(c)
        if ev & EPOLLHUP:
            # A socket shut both ways reports HUP whatever it is asked for.
            # While it has nothing to do (its data waits on the other side)
            # it leaves epoll; tunnel_masks adds it back when it has.
            if fd == c.fd and c.cmask == 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &unused)
                c.cmask = -1
            elif fd == c.ufd and c.umask == 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &unused)
                c.umask = -1

    cdef void tunnel_masks(self, Conn c):
        cdef int cw = 0, uw = 0
        if not c.up.eof and not dir_pending(&c.up):
            cw |= EPOLLIN
        if dir_pending(&c.down):
            cw |= EPOLLOUT
        if not c.down.eof and not dir_pending(&c.down):
            uw |= EPOLLIN
        if dir_pending(&c.up):
            uw |= EPOLLOUT
        self.set_mask(c.fd, &c.cmask, cw)
        self.set_mask(c.ufd, &c.umask, uw)

    cdef void tunnel_abort(self, Conn c, int culprit):
        """One side failed or reset: end both, passing a reset on."""
        if culprit == c.fd:
            self.c_client_aborts += 1
            if c.ufd >= 0:
                self.fdmap[c.ufd] = None
                self.retire_fd(c.ufd, True)
                c.ufd = -1
        else:
            self.c_upstream_aborts += 1
            if c.fd >= 0:
                self.fdmap[c.fd] = None
                self.retire_fd(c.fd, True)
                c.fd = -1
        self.close_conn(c, False)

    cdef int pump(self, Conn c, Dir *d, int src, int dst) except STEP_RAISED:
        """Move what src has to dst: PUMP_OK (progress, or a clean wait),
        PUMP_SRC_FAILED or PUMP_DST_FAILED. It closes nothing; the caller
        aborts the tunnel with the side that failed as the culprit.

        A flow starts in copy mode (recv/send through the loop's buffer:
        cheapest for small messages, one syscall each way) and moves to
        splice through a kernel pipe as soon as one read fills the buffer,
        the sign of a bulk flow. Backpressure: nothing is read while the
        destination still has bytes of ours to take.
        """
        cdef ssize_t n, k
        cdef int _rounds, rc
        cdef bint up = d == &c.up
        # 1. bytes already on their way
        rc = buf_send(dst, NULL, &d.pend, &self.c_copied)
        if rc <= 0:
            return PUMP_DST_FAILED if rc < 0 else PUMP_OK
        if d.pend.cap:
            buf_free(&d.pend)  # an idle tunnel keeps no buffer
        rc = self.drain_pipe(d, dst)
        if rc != 1:
            return rc  # PUMP_OK: dst is full; or PUMP_DST_FAILED
        # 2. read more, as long as the destination keeps up
        for _rounds in range(PUMP_ROUNDS):
            if d.eof:
                break
            if d.spliced:
                n = splice(src, NULL, d.pipe_w, NULL, SPLICE_CHUNK,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            else:
                n = recv(src, self.iobuf, IO_CHUNK, 0)
            if n < 0:
                if errno == EINTR:
                    continue  # a signal first: nothing moved, read again
                if errno == EAGAIN:
                    break  # src is empty (or, spliced, the pipe is full)
                if d.spliced and (errno == EINVAL or errno == ENOSYS or errno == EBADF):
                    # this kernel or socket type cannot splice: copy instead
                    self.stop_splicing(d)
                    continue
                return PUMP_SRC_FAILED  # ECONNRESET, ETIMEDOUT, EHOSTUNREACH...
            if n == 0:
                d.eof = True  # src sent its FIN
                break
            if up:
                c.bytes_up += n
                self.c_bytes_up += n
            else:
                c.bytes_down += n
                self.c_bytes_down += n
            if d.spliced:
                d.in_pipe = n
                rc = self.drain_pipe(d, dst)
                if rc != 1:
                    return rc
                continue
            k = send(dst, self.iobuf, n, MSG_NOSIGNAL)
            if k < 0:
                if errno != EAGAIN and errno != EINTR:
                    return PUMP_DST_FAILED  # EPIPE, ECONNRESET: dst is gone
                k = 0  # dst is full (or a signal): the bytes are parked below
            self.c_copied += k
            if n == IO_CHUNK and self.splice_mode == SPLICE_AUTO and not d.no_splice:
                self.go_splice(d)
            if k < n:
                buf_append(&d.pend, self.iobuf + k, n - k)
                return PUMP_OK
            if n < IO_CHUNK:
                # a short read emptied the socket: another recv would
                # only say EAGAIN; the level-triggered poll will call again
                return PUMP_OK
        # 3. the source is done and everything reached dst: pass the FIN on
        if d.eof and not d.shut and not dir_pending(d):
            # the FIN travels on; when the other way is already finished the
            # tunnel closes right after, and close() sends it for free
            if not (c.down.shut if up else c.up.shut):
                shutdown(dst, SHUT_WR)  # errors ignored: a dead dst shows on its next event
            d.shut = True
            self.release_pipe(d)
        return PUMP_OK

    cdef int drain_pipe(self, Dir *d, int dst) except STEP_RAISED:
        """Move what the pipe holds to dst: 1 emptied, PUMP_OK (0) dst is
        full, PUMP_DST_FAILED dst failed."""
        cdef ssize_t k
        while d.in_pipe > 0:
            k = splice(d.pipe_r, NULL, dst, NULL, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if k < 0:
                if errno == EINTR:
                    continue  # a signal first: nothing moved
                if errno == EAGAIN:
                    return PUMP_OK  # dst's socket buffer is full
                if errno == EINVAL or errno == ENOSYS or errno == EBADF:
                    # dst cannot take spliced pages: its bytes leave by copy
                    self.stop_splicing(d)
                    return 1 if buf_len(&d.pend) == 0 else self.flush_pend(d, dst)
                return PUMP_DST_FAILED  # EPIPE, ECONNRESET: dst is gone
            d.in_pipe -= k
            self.c_spliced += k
        return 1

    cdef int flush_pend(self, Dir *d, int dst) except STEP_RAISED:
        """Send d.pend to dst: 1 all sent, PUMP_OK dst is full, PUMP_DST_FAILED."""
        cdef int rc = buf_send(dst, NULL, &d.pend, &self.c_copied)
        if rc < 0:
            return PUMP_DST_FAILED
        return 1 if rc else PUMP_OK

    cdef void stop_splicing(self, Dir *d):
        """splice(2) refused this flow (EINVAL, ENOSYS, EBADF: an old kernel,
        a socket type without splice support): the bytes already in the pipe
        move to the copy buffer, and the flow copies from now on."""
        cdef ssize_t k
        self.c_splice_fallbacks += 1
        d.no_splice = True
        while d.in_pipe > 0:
            buf_reserve(&d.pend, d.in_pipe)
            k = read(d.pipe_r, d.pend.data + d.pend.end, d.in_pipe)
            if k <= 0:
                if k < 0 and errno == EINTR:
                    continue
                break  # cannot happen for a pipe we filled; give up on those bytes
            d.pend.end += k
            d.in_pipe -= k
        d.in_pipe = 0
        self.release_pipe(d)

    cdef void go_splice(self, Dir *d):
        cdef int p[2]
        if d.spliced:
            return
        if self.npipes > 0:
            self.npipes -= 1
            d.pipe_r = self.pipes[self.npipes][0]
            d.pipe_w = self.pipes[self.npipes][1]
        else:
            if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
                return  # EMFILE/ENFILE: out of fds, this flow stays in copy mode
            # EPERM past fs.pipe-user-pages-soft: ignored, the pipe keeps its size
            fcntl(p[1], F_SETPIPE_SZ, <int>PIPE_SIZE)
            d.pipe_r = p[0]
            d.pipe_w = p[1]
            self.c_pipes_created += 1
        d.spliced = True

    cdef void release_pipe(self, Dir *d):
        """Give a flow's pipe back to the pool (or close it if bytes remain in it)."""
        if d.pipe_r < 0:
            return
        if d.in_pipe == 0 and self.npipes < PIPE_POOL_MAX:
            self.pipes[self.npipes][0] = d.pipe_r
            self.pipes[self.npipes][1] = d.pipe_w
            self.npipes += 1
        else:
            close(d.pipe_r)
            close(d.pipe_w)
            self.c_pipes_closed += 1
        d.pipe_r = -1
        d.pipe_w = -1
        d.in_pipe = 0
        d.spliced = False

    # ---- forwarding HTTP messages ---------------------------------------------------------

    cdef bint take_pooled(self, Conn c, str host, int port, bint tls):
        """Reuse an idle upstream connection for (host, port, tls), if a live one waits."""
        cdef list idle = self.pool.get((host, port, tls))
        cdef Pooled p
        cdef ssize_t n
        cdef char probe
        while idle:
            p = <Pooled>idle.pop()
            # An upstream that closed while idle is usually dropped by its
            # hang-up event, but one that closed (or sent stray bytes) a moment
            # ago may not be yet: a one-byte peek makes sure nothing waits on
            # it, so no byte from before is read as this request's answer.
            n = recv(p.fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT)
            if n < 0 and errno == EAGAIN:
                c.ufd = p.fd
                c.umask = p.mask
                c.ussl = p.ssl
                p.ssl = NULL
                self.map_fd(p.fd, c)
                p.deadline = 0
                c.reused = True
                self.c_pool_reused += 1
                self.begin_forward(c)
                return True
            self.c_pool_stale += 1
            self.fdmap[p.fd] = None
            self.retire_fd(p.fd, False)
            pooled_free_tls(p)
        return False

    cdef void pool_put(self, Conn c):
        cdef object v = c.verdict
        cdef object key = (v.host, v.port, v.tls)
        cdef list idle = self.pool.get(key)
        cdef Pooled p
        if idle is None:
            idle = []
            self.pool[key] = idle
        if len(idle) >= POOL_PER_HOST:
            self.drop_upstream(c, False)
            return
        p = Pooled.__new__(Pooled)
        p.fd = c.ufd
        p.serial = self.new_serial()
        p.key = key
        p.mask = c.umask
        p.since = self.now
        p.ssl = c.ussl
        c.ussl = NULL
        self.map_fd(p.fd, p)
        # any byte or FIN from an idle upstream means it is no longer usable
        self.set_mask(p.fd, &p.mask, EPOLLIN | EPOLLRDHUP)
        idle.append(p)
        c.ufd = -1
        c.umask = -1

    cdef void pool_drop(self, Pooled p):
        cdef list idle = self.pool.get(p.key)
        if idle is not None:
            try:
                idle.remove(p)
            except ValueError:
                pass
        if self.fdmap[p.fd] is p:
            self.fdmap[p.fd] = None
            self.retire_fd(p.fd, False)
        pooled_free_tls(p)
        p.deadline = 0

    cdef void begin_forward(self, Conn c):
        cdef object v = c.verdict
        cdef bytes head = v.head
        c.state = S_FORWARD
        c.req_framing = v.body
        c.req_remaining = v.length
        c.req_chunks.state = 0
        c.req_chunks.remaining = 0
        c.req_done = c.req_framing == BODY_NONE or (
            c.req_framing == BODY_LENGTH and c.req_remaining == 0)
        c.resp_head_done = False
        c.resp_done = False
        c.status = 0
        c.bytes_up = PyBytes_GET_SIZE(head)
        c.bytes_down = 0
        c.uout.start = 0
        c.uout.end = 0
        c.uin.start = 0
        c.uin.end = 0
        self.c_bytes_up += PyBytes_GET_SIZE(head)
        buf_append(&c.uout, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        self.arm(c, self.now + self.response_ns)
        if self.request_body_step(c) == STEP_ENDED:
            return
        if self.flush_upstream(c) == STEP_ENDED:
            return
        self.forward_masks(c)

    cdef int request_body_step(self, Conn c) except STEP_RAISED:
        """Move the request body bytes we hold from cin to uout, by framing:
        STEP_DONE, or STEP_ENDED after a malformed chunked body (answered 400)."""
        cdef Py_ssize_t avail = buf_len(&c.cin)
        cdef Py_ssize_t take
        cdef long got
        if c.req_done or avail == 0:
            return STEP_DONE
        if c.req_framing == BODY_LENGTH:
            take = avail if <uint64_t>avail < c.req_remaining else <Py_ssize_t>c.req_remaining
            c.req_remaining -= take
            if c.req_remaining == 0:
                c.req_done = True
        else:
            got = elb_chunked_scan(&c.req_chunks, c.cin.data + c.cin.start, avail)
            if got < 0:
                self.bad_request_body(c)
                return STEP_ENDED
            take = got
            if c.req_chunks.state == CH_DONE:
                c.req_done = True
        buf_append(&c.uout, c.cin.data + c.cin.start, take)
        buf_consumed(&c.cin, take)
        c.bytes_up += take
        self.c_bytes_up += take
        return STEP_DONE

    cdef void bad_request_body(self, Conn c):
        cdef bytes data
        try:
            data = self.policy.bad_body(c.ticket)
        except Exception:
            data = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
        # the upstream has a partial request: it can never be reused
        self.drop_upstream(c, True)
        if c.resp_head_done:
            self.close_conn(c, False)
        else:
            self.send_final(c, data)

    cdef int flush_upstream(self, Conn c) except STEP_RAISED:
        """Write the request bytes we hold to the upstream: STEP_DONE drained,
        STEP_WAIT some left (forward_masks asks for EPOLLOUT), STEP_ENDED the
        upstream failed and upstream_lost has answered, retried or closed."""
        cdef int rc = buf_send(c.ufd, c.ussl, &c.uout, NULL)
        if rc < 0:
            self.c_upstream_aborts += 1
            self.upstream_lost(c)
            return STEP_ENDED
        return STEP_DONE if rc else STEP_WAIT

    cdef void forward_masks(self, Conn c):
        """epoll interest during an exchange, chosen so that the common case
        never changes it: the client stays registered for input and the
        upstream for input and hang-up, from one request to the next and
        while pooled. Reading pauses only for backpressure, or once the
        client sends more than the request while the response is pending.
        """
        cdef int cw = 0, uw = 0
        if not c.client_paused and (c.req_done or buf_len(&c.uout) == 0):
            cw |= EPOLLIN
        if buf_len(&c.cout) or c.c_rw:
            cw |= EPOLLOUT
        if c.resp_done or buf_len(&c.cout) == 0:
            uw |= EPOLLIN | EPOLLRDHUP
        if buf_len(&c.uout) or c.u_rw:
            uw |= EPOLLOUT
        self.set_mask(c.fd, &c.cmask, cw)
        self.set_mask(c.ufd, &c.umask, uw)

    cdef void forward_event(self, Conn c, int fd, uint32_t ev):
        cdef ssize_t n
        if fd == c.fd:
            if ev & EPOLLOUT:
                if self.flush_client(c) == STEP_ENDED:
                    return
            if ev & (EPOLLIN | EPOLLHUP) and c.req_done:
                # bytes (a pipelined request) or the end, before our answer:
                # leave them in the kernel until the response is through
                c.client_paused = True
            elif ev & (EPOLLIN | EPOLLHUP):
                buf_reserve(&c.cin, IO_CHUNK)
                n = elb_io_recv(c.fd, c.cssl, c.cin.data + c.cin.end, IO_CHUNK, &c.c_rw)
                if n == 0 or (n < 0 and errno != EAGAIN and errno != EINTR):
                    # 0: its FIN in the middle of its own request body;
                    # ECONNRESET, EPROTO (TLS): it is gone. EAGAIN: nothing yet.
                    self.client_lost(c)
                    return
                if n > 0:
                    c.cin.end += n
                    if self.request_body_step(c) == STEP_ENDED:
                        return
                    if self.flush_upstream(c) == STEP_ENDED:
                        return
        else:
            if ev & EPOLLOUT:
                if self.flush_upstream(c) == STEP_ENDED:
                    return
            if ev & (EPOLLIN | EPOLLHUP | EPOLLRDHUP):
                if self.read_response(c) == STEP_ENDED:
                    return
        if c.state != S_FORWARD:
            return
        if c.resp_done:
            self.finish_exchange(c)
            return
        c.deadline = self.now + self.response_ns
        self.forward_masks(c)

    cdef int read_response(self, Conn c) except STEP_RAISED:
        """Read what the upstream sent and relay it: STEP_DONE (or a wait:
        epoll calls again) or STEP_ENDED when the connection was answered,
        retried or closed inside."""
        cdef ssize_t n
        cdef int _rounds
        for _rounds in range(PUMP_ROUNDS):
            buf_reserve(&c.uin, IO_CHUNK)
            n = elb_io_recv(c.ufd, c.ussl, c.uin.data + c.uin.end, IO_CHUNK, &c.u_rw)
            if n < 0:
                if errno == EINTR:
                    continue  # a signal first: read again
                if errno == EAGAIN:
                    return STEP_WAIT  # nothing more yet (or TLS wants to write: u_rw)
                # ECONNRESET, ETIMEDOUT, EPROTO (a TLS alert or garbage)
                self.c_upstream_aborts += 1
                self.upstream_lost(c)
                return STEP_ENDED
            if n == 0:
                if c.resp_head_done and c.resp_framing == BODY_CLOSE:
                    c.resp_done = True  # a body delimited by the close: complete
                    c.reuse_upstream = False
                    return STEP_DONE
                # a FIN before the response was whole
                self.c_upstream_aborts += 1
                self.upstream_lost(c)
                return STEP_ENDED
            c.uin.end += n
            if self.response_step(c) == STEP_ENDED:
                return STEP_ENDED
            if c.resp_done or buf_len(&c.cout) or (n < IO_CHUNK and c.ussl == NULL):
                # (a TLS read returns one record at most: read on until EAGAIN)
                return STEP_DONE
        return STEP_DONE

    cdef int response_step(self, Conn c) except STEP_RAISED:
        """Handle what uin holds: heads (interim and final), then body bytes.

        STEP_DONE, STEP_WAIT (the client's socket is full), or STEP_ENDED.
        """
        cdef long end
        cdef Py_ssize_t avail, take
        cdef Py_ssize_t parked = 0  # bytes of a final head parked in this call, not yet sent
        cdef long got
        cdef bytes head
        cdef object plan
        while not c.resp_head_done:
            avail = buf_len(&c.uin)
            end = elb_head_end(c.uin.data + c.uin.start, avail, 0)
            if end < 0:
                if avail > self.max_head:
                    self.drop_upstream(c, True)
                    self.fail(c, 502, "the upstream's response head is too large")
                    return STEP_ENDED
                return STEP_WAIT  # the rest of the head is still on its way
            head = PyBytes_FromStringAndSize(c.uin.data + c.uin.start, end)
            buf_consumed(&c.uin, end)
            try:
                plan = self.policy.on_response(c.ticket, head)
            except Exception as exc:
                self.drop_upstream(c, True)
                try:
                    data = self.policy.bad_response(c.ticket, exc)
                except Exception:
                    data = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
                self.send_final(c, data)
                return STEP_ENDED
            if plan.retry_at > 0 and not plan.interim:
                self.retry_later(c, plan.retry_at)
                return STEP_ENDED
            head = plan.head
            c.bytes_down += PyBytes_GET_SIZE(head)
            self.c_bytes_down += PyBytes_GET_SIZE(head)
            # parked, not sent: the body bytes that came with it leave in the
            # same send (one segment, one wake-up for the client)
            buf_append(&c.cout, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
            if plan.interim:
                continue
            parked = PyBytes_GET_SIZE(head)
            c.resp_head_done = True
            c.status = plan.status
            c.resp_framing = plan.body
            c.resp_remaining = plan.length
            c.resp_chunks.state = 0
            c.resp_chunks.remaining = 0
            c.keep_client = plan.keep_client
            c.reuse_upstream = plan.reuse_upstream
            c.capture = plan.capture
            if c.resp_framing == BODY_NONE or (
                    c.resp_framing == BODY_LENGTH and c.resp_remaining == 0):
                c.resp_done = True
        avail = buf_len(&c.uin)
        if c.resp_done or avail == 0:
            if c.resp_done and avail:
                c.reuse_upstream = False  # bytes past the response: not trusted
            return self.flush_client(c)
        if c.resp_framing == BODY_LENGTH:
            take = avail if <uint64_t>avail < c.resp_remaining else <Py_ssize_t>c.resp_remaining
            c.resp_remaining -= take
            if c.resp_remaining == 0:
                c.resp_done = True
        elif c.resp_framing == BODY_CHUNKED:
            got = elb_chunked_scan(&c.resp_chunks, c.uin.data + c.uin.start, avail)
            if got < 0:
                self.c_upstream_aborts += 1
                self.drop_upstream(c, True)
                if parked and buf_len(&c.cout) >= parked:
                    # nothing of this response has reached the client yet: the
                    # head parked above is taken back and the client hears why
                    c.cout.end -= parked
                    self.fail(c, 502, "the upstream sent a malformed chunked body")
                else:
                    self.close_conn(c, False)  # mid-body: a close is all that is left
                return STEP_ENDED
            take = got
            if c.resp_chunks.state == CH_DONE:
                c.resp_done = True
        else:
            take = avail
        if c.resp_done and take < avail:
            c.reuse_upstream = False
        if c.capture > buf_len(&c.captured):
            buf_append(&c.captured, c.uin.data + c.uin.start,
                       min(take, c.capture - buf_len(&c.captured)))
        c.bytes_down += take
        self.c_bytes_down += take
        if buf_len(&c.cout):
            buf_append(&c.cout, c.uin.data + c.uin.start, take)
            c.uin.start = 0
            c.uin.end = 0
            return self.flush_client(c)
        if self.queue_client(c, c.uin.data + c.uin.start, take) == STEP_ENDED:
            return STEP_ENDED
        c.uin.start = 0
        c.uin.end = 0
        return STEP_DONE

    cdef void upstream_lost(self, Conn c):
        """The upstream closed or failed mid-exchange."""
        cdef object v = c.verdict
        if (c.state == S_FORWARD and not c.resp_head_done and buf_len(&c.uin) == 0
                and c.reused and not c.retried and v.retryable):
            # A pooled connection the server had closed as we reused it: the
            # request never reached an application, and it is idempotent with
            # no body, so one fresh attempt is safe.
            self.c_retries += 1
            c.retried = True
            self.drop_upstream(c, False)
            buf_free(&c.uout)
            c.goal = GOAL_FORWARD
            self.start_upstream(c, v.host, v.port)
            return
        self.drop_upstream(c, True)
        if c.state == S_TLS_CONNECT:
            self.fail(c, 502, "the upstream closed the connection during the TLS handshake")
        elif c.state == S_FORWARD and not c.resp_head_done:
            self.fail(c, 502, "the upstream closed the connection before answering")
        else:
            self.close_conn(c, False)

    cdef void retry_later(self, Conn c, double at):
        """The server refused a request the policy may send again: hold it until `at`.

        The refusal is not read further, so its upstream connection goes.
        """
        self.c_throttle_retries += 1
        self.drop_upstream(c, True)
        c.uin.start = 0
        c.uin.end = 0
        buf_free(&c.uout)
        self.hold(c, seconds_ns(at))

    cdef void finish_exchange(self, Conn c):
        cdef int64_t took = self.now - c.exchange_started
        if c.capture:
            try:
                self.policy.on_response_body(
                    c.ticket, PyBytes_FromStringAndSize(c.captured.data + c.captured.start,
                                                        buf_len(&c.captured)))
            except Exception:
                self.c_policy_errors += 1
            buf_free(&c.captured)
            c.capture = 0
        try:
            self.policy.finished(c.ticket, c.status, c.bytes_up, c.bytes_down, took)
        except Exception:
            self.c_policy_errors += 1
        if c.reuse_upstream and c.req_done and buf_len(&c.uout) == 0:
            self.pool_put(c)
        else:
            self.drop_upstream(c, False)
        buf_free(&c.uin)
        buf_free(&c.uout)
        c.ticket = None
        if c.keep_client and c.req_done:
            self.back_to_head(c, True)
        else:
            self.linger(c)

    # ---- the end of a connection ---------------------------------------------------------

    cdef void close_conn(self, Conn c, bint reset):
        cdef int64_t took
        if c.state == S_CLOSED:
            return
        if c.state == S_TUNNEL:
            self.c_tunnels_open -= 1
            took = self.now - c.exchange_started
            try:
                self.policy.finished(c.ticket, 200, c.bytes_up, c.bytes_down, took)
            except Exception:
                self.c_policy_errors += 1
        elif c.state == S_FORWARD and c.ticket is not None:
            took = self.now - c.exchange_started
            try:
                self.policy.finished(c.ticket, c.status, c.bytes_up, c.bytes_down, took)
            except Exception:
                self.c_policy_errors += 1
        elif c.state == S_WAIT:
            self.unhold(c)
            try:
                self.policy.abandoned(c.ticket)
            except Exception:
                self.c_policy_errors += 1
        if c.site is not None:
            self.c_intercepts_open -= 1
            c.site = None
        ssl_release(&c.cssl)
        c.state = S_CLOSED
        if c.fd >= 0:
            self.fdmap[c.fd] = None
            if reset:
                self.retire_fd(c.fd, True)
            else:
                self.retire_fd(c.fd, False)
            c.fd = -1
        self.drop_upstream(c, reset)
        self.release_pipe(&c.up)
        self.release_pipe(&c.down)
        buf_free(&c.cin)
        buf_free(&c.cout)
        buf_free(&c.uin)
        buf_free(&c.uout)
        buf_free(&c.up.pend)
        buf_free(&c.down.pend)
        buf_free(&c.captured)
        c.deadline = 0
        c.ticket = None
        c.verdict = None
        c.addrs = None
        self.c_open -= 1

    cdef void sweep_pool(self):
        """Close upstream connections idle longer than the keep-alive timeout.

        One pass a second over the pool (at most POOL_PER_HOST per host)
        instead of a timer per pooled connection: a connection is pooled and
        taken again on every request, and a timer each time would churn.
        """
        cdef list idle
        cdef Pooled p
        cdef int64_t oldest = self.now - self.keepalive_ns
        for key in list(self.pool):
            idle = self.pool[key]
            # oldest first: put() appends, take() pops the newest
            while idle and (<Pooled>idle[0]).since <= oldest:
                p = <Pooled>idle.pop(0)
                if self.fdmap[p.fd] is p:
                    self.fdmap[p.fd] = None
                    self.retire_fd(p.fd, False)
                pooled_free_tls(p)
            if not idle:
                del self.pool[key]

    cdef void drain_wakeup(self):
        cdef char scratch[64]
        while read(self.wakeup_fd, scratch, sizeof(scratch)) > 0:
            pass

    cdef void shutdown_all(self):
        cdef object obj
        for obj in list(self.fdmap):
            if obj is None:
                continue
            if type(obj) is Conn:
                self.close_conn(<Conn>obj, False)
            else:
                self.pool_drop(<Pooled>obj)
        self.pool.clear()
