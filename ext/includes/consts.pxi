# The loop's constants, as C enums (no DEF: deprecated in Cython 3). Included
# by ext/loop/elbasy._loop.pxd, so every room of the loop sees them.

# ---- sizes --------------------------------------------------------------------

cdef enum:
    MAX_EVENTS = 256          # epoll events taken per wake-up
    ACCEPT_BATCH = 64         # connections accepted per listener wake-up
    IO_CHUNK = 65536          # one recv; a full read marks a bulk flow
    CLIENT_COUNT_BUCKETS = 16384  # client addresses' connection counts, by a hash of the address
    SPLICE_CHUNK = 1048576    # bytes asked of one splice(2)
    # Bulk flows move up to 1 MiB per splice pair: fewer wake-ups and syscalls
    # per GB (measured: 0.50 s of CPU per GB against 0.59 with 256 KiB). An
    # unprivileged user past fs.pipe-user-pages-soft gets smaller pipes; the
    # F_SETPIPE_SZ failure is ignored and splice works with what it has.
    PIPE_SIZE = 1048576
    PIPE_POOL_MAX = 64        # idle pipe pairs a loop keeps for the next bulk flow
    POOL_PER_HOST = 256       # idle upstream connections kept per (host, port, tls)
    PUMP_ROUNDS = 8           # bounds the work one wake-up does for one flow
    OUT_HIGH = 262144         # bytes owed to a client beyond which its input waits
    PIPELINE_MAX = 32         # answers owed to a client beyond which its input waits
    CLIENT_VERDICTS_KEPT = 4096  # --allow-clients verdicts a loop keeps, by address
    LINGER_NS = 2000000000    # how long a lingering close waits for the client's FIN
    DRAIN_TUNNEL_IDLE_NS = 1000000000  # draining: a tunnel idle this long is closed
    DRAIN_RESOLVE_NS = 500000000  # draining: a DNS lookup is waited for this long, then 503

# ---- connection states ------------------------------------------------------------
# One value per row of the state table at the top of ext/loop/loop.pyx, which
# says who sets each, its deadline, its epoll interest, and what its events
# and its expiry do. tests/test_loop_states.py checks that table, this enum
# and both dispatches (conn_event, conn_expired) name the same states.

cdef enum ConnState:
    S_HEAD = 1          # reading a request head (or idle between requests)
    S_RESOLVE = 2       # the resolver looks up the upstream host
    S_CONNECT = 3       # a non-blocking connect to one address of it
    S_TUNNEL = 4        # relaying CONNECT tunnel bytes both ways
    S_FORWARD = 5       # one request/response exchange with the upstream
    S_LINGER = 6        # answered: delivering the last bytes, then closing
    S_CLOSED = 7        # finished; no fd, no deadline
    S_TLS_ACCEPT = 8    # intercepted: TLS handshake with the client
    S_TLS_CONNECT = 9   # TLS handshake with an https upstream
    S_WAIT = 10         # a request held until its departure time
    S_BODY = 11         # reading a request body the policy asked to see first
    S_BODY_READ = 12    # that body is with the policy (on_body), nothing read meanwhile
    S_DEPARTING = 13    # a held request the policy confirmed, on its way to an upstream
    S_HELLO = 14        # --transparent: reading the client's first bytes (a ClientHello?)

# ---- values shared with Python ------------------------------------------------------
# Checked equal to their Python twins by tests/test_loop_states.py through the
# module's BODY_FRAMINGS and SPLICE_MODES.

# body framings: elbasy.verdicts.BODY_*
cdef enum BodyFraming:
    BODY_NONE = 0
    BODY_LENGTH = 1
    BODY_CHUNKED = 2
    BODY_CLOSE = 3

# how tunnels move bytes: an index into elbasy.config.SPLICE_MODES
cdef enum SpliceMode:
    SPLICE_AUTO = 0
    SPLICE_ALWAYS = 1
    SPLICE_NEVER = 2

# what a connection waits for after resolving and connecting
cdef enum Goal:
    GOAL_NONE = 0
    GOAL_TUNNEL = 1
    GOAL_FORWARD = 2

# ---- step results (the return convention at the top of ext/loop/loop.pyx) ---------

cdef enum StepResult:
    STEP_WAIT = 0
    STEP_DONE = 1
    STEP_ENDED = -1
    STEP_RAISED = -99

# what pump() and drain_pipe() report (they close nothing themselves)
cdef enum PumpResult:
    PUMP_OK = 0            # progress, or a clean wait
    PUMP_SRC_FAILED = -1   # reading the source failed (reset, error)
    PUMP_DST_FAILED = -2   # writing the destination failed
