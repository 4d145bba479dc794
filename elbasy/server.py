"""Compose one worker: listener, resolver, policy and the loop, then serve.

This is the only module that sees both planes: it builds the policy objects
(plain Python), hands them to the Cython loop, and owns process-level
concerns (the listening socket, fd limits, signals).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import socket
import time

from elbasy import __version__
from elbasy._loop import Loop
from elbasy.config import SPLICE_MODES, Config
from elbasy.logs import startup_banner
from elbasy.policy import Proxy
from elbasy.resolver import Resolver

log = logging.getLogger("elbasy")

# TCP_DEFER_ACCEPT: the kernel completes accept only once the client has
# sent its first bytes, so the loop can read the head right away.
DEFER_ACCEPT_SECONDS = 1


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
    # accepted client sockets inherit TCP_NODELAY: small TLS records and
    # responses leave at once, without a setsockopt per connection
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM."""
    limit = raise_fd_limit()
    sock = listen(config.listen_host, config.listen_port)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    resolver = Resolver(time.monotonic, config.connect_to)
    loop: Loop | None = None
    proxy = Proxy(lambda: loop.stats() if loop is not None else {})
    loop = Loop(
        proxy,
        resolver,
        sock.fileno(),
        wake_r.fileno(),
        head_timeout=config.head_timeout,
        connect_timeout=config.connect_timeout,
        idle_timeout=config.idle_timeout,
        keepalive_timeout=config.keepalive_timeout,
        response_timeout=config.response_timeout,
        max_head_bytes=config.max_head_bytes,
        splice=SPLICE_MODES.index(config.splice),
    )

    def stop(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        assert loop is not None
        loop.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    host, port = sock.getsockname()[:2]
    startup_banner(__version__, host, port)
    log.info("fd limit %d", limit)
    try:
        loop.run()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        resolver.close()
        sock.close()
        wake_r.close()
        wake_w.close()
        log.info("stopped")
