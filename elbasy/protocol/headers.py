"""Hop-by-hop headers: what a proxy must not pass on (RFC 9110 §7.6.1).

Stripping happens before any policy sees a message, so a rule can never be
fooled by, or accidentally forward, a header meant for elbasy itself. The
names are declared once, in ext/heads.pyx, whose one pass over a head also
marks the lines to strip (`elbasy._heads.Head.without`).
"""

from __future__ import annotations

from elbasy._heads import HOP_BY_HOP

__all__ = ["HOP_BY_HOP", "Headers", "named_in_connection", "serialize"]

Headers = list[tuple[bytes, bytes]]

# Connection options that are not header names.
_PLAIN_OPTIONS = frozenset({b"close", b"keep-alive"})


# Never dropped because Connection names them: elbasy frames the body by
# them, so the next hop must see the same framing (or one request could
# carry another inside its body), and Host is set by elbasy itself.
_NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})


#: distinct Connection option sets whose named headers are kept (all dropped when full)
OPTION_SETS_KEPT = 256
_named: dict[frozenset[bytes], frozenset[bytes]] = {}


def named_in_connection(connection: frozenset[bytes]) -> frozenset[bytes]:
    """The Connection options that name headers to drop (not close or keep-alive)."""
    if not connection:
        return connection
    known = _named.get(connection)
    if known is None:
        if len(_named) >= OPTION_SETS_KEPT:
            _named.clear()
        known = _named[connection] = connection - _PLAIN_OPTIONS - _NEVER_NAMED
    return known


def serialize(start_line: bytes, headers: Headers) -> bytes:
    """A head ready for the wire: start line, headers, blank line."""
    parts = [start_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"")
    parts.append(b"")
    return b"\r\n".join(parts)
