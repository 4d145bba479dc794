# cython: language_level=3
"""Header lines of a head that llhttp has already validated, read in C.

llhttp (through httptools) decides whether a head is HTTP at all: request or
status line, header syntax, CRLF line ends, no folded lines, no whitespace
before a colon, no Content-Length beside Transfer-Encoding. What elbasy then
needs per message is small and fixed: the values that decide framing and
persistence, and the head without its hop-by-hop lines. Python spent more on
that than on everything else per request, so it is done here in one pass.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy


# what a header line is to elbasy
DEF KEEP = 0
DEF HOP = 1            # hop-by-hop: never forwarded
DEF CONNECTION = 2     # hop-by-hop, and its options matter
DEF LENGTH = 3         # Content-Length
DEF CODING = 4         # Transfer-Encoding
DEF HOST = 5


cdef inline char lower(char c) noexcept nogil:
    if c >= 65 and c <= 90:
        return c + 32
    return c


cdef inline bint same(const char *p, const char *lit, Py_ssize_t n) noexcept nogil:
    """p[:n], case-insensitively, equals the lower-case literal lit."""
    cdef Py_ssize_t i
    for i in range(n):
        if lower(p[i]) != lit[i]:
            return False
    return True


cdef int kind_of(const char *p, Py_ssize_t n) noexcept nogil:
    cdef char first = lower(p[0]) if n else 0
    if n == 2:
        return HOP if same(p, b"te", 2) else KEEP
    if n == 4:
        return HOST if same(p, b"host", 4) else KEEP
    if n == 7:
        if first == 116 and same(p, b"trailer", 7):
            return HOP
        if first == 117 and same(p, b"upgrade", 7):
            return HOP
        return KEEP
    if n == 10:
        if first == 99 and same(p, b"connection", 10):
            return CONNECTION
        if first == 107 and same(p, b"keep-alive", 10):
            return HOP
        return KEEP
    if n == 14:
        return LENGTH if same(p, b"content-length", 14) else KEEP
    if n == 16:
        return HOP if same(p, b"proxy-connection", 16) else KEEP
    if n == 17:
        return CODING if same(p, b"transfer-encoding", 17) else KEEP
    if n == 18:
        return HOP if same(p, b"proxy-authenticate", 18) else KEEP
    if n == 19:
        return HOP if same(p, b"proxy-authorization", 19) else KEEP
    return KEEP


def scan(bytes head, bint drop_host):
    """Read a validated head's header lines.

    Returns (stripped, connection, lengths, codings, hop) where stripped is
    the head without hop-by-hop lines (and Host lines when drop_host; the
    same object when nothing goes), connection, lengths and codings are
    tuples of the raw values of the Connection, Content-Length and
    Transfer-Encoding lines, and hop says whether any hop-by-hop line was
    there.
    """
    cdef const char *s = PyBytes_AS_STRING(head)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(head)
    cdef const char *hit
    cdef Py_ssize_t pos, colon, vstart, vend, eol, kept_from = 0, out_len = 0
    cdef int kind
    cdef bint hop = False
    cdef char *out = NULL
    cdef bytes stripped = None
    cdef list connection = None, lengths = None, codings = None
    cdef list drops = None      # (start, end) ranges of the lines to drop
    hit = <const char *>memchr(s, 10, size)
    if hit == NULL:
        return head, (), (), (), False
    pos = hit - s + 1
    while pos + 1 < size and not (s[pos] == 13 and s[pos + 1] == 10):
        hit = <const char *>memchr(s + pos, 58, size - pos)   # ':'
        if hit == NULL:
            break
        colon = hit - s
        hit = <const char *>memchr(s + colon, 13, size - colon)  # '\r'
        if hit == NULL:
            break
        eol = hit - s
        kind = kind_of(s + pos, colon - pos)
        if kind != KEEP:
            vstart = colon + 1
            while vstart < eol and (s[vstart] == 32 or s[vstart] == 9):
                vstart += 1
            vend = eol
            while vend > vstart and (s[vend - 1] == 32 or s[vend - 1] == 9):
                vend -= 1
            value = PyBytes_FromStringAndSize(s + vstart, vend - vstart)
            if kind == LENGTH:
                if lengths is None:
                    lengths = []
                lengths.append(value)
            elif kind == CODING:
                if codings is None:
                    codings = []
                codings.append(value)
            elif kind == HOST:
                if drop_host:
                    if drops is None:
                        drops = []
                    drops.append((pos - 2, eol))
            else:
                hop = True
                if kind == CONNECTION:
                    if connection is None:
                        connection = []
                    connection.append(value)
                if drops is None:
                    drops = []
                drops.append((pos - 2, eol))
        pos = eol + 2
    if drops is None:
        stripped = head
    else:
        # every dropped range is "\r\nName: value", from the CRLF before the
        # line to just before the CRLF after it
        stripped = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(stripped)
        for start, end in drops:
            memcpy(out + out_len, s + kept_from, <Py_ssize_t>start - kept_from)
            out_len += <Py_ssize_t>start - kept_from
            kept_from = end
        memcpy(out + out_len, s + kept_from, size - kept_from)
        out_len += size - kept_from
        stripped = stripped[:out_len]
    return (
        stripped,
        tuple(connection) if connection is not None else (),
        tuple(lengths) if lengths is not None else (),
        tuple(codings) if codings is not None else (),
        hop,
    )
