# cython: language_level=3
"""Header lines of a head that llhttp has already validated, read once in C.

llhttp (through httptools) decides whether a head is HTTP at all: request or
status line, header syntax, CRLF line ends, no folded lines, no whitespace
before a colon, no Content-Length beside Transfer-Encoding. Everything else
elbasy needs of a head comes from one pass here: the values that decide
framing and persistence (Connection, Content-Length, Transfer-Encoding), the
first Host, whether the client asked for 100-continue, the Via values (loop
detection), and where every header line lies. From those places the head
without some of its lines, and the (name, value) pairs the rules read, are
cut without reading the head again.

The hop-by-hop names are declared here once (NAMES); elbasy.protocol.headers
takes HOP_BY_HOP from this module.

`parse_request` and `parse_response` are the whole parse of a head, the
one elbasy.protocol.http1 exports: llhttp's check, then this pass, then the
start line read off the validated bytes and the caps applied, all in one
call. A forwarded request has two heads, and their parse was a third of the
policy's time per request while each step was a Python call of its own.
"""

import httptools

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memchr, memcmp, memcpy


# what a header line is to elbasy
cdef enum Kind:
    KEEP = 0
    HOP = 1            # hop-by-hop: never forwarded
    CONNECTION = 2     # hop-by-hop, and its options matter
    LENGTH = 3         # Content-Length
    CODING = 4         # Transfer-Encoding
    HOST = 5
    EXPECT = 6
    VIA = 7

#: the header names elbasy reads or drops, lower-case, and what each is to it.
#: Transfer-Encoding is hop-by-hop too, but elbasy relays chunked bodies byte
#: for byte, so the coding on both hops is the same and the header stays.
NAMES = (
    (b"connection", CONNECTION),
    (b"proxy-connection", HOP),   # not standard; curl and old browsers send it
    (b"keep-alive", HOP),
    (b"proxy-authorization", HOP),
    (b"proxy-authenticate", HOP),
    (b"te", HOP),
    (b"trailer", HOP),
    (b"upgrade", HOP),
    (b"content-length", LENGTH),
    (b"transfer-encoding", CODING),
    (b"host", HOST),
    (b"expect", EXPECT),
    (b"via", VIA),
)

#: never forwarded (RFC 9110 §7.6.1), besides what Connection names
HOP_BY_HOP = frozenset(name for name, kind in NAMES if kind == HOP or kind == CONNECTION)

# NAMES as C: the kind of a name of length n is looked up among the names of
# that length only (at most 32 bytes: longer names are all KEEP)
cdef enum:
    LONGEST = 32
    PER_LENGTH = 4

cdef const char *_name_of[LONGEST + 1][PER_LENGTH]
cdef int _kind_of[LONGEST + 1][PER_LENGTH]
cdef int _count_of[LONGEST + 1]
cdef list _keep_alive = []    # the bytes objects _name_of points into


cdef void _declare(bytes name, int kind) except *:
    cdef Py_ssize_t n = len(name)
    if n > LONGEST or _count_of[n] == PER_LENGTH:
        raise ValueError(f"header name table full for length {n}")
    _keep_alive.append(name)
    _name_of[n][_count_of[n]] = PyBytes_AS_STRING(name)
    _kind_of[n][_count_of[n]] = kind
    _count_of[n] += 1


for _name, _kind in NAMES:
    _declare(_name, _kind)


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


cdef inline int kind_of(const char *p, Py_ssize_t n) noexcept nogil:
    cdef int i
    if n > LONGEST:
        return KEEP
    for i in range(_count_of[n]):
        if same(p, _name_of[n][i], n):
            return _kind_of[n][i]
    return KEEP


cdef struct Line:
    Py_ssize_t start     # first byte of the name (just past the CRLF before it)
    Py_ssize_t colon
    Py_ssize_t vstart    # the value, without the whitespace around it
    Py_ssize_t vend
    Py_ssize_t eol       # the CR that ends the line
    int kind


cdef inline bytes value_of(const char *s, Line *line):
    return PyBytes_FromStringAndSize(s + line.vstart, line.vend - line.vstart)


cdef class Head:
    """One validated head and what elbasy reads of its header lines.

    ``options`` are the Connection options and ``codings`` the
    Transfer-Encoding codings, each comma-separated item trimmed and
    lower-cased (codings in order); ``lengths`` and ``via`` are the raw
    values of the Content-Length and Via lines;
    ``host`` is the first Host value (or None); ``expect_continue`` says an
    Expect line asks for 100-continue; ``hop`` that a hop-by-hop line is
    there; ``line_end`` is where the start line's CRLF begins; ``count``
    is the number of header lines.
    """

    cdef readonly bytes raw
    cdef readonly frozenset options
    cdef readonly tuple lengths
    cdef readonly tuple codings
    cdef readonly tuple via
    cdef readonly object host
    cdef readonly bint expect_continue
    cdef readonly bint hop
    cdef readonly Py_ssize_t line_end
    cdef Line *lines
    cdef readonly Py_ssize_t count

    def __dealloc__(self):
        PyMem_Free(self.lines)

    def without(self, names=(), bint drop_host=False, start=None):
        """The head without its hop-by-hop lines, its Host lines when
        ``drop_host``, and the lines whose names are in ``names`` (lower-case);
        ``start``, when given, stands in for the start line. The same object
        as ``raw`` when nothing changes.

        One pass over the lines, each name looked up in a set: linear in the
        head whatever ``names`` holds (a head whose Connection names
        thousands of headers once cost lines times names).
        """
        cdef const char *s = PyBytes_AS_STRING(self.raw)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(self.raw)
        cdef Py_ssize_t i, k, n, out_len = 0, kept_from, head_len, cut
        cdef Py_ssize_t shortest = size + 1, longest = 0
        cdef Line *line
        cdef bint drop
        cdef char *out
        cdef char *t
        cdef bytes result, key
        cdef set drop_names = set()
        for name in names:
            n = len(<bytes?>name)
            drop_names.add(name)
            if n < shortest:
                shortest = n
            if n > longest:
                longest = n
        head_len = self.line_end if start is None else len(<bytes?>start)
        kept_from = self.line_end
        # at most the start and every byte after the start line
        result = PyBytes_FromStringAndSize(NULL, head_len + size - self.line_end)
        out = PyBytes_AS_STRING(result)
        if start is None:
            memcpy(out, s, head_len)
        else:
            memcpy(out, PyBytes_AS_STRING(start), head_len)
        out_len = head_len
        cut = 0
        for i in range(self.count):
            line = &self.lines[i]
            drop = line.kind == HOP or line.kind == CONNECTION or (
                drop_host and line.kind == HOST)
            n = line.colon - line.start
            if not drop and shortest <= n <= longest:
                key = PyBytes_FromStringAndSize(NULL, n)
                t = PyBytes_AS_STRING(key)
                for k in range(n):
                    t[k] = lower(s[line.start + k])
                drop = key in drop_names
            if drop:
                # "\r\nName: value": from the CRLF before the line to its CR
                memcpy(out + out_len, s + kept_from, line.start - 2 - kept_from)
                out_len += line.start - 2 - kept_from
                kept_from = line.eol
                cut += 1
        if cut == 0 and start is None:
            return self.raw
        memcpy(out + out_len, s + kept_from, size - kept_from)
        out_len += size - kept_from
        return result[:out_len]

    def headers(self):
        """Every header line as (name, value), in order: the name as sent,
        the value without the whitespace around it."""
        cdef const char *s = PyBytes_AS_STRING(self.raw)
        cdef Py_ssize_t i
        cdef Line *line
        cdef list pairs = []
        for i in range(self.count):
            line = &self.lines[i]
            pairs.append((
                PyBytes_FromStringAndSize(s + line.start, line.colon - line.start),
                value_of(s, line),
            ))
        return pairs


cdef inline bint blank(char c) noexcept nogil:
    """What bytes.strip() strips: ASCII whitespace."""
    return c == 32 or (c >= 9 and c <= 13)


cdef tuple tokens_of(tuple values):
    """The comma-separated items of ``values``, trimmed and lower-cased, empty ones left out."""
    cdef list out = []
    cdef const char *s
    cdef char *t
    cdef Py_ssize_t n, i, a, b, k
    cdef bytes token
    for value in values:
        s = PyBytes_AS_STRING(value)
        n = PyBytes_GET_SIZE(value)
        i = 0
        while i <= n:
            a = i
            while i < n and s[i] != 44:   # ','
                i += 1
            b = i
            i += 1
            while a < b and blank(s[a]):
                a += 1
            while b > a and blank(s[b - 1]):
                b -= 1
            if b > a:
                token = PyBytes_FromStringAndSize(NULL, b - a)
                t = PyBytes_AS_STRING(token)
                for k in range(b - a):
                    t[k] = lower(s[a + k])
                out.append(token)
    return tuple(out)


# The same few Connection and Transfer-Encoding values come again and again
# ("keep-alive", "chunked"): their items are read once per distinct value.
cdef enum:
    VALUES_KEPT = 256

cdef frozenset _NO_OPTIONS = frozenset()
cdef dict _known_options = {}
cdef dict _known_codings = {}


cdef frozenset _options(tuple values):
    cdef object known = _known_options.get(values)
    if known is None:
        if len(_known_options) >= VALUES_KEPT:
            _known_options.clear()
        known = _known_options[values] = frozenset(tokens_of(values))
    return <frozenset>known


cdef tuple _codings(tuple values):
    cdef object known = _known_codings.get(values)
    if known is None:
        if len(_known_codings) >= VALUES_KEPT:
            _known_codings.clear()
        known = _known_codings[values] = tokens_of(values)
    return <tuple>known


def scan(bytes head not None):
    """Read a validated head's header lines, once."""
    cdef Head h = Head.__new__(Head)
    read_lines(h, head)
    return h


cdef int read_lines(Head h, bytes head) except -1:
    """Fill a new ``h`` from ``head``'s header lines (0; -1 with an exception set)."""
    cdef const char *s = PyBytes_AS_STRING(head)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(head)
    cdef const char *hit
    cdef Py_ssize_t pos, colon, vstart, vend, eol, cap = 16
    cdef int kind
    cdef Line *line
    cdef Line *grown
    cdef list connection = None, lengths = None, codings = None, via = None
    h.raw = head
    h.host = None
    h.options = _NO_OPTIONS
    h.lengths = h.codings = h.via = ()
    hit = <const char *>memchr(s, 10, size)
    if hit == NULL:
        h.line_end = size
        return 0
    h.line_end = hit - s - 1 if hit > s and s[hit - s - 1] == 13 else hit - s
    h.lines = <Line *>PyMem_Malloc(cap * sizeof(Line))
    if h.lines == NULL:
        raise MemoryError()
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
        vstart = colon + 1
        while vstart < eol and (s[vstart] == 32 or s[vstart] == 9):
            vstart += 1
        vend = eol
        while vend > vstart and (s[vend - 1] == 32 or s[vend - 1] == 9):
            vend -= 1
        if h.count == cap:
            cap *= 2
            grown = <Line *>PyMem_Realloc(h.lines, cap * sizeof(Line))
            if grown == NULL:
                raise MemoryError()
            h.lines = grown
        kind = kind_of(s + pos, colon - pos)
        h.lines[h.count] = Line(pos, colon, vstart, vend, eol, kind)
        line = &h.lines[h.count]
        h.count += 1
        if kind != KEEP:
            if kind == LENGTH:
                if lengths is None:
                    lengths = []
                lengths.append(value_of(s, line))
            elif kind == CODING:
                if codings is None:
                    codings = []
                codings.append(value_of(s, line))
            elif kind == HOST:
                if h.host is None:
                    h.host = value_of(s, line)
            elif kind == EXPECT:
                if vend - vstart == 12 and same(s + vstart, b"100-continue", 12):
                    h.expect_continue = True
            elif kind == VIA:
                if via is None:
                    via = []
                via.append(value_of(s, line))
            else:
                h.hop = True
                if kind == CONNECTION:
                    if connection is None:
                        connection = []
                    connection.append(value_of(s, line))
        pos = eol + 2
    if connection is not None:
        h.options = _options(tuple(connection))
    if lengths is not None:
        h.lengths = tuple(lengths)
    if codings is not None:
        h.codings = _codings(tuple(codings))
    if via is not None:
        h.via = tuple(via)
    return 0


# ---- whole heads: llhttp's check, the pass above, the start line ----------------

from elbasy.errors import RemoteProtocolError
from elbasy.verdicts import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE

#: Header lines a head may carry (a request beyond: 431; a response: 502).
#: Real clients and APIs send a few dozen; the cap keeps the work a head
#: costs bounded by more than its bytes.
MAX_HEADER_LINES = 256

#: Distinct Connection options a head may carry (beyond: 400 or 502). A
#: real one names one to three ("close", "keep-alive", "upgrade").
MAX_CONNECTION_OPTIONS = 32

cdef object _RequestParser = httptools.HttpRequestParser
cdef object _ResponseParser = httptools.HttpResponseParser
cdef object _Upgrade = httptools.HttpParserUpgrade
cdef object _Malformed = httptools.HttpParserError
cdef bytes _CLOSE = b"close"
cdef bytes _KEEP_ALIVE = b"keep-alive"
cdef tuple _CHUNKED = (b"chunked",)
cdef bytes _EXPECT = b"expect"
cdef tuple _NO_BODY = (BODY_NONE, 0)
cdef tuple _BY_CHUNKS = (BODY_CHUNKED, 0)
cdef tuple _TO_CLOSE = (BODY_CLOSE, 0)

# Connection options that are not header names.
cdef frozenset _PLAIN_OPTIONS = frozenset({b"close", b"keep-alive"})

# Never dropped because Connection names them: elbasy frames the body by
# them, so the next hop must see the same framing (or one request could
# carry another inside its body), and Host is set by elbasy itself.
cdef frozenset _NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})

#: distinct Connection option sets whose named headers are kept (all dropped when full)
OPTION_SETS_KEPT = 256
cdef dict _named = {}


cpdef frozenset named_in_connection(frozenset connection):
    """The Connection options that name headers to drop (not close or keep-alive)."""
    if not connection:
        return connection
    cdef object known = _named.get(connection)
    if known is None:
        if len(_named) >= OPTION_SETS_KEPT:
            _named.clear()
        known = _named[connection] = connection - _PLAIN_OPTIONS - _NEVER_NAMED
    return <frozenset>known


cdef object _content_length(tuple values, int status):
    """The one Content-Length of ``values`` (None: there is none)."""
    if not values:
        return None
    cdef bytes text = values[0]
    if len(values) > 1:
        for value in values:
            if value != text:
                raise RemoteProtocolError("conflicting Content-Length values", status)
    if not text.isdigit():
        raise RemoteProtocolError("bad Content-Length", status)
    return int(text)


cdef str _listed(tuple codings):
    return ", ".join([c.decode("latin-1") for c in codings])


cdef class _Checked:
    """llhttp's callbacks here: the end of the head, and the end of a message
    (a request with no body ends with its head). Leaving out on_url and
    on_header keeps llhttp from calling Python for the rest (the start line
    is read off the validated bytes below)."""

    cdef public bint complete  # the head ended
    cdef public bint finished  # and the message with it

    def on_headers_complete(self):
        self.complete = True

    def on_message_complete(self):
        self.finished = True


# One request parser and its sink, kept from one head to the next. After a
# request with no body on a connection that persists, llhttp is back at the
# start of a message, as a new parser would be; making one costs about what
# feeding it a head does (httptools looks up every callback on the sink). Any
# other ending (a body to come, a close, a CONNECT or Upgrade, a refusal)
# leaves it mid-message or stopped: it is dropped, and the next head gets a
# new one. Should a kept parser refuse a head, a new one is asked again, so a
# kept one can never refuse what a new one would pass, nor pass what it would
# refuse (a parser mid-message finds no head end in the next head). Heads are
# parsed one at a time: one thread, and no callback here parses.
cdef object _kept_parser = None
cdef _Checked _kept_sink = None


cdef class RequestHead(Head):
    """A request head, parsed: its start line besides what `Head` reads.

    ``version`` is "1.0" or "1.1"; ``keep_alive`` says the client's
    connection persists after it (HTTP/1.1 unless it says close; HTTP/1.0
    only when it asks). A CONNECT's is False, and its Connection options
    are not capped: a tunnel needs none of its headers.
    """

    cdef readonly str method
    cdef readonly str target
    cdef readonly bytes target_bytes  # the target as it came (ASCII): no encode to send it
    cdef readonly str version
    cdef readonly bint keep_alive

    @property
    def lines(self):
        """The head's header lines: this object (`Head`'s fields and cuts)."""
        return self

    cpdef tuple framing(self):
        """(body framing, length) of the request (RFC 9112 §6.3)."""
        length = _content_length(self.lengths, 400)
        if self.codings:
            if length is not None:
                raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
            if self.version == "1.0":
                # RFC 9112 §6.1: framing an HTTP/1.0 message by it is faulty
                raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
            if self.codings != _CHUNKED:
                # RFC 9112 §6.1, §6.3: elbasy relays chunked framing only; any
                # other coding (identity is none, gzip would need decoding to
                # frame) could make two hops disagree on where the body ends
                raise RemoteProtocolError(
                    "request Transfer-Encoding must be exactly chunked, not "
                    + _listed(self.codings)
                )
            return _BY_CHUNKS
        if length is None or length == 0:
            return _NO_BODY
        return (BODY_LENGTH, length)

    def outgoing(self, bytes path not None, bytes authority not None, bytes via not None,
                 bytes extra not None, drop, int peek):
        """The request as it leaves: (head, body framing, length, peek, expect).

        The start line names ``path``; Host (``authority``) and Via (``via``,
        this proxy's name) follow it, then ``extra`` (header lines, each
        after its CRLF). Left out: the hop-by-hop lines, the client's Host,
        what Connection names, and the names in ``drop`` (lower-case).
        ``peek``: the bytes of the body the policy reads before it leaves
        (0 when there is no body); ``expect``: the client asked for
        100-continue, which elbasy then answers itself, so the upstream
        gets no Expect and the body with the head.
        """
        body, length = self.framing()
        cdef bytes start = b"".join([
            self.method.encode("ascii"), b" ", path,
            b" HTTP/1.0" if self.version == "1.0" else b" HTTP/1.1",
            b"\r\nHost: ", authority, b"\r\nVia: 1.1 ", via, extra,
        ])
        named = named_in_connection(self.options)
        names = named.union(drop) if named else drop
        cdef bint expect = False
        if body == BODY_NONE:
            peek = 0
        elif peek and self.expect_continue and _EXPECT not in names:
            names = (*names, _EXPECT)
            expect = True
        return self.without(names, True, start), body, length, peek, expect


cdef class ResponseHead(Head):
    """A response head, parsed: its status and version besides what `Head` reads."""

    cdef readonly int status
    cdef readonly str version
    cdef readonly bint keep_alive

    @property
    def lines(self):
        return self

    @property
    def status_line(self):
        return self.raw[: self.line_end]

    cpdef tuple framing(self, str request_method):
        """(body framing, length) of the response to ``request_method``."""
        cdef int status = self.status
        if request_method == "HEAD" or 100 <= status < 200 or status == 204 or status == 304:
            return _NO_BODY
        if self.codings:
            if self.codings != _CHUNKED:
                # elbasy strips TE, so no client asked for another coding; and a
                # framing elbasy does not read exactly is no framing to relay
                raise RemoteProtocolError(
                    "response Transfer-Encoding must be exactly chunked, not "
                    + _listed(self.codings),
                    502,
                )
            if self.version == "1.0":
                # RFC 9112 §6.1: its framing is faulty
                raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 response", 502)
            return _BY_CHUNKS
        length = _content_length(self.lengths, 502)
        if length is None:
            return _TO_CLOSE
        if length == 0:
            return _NO_BODY
        return (BODY_LENGTH, length)

    def relayed(self, str request_method not None, bint client_keeps):
        """The response as it goes to the client of a ``request_method``
        request: (head, body framing, length, keep_client, reuse_upstream).

        The head loses its hop-by-hop lines and what Connection names, and
        says "Connection: close" when the client's connection ends after it:
        when the client did not keep it (``client_keeps``), or the body runs
        to the upstream's close. A 101 hands both connections to another
        protocol: neither is kept.
        """
        body, length = self.framing(request_method)
        cdef bint switched = self.status == 101
        cdef bint keep_client = client_keeps and body != BODY_CLOSE and not switched
        cdef bytes head = self.without(named_in_connection(self.options))
        if not keep_client:
            head = head[: len(head) - 2] + b"Connection: close\r\n\r\n"
        reuse = self.keep_alive and body != BODY_CLOSE and not switched
        return head, body, length, keep_client, reuse


cdef bytes _after_empty_lines(bytes head):
    """The head less the CR and LF bytes before its first line.

    RFC 9112 §2.2: a recipient SHOULD ignore at least one empty line before
    the request line (a client's stray CRLF after a body). llhttp, which
    validates the head, skips every CR and LF there; this scanner has to
    start where llhttp did, or it takes the empty line for the start line and
    the real one for a header line (which was forwarded upstream as a header:
    found by the fuzz run, tests/fuzz).
    """
    cdef const char *s = PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head), i = 0
    while i < n and (s[i] == 13 or s[i] == 10):
        i += 1
    return head if i == 0 else head[i:]


cdef bytes _checked(object parser_type, bytes head, str what, int status):
    """The head without the empty lines before it, once llhttp found it whole and
    well formed (else the peer's fault, with ``status``)."""
    head = _after_empty_lines(head)
    cdef _Checked sink = _Checked.__new__(_Checked)
    _validate(parser_type(sink), sink, head, what, status)
    return head


cdef bytes _checked_request(bytes head):
    """`_checked` for a request head, on the kept parser when there is one; the
    parser is kept for the next head when the message ended with this one
    (parse_request lets it go again if the connection does not persist)."""
    global _kept_parser, _kept_sink
    head = _after_empty_lines(head)
    cdef object parser = _kept_parser
    cdef _Checked sink = _kept_sink
    cdef int upgraded = 0
    _kept_parser = _kept_sink = None  # kept again below only if left clean
    if parser is not None:
        sink.complete = sink.finished = False
        try:
            upgraded = _validate(parser, sink, head, "request", 400)
        except RemoteProtocolError:
            parser = None  # maybe the kept parser's own state: a new one decides
    if parser is None:
        sink = _Checked.__new__(_Checked)
        parser = _RequestParser(sink)
        upgraded = _validate(parser, sink, head, "request", 400)
    if not upgraded and sink.finished:
        _kept_parser = parser
        _kept_sink = sink
    return head


cdef int _validate(object parser, _Checked sink, bytes head, str what, int status) except -1:
    """Let llhttp check a whole head; its complaint becomes the peer's fault.
    1: it was a CONNECT or an Upgrade (llhttp stops after it), else 0."""
    cdef int upgraded = 0
    try:
        parser.feed_data(head)
    except _Upgrade:
        upgraded = 1  # the head is complete, what follows is not HTTP
    except _Malformed as exc:
        raise RemoteProtocolError(f"malformed {what} head: {exc}", status) from None
    if not sink.complete:
        raise RemoteProtocolError(f"malformed {what} head: incomplete", status)
    return upgraded


cdef int _cap_lines(Head h, str what, int status) except -1:
    if h.count > MAX_HEADER_LINES:
        raise RemoteProtocolError(
            f"{what} head has {h.count} header lines (at most {MAX_HEADER_LINES})",
            431 if status == 400 else status,
        )
    return 0


cdef int _cap_options(Head h, str what, int status) except -1:
    if len(h.options) > MAX_CONNECTION_OPTIONS:
        raise RemoteProtocolError(
            f"{what} head's Connection names {len(h.options)} options"
            f" (at most {MAX_CONNECTION_OPTIONS})",
            status,
        )
    return 0


cdef inline bint _persists(str version, frozenset options):
    """HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked to."""
    if version == "1.1":
        return _CLOSE not in options
    return _KEEP_ALIVE in options and _CLOSE not in options


cdef str _version_at(const char *p):
    """The "x.y" of an "HTTP/x.y" llhttp has checked (two digits)."""
    if p[0] == 49 and p[2] == 49:
        return "1.1"
    if p[0] == 49 and p[2] == 48:
        return "1.0"
    return PyBytes_FromStringAndSize(p, 3).decode("ascii")


def parse_request(bytes head not None):
    """Parse a complete request head (request line to blank line); empty lines
    before the request line are left out (the head's ``raw`` starts after them)."""
    head = _checked_request(head)
    cdef RequestHead h = RequestHead.__new__(RequestHead)
    read_lines(h, head)
    # llhttp accepted "METHOD SP+ target", then "SP+ HTTP/x.y" (or RTSP/x.y, or
    # nothing: HTTP/0.9): the target holds no space
    cdef const char *s = PyBytes_AS_STRING(head)
    cdef Py_ssize_t end = h.line_end, m = 0, a, b
    while m < end and s[m] != 32:
        m += 1
    a = m
    while a < end and s[a] == 32:
        a += 1
    b = end - 8  # "HTTP/x.y"
    if b <= a or s[b - 1] != 32 or memcmp(s + b, b"HTTP/", 5) != 0:
        raise RemoteProtocolError("the request line names no HTTP/1.x version")
    while b > a and s[b - 1] == 32:
        b -= 1
    h.target_bytes = PyBytes_FromStringAndSize(s + a, b - a)
    try:
        h.target = h.target_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("request target is not ASCII") from None
    h.version = _version_at(s + end - 3)
    if h.version != "1.0" and h.version != "1.1":
        raise RemoteProtocolError(f"unsupported HTTP version {h.version}")
    h.method = PyBytes_FromStringAndSize(s, m).decode("ascii")
    _cap_lines(h, "request", 400)
    if h.method == "CONNECT":
        return h  # a tunnel needs none of its headers (yet), nor keeps alive
    _cap_options(h, "request", 400)
    h.keep_alive = _persists(h.version, h.options)
    if not h.keep_alive:
        _drop_kept_parser()  # llhttp would take a next head on it for one after a close
    return h


cdef void _drop_kept_parser():
    global _kept_parser, _kept_sink
    _kept_parser = _kept_sink = None


def parse_response(bytes head not None):
    """Parse a complete response head from an upstream (empty lines before its
    status line left out, as for a request)."""
    head = _checked(_ResponseParser, head, "response", 502)
    cdef ResponseHead h = ResponseHead.__new__(ResponseHead)
    read_lines(h, head)
    # llhttp accepted "HTTP/x.y SP ddd" (or RTSP/, or ICE/): three digits at 9
    cdef const char *s = PyBytes_AS_STRING(head)
    if h.line_end < 12 or memcmp(s, b"HTTP/", 5) != 0:
        raise RemoteProtocolError("the status line names no HTTP/1.x version", 502)
    h.status = (s[9] - 48) * 100 + (s[10] - 48) * 10 + (s[11] - 48)
    h.version = _version_at(s + 5)
    _cap_lines(h, "response", 502)
    _cap_options(h, "response", 502)
    h.keep_alive = _persists(h.version, h.options)
    return h
