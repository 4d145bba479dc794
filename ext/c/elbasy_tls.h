/* elbasy data plane: TLS reads, writes and handshakes on the SSL* objects the
 * cffi binding (elbasy._tls) creates. The loop links the same libssl, so the
 * pointer it is handed is used directly, never through the stdlib ssl module.
 *
 * Every function reports like the socket calls it stands in for: bytes, 0 for
 * an orderly end, or -1 with errno (EAGAIN: wait for the socket). A TLS read
 * that needs the socket writable (a key update to answer) says so in
 * *want_write, so the loop can ask epoll for EPOLLOUT and read again then.
 */
#ifndef ELBASY_TLS_H
#define ELBASY_TLS_H

#include <errno.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* Empty the thread's error queue before a TLS call, so SSL_get_error reads
 * this call's failure only. The queue is almost always empty already, and
 * ERR_peek_error looks at it for a fraction of what ERR_clear_error spends
 * wiping all of its slots (some 400 instructions under OpenSSL 3, four
 * times per intercepted request). */
static inline void elb_tls_clear_errors(void)
{
    if (ERR_peek_error() != 0)
        ERR_clear_error();
}

static inline ssize_t elb_io_recv(int fd, SSL *ssl, char *buf, size_t n, int *want_write)
{
    int r;
    if (ssl == NULL)
        return recv(fd, buf, n, 0);
    if (n > INT_MAX)
        n = INT_MAX;
    elb_tls_clear_errors();
    r = SSL_read(ssl, buf, (int)n);
    if (r > 0)
        return r;
    switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        *want_write = 1;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        if (errno == 0)
            return 0; /* EOF without close_notify */
        if (errno == EAGAIN)
            errno = ECONNRESET;
        return -1;
    default:
        errno = EPROTO;
        return -1;
    }
}

static inline ssize_t elb_io_send(int fd, SSL *ssl, const char *buf, size_t n)
{
    int r;
    if (ssl == NULL)
        return send(fd, buf, n, MSG_NOSIGNAL);
    if (n == 0)
        return 0;
    if (n > INT_MAX)
        n = INT_MAX;
    elb_tls_clear_errors();
    r = SSL_write(ssl, buf, (int)n);
    if (r > 0)
        return r;
    switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_SYSCALL:
        if (errno == 0 || errno == EAGAIN)
            errno = EPIPE;
        return -1;
    default:
        errno = EPROTO;
        return -1;
    }
}

/* One step of a handshake: 1 done, 0 wait for *want (EPOLLIN or EPOLLOUT),
 * -1 failed (the reason stays on the error queue for the binding to read). */
static inline int elb_tls_handshake(SSL *ssl, int *want)
{
    int r;
    elb_tls_clear_errors();
    r = SSL_do_handshake(ssl);
    if (r == 1)
        return 1;
    switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
        *want = EPOLLIN;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        *want = EPOLLOUT;
        return 0;
    default:
        return -1;
    }
}

/* A ClientHello that came with the CONNECT head was handed to OpenSSL in a
 * memory BIO. Once OpenSSL has read all of it, reads switch to the socket:
 * 1 switched, 0 not yet, -1 out of memory. */
static inline int elb_tls_settle(SSL *ssl, int fd)
{
    BIO *r = SSL_get_rbio(ssl);
    BIO *s;
    if (r == NULL || BIO_method_type(r) != BIO_TYPE_MEM || BIO_ctrl_pending(r) > 0)
        return 0;
    s = BIO_new_socket(fd, BIO_NOCLOSE);
    if (s == NULL)
        return -1;
    SSL_set0_rbio(ssl, s);
    return 1;
}

/* Say goodbye (close_notify) without waiting for the peer's; errors ignored. */
static inline void elb_tls_goodbye(SSL *ssl)
{
    ERR_clear_error();
    if (SSL_is_init_finished(ssl))
        SSL_shutdown(ssl);
    ERR_clear_error();
}

#endif
