"""Type stub for ext/heads.pyx."""

NAMES: tuple[tuple[bytes, int], ...]
HOP_BY_HOP: frozenset[bytes]

class Head:
    raw: bytes
    options: frozenset[bytes]
    lengths: tuple[bytes, ...]
    codings: tuple[bytes, ...]
    via: tuple[bytes, ...]
    host: bytes | None
    expect_continue: bool
    hop: bool
    line_end: int
    count: int  # header lines
    def without(
        self,
        names: tuple[bytes, ...] | frozenset[bytes] = (),
        drop_host: bool = False,
        start: bytes | None = None,
    ) -> bytes: ...
    def headers(self) -> list[tuple[bytes, bytes]]: ...

def scan(head: bytes) -> Head: ...

MAX_HEADER_LINES: int
MAX_CONNECTION_OPTIONS: int

class RequestHead(Head):
    method: str
    target: str
    target_bytes: bytes  # the same, as it came
    version: str  # "1.0" or "1.1"
    keep_alive: bool
    @property
    def lines(self) -> RequestHead: ...
    def framing(self) -> tuple[int, int]: ...
    def outgoing(
        self,
        path: bytes,
        authority: bytes,
        via: bytes,
        extra: bytes,
        drop: tuple[bytes, ...] | frozenset[bytes],
        peek: int,
    ) -> tuple[bytes, int, int, int, bool]: ...

class ResponseHead(Head):
    status: int
    version: str
    keep_alive: bool
    @property
    def lines(self) -> ResponseHead: ...
    @property
    def status_line(self) -> bytes: ...
    def framing(self, request_method: str) -> tuple[int, int]: ...
    def relayed(
        self, request_method: str, client_keeps: bool
    ) -> tuple[bytes, int, int, bool, bool]: ...

def parse_request(head: bytes) -> RequestHead: ...
def parse_response(head: bytes) -> ResponseHead: ...

OPTION_SETS_KEPT: int

def named_in_connection(connection: frozenset[bytes]) -> frozenset[bytes]: ...
