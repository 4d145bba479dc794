# The loop's counters, as /healthz shows them (Loop.stats).


cdef dict loop_stats(Loop loop):
    """Counters for /healthz; cheap enough to call per status request."""
    return {
        "uptime_seconds": (elb_now_ns() - loop.started_ns) / 1e9,
        "draining": bool(loop.draining),
        "connections": {
            "open": loop.c.open,
            "accepted": loop.c.accepted,
            "tunnels_open": loop.c.tunnels_open,
            "tunnels_total": loop.c.tunnels_total,
            "requests_total": loop.c.requests,
            "upstream_idle": loop.c.pool_idle,
        },
        "bytes_up": loop.c.bytes_up,
        "bytes_down": loop.c.bytes_down,
        "bytes_spliced": loop.c.spliced,
        "bytes_copied": loop.c.copied,
        "counters": {
            "head_timeouts": loop.c.head_timeouts,
            "idle_timeouts": loop.c.idle_timeouts,
            "keepalive_closed": loop.c.keepalive_closed,
            "accept_emfile": loop.c.accept_emfile,
            "accept_errors": loop.c.accept_errors,
            "connect_failures": loop.c.connect_failures,
            "connect_timeouts": loop.c.connect_timeouts,
            "response_timeouts": loop.c.response_timeouts,
            "exchange_timeouts": loop.c.exchange_timeouts,
            "refused_busy": loop.c.refused_busy,
            "clients_refused": loop.c.clients_refused,
            "bad_hellos": loop.c.bad_hellos,
            "client_aborts": loop.c.client_aborts,
            "drain_refused": loop.c.drain_refused,
            "drain_closed": loop.c.drain_closed,
            "upstream_aborts": loop.c.upstream_aborts,
            "upstream_reused": loop.c.pool_reused,
            "upstream_stale": loop.c.pool_stale,
            "retries": loop.c.retries,
            "policy_errors": loop.c.policy_errors,
            "pipes_created": loop.c.pipes_created,
            "splice_fallbacks": loop.c.splice_fallbacks,
            "internal_errors": loop.c.internal_errors,
            "timers": loop.timers.len,
        },
        "tls": {
            "intercepts_open": loop.c.intercepts_open,
            "intercepts_total": loop.c.intercepts_total,
            "client_handshakes": loop.c.tls_accepted,
            "client_handshake_failures": loop.c.tls_accept_failures,
            "upstream_handshakes": loop.c.tls_upstream,
            "upstream_handshake_failures": loop.c.tls_upstream_failures,
        },
        "live": {
            # objects this process owns right now (the /healthz request's
            # own connection included): each returns to its baseline when
            # the connections that used it have ended
            "conns": live_conns,
            "ssl": live_ssl,
            "pipes": loop.c.pipes_created - loop.c.pipes_closed,
            "pipes_pooled": loop.pipes.idle,
        },
        "held": {
            "total": loop.c.held,
            "waiting": loop.c.waiting,
            "retried_after_refusal": loop.c.throttle_retries,
            # the loop saw the client hang up while its request was held;
            # the policy's abandoned_while_held counts every held request
            # that ended without leaving (a hang-up, a shutdown...)
            "clients_left": loop.c.held_left,
        },
    }
