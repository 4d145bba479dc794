# cython: language_level=3
"""The data plane's framing scanners (ext/c/elbasy_io.h) as Python objects.

The loop calls elb_head_end, elb_chunked_scan and elb_hello_name directly on its buffers;
this module hands the same compiled C to the tests, which feed each scanner
whole, split at every byte and byte by byte, with no sockets. A test through
sockets cannot promise those splits: TCP may join two sends before the loop
reads them, so which pieces the scanner saw would be up to the kernel.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from io cimport (
    CH_DONE, ELB_HELLO_BAD, ELB_HELLO_MORE, ELB_HELLO_NAME, elb_chunked, elb_chunked_scan,
    elb_head_end, elb_hello_name,
)


def head_end(bytes buf, size_t start=0):
    """Where the head in ``buf`` ends (just past its blank line), or -1.

    ``start``: how much of ``buf`` an earlier call already scanned, as the
    loop passes it while a head arrives in pieces.
    """
    return elb_head_end(PyBytes_AS_STRING(buf), <size_t>PyBytes_GET_SIZE(buf), start)


def hello_name(bytes buf):
    """The server name of the TLS ClientHello that ``buf`` begins with: the name
    (bytes), ``None`` for a whole ClientHello that names no host, ``...`` when
    more bytes are needed; raises ValueError for bytes that are not one."""
    cdef unsigned char name[256]
    cdef size_t n = 0
    cdef int rc = elb_hello_name(<const unsigned char *>PyBytes_AS_STRING(buf),
                                 <size_t>PyBytes_GET_SIZE(buf), name, &n)
    if rc == ELB_HELLO_NAME:
        return bytes(name[:n])
    if rc == ELB_HELLO_MORE:
        return ...
    if rc == ELB_HELLO_BAD:
        raise ValueError("not a TLS ClientHello")
    return None


cdef class Chunked:
    """One chunked message's framing, fed as it arrives."""

    cdef elb_chunked st
    cdef bytearray out

    def __cinit__(self):
        self.st.state = 0
        self.st.remaining = 0
        self.out = bytearray()

    def feed(self, bytes data):
        """How many bytes of ``data`` belong to the message (all of them
        unless it ends inside), or -1 for bad framing. What the loop would
        pass on of them (the message without its trailer lines) is added to
        ``passed``."""
        cdef bytearray work = bytearray(data)
        cdef size_t kept = 0
        cdef long got = elb_chunked_scan(&self.st, work, <size_t>len(work), &kept)
        if got >= 0:
            self.out += work[:kept]
        return got

    @property
    def passed(self):
        """Every byte passed on so far."""
        return bytes(self.out)

    @property
    def done(self):
        """The last chunk and the trailers are through."""
        return self.st.state == CH_DONE
