# cython: language_level=3
"""elbasy's data plane: one epoll loop per worker process.

The loop owns every fd: the listeners (the proxy's, each --reverse one's: a
Listener in fdmap), client connections, upstream
connections (in use and pooled), kernel pipes for splice(2), the resolver's
eventfd, the quota store's eventfd and the signal wake-up fd. It makes no
policy decision: a complete
request head goes to the policy object once (``on_request``), a complete
response head once (``on_response``), and the verdicts that come back say
what to do; every ending is told to it once (``ended``, with an Ended:
objects.pxi, its kinds in elbasy.verdicts). Bodies and tunnel bytes never
enter Python.

What the loop calls in Python is declared in elbasy/seam.py (the policy,
the resolver, the TLS factories); each method is bound once in
Loop.__init__ (the Loop's p_*, r_*, s_* and u_* fields), so an object missing one is
refused there. A policy call that raises is counted once in policy_errors
(replies.pxi: policy_error, ended_page, tell_ended). The answers sent when
the policy's ``ended`` could not spell one come from elbasy.pages.LoopPages,
handed to the Loop once; the loop itself writes only the two protocol lines
CONTINUE_100 and CONNECT_200.

Where things are (ext/loop/, one C translation unit: the rooms are
``include``d below, so every call between them is a direct C call):

* ``elbasy/_loop.pxd`` (the module's own .pxd, at its full name's path):
  every object and field (Conn, Pooled, Loop, the Ended the policy is
  handed, and the per-phase state embedded in Conn: TunnelState,
  ExchangeState, TlsState);
  ``ext/includes/``: the C the loop calls (system, io, tls, timers) and
  its constants (consts.pxi);
* the rooms, in the order a connection goes through them: buffers,
  objects, epoll, deadlines, dispatch (events and expiries by state),
  accept_head, hold, intercept, upstream_connect, tunnel, splice,
  upstream_pool, forward, response, replies, close; then drain (the
  graceful end: Loop.drain) and stats.

Deadlines live in one min-heap of (when, fd, serial) entries
(ext/c/elbasy_timers.h) checked lazily: an idle deadline moves forward with
a plain store, and the heap entry is pushed again only when it fires early.

Return convention of the connection steps. Every function that does I/O
for a connection, or calls one that does, and reports a result returns an
``int`` step result and is declared ``except STEP_RAISED``:

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

State table
-----------

A connection is in exactly one state (Conn.state, the ConnState enum in
ext/includes/consts.pxi). For each: the functions that set it, its
deadline, what its expiry does (conn_expired), its epoll interest, and the
events it accepts (conn_event). "client" and "upstream" are its two fds;
ERR is EPOLLERR, HUP EPOLLHUP, RDHUP EPOLLRDHUP. tests/test_loop_states.py
checks that this table, the enum and both dispatches name the same states.

S_HEAD
    set by:   accept_batch; client_tls_step (handshake done); back_to_head;
              read_hello (a --transparent client's plain HTTP)
    deadline: head_ns from a head's first byte; keepalive_ns between requests
    expiry:   close (head_timeouts; keepalive_closed when idle between requests)
    epoll:    client IN while at most OUT_HIGH bytes and PIPELINE_MAX answers are owed,
              OUT while cout holds bytes
    events:   client IN/HUP: read_head; OUT: flush_client; ERR: client_lost
S_BODY
    set by:   begin_peek (dispatch_head: a Forward whose body the policy sees first)
    deadline: head_ns
    expiry:   close (head_timeouts)
    epoll:    client IN, OUT while a "100 Continue" is owed
    events:   client any: peek_step; ERR: client_lost
S_BODY_READ
    set by:   peek_step, once the body is in: the policy's on_body runs
    deadline: S_BODY's; left within peek_step (hold, send_forward or an answer)
    expiry:   cannot happen (internal_errors, close)
    epoll:    S_BODY's
    events:   client HUP: client_lost; ERR: client_lost
S_WAIT
    set by:   hold (dispatch_head, peek_step: a hold-until other than NOW; retry_later)
    deadline: the departure time; Loop.wake moves it (the `held` dict)
    expiry:   departure: the policy's departing confirms it, sets a later time or answers it
    epoll:    client RDHUP, OUT while cout holds bytes
    events:   client RDHUP/HUP/ERR: close (ended ABANDONED); OUT: flush_client
S_DEPARTING
    set by:   departure (confirmed, or the policy failed); drain_expire (held
              past the drain's deadline: leaves with the 503)
    deadline: spent; left within departure (send_forward, or the error page)
    expiry:   cannot happen (internal_errors, close)
    epoll:    S_WAIT's
    events:   client HUP: client_lost; ERR: client_lost
S_HELLO
    set by:   accept_batch (a --transparent listener)
    deadline: head_ns
    expiry:   close (head_timeouts)
    epoll:    client IN
    events:   client IN/HUP: read_hello (a ClientHello: on_hello; other bytes:
              S_HEAD, read_head); ERR: client_lost
S_RESOLVE
    set by:   start_upstream (a Tunnel; send_forward with no pooled upstream;
              upstream_lost's one retry)
    deadline: connect_ns; DRAIN_RESOLVE_NS once the worker drains
    expiry:   504 (connect_timeouts); draining: the drain's 503 (drain_refused)
    epoll:    client none (a reset still shows as ERR or HUP)
    events:   client HUP/ERR: client_lost; the resolver's answer (resolved_batch)
S_CONNECT
    set by:   try_connect, for each address in turn
    deadline: connect_ns for each address
    expiry:   the next address (try_connect), or 504 after the last (connect_timeouts)
    epoll:    upstream OUT; client none
    events:   upstream OUT/ERR: connect_ready; client HUP/ERR: client_lost
S_TLS_ACCEPT
    set by:   begin_intercept (dispatch_head, dispatch_hello: an Intercept);
              listener_tls (accept_batch: a --listen-tls client)
    deadline: head_ns
    expiry:   close (head_timeouts)
    epoll:    client OUT until the plain "200" is out, then what the handshake wants
    events:   client any: client_tls_step; ERR: client_tls_failed
S_TLS_CONNECT
    set by:   begin_upstream_tls (connected: a Forward to an https upstream)
    deadline: connect_ns
    expiry:   504 (connect_timeouts)
    epoll:    upstream: what the handshake wants; client none
    events:   upstream any: upstream_tls_step; ERR: upstream_lost; client HUP/ERR: client_lost
S_TUNNEL
    set by:   begin_tunnel (connected, goal GOAL_TUNNEL)
    deadline: idle_ns, moved on whenever a byte moves
    expiry:   close (idle_timeouts)
    epoll:    each side IN while its direction has nothing pending, OUT while the
              other direction has bytes for it (tunnel_masks)
    events:   IN/HUP: pump from that side; OUT/HUP: pump into it; ERR: tunnel_abort
S_FORWARD
    set by:   begin_forward (connected, upstream_tls_step, take_pooled)
    deadline: response_ns, moved on with each event, never past the exchange's
              own end (exchange_ns from begin_forward: a body or an answer
              trickled a byte at a time cannot hold the connection longer)
    expiry:   504 before the response head (response_timeouts, exchange_timeouts
              when its end came), else close
    epoll:    forward_masks: client IN and upstream IN/RDHUP unless held back,
              OUT on a side while bytes wait for it
    events:   client IN: the request body (or pause); OUT: flush_client; upstream
              OUT: flush_upstream; IN/HUP/RDHUP: read_response; ERR: upstream_lost
              or client_lost
S_LINGER
    set by:   linger (send_final; finish_exchange without keep-alive; read_head
              at the client's FIN with bytes owed)
    deadline: LINGER_NS, moved on while the client reads
    expiry:   close
    epoll:    client OUT while bytes are owed, then IN
    events:   client any: linger_event (flush, shut, drain, close); ERR: client_lost
S_CLOSED
    set by:   close_conn
    deadline: none (cleared)
    expiry:   none
    epoll:    none: both fds are unmapped and retired
    events:   none
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.errno cimport EAGAIN, EBADF, EINTR, EINVAL, EMFILE, ENFILE, ENOSYS, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from counters cimport (
    elb_loop_counter_names,
    elb_loop_counters,
    elb_loop_gauge_names,
    elb_loop_gauges_zero,
)
from io cimport (
    CH_DONE, ELB_HELLO_BAD, ELB_HELLO_MAX, ELB_HELLO_MORE, ELB_HELLO_NAME, elb_chunked_scan,
    elb_connect, elb_fence, elb_format_peer, elb_head_end, elb_hello_name, elb_now_ns,
    elb_original_dst, elb_peer_key, elb_set_reset, elb_socket_error,
)
from system cimport (
    ECONNABORTED, ENOBUFS, ENOMEM, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD,
    EPOLLERR, EPOLLEXCLUSIVE, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, F_SETPIPE_SZ,
    MSG_DONTWAIT, MSG_NOSIGNAL, MSG_PEEK, O_CLOEXEC, O_NONBLOCK, O_RDONLY, SHUT_WR,
    SOCK_CLOEXEC, SOCK_NONBLOCK, SPLICE_F_MOVE, SPLICE_F_NONBLOCK, PyErr_CheckSignals, accept4,
    close, epoll_create1, epoll_ctl, epoll_event, epoll_wait, fcntl, open, pipe2, read, recv,
    send, shutdown, sockaddr, sockaddr_storage, socklen_t, splice,
)
from timers cimport (
    elb_timer, elb_timers_first, elb_timers_free, elb_timers_init, elb_timers_pop,
    elb_timers_push,
)
from tls cimport (
    SSL, SSL_free, SSL_has_pending, SSL_pending, SSL_set_read_ahead, elb_io_recv, elb_io_send,
    elb_tls_goodbye, elb_tls_handshake, elb_tls_settle,
)

import os

from elbasy.errors import RemoteProtocolError
from elbasy.pages import LOOP_PAGES
from elbasy.verdicts import (
    ABANDONED, BAD_BODY, BAD_RESPONSE, DRAINED, FAILED, FINISHED, HEAD_TOO_LARGE,
    INTERNAL_ERROR, NOW, TLS_FAILED, Forward, Intercept, Reply, ResponsePlan, TLSListener,
    Transparent, Tunnel,
)
from elbasy.trust import HANDSHAKE_RESET

# "hold until" NOW (elbasy.verdicts): leave at once, unconfirmed. Every
# other hold-until is a monotonic time, held on the timer heap (hold_ns).
cdef double HOLD_NOW = NOW

# The verdicts are named tuples; the loop reads a Forward's and a
# ResponsePlan's fields by position (a tuple slot, not an attribute
# lookup: some twenty per request). Each position is taken from the
# tuple's own _fields here, so the order is written once, in verdicts.py,
# and a field renamed there fails the import, not a request.
cdef Py_ssize_t FWD_HOST = Forward._fields.index("host")
cdef Py_ssize_t FWD_PORT = Forward._fields.index("port")
cdef Py_ssize_t FWD_HEAD = Forward._fields.index("head")
cdef Py_ssize_t FWD_BODY = Forward._fields.index("body")
cdef Py_ssize_t FWD_LENGTH = Forward._fields.index("length")
cdef Py_ssize_t FWD_TICKET = Forward._fields.index("ticket")
cdef Py_ssize_t FWD_TLS = Forward._fields.index("tls")
cdef Py_ssize_t FWD_DEPART = Forward._fields.index("depart")
cdef Py_ssize_t FWD_PEEK = Forward._fields.index("peek")
cdef Py_ssize_t FWD_EXPECT = Forward._fields.index("expect")
cdef Py_ssize_t PLAN_HEAD = ResponsePlan._fields.index("head")
cdef Py_ssize_t PLAN_STATUS = ResponsePlan._fields.index("status")
cdef Py_ssize_t PLAN_BODY = ResponsePlan._fields.index("body")
cdef Py_ssize_t PLAN_LENGTH = ResponsePlan._fields.index("length")
cdef Py_ssize_t PLAN_INTERIM = ResponsePlan._fields.index("interim")
cdef Py_ssize_t PLAN_KEEP_CLIENT = ResponsePlan._fields.index("keep_client")
cdef Py_ssize_t PLAN_REUSE_UPSTREAM = ResponsePlan._fields.index("reuse_upstream")
cdef Py_ssize_t PLAN_CAPTURE = ResponsePlan._fields.index("capture")
cdef Py_ssize_t PLAN_RETRY_AT = ResponsePlan._fields.index("retry_at")


cdef inline object field(object verdict, Py_ssize_t at):
    """Field ``at`` of a verdict whose type (Forward, ResponsePlan) was checked."""
    return <object>PyTuple_GET_ITEM(verdict, at)

# The two protocol lines the loop writes itself (every other answer comes
# from Python: the policy's, or the LoopPages it was handed).
cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes CONNECT_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"

include "buffers.pxi"
include "objects.pxi"
include "epoll.pxi"
include "readahead.pxi"
include "deadlines.pxi"
include "dispatch.pxi"
include "accept_head.pxi"
include "hello.pxi"
include "hold.pxi"
include "intercept.pxi"
include "upstream_connect.pxi"
include "tunnel.pxi"
include "splice.pxi"
include "upstream_pool.pxi"
include "forward.pxi"
include "response.pxi"
include "replies.pxi"
include "close.pxi"
include "drain.pxi"
include "stats.pxi"


# The loop's constants that Python also knows, as the compiled module has
# them: tests/test_loop_states.py checks them against elbasy.verdicts,
# elbasy.config and the state table above.
#: the buckets of client addresses the connection limits count by (a slot's share
#: of the metrics memory holds as many uint32s: elbasy.metrics)
CLIENT_BUCKETS = CLIENT_COUNT_BUCKETS
STATES = {
    "S_HEAD": S_HEAD,
    "S_RESOLVE": S_RESOLVE,
    "S_CONNECT": S_CONNECT,
    "S_TUNNEL": S_TUNNEL,
    "S_FORWARD": S_FORWARD,
    "S_LINGER": S_LINGER,
    "S_CLOSED": S_CLOSED,
    "S_TLS_ACCEPT": S_TLS_ACCEPT,
    "S_TLS_CONNECT": S_TLS_CONNECT,
    "S_WAIT": S_WAIT,
    "S_BODY": S_BODY,
    "S_BODY_READ": S_BODY_READ,
    "S_DEPARTING": S_DEPARTING,
    "S_HELLO": S_HELLO,
}
BODY_FRAMINGS = {
    "BODY_NONE": BODY_NONE,
    "BODY_LENGTH": BODY_LENGTH,
    "BODY_CHUNKED": BODY_CHUNKED,
    "BODY_CLOSE": BODY_CLOSE,
}
SPLICE_MODES = {"auto": SPLICE_AUTO, "always": SPLICE_ALWAYS, "never": SPLICE_NEVER}


cdef object seam_method(object obj, str name, list missing):
    """obj's method `name`, bound once; None, and its name added to
    `missing`, when obj has no such callable."""
    cdef object m = getattr(obj, name, None)
    if m is None or not callable(m):
        missing.append(name)
        return None
    return m


cdef void seam_complete(str role, object obj, list missing) except *:
    """Refuse `obj` (a TypeError naming what it lacks) if `missing` names any method."""
    if missing:
        raise TypeError(f"the {role} {type(obj).__name__} has no method " + ", ".join(missing))


#: the loop's counters by name, in their order in memory (ext/c/elbasy_counters.h)
LOOP_COUNTERS = tuple(name_list(elb_loop_counter_names))
#: those of them that describe a live process (zeroed when a Loop starts)
LOOP_GAUGES = tuple(name_list(elb_loop_gauge_names))
#: the bytes a Loop's ``counters=`` memory must hold
LOOP_COUNTERS_SIZE = sizeof(elb_loop_counters)


cdef list name_list(const char *const *names):
    cdef list out = []
    cdef Py_ssize_t i = 0
    while names[i] != NULL:
        out.append(names[i].decode("ascii"))
        i += 1
    return out


cdef void clients_in(Loop loop, object instance_counts) except *:
    """Where the connection limits count (Loop.clients, Loop.peers_*): in this
    worker's slot of the instance's metrics memory, ``instance_counts`` being
    (the mapping, its slots, their size, the loop counters' and the client
    counts' place in a slot, this worker's slot: MetricsMemory.connections_of),
    zeroed for a predecessor's; or, with None, in this loop's own array."""
    cdef unsigned char[::1] view
    cdef Py_ssize_t slot
    if instance_counts is None:
        loop.own_clients = <unsigned int *>calloc(CLIENT_COUNT_BUCKETS, sizeof(unsigned int))
        if loop.own_clients == NULL:
            raise MemoryError()
        loop.clients = loop.own_clients
        return
    memory, loop.peers_slots, loop.peers_stride, loop.peers_loop_at, loop.peers_clients_at, slot = (
        instance_counts)
    view = memory
    if (not 0 <= slot < loop.peers_slots or view.shape[0] < loop.peers_slots * loop.peers_stride
            or loop.peers_clients_at + CLIENT_COUNT_BUCKETS * 4 > loop.peers_stride
            or (<uintptr_t>&view[0] + loop.peers_clients_at) % 8):
        raise ValueError("instance_counts do not describe the metrics memory")
    loop.peers_memory = memory
    loop.peers = &view[0]
    loop.clients = <unsigned int *>(loop.peers + slot * loop.peers_stride + loop.peers_clients_at)
    memset(loop.clients, 0, CLIENT_COUNT_BUCKETS * sizeof(unsigned int))


cdef elb_loop_counters *counters_in(object memory) except NULL:
    """The struct at the start of ``memory``: a writable, C-contiguous buffer
    of at least LOOP_COUNTERS_SIZE bytes, aligned for uint64 (an mmap slice)."""
    cdef unsigned char[::1] view = memory
    if view.shape[0] < <Py_ssize_t>sizeof(elb_loop_counters):
        raise ValueError(f"counters memory holds {view.shape[0]} bytes, "
                         f"the loop's counters need {sizeof(elb_loop_counters)}")
    if <uintptr_t>&view[0] % 8:
        raise ValueError("counters memory is not 8-byte aligned")
    return <elb_loop_counters *>&view[0]


@cython.final
cdef class Loop:
    """The epoll loop of one worker. See the module docstring."""

    def __cinit__(self):
        self.epfd = -1
        self.listen_fd = -1
        self.spare_fd = -1
        self.resolver_fd = -1
        self.wakeup_fd = -1
        self.quota_fd = -1
        self.events = NULL
        self.iobuf = NULL
        self.retired = NULL
        self.c = &self.own_counters

    def __init__(self, policy, resolver, int listen_fd, int wakeup_fd=-1, *,
                 double head_timeout=10.0, double connect_timeout=10.0,
                 double idle_timeout=300.0, double keepalive_timeout=60.0,
                 double response_timeout=60.0, double exchange_timeout=300.0,
                 Py_ssize_t max_head_bytes=65536, Py_ssize_t max_connections=0,
                 Py_ssize_t max_client_connections=0,
                 int splice=SPLICE_AUTO,  # no-cython-lint (the keyword is public; splice(2) is not)
                 server_tls=None, client_tls=None, bint listen_exclusive=False,
                 int quota_fd=-1, pages=LOOP_PAGES, counters=None, client_allowed=None,
                 sites=(), instance_counts=None):
        # the seam (elbasy.seam), bound before any fd is taken: an object
        # missing a method is refused here, not at the request that needs it
        cdef list missing = []
        self.p_on_request = seam_method(policy, "on_request", missing)
        self.p_on_body = seam_method(policy, "on_body", missing)
        self.p_departing = seam_method(policy, "departing", missing)
        self.p_on_response = seam_method(policy, "on_response", missing)
        self.p_on_response_body = seam_method(policy, "on_response_body", missing)
        self.p_ended = seam_method(policy, "ended", missing)
        self.p_quota_moved = seam_method(policy, "quota_moved", missing)
        seam_complete("policy", policy, missing)
        # asked only by a --transparent listener's clients (add_listener)
        self.p_on_hello = getattr(policy, "on_hello", None)
        resolver_fileno = seam_method(resolver, "fileno", missing)
        self.r_lookup = seam_method(resolver, "lookup", missing)
        self.r_completed = seam_method(resolver, "completed", missing)
        seam_complete("resolver", resolver, missing)
        if server_tls is not None:
            self.s_new_ssl = seam_method(server_tls, "new_ssl", missing)
            self.s_failure = seam_method(server_tls, "failure", missing)
            self.s_new_ssl_over = getattr(server_tls, "new_ssl_over", None)
            seam_complete("server TLS", server_tls, missing)
        if client_tls is not None:
            self.u_new_ssl = seam_method(client_tls, "new_ssl", missing)
            self.u_failure = seam_method(client_tls, "failure", missing)
            seam_complete("client TLS", client_tls, missing)
        # a page that is not bytes is refused here (a TypeError), not sent
        self.page_head_too_large = pages.head_too_large
        self.page_bad_body = pages.bad_body
        self.page_internal_error = pages.internal_error
        self.page_bad_gateway = pages.bad_gateway
        self.page_drained = pages.drained
        self.page_busy = pages.busy
        if counters is not None:
            self.c = counters_in(counters)
            self.counters_memory = counters
            elb_loop_gauges_zero(self.c)  # a dead predecessor's connections are gone
        self.fdmap = []
        self.pool = {}
        self.held = {}
        self.posted = []
        self.head_ns = seconds_ns(head_timeout)
        self.connect_ns = seconds_ns(connect_timeout)
        self.idle_ns = seconds_ns(idle_timeout)
        self.keepalive_ns = seconds_ns(keepalive_timeout)
        self.response_ns = seconds_ns(response_timeout)
        self.exchange_ns = seconds_ns(exchange_timeout)
        self.max_conns = max_connections
        self.max_client_conns = max_client_connections
        clients_in(self, instance_counts)
        if client_allowed is not None and not callable(client_allowed):
            raise TypeError(f"client_allowed must be callable, not {client_allowed!r}")
        self.p_client_allowed = client_allowed
        self.client_verdicts = {}
        self.max_head = max_head_bytes
        self.splice_mode = <SpliceMode>splice
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
        # a listener shared by several workers' loops: EPOLLEXCLUSIVE wakes
        # one of them per new connection, not all (docs: README, Processes)
        self.listen_exclusive = listen_exclusive
        add_fd(self, listen_fd, EPOLLIN | (EPOLLEXCLUSIVE if listen_exclusive else 0))
        self.listening = True
        # --reverse and --transparent listeners: (fd, site) pairs, shared like the main one
        self.listeners = []
        for lfd, site in sites:
            add_listener(self, lfd, site)
        self.resolver_fd = resolver_fileno()
        add_fd(self, self.resolver_fd, EPOLLIN)
        self.wakeup_fd = wakeup_fd
        if wakeup_fd >= 0:
            add_fd(self, wakeup_fd, EPOLLIN)
        self.quota_fd = quota_fd
        if quota_fd >= 0:
            add_fd(self, quota_fd, EPOLLIN)
        self.now = elb_now_ns()
        self.started_ns = self.now

    def __dealloc__(self):
        cdef int i
        if self.epfd >= 0:
            close(self.epfd)
        if self.spare_fd >= 0:
            close(self.spare_fd)
        for i in range(self.pipes.idle):
            close(self.pipes.ends[i][0])
            close(self.pipes.ends[i][1])
            self.c.pipes_closed += 1
        close_retired(self)
        free(self.events)
        free(self.iobuf)
        free(self.own_clients)
        elb_timers_free(&self.timers)
        free(self.retired)

    def stop(self):
        """Leave run() at the next wake-up (safe from a signal handler)."""
        self.stopping = True

    def drain(self, double deadline_seconds):
        """Finish what is in flight, then leave run() (safe from a signal handler).

        Stop accepting, close idle keep-alive clients at once, answer with
        ``Connection: close`` from now on, let held requests depart as the
        quota allows; ``deadline_seconds`` from now, answer every request
        still held or still waiting for its upstream's head 503 with
        Retry-After and close tunnels. run() returns when no connection is
        left. A second call does not move the deadline. See drain.pxi.
        """
        if self.draining:
            return
        self.drain_deadline = elb_now_ns() + seconds_ns(deadline_seconds)
        self.draining = True

    def run(self):
        """Serve until stop(), or until a drain() has ended every connection;
        then close every connection (and pooled upstream) this loop owns."""
        cdef int n, i, fd, timeout
        cdef uint32_t ev
        cdef object obj
        while not self.stopping:
            timeout = next_timeout_ms(self)
            if self.draining:
                if not self.drain_begun:
                    drain_begin(self)
                if not self.drain_expired and elb_now_ns() >= self.drain_deadline:
                    drain_expire(self)
                if self.c.open == 0:
                    break
                if not self.drain_expired:
                    timeout = min(timeout, drain_timeout_ms(self))
            if self.posted:
                timeout = 0  # TLS input waits in OpenSSL: look at the sockets, then read it
            with nogil:
                n = epoll_wait(self.epfd, self.events, MAX_EVENTS, timeout)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()  # a signal: its handler may have stopped us
                    continue
                raise OSError(errno, os.strerror(errno))  # EBADF, EINVAL: a bug, not load
            self.now = elb_now_ns()
            for i in range(n):
                fd = self.events[i].data.fd
                ev = self.events[i].events
                if fd == self.listen_fd:
                    accept_batch(self, fd, None)
                elif fd == self.resolver_fd:
                    resolved_batch(self)
                elif fd == self.wakeup_fd:
                    drain_wakeup(self)
                    PyErr_CheckSignals()
                elif fd == self.quota_fd:
                    quota_moved(self)
                elif fd < len(self.fdmap):
                    obj = self.fdmap[fd]
                    if obj is None:
                        continue
                    if type(obj) is Conn:
                        guarded_event(self, <Conn>obj, fd, ev)
                    elif type(obj) is Listener:
                        accept_batch(self, fd, (<Listener>obj).site)
                    else:
                        pool_drop(self, <Pooled>obj)
            obj = None  # a connection closed in this batch is freed now, not next turn
            run_timers(self)
            if self.now >= self.next_sweep:
                sweep_pool(self)
                self.next_sweep = self.now + 1000000000
            if self.posted:
                run_posted(self)
            close_retired(self)
        shutdown_all(self)
        close_retired(self)

    def wake(self, ticket, double when):
        """Move a held request's departure to ``when`` (a hold-until: monotonic seconds).

        The policy calls it when a line moves (a refund, a client ahead that
        left, the one ahead that departed). A ticket no longer held (sent,
        closed) is ignored. It only re-arms a timer: the request leaves from
        the timer, never from inside the policy call that woke it.
        """
        cdef object obj = self.held.get(ticket)
        cdef Conn c
        cdef int64_t t
        if obj is None:
            return
        c = <Conn>obj
        if c.state != S_WAIT:
            return
        t = hold_ns(self, when)
        arm(self, c, t if t else self.now + 1)  # NOW: at the next turn (a held one is confirmed)

    def stats(self):
        """Counters for /healthz; cheap enough to call per status request."""
        return loop_stats(self)
