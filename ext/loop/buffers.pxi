# Byte buffers (Buf, declared in elbasy._loop.pxd): a malloc'd window
# [start, end) of cap bytes, grown on demand and compacted before growing.
# buf_reserve and buf_append raise MemoryError (never on purpose);
# buf_send reports what failed and leaves the decision to its caller.


cdef inline Py_ssize_t buf_len(Buf *b) noexcept nogil:
    return b.end - b.start


cdef int buf_reserve(Buf *b, Py_ssize_t room) except -1:
    """Make room for `room` more bytes after b.end, compacting first.

    Returns 0; -1 only with MemoryError raised (never on purpose).
    """
    cdef Py_ssize_t used = b.end - b.start
    cdef Py_ssize_t cap
    cdef char *p
    if b.cap - b.end >= room:
        return 0
    if b.start > 0:
        if used:
            memmove(b.data, b.data + b.start, used)
        b.start = 0
        b.end = used
        if b.cap - b.end >= room:
            return 0
    cap = b.cap if b.cap else 4096
    while cap - used < room:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef int buf_append(Buf *b, const char *src, Py_ssize_t n) except -1:
    """Copy n bytes to the end of b. Returns 0; -1 only with MemoryError raised."""
    buf_reserve(b, n)
    memcpy(b.data + b.end, src, n)
    b.end += n
    return 0


cdef inline void buf_consumed(Buf *b, Py_ssize_t n) noexcept nogil:
    b.start += n
    if b.start >= b.end:
        b.start = 0
        b.end = 0


cdef int buf_send(int fd, SSL *ssl, Buf *b, uint64_t *counter) noexcept nogil:
    """Send what b holds (through TLS if ssl): 1 all sent, 0 the socket is
    full, -1 failed (errno). A TLS write that could not finish is retried
    with the same bytes at the front of b, as OpenSSL requires."""
    cdef ssize_t sent
    while buf_len(b):
        sent = elb_io_send(fd, ssl, b.data + b.start, buf_len(b))
        if sent < 0:
            if errno == EINTR:
                continue  # a signal came first: nothing was sent, send again
            if errno == EAGAIN:
                return 0  # the socket buffer is full (or TLS wants the other way)
            return -1  # EPIPE, ECONNRESET, EPROTO (TLS): the peer is gone
        buf_consumed(b, sent)
        if counter != NULL:
            counter[0] += sent
    return 1


cdef void buf_shrink(Buf *b) noexcept nogil:
    """Give back what b has beyond the bytes it holds (kept as they are if realloc fails)."""
    cdef Py_ssize_t used = b.end - b.start
    cdef char *p
    if used == 0 or b.cap - used < 512:
        return
    if b.start > 0:
        memmove(b.data, b.data + b.start, used)
        b.start = 0
        b.end = used
    p = <char *>realloc(b.data, used)
    if p != NULL:
        b.data = p
        b.cap = used


cdef inline void buf_free(Buf *b) noexcept nogil:
    if b.data != NULL:
        free(b.data)
    b.data = NULL
    b.start = 0
    b.end = 0
    b.cap = 0
