/* elbasy._tls: the OpenSSL contexts and SSL* objects of TLS interception.
 *
 * Compiled into the cffi module elbasy._tls (ext/tls_build.py declares the
 * same functions to cffi), linked against the same libssl/libcrypto as
 * elbasy._loop, which drives the SSL* objects made here after receiving
 * them as integers (see setup.py).
 *
 * What lives here, so that the common case never calls Python:
 *
 * - The server side. A *default* SSL_CTX (the session ctx: its ticket keys
 *   and session cache are the ones that count) carries a servername callback
 *   and an elb_server state in its ex_data: a hash table SAN name -> leaf
 *   SSL_CTX* (up-ref'd), a count of hits and misses, and the time used to
 *   spot stale leaves. The callback takes the SNI name (lower-cased, trailing
 *   dot dropped) or, when the client sent none, the fallback name stored on
 *   the SSL at creation (the CONNECT host), looks up the exact name and then
 *   the wildcard "*." + everything after the first label. A hit whose leaf
 *   is due for renewal counts as a miss. On a miss it calls the Python
 *   handler elb_sni_miss (cffi extern "Python+C"), which mints a leaf,
 *   inserts it under its SAN and returns it (borrowed: the table owns it),
 *   or NULL: the handshake then fails with an unrecognized_name alert. The
 *   table is bounded: when full, the oldest inserted entry is dropped
 *   (FIFO); the SSLs using its context keep their own reference.
 * - ALPN on every server context: "http/1.1" when the client offers it,
 *   else no ALPN at all (SSL_TLSEXT_ERR_NOACK), so an h2-only client is not
 *   failed.
 * - The client side. One SSL_CTX per upstream configuration with a small
 *   table host -> SSL_SESSION* fed by the new-session callback (client
 *   cache, no internal store); a new client SSL resumes from it. TLS 1.3
 *   tickets are taken out of the table when used (single use, RFC 8446
 *   appendix C.4); the connection that used one receives fresh ones.
 * - elb_ssl_failure: the reason a handshake failed, as text, with the verify
 *   result and the first error of the queue, for elbasy.tls to map to its
 *   exceptions.
 */
#ifndef ELBASY_TLS_BINDING_H
#define ELBASY_TLS_BINDING_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

/* Python's handler for a name the SNI table does not hold (defined by cffi
 * in elbasy._tls's generated C): a leaf context for `name`, borrowed, or NULL. */
SSL_CTX *elb_sni_miss(SSL *ssl, const char *name);

/* ---- server side: the SNI table and client-facing SSL*s */
SSL_CTX *elb_server_ctx_new(size_t table_size);
SSL_CTX *elb_leaf_ctx_new(const char *chain, size_t chain_len, const char *key, size_t key_len);
int elb_sni_insert(SSL_CTX *server, const char *name, SSL_CTX *leaf, int64_t renew_at);
int elb_sni_remove(SSL_CTX *server, const char *name);
void elb_sni_clear(SSL_CTX *server);
void elb_sni_set_now(SSL_CTX *server, int64_t now);
int elb_sni_stats(SSL_CTX *server, uint64_t *out);
uintptr_t elb_server_ssl(SSL_CTX *ctx, int fd, const char *fallback_name,
                         const char *early, size_t early_len);
/* A server SSL* inside another TLS session (a CONNECT intercepted inside a
 * --listen-tls connection): it reads and writes through `outer`. */
uintptr_t elb_server_ssl_over(SSL_CTX *ctx, SSL *outer, const char *fallback_name);
const char *elb_ssl_name(SSL *ssl);
int elb_ssl_set_note(SSL *ssl, const char *text);
const char *elb_ssl_note(SSL *ssl);

/* ---- client side: verified upstream SSL*s and their session cache */
SSL_CTX *elb_client_ctx_new(size_t cache_size);
int elb_client_ctx_load_defaults(SSL_CTX *ctx, const char *cafile, const char *capath);
uintptr_t elb_client_ssl(SSL_CTX *ctx, int fd, const char *host);
size_t elb_client_sessions(SSL_CTX *ctx);

/* ---- failures */
unsigned long elb_ssl_failure(SSL *ssl, long *verify_result, char *out, size_t cap);

#endif
