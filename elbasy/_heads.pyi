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
