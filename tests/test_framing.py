"""The data plane's C framing scanners, fed whole, split at every byte and byte by byte.

elbasy._framing hands the tests the same C the loop inlines (ext/c/elbasy_io.h):
the head-end scanner, which the loop calls again from where it stopped each
time more of a head arrives, and the chunked-body decoder, which keeps its
state between reads. However the bytes arrive, the answer must be the one
they give whole, and the one a small reference decoder written here gives.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from elbasy._framing import Chunked, head_end

# ---- the head end ------------------------------------------------------------------


def reference_head_end(buf: bytes) -> int:
    """Just past the first empty line: LF LF or LF CR LF (bare LFs are llhttp's to refuse)."""
    for i, byte in enumerate(buf):
        if byte != 10:
            continue
        if buf[i + 1 : i + 2] == b"\n":
            return i + 2
        if buf[i + 1 : i + 3] == b"\r\n":
            return i + 3
    return -1


def fed_head_end(pieces: list[bytes]) -> int:
    """head_end as the loop calls it: once per arrival, from what it had scanned."""
    buf = b""
    scanned = 0
    for piece in pieces:
        buf += piece
        end = head_end(buf, scanned)
        if end > 0:
            return end
        scanned = len(buf)
    return -1


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` whole, in two pieces at every byte, and byte by byte."""
    ways = [[data]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    ways.append([data[i : i + 1] for i in range(len(data))])
    return ways


HEADS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\n\n",
    b"GET / HTTP/1.1\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"GET / HTTP/1.1\r\nX: \r\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: \n\r\r\n\r\n",
    b"GET /\r\r\r\n\r",
    b"",
]


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b": ", b"GET / HTTP/1.1"])))
@example([b"a", b"\n", b"\r", b"\n"])
def test_head_end_against_the_reference(parts: list[bytes]) -> None:
    data = b"".join(parts)
    want = reference_head_end(data)
    assert head_end(data) == want
    for pieces in splits(data):
        assert fed_head_end(pieces) == want


# ---- chunked bodies -----------------------------------------------------------------

HEX = frozenset(b"0123456789abcdefABCDEF")


class _More(Exception):
    """The input stops inside a message that is well framed so far."""


class _Bad(Exception):
    """The framing is malformed."""


def _plain(byte: int) -> bool:
    """A byte allowed in a chunk extension or a trailer line: no controls but HTAB."""
    return (byte >= 0x20 or byte == 0x09) and byte != 0x7F


def reference_chunked(data: bytes) -> tuple[str, int]:
    """("done", message length), ("more", 0) or ("bad", 0), by RFC 9112 §7.1 as elbasy
    reads it: 1*HEXDIG sizes below 2**63, an extension (after ";", SP or HTAB) of plain
    bytes up to CRLF, data then CRLF, and after the last chunk trailer lines of plain
    bytes, each ended by CRLF, then CRLF."""
    pos = 0

    def at(i: int) -> int:
        if i >= len(data):
            raise _More
        return data[i]

    def crlf(i: int) -> int:
        if at(i) != 13 or at(i + 1) != 10:
            raise _Bad
        return i + 2

    try:
        while True:
            size, start = 0, pos
            while at(pos) in HEX:
                if size >= 1 << 59:
                    raise _Bad  # the next digit could overflow 64 bits
                size = size * 16 + int(chr(data[pos]), 16)
                pos += 1
            if pos == start:
                raise _Bad
            if data[pos] in b"; \t":
                pos += 1
                while at(pos) != 13:
                    if not _plain(data[pos]):
                        raise _Bad
                    pos += 1
            pos = crlf(pos)
            if size == 0:
                break
            if pos + size > len(data):
                raise _More
            pos = crlf(pos + size)
        while at(pos) != 13:  # trailer lines
            while at(pos) != 13:
                if not _plain(data[pos]):
                    raise _Bad
                pos += 1
            pos = crlf(pos)
        return "done", crlf(pos)
    except _More:
        return "more", 0
    except _Bad:
        return "bad", 0


def fed_chunked(pieces: list[bytes]) -> tuple[str, int]:
    """The decoder as the loop drives it: each read fed as it comes, until done."""
    dec = Chunked()
    taken = 0
    for piece in pieces:
        if dec.done:
            break
        got = dec.feed(piece)
        if got < 0:
            return "bad", 0
        assert got == len(piece) or dec.done
        taken += got
    return ("done", taken) if dec.done else ("more", 0)


BODIES = [
    b"0\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"A;name=value\r\n0123456789\r\n0;last\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n",
    b"1 \t;x\r\nz\r\n0\r\n\r\n",
    b"00000000000000000003\r\nabc\r\n0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"10000000000000000\r\n",
    b"3\r\nabc\r\n0\r\nX: a\nb\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\nX: 1\r\n\r\n",
    b"3\r\nabcd\r\n0\r\n\r\n",
    b"3\nabc\r\n0\r\n\r\n",
    b"-3\r\nabc\r\n0\r\n\r\n",
    b"\r\n",
    b"3;a\x00b\r\nabc\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\nX: \x7f\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\x01X: 1\r\n\r\n",
    b"3\r\nab",
    b"",
]


@pytest.mark.parametrize(
    ("reference", "fed", "data"),
    [(reference_head_end, fed_head_end, head) for head in HEADS]
    + [(reference_chunked, fed_chunked, body) for body in BODIES],
)
def test_scanner_however_it_arrives(
    reference: Callable[[bytes], object], fed: Callable[[list[bytes]], object], data: bytes
) -> None:
    """Whole (the loop's first call scans from 0), at every split, byte by byte."""
    want = reference(data)
    for pieces in splits(data):
        assert fed(pieces) == want, pieces


def _chunk(size: int, ext: bytes, fill: int) -> bytes:
    line = b"%x" % size + (b";" + ext if ext else b"")
    return line + b"\r\n" + bytes([fill]) * size + b"\r\n"


_printable = st.binary(max_size=8).map(lambda b: bytes(0x21 + x % 94 for x in b))
_messages = st.builds(
    lambda chunks, trailers, tail: (
        b"".join(_chunk(*c) for c in chunks)
        + b"0\r\n"
        + b"".join(b"X-" + t + b": 1\r\n" for t in trailers)
        + b"\r\n"
        + tail
    ),
    st.lists(st.tuples(st.integers(1, 40), _printable, st.integers(0, 255)), max_size=4),
    st.lists(_printable.filter(bool), max_size=2),
    st.binary(max_size=6),
)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    """A well-framed message, sometimes cut short or with a few bytes changed."""
    data = bytearray(draw(_messages))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 48, 59, 65, 102, 103, 127, 255]))
        if how == "set":
            data[at] = byte
        elif how == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(_damaged(), st.data())
def test_chunked_against_the_reference(body: bytes, data: st.DataObject) -> None:
    want = reference_chunked(body)
    assert fed_chunked([body]) == want
    assert fed_chunked([body[i : i + 1] for i in range(len(body))]) == want
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert fed_chunked([p for p in pieces if p]) == want
