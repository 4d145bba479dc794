"""Small pure helpers the rules need on the wire: hashing secrets, reading
headers, decoding a response body (chunked, gzip, deflate) within bounds,
and walking JSON paths. (GraphQL queries are keyed and priced by
:mod:`elbasy.rules.graphql_cost`.)

No sockets and no clock: everything here is bytes in, values out.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "JSONPath",
    "decode_body",
    "first_header",
    "hash_secret",
    "json_document",
    "json_values",
    "parse_http_date",
    "parse_json_path",
    "parse_number",
]

Headers = Sequence[tuple[bytes, bytes]]
#: A parsed JSON path: keys, with "*" meaning every element of a list.
JSONPath = tuple[str, ...]

#: At most this many decoded body bytes are kept whole; beyond it only the
#: first and last ``_EDGE`` bytes are kept (the JSON readers look there).
MAX_BODY = 4 * 1024 * 1024
_EDGE = 256 * 1024
#: Give up decompressing after this many output bytes (a decompression bomb).
MAX_INFLATED = 64 * 1024 * 1024


def hash_secret(value: str) -> str:
    """A token's stand-in in keys and logs: sha256, first 8 bytes, hex."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()[:8].hex()


def first_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def parse_number(text: str | bytes | None) -> float | None:
    """A finite number from header text (``"2.0"``, ``" 40 "``), else None."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def parse_http_date(text: str | bytes | None) -> float | None:
    """An HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``) as epoch seconds, else None."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp()


# --------------------------------------------------------------------------- bodies


def _dechunk(raw: bytes) -> bytes:
    """The data of a chunked body; a truncated or malformed tail is dropped."""
    out = bytearray()
    i = 0
    while i < len(raw):
        eol = raw.find(b"\r\n", i)
        if eol == -1:
            break
        size_text = raw[i:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size == 0:
            break
        start = eol + 2
        out += raw[start : start + size]
        if start + size > len(raw):
            break
        i = start + size + 2
    return bytes(out)


class _Edges:
    """Keeps a whole body up to MAX_BODY, else its first and last _EDGE bytes."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if len(self.head) < MAX_BODY:
            take = MAX_BODY - len(self.head)
            self.head += data[:take]
            data = data[take:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * _EDGE:
                del self.tail[: len(self.tail) - _EDGE]

    def result(self) -> tuple[bytes, bytes | None]:
        if not self.tail:
            return bytes(self.head), None
        return bytes(self.head[:_EDGE]), bytes(self.tail[-_EDGE:])


def decode_body(raw: bytes, headers: Headers) -> tuple[bytes, bytes | None]:
    """Undo Transfer-Encoding chunked and Content-Encoding gzip/deflate.

    Returns ``(body, None)`` for a body kept whole, or ``(first, last)``
    edges of one too large to keep. An unknown coding (br, zstd) or a broken
    stream gives what could be decoded so far (possibly ``b""``).
    """
    transfer = (first_header(headers, b"transfer-encoding") or b"").lower()
    if b"chunked" in transfer:
        raw = _dechunk(raw)
    coding = (first_header(headers, b"content-encoding") or b"").strip().lower()
    edges = _Edges()
    if coding in (b"", b"identity"):
        edges.add(raw)
        return edges.result()
    if coding in (b"gzip", b"x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == b"deflate":
        # RFC 9110's deflate is zlib-wrapped; some servers send raw deflate
        inflater = zlib.decompressobj(zlib.MAX_WBITS if raw[:1] == b"\x78" else -zlib.MAX_WBITS)
    else:
        return b"", None
    produced = 0
    data = raw
    try:
        while data and produced < MAX_INFLATED:
            out = inflater.decompress(data, 256 * 1024)
            produced += len(out)
            edges.add(out)
            data = inflater.unconsumed_tail
    except zlib.error:
        pass
    return edges.result()


_TOP_KEYS = ("extensions", "errors")


def json_document(body: bytes, tail: bytes | None = None) -> Any:
    """The JSON value of a body, or None.

    For a body kept only by its edges (too large, or truncated), the top-level
    ``"extensions"`` and ``"errors"`` members are recovered from where they
    start: Shopify puts ``extensions.cost`` at the end of the document.
    """
    if tail is None:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            pass
    out: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    for part in (body, tail or b""):
        text = part.decode("utf-8", "replace")
        for key in _TOP_KEYS:
            if key in out:
                continue
            for m in re.finditer(r'"' + key + r'"\s*:\s*', text):
                try:
                    value, _ = decoder.raw_decode(text, m.end())
                except ValueError:
                    continue
                out[key] = value
                break
    return out or None


def parse_json_path(text: str) -> JSONPath:
    """``"errors[*].extensions.code"`` as ``("errors", "*", "extensions", "code")``.

    Raises ValueError for an empty path or segment.
    """
    parts: list[str] = []
    for segment in text.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\*\])*)", segment)
        if m is None:
            raise ValueError(f"bad JSON path {text!r}: use keys and [*], e.g. errors[*].code")
        parts.append(m.group(1))
        parts.extend("*" * (len(m.group(2)) // 3))
    return tuple(parts)


def json_values(doc: Any, path: JSONPath) -> list[Any]:
    """Every value at ``path`` in ``doc`` (``*`` fans out over a list)."""
    current: list[Any] = [doc]
    for key in path:
        following: list[Any] = []
        for value in current:
            if key == "*":
                if isinstance(value, list):
                    following.extend(value)
            elif isinstance(value, dict) and key in value:
                following.append(value[key])
        current = following
        if not current:
            break
    return current
