"""Type stub for the Cython data plane (ext/loop.pyx)."""

from typing import Any

class Loop:
    def __init__(
        self,
        policy: Any,
        resolver: Any,
        listen_fd: int,
        wakeup_fd: int = -1,
        *,
        head_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        keepalive_timeout: float = 60.0,
        response_timeout: float = 60.0,
        max_head_bytes: int = 65536,
        splice: int = 0,
        server_tls: Any = None,
        client_tls: Any = None,
    ) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def wake(self, ticket: object, when: float) -> None: ...
    def stats(self) -> dict[str, Any]: ...
