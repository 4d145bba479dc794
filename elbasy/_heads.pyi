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
    version: str  # "1.0" or "1.1"
    keep_alive: bool
    @property
    def lines(self) -> RequestHead: ...

class ResponseHead(Head):
    status: int
    version: str
    keep_alive: bool
    @property
    def lines(self) -> ResponseHead: ...
    @property
    def status_line(self) -> bytes: ...

def parse_request(head: bytes) -> RequestHead: ...
def parse_response(head: bytes) -> ResponseHead: ...
