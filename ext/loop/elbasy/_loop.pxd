# Every object of the loop and every field it has, in one place.
#
# Cython pairs a module with the .pxd found at its full name's path, so this
# file is ext/loop/elbasy/_loop.pxd: elbasy._loop's own declaration file.
# loop.pyx and every room it includes see all of it, and the calls between
# rooms stay direct C calls in one translation unit.

cimport cython
from libc.stdint cimport int64_t, uint64_t

from counters cimport elb_loop_counters
from io cimport elb_chunked
from system cimport epoll_event, sockaddr_storage
from timers cimport elb_timers
from tls cimport SSL

include "consts.pxi"


# ---- plain C state ----------------------------------------------------------------

cdef struct Buf:
    # a byte buffer: bytes [start, end) of data's cap (buffers.pxi)
    char *data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t cap


cdef struct Dir:
    # one direction of a tunnel (tunnel.pxi, splice.pxi)
    Buf pend               # copy mode: bytes the destination did not take yet
    Py_ssize_t in_pipe     # bytes parked in the kernel pipe
    int pipe_r
    int pipe_w
    bint spliced           # bulk flow: bytes go through the pipe
    bint eof               # source sent FIN
    bint shut              # FIN passed on to the destination
    bint no_splice         # splice(2) refused this flow: it copies to the end


cdef struct TunnelState:
    # S_TUNNEL (tunnel.pxi)
    Dir up                 # client -> upstream
    Dir down               # upstream -> client


cdef struct ExchangeState:
    # one forwarded request and its response: S_BODY .. S_FORWARD (hold.pxi,
    # forward.pxi, response.pxi)
    Buf uin                # from upstream
    Buf uout               # to upstream, not yet taken by its socket
    Buf captured           # the response body so far, up to `capture` bytes
    elb_chunked req_chunks
    elb_chunked resp_chunks
    uint64_t req_remaining
    uint64_t resp_remaining
    Py_ssize_t peek        # request body bytes the policy sees before departure
    Py_ssize_t capture     # response body bytes the policy sees at the end (0: none)
    int req_framing        # BodyFraming of the request
    int resp_framing       # BodyFraming of the response
    int status             # the response's status, for its Ended (FINISHED)
    bint req_done
    bint resp_head_done
    bint resp_done
    bint keep_client       # the client may send another request after this one
    bint reuse_upstream    # the upstream may go back to the pool
    bint reused            # the upstream came from the pool
    bint retried           # sent once more on a fresh connection already
    int64_t ends_by        # the whole exchange's deadline (exchange_ns from its start)


cdef struct TlsState:
    # intercepted sessions and https upstreams (intercept.pxi); the SSL*s are
    # owned and counted from ssl_adopt to ssl_release (objects.pxi)
    # outer: --listen-tls with an intercepted CONNECT inside, the outer session,
    # which cssl reads and writes through
    SSL *cssl              # intercepted (or --listen-tls): our TLS session with the client
    SSL *outer
    SSL *ussl              # our TLS session with an https upstream
    int c_rw               # a TLS read on the client needs it writable
    int u_rw               # a TLS read on the upstream needs it writable
    bint c_more            # the last TLS read on the client gave bytes: OpenSSL may
    bint u_more            # hold more (read-ahead, readahead.pxi); the upstream's
    bint early_tls         # the ClientHello came with the CONNECT head


cdef struct PipePool:
    # idle pipe pairs for the next bulk flow (splice.pxi)
    int ends[PIPE_POOL_MAX][2]
    int idle


# ---- what the loop hands the policy ------------------------------------------------

@cython.final
cdef class Ended:
    # how a request or tunnel ended: the one value of the policy's `ended`
    # (elbasy.seam); immutable from Python. Its kinds: elbasy.verdicts.
    cdef readonly str kind
    cdef readonly int status       # FINISHED: the answer's (200: a tunnel); FAILED: 502, 504
    cdef readonly uint64_t up      # FINISHED: bytes sent to the upstream
    cdef readonly uint64_t down    # FINISHED: bytes sent to the client
    cdef readonly int64_t took_ns  # FINISHED: from the head to the end
    cdef readonly str reason       # FAILED, TLS_FAILED: why, in one line
    cdef readonly object error     # BAD_RESPONSE, INTERNAL_ERROR, TLS_FAILED: what raised
    cdef readonly str client       # HEAD_TOO_LARGE: the peer's "address:port" (no ticket yet)
    cdef readonly bint sent        # DRAINED: the request had already left for the upstream


# ---- the objects fds map to ---------------------------------------------------------

cdef class Slot:
    # anything the loop keeps a deadline for
    cdef int fd
    cdef uint64_t serial
    cdef int64_t deadline       # 0: none
    cdef int64_t next_check     # when this slot's earliest heap entry fires


@cython.final
cdef class Pooled(Slot):
    # an idle upstream connection in the keep-alive pool (upstream_pool.pxi)
    cdef object key
    cdef int mask
    cdef int64_t since          # when it went idle
    cdef SSL *ssl               # its TLS session, for an https upstream


@cython.final
cdef class Listener(Slot):
    # a --reverse or --transparent listener (its socket is Python's, never
    # closed here): every connection it accepts has `site` as its Conn.site
    # (accept_head.pxi)
    cdef object site            # the policy's elbasy.verdicts.Reverse or Transparent


@cython.final
cdef class Conn(Slot):
    # a client connection and, while it has one, its upstream
    cdef ConnState state        # a row of the state table (loop.pyx)
    cdef int ufd                # the upstream's fd, or -1
    cdef int cmask              # the client fd's epoll interest (-1: not registered)
    cdef int umask              # the upstream fd's epoll interest (-1: not registered)
    cdef Goal goal              # what the connection waits for after connecting
    cdef int requests           # request heads read on this connection
    cdef int pipelined          # heads dispatched since cout was last empty (accept_head.pxi)
    cdef int addr_i             # upstream connect: the next address to try
    cdef int last_err           # upstream connect: the last address's errno
    cdef bint client_shut       # our FIN to the client went out (lingering close)
    cdef bint client_paused     # client input waits until this response is through
    cdef int64_t started
    cdef int64_t exchange_started
    cdef uint64_t bytes_up      # this request's or tunnel's bytes, for its Ended
    cdef uint64_t bytes_down
    cdef Buf cin                # from the client: head bytes, then body bytes
    cdef Buf cout               # to the client, not yet taken by its socket
    cdef object peer_text
    cdef object client_key      # its address's key (elb_peer_key): --allow-clients asks by it
    cdef int client_bucket      # its address's count in Loop.clients (-1: not counted)
    cdef object ticket          # the policy's handle for this request or tunnel
    cdef object verdict         # the Tunnel or Forward being carried out
    cdef tuple pool_key         # a Forward's upstream (host, port, tls): its pool's key
    cdef int posted             # POSTED_CLIENT | POSTED_UPSTREAM: in Loop.posted (readahead.pxi)
    cdef object addrs           # upstream connect: the resolver's addresses
    # site: intercepted, the Intercept verdict; --reverse, its Reverse; --transparent,
    # its Transparent until the first bytes say what comes (a TLS client's goes, plain
    # HTTP's stays). reverse: accepted by a --reverse or --transparent listener (site is
    # not an interception's). transparent: a --transparent TLS client before its tunnel
    # or TLS session: no CONNECT, so no "200"; an error closes with a TLS alert.
    cdef object site
    cdef bint reverse
    cdef bint transparent
    cdef TunnelState tunnel
    cdef ExchangeState exchange
    cdef TlsState tls
    cdef sockaddr_storage peer


@cython.final
cdef class Loop:
    # the epoll loop of one worker (loop.pyx)
    cdef int epfd
    cdef int listen_fd
    cdef int spare_fd           # held in reserve for EMFILE (accept_head.pxi)
    cdef int resolver_fd
    cdef int wakeup_fd
    cdef int quota_fd           # readable when another worker gave quota back (or -1)
    cdef bint stopping
    cdef bint listen_exclusive  # the listener is shared: EPOLLEXCLUSIVE (one waiter woken)
    cdef bint listening         # the listener is in this loop's epoll
    cdef list listeners         # the --reverse Listeners (also in fdmap at their fds)
    cdef bint draining          # drain() was asked for (drain.pxi)
    cdef bint drain_begun       # run() has stopped accepting and closed the idle
    cdef bint drain_expired     # the drain's deadline came: the rest were answered 503
    cdef int64_t drain_deadline
    # the policy's methods (elbasy.seam.PolicySeam), bound once by __init__
    cdef object p_on_request
    cdef object p_on_body
    cdef object p_departing
    cdef object p_on_response
    cdef object p_on_response_body
    cdef object p_ended
    cdef object p_quota_moved
    cdef object p_on_hello
    cdef object s_new_ssl_over  # the server TLS's new_ssl_over (interception inside --listen-tls)
    # the resolver's (elbasy.seam.ResolverSeam)
    cdef object r_lookup
    cdef object r_completed
    # what is sent when the policy's ended, asked for an answer, raised (or
    # gave no bytes) (elbasy.pages.LoopPages): no answer is written in the
    # loop's Cython
    cdef bytes page_head_too_large
    cdef bytes page_bad_body
    cdef bytes page_internal_error
    cdef bytes page_bad_gateway
    cdef bytes page_drained
    cdef bytes page_busy            # 503: a connection over the connection limits
    # the TLS factories' (elbasy.seam.ServerTLSSeam, ClientTLSSeam); None
    # without interception
    cdef object s_new_ssl       # an SSL* accepting as the CONNECT's host
    cdef object s_failure
    cdef object u_new_ssl       # a verifying SSL* to an https upstream
    cdef object u_failure
    cdef list fdmap             # fd -> Conn or Pooled
    cdef dict pool              # (host, port, tls) -> [Pooled], oldest first
    cdef dict held              # ticket -> Conn, for every request held in S_WAIT
    cdef list posted            # Conns with TLS input in OpenSSL to read this turn
    cdef uint64_t next_serial
    cdef int64_t now
    cdef int64_t started_ns
    cdef int64_t next_sweep
    cdef epoll_event *events
    cdef char *iobuf
    cdef elb_timers timers
    cdef int *retired           # fds to close once this wake-up's events are handled
    cdef Py_ssize_t nretired
    cdef Py_ssize_t retired_cap
    cdef PipePool pipes
    # deadlines, ns
    cdef int64_t head_ns
    cdef int64_t connect_ns
    cdef int64_t idle_ns
    cdef int64_t keepalive_ns
    cdef int64_t response_ns
    cdef int64_t exchange_ns
    cdef Py_ssize_t max_conns         # 0: only the fd limit
    cdef Py_ssize_t max_client_conns  # per client address; 0: no limit
    # the connection limits' counts: this worker's open connections by a hash of
    # the client's address (clients), in its slot of the instance's metrics
    # memory when it has one; every worker's slot is summed (peers_*: the
    # mapping, its slots, their size, where each holds its loop counters and
    # its client counts). Without one, this loop's alone.
    cdef unsigned int *clients
    cdef unsigned int *own_clients
    cdef unsigned char *peers
    cdef Py_ssize_t peers_slots, peers_stride, peers_loop_at, peers_clients_at
    cdef object peers_memory
    # --allow-clients: the policy's verdict on a client address (a client_key
    # -> bool), asked once per address and kept in client_verdicts (at most
    # CLIENT_VERDICTS_KEPT); None: every client is let in, nothing asked
    cdef object p_client_allowed
    cdef dict client_verdicts
    cdef Py_ssize_t max_head
    cdef SpliceMode splice_mode
    # the counters (ext/c/elbasy_counters.h): in the worker's slot of the
    # instance's shared metrics memory, or in own_counters without one
    cdef elb_loop_counters *c
    cdef elb_loop_counters own_counters
    cdef object counters_memory     # the buffer c points into, kept alive
