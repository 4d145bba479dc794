"""``--metrics-listen HOST:PORT``: /metrics on an address of its own, answered by the supervisor.

The proxy's own address answers ``/metrics`` too, from whichever worker a
scrape lands on; this listener is for a scraper that should not share the
proxy's port (a firewall opens one and not the other) or wait behind a
worker busy with traffic. The supervisor reads the same shared memory the
workers write (elbasy.metrics), from a thread of its own, so a scrape costs
no worker anything. Not on the hot path: the standard library's HTTP server.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elbasy import __version__

__all__ = ["MetricsListener"]

Scrape = Callable[[], tuple[bytes, bytes]]


class MetricsListener:
    """Serves ``GET /metrics`` on ``host:port`` from a daemon thread; :meth:`close` stops it.

    The socket is bound on construction: a taken port is an OSError there,
    before any worker starts.
    """

    def __init__(self, host: str, port: int, scrape: Scrape) -> None:
        handler = _handler(scrape)
        server_type = _Server6 if ":" in host else _Server
        self.server = server_type((host, port), handler)
        self.address: tuple[str, int] = self.server.server_address[:2]  # type: ignore[assignment]
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="elbasy-metrics", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def forget(self) -> None:
        """In a forked worker: close the inherited socket, leave the thread (not there) alone."""
        self.server.socket.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # never SO_REUSEPORT: a taken port is an error, not a share of its connections
    allow_reuse_port = False


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(scrape: Scrape) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"elbasy/{__version__}"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, content_type = scrape()
                status = 200
            else:
                body, content_type = b"elbasy metrics: see /metrics\n", b"text/plain"
                status = 404
            self.send_response(status)
            self.send_header("Content-Type", content_type.decode())
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # a scrape every few seconds is not news

    return Handler
