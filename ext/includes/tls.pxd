# TLS I/O on the SSL* objects elbasy._tls makes (ext/c/elbasy_tls.h). The
# loop links the same libssl as that binding (see setup.py), so a pointer it
# is handed is driven here directly. Each call reports like the socket call
# it stands in for: bytes, 0 for an orderly end, -1 with errno.


cdef extern from "elbasy_tls.h" nogil:
    ctypedef struct SSL:
        pass
    void SSL_free(SSL *ssl)
    int SSL_pending(const SSL *ssl)
    int SSL_has_pending(const SSL *ssl)
    void SSL_set_read_ahead(SSL *ssl, int yes)
    ssize_t elb_io_recv(int fd, SSL *ssl, char *buf, size_t n, int *want_write)
    ssize_t elb_io_send(int fd, SSL *ssl, const char *buf, size_t n)
    int elb_tls_handshake(SSL *ssl, int *want)
    int elb_tls_settle(SSL *ssl, int fd)
    void elb_tls_goodbye(SSL *ssl)
