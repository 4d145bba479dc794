"""Hop-by-hop headers: what a proxy must not pass on (RFC 9110 §7.6.1).

Stripping happens before any policy sees a message, so a rule can never be
fooled by, or accidentally forward, a header meant for elbasy itself.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Transfer-Encoding is hop-by-hop too, but elbasy relays chunked bodies byte
# for byte, so the coding on both hops is the same and the header stays.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",  # not standard; curl and old browsers send it
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-cased option names listed in every Connection header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def strip_hop_by_hop(headers: Headers, named: Iterable[bytes] | None = None) -> Headers:
    """The headers minus hop-by-hop ones and any named in Connection.

    `named` is the set of Connection options when the caller already has it.
    """
    drop = HOP_BY_HOP.union(connection_tokens(headers) if named is None else named)
    return [(name, value) for name, value in headers if name.lower() not in drop]


# Connection options that are not header names.
_PLAIN_OPTIONS = frozenset({b"close", b"keep-alive"})


# Never dropped because Connection names them: elbasy frames the body by
# them, so the next hop must see the same framing (or one request could
# carry another inside its body), and Host is set by elbasy itself.
_NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})


def named_in_connection(connection: frozenset[bytes]) -> frozenset[bytes]:
    """The Connection options that name headers to drop (not close or keep-alive)."""
    return connection - _PLAIN_OPTIONS - _NEVER_NAMED


def drop_header_lines(head: bytes, names: Iterable[bytes]) -> bytes:
    """`head` (validated: CRLF lines, no space before colons) without the
    header lines whose lower-cased names are in `names`.

    Plain bytes searches on a lower-cased copy: no list of header pairs is
    built on the per-request path.
    """
    low = head.lower()
    spans: list[tuple[int, int]] = []
    for name in names:
        key = b"\r\n" + name + b":"
        at = low.find(key)
        while at >= 0:
            end = low.find(b"\r\n", at + 2)
            spans.append((at, end))
            at = low.find(key, end)
    if not spans:
        return head
    spans.sort()
    parts = []
    at = 0
    for start, end in spans:
        parts.append(head[at:start])
        at = end
    parts.append(head[at:])
    return b"".join(parts)


def first(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def serialize(start_line: bytes, headers: Headers) -> bytes:
    """A head ready for the wire: start line, headers, blank line."""
    parts = [start_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"")
    parts.append(b"")
    return b"\r\n".join(parts)
