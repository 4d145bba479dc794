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
#: tchar (RFC 9110 §5.6.2)
TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
WS = frozenset(b" \t")


class _More(Exception):
    """The input stops inside a message that is well framed so far."""


class _Bad(Exception):
    """The framing is malformed."""


def _vbyte(byte: int) -> bool:
    """SP, HTAB, VCHAR or obs-text: a field value's bytes, a quoted pair's second."""
    return byte in WS or (byte >= 0x21 and byte != 0x7F)


def _qdtext(byte: int) -> bool:
    return _vbyte(byte) and byte not in b'"\\'


def reference_chunked(data: bytes) -> tuple[str, int, bytes]:
    """("done", message length, what is passed on), ("more", 0, b"") or ("bad", 0, b""),
    by the grammar of RFC 9112 §7.1, one rule per step:

        chunked-body   = *chunk last-chunk trailer-section CRLF
        chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        chunk-size     = 1*HEXDIG                      (below 2**63 here)
        last-chunk     = 1*("0") [ chunk-ext ] CRLF
        chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
        chunk-ext-val  = token / quoted-string
        trailer-section = *( field-line CRLF )
        field-line     = field-name ":" OWS field-value OWS

    What is passed on is the message without its trailer lines."""

    def at(i: int) -> int:
        if i >= len(data):
            raise _More
        return data[i]

    def crlf(i: int) -> int:
        if at(i) != 13 or at(i + 1) != 10:
            raise _Bad
        return i + 2

    def bws(i: int) -> int:
        while at(i) in WS:
            i += 1
        return i

    def token(i: int) -> int:
        if at(i) not in TCHAR:
            raise _Bad
        while at(i) in TCHAR:
            i += 1
        return i

    def quoted_string(i: int) -> int:  # at the opening DQUOTE
        i += 1
        while at(i) != 0x22:
            if data[i] == 0x5C:  # quoted-pair
                if not _vbyte(at(i + 1)):
                    raise _Bad
                i += 2
            elif _qdtext(data[i]):
                i += 1
            else:
                raise _Bad
        return i + 1

    def chunk_ext(i: int) -> int:
        while True:
            j = bws(i)
            if at(j) != 0x3B:  # ";": no more extensions (the BWS was not theirs)
                return i
            i = token(bws(j + 1))
            j = bws(i)
            if at(j) == 0x3D:  # "="
                j = bws(j + 1)
                i = quoted_string(j) if at(j) == 0x22 else token(j)

    pos = 0
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
            pos = crlf(chunk_ext(pos))
            if size == 0:
                break
            if pos + size > len(data):
                raise _More
            pos = crlf(pos + size)
        trailers = pos
        while at(pos) != 13:  # field lines
            pos = token(pos)
            if at(pos) != 0x3A:
                raise _Bad
            pos += 1
            while at(pos) != 13:
                if not _vbyte(data[pos]):
                    raise _Bad
                pos += 1
            pos = crlf(pos)
        end = crlf(pos)
        return "done", end, data[:trailers] + b"\r\n"
    except _More:
        return "more", 0, b""
    except _Bad:
        return "bad", 0, b""


def fed_chunked(pieces: list[bytes]) -> tuple[str, int, bytes]:
    """The decoder as the loop drives it: each read fed as it comes, until done."""
    dec = Chunked()
    taken = 0
    for piece in pieces:
        if dec.done:
            break
        got = dec.feed(piece)
        if got < 0:
            return "bad", 0, b""
        assert got == len(piece) or dec.done
        taken += got
    return ("done", taken, dec.passed) if dec.done else ("more", 0, b"")


BODIES = [
    b"0\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"A;name=value\r\n0123456789\r\n0;last\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n",
    b"1 \t;x\r\nz\r\n0\r\n\r\n",
    b'5 ; a = "q \\" \\\\ x" ;b;c=d\t\r\nhello\r\n0;e="\x80"\r\n\r\n',
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
    # chunk lines the grammar refuses
    b"5 junk\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5;\r\nhello\r\n0\r\n\r\n",
    b"5;=x\r\nhello\r\n0\r\n\r\n",
    b"5;a=\r\nhello\r\n0\r\n\r\n",
    b"5;a b\r\nhello\r\n0\r\n\r\n",
    b'5;a="x\r\nhello\r\n0\r\n\r\n',
    b'5;a="x"y\r\nhello\r\n0\r\n\r\n',
    b"5;a=(x)\r\nhello\r\n0\r\n\r\n",
    b"5\r\r\nhello\r\n0\r\n\r\n",
    # trailers: validated as field lines, then left out
    b"0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: elsewhere\r\n\r\n",
    b"0\r\nX-Obs: \x80\xff\t \r\n\r\nGET /next HTTP/1.1\r\n\r\n",
    b"0\r\nX-Empty:\r\n\r\n",
    b"0\r\n: no name\r\n\r\n",
    b"0\r\nX Y: 1\r\n\r\n",
    b"0\r\nX-No-Colon\r\n\r\n",
    b"0\r\n X: folded\r\n\r\n",
    b"0\r\nX: a\rb\r\n\r\n",
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


def test_the_findings_in_particular() -> None:
    """A size line with junk after it is refused; trailers naming framing headers
    are not passed on (nor any trailer); a valid extension is."""
    assert fed_chunked([b"5 junk\r\nhello\r\n0\r\n\r\n"])[0] == "bad"
    body = b'5;ext="a b"\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: x\r\n\r\n'
    assert fed_chunked([body]) == ("done", len(body), b'5;ext="a b"\r\nhello\r\n0\r\n\r\n')


# ---- generated messages: valid by construction, then sometimes damaged


def _bytes_of(alphabet: bytes, min_size: int = 0) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=6).map(bytes)


_token = _bytes_of(bytes(sorted(TCHAR)), 1)
_bws = _bytes_of(b" \t").filter(lambda b: len(b) < 3)
_quoted = st.lists(
    st.one_of(
        st.sampled_from([b" ", b"\t", b"!", b"#", b"[", b"]", b"~", b"\x80", b"\xff", b"a"]),
        st.sampled_from([b'\\"', b"\\\\", b"\\a", b"\\\t", b"\\\xfe"]),
    ),
    max_size=4,
).map(lambda parts: b'"' + b"".join(parts) + b'"')
_ext = st.builds(
    lambda w1, name, w2, value: w1 + b";" + w2 + name + value,
    _bws,
    _token,
    _bws,
    st.one_of(
        st.just(b""),
        st.builds(lambda a, b, v: a + b"=" + b + v, _bws, _bws, st.one_of(_token, _quoted)),
    ),
)
_exts = st.lists(_ext, max_size=2).map(b"".join)
_value = _bytes_of(b" \tax:;\x21\x7e\x80\xff")
_trailer = st.builds(
    lambda name, value: name + b":" + value + b"\r\n",
    st.one_of(
        _token, st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Connection"])
    ),
    _value,
)


def _chunk(size: int, ext: bytes, fill: int) -> bytes:
    return b"%x" % size + ext + b"\r\n" + bytes([fill]) * size + b"\r\n"


_messages = st.builds(
    lambda chunks, last_ext, trailers, tail: (
        b"".join(_chunk(*c) for c in chunks)
        + b"0"
        + last_ext
        + b"\r\n"
        + b"".join(trailers)
        + b"\r\n"
        + tail
    ),
    st.lists(st.tuples(st.integers(1, 40), _exts, st.integers(0, 255)), max_size=4),
    _exts,
    st.lists(_trailer, max_size=3),
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
        byte = draw(
            st.sampled_from([0, 9, 10, 13, 32, 34, 48, 58, 59, 61, 65, 92, 102, 103, 127, 255])
        )
        if how == "set":
            data[at] = byte
        elif how == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(_messages)
def test_valid_messages_pass_without_their_trailers(body: bytes) -> None:
    """Everything the grammar allows is framed as it says, and its trailer lines left out."""
    want = reference_chunked(body)
    assert want[0] == "done"
    assert b"\r\n0" in b"\r\n" + want[2] and want[2].endswith(b"\r\n\r\n")
    assert fed_chunked([body]) == want


@settings(max_examples=300, deadline=None)
@given(_damaged(), st.data())
def test_chunked_against_the_reference(body: bytes, data: st.DataObject) -> None:
    want = reference_chunked(body)
    assert fed_chunked([body]) == want
    assert fed_chunked([body[i : i + 1] for i in range(len(body))]) == want
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert fed_chunked([p for p in pieces if p]) == want
