# The loop's counters, as /healthz shows them (Loop.stats).


cdef dict loop_stats(Loop loop):
    """Counters for /healthz; cheap enough to call per status request."""
    return {
        "uptime_seconds": (elb_now_ns() - loop.started_ns) / 1e9,
        "draining": bool(loop.draining),
        "connections": {
            "open": loop.c_open,
            "accepted": loop.c_accepted,
            "tunnels_open": loop.c_tunnels_open,
            "tunnels_total": loop.c_tunnels_total,
            "requests_total": loop.c_requests,
            "upstream_idle": sum(len(v) for v in loop.pool.values()),
        },
        "bytes_up": loop.c_bytes_up,
        "bytes_down": loop.c_bytes_down,
        "bytes_spliced": loop.c_spliced,
        "bytes_copied": loop.c_copied,
        "counters": {
            "head_timeouts": loop.c_head_timeouts,
            "idle_timeouts": loop.c_idle_timeouts,
            "keepalive_closed": loop.c_keepalive_closed,
            "accept_emfile": loop.c_accept_emfile,
            "accept_errors": loop.c_accept_errors,
            "connect_failures": loop.c_connect_failures,
            "connect_timeouts": loop.c_connect_timeouts,
            "response_timeouts": loop.c_response_timeouts,
            "client_aborts": loop.c_client_aborts,
            "drain_refused": loop.c_drain_refused,
            "drain_closed": loop.c_drain_closed,
            "upstream_aborts": loop.c_upstream_aborts,
            "upstream_reused": loop.c_pool_reused,
            "upstream_stale": loop.c_pool_stale,
            "retries": loop.c_retries,
            "policy_errors": loop.c_policy_errors,
            "pipes_created": loop.c_pipes_created,
            "splice_fallbacks": loop.c_splice_fallbacks,
            "internal_errors": loop.c_internal_errors,
            "timers": loop.timers.len,
        },
        "tls": {
            "intercepts_open": loop.c_intercepts_open,
            "intercepts_total": loop.c_intercepts_total,
            "client_handshakes": loop.c_tls_accepted,
            "client_handshake_failures": loop.c_tls_accept_failures,
            "upstream_handshakes": loop.c_tls_upstream,
            "upstream_handshake_failures": loop.c_tls_upstream_failures,
        },
        "live": {
            # objects this process owns right now (the /healthz request's
            # own connection included): each returns to its baseline when
            # the connections that used it have ended
            "conns": live_conns,
            "ssl": live_ssl,
            "pipes": loop.c_pipes_created - loop.c_pipes_closed,
            "pipes_pooled": loop.pipes.idle,
        },
        "held": {
            "total": loop.c_held,
            "waiting": loop.c_waiting,
            "retried_after_refusal": loop.c_throttle_retries,
            # the loop saw the client hang up while its request was held;
            # the policy's abandoned_while_held counts every held request
            # that ended without leaving (a hang-up, a shutdown...)
            "clients_left": loop.c_held_left,
        },
    }
