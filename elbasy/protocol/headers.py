"""Hop-by-hop headers: what a proxy must not pass on (RFC 9110 §7.6.1).

Stripping happens before any policy sees a message, so a rule can never be
fooled by, or accidentally forward, a header meant for elbasy itself. The
names are declared once, in ext/heads.pyx, whose one pass over a head also
marks the lines to strip (`elbasy._heads.Head.without`).
"""

from __future__ import annotations

from elbasy._heads import HOP_BY_HOP, named_in_connection

__all__ = ["HOP_BY_HOP", "Headers", "named_in_connection", "serialize"]

Headers = list[tuple[bytes, bytes]]

def serialize(start_line: bytes, headers: Headers) -> bytes:
    """A head ready for the wire: start line, headers, blank line."""
    parts = [start_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"")
    parts.append(b"")
    return b"\r\n".join(parts)
