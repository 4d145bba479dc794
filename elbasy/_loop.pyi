"""Type stub for the Cython data plane (ext/loop/: loop.pyx and the rooms it includes)."""

from collections.abc import Callable, Sequence
from typing import Any

from elbasy.pages import LoopPages
from elbasy.seam import ClientTLSSeam, PolicySeam, ResolverSeam, ServerTLSSeam
from elbasy.verdicts import Reverse, TLSListener, Transparent

# the loop's constants as compiled (ext/includes/consts.pxi)
STATES: dict[str, int]
BODY_FRAMINGS: dict[str, int]
SPLICE_MODES: dict[str, int]

class Ended:
    """How a request or tunnel ended (the policy's ``ended``); kinds: elbasy.verdicts."""

    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def up(self) -> int: ...
    @property
    def down(self) -> int: ...
    @property
    def took_ns(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def client(self) -> str: ...
    @property
    def sent(self) -> bool: ...
    def __init__(
        self,
        kind: str,
        status: int = 0,
        up: int = 0,
        down: int = 0,
        took_ns: int = 0,
        reason: str = "",
        error: BaseException | None = None,
        client: str = "",
        sent: bool = False,
    ) -> None: ...

CLIENT_BUCKETS: int
LOOP_COUNTERS: tuple[str, ...]
LOOP_GAUGES: tuple[str, ...]
LOOP_COUNTERS_SIZE: int

class Loop:
    def __init__(
        self,
        policy: PolicySeam,
        resolver: ResolverSeam,
        listen_fd: int,
        wakeup_fd: int = -1,
        *,
        head_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        keepalive_timeout: float = 60.0,
        response_timeout: float = 60.0,
        exchange_timeout: float = 300.0,
        max_connections: int = 0,
        max_client_connections: int = 0,
        max_head_bytes: int = 65536,
        splice: int = 0,
        server_tls: ServerTLSSeam | None = None,
        client_tls: ClientTLSSeam | None = None,
        quota_fd: int = -1,
        listen_exclusive: bool = False,
        pages: LoopPages = ...,
        counters: memoryview | None = None,
        client_allowed: Callable[[bytes], bool] | None = None,
        sites: Sequence[tuple[int, Reverse | Transparent | TLSListener]] = (),
        instance_counts: tuple[memoryview, int, int, int, int, int] | None = None,
    ) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def drain(self, deadline_seconds: float) -> None: ...
    def wake(self, ticket: object, when: float) -> None: ...
    def stats(self) -> dict[str, Any]: ...
