"""cffi builder for elbasy._tls: the OpenSSL contexts and SSL* objects of TLS interception.

Out-of-line API mode, linked against the same libssl/libcrypto as elbasy._loop,
which drives the SSL* objects made here (SSL_do_handshake, SSL_read, SSL_write,
SSL_get_error, SSL_shutdown, SSL_free) after receiving them as integers.

The C is elbasy's own source, ext/c/elbasy_tls_binding.c (what each part does
is in its header, ext/c/elbasy_tls_binding.h): the SNI table that picks leaves
without Python, ALPN, the client session cache and the failure reasons. This
file declares to cffi the OpenSSL calls elbasy.tls and the tests make, and that
C's functions; it compiles the source beside the module cffi generates, with
the same -Wall -Wextra as the rest of elbasy's C.
"""

from __future__ import annotations

import os

from cffi import FFI

# setup.py runs this from the repository root; the paths stay relative to it
# (as an sdist needs), found from this file when it is run from elsewhere
C_DIR = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "c"))

CDEF = r"""
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_SESSION;
typedef ... BIO;
typedef ... BIO_METHOD;
typedef ... X509;
typedef ... X509_VERIFY_PARAM;

#define SSL_ERROR_NONE ...
#define SSL_ERROR_SSL ...
#define SSL_ERROR_WANT_READ ...
#define SSL_ERROR_WANT_WRITE ...
#define SSL_ERROR_SYSCALL ...
#define SSL_ERROR_ZERO_RETURN ...
#define BIO_NOCLOSE ...
#define TLS1_2_VERSION ...
#define TLS1_3_VERSION ...
#define X509_V_OK ...
#define X509_V_ERR_HOSTNAME_MISMATCH ...
#define X509_V_ERR_IP_ADDRESS_MISMATCH ...
#define X509_V_ERR_CERT_HAS_EXPIRED ...
#define X509_V_ERR_CERT_NOT_YET_VALID ...
#define X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT ...
#define X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN ...
#define X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ...

#define ERR_LIB_SSL ...
#define ERR_LIB_X509 ...
#define ERR_LIB_PEM ...
#define ERR_LIB_EVP ...
#define ERR_LIB_ASN1 ...
#define ERR_LIB_SYS ...
#define ERR_LIB_BIO ...
#define ERR_LIB_EC ...
#define SSL_R_CERTIFICATE_VERIFY_FAILED ...
#define SSL_R_NO_SHARED_CIPHER ...
#define SSL_R_WRONG_VERSION_NUMBER ...
#define SSL_R_UNSUPPORTED_PROTOCOL ...
#define SSL_R_HTTP_REQUEST ...
#define SSL_R_HTTPS_PROXY_REQUEST ...
#define SSL_R_PACKET_LENGTH_TOO_LONG ...
#define SSL_R_RECORD_LENGTH_MISMATCH ...
#define SSL_R_UNEXPECTED_MESSAGE ...
#define SSL_R_UNEXPECTED_EOF_WHILE_READING ...
#define SSL_R_NO_PROTOCOLS_AVAILABLE ...
#define SSL_R_CALLBACK_FAILED ...
#define SSL_R_TLSV1_ALERT_UNKNOWN_CA ...
#define SSL_R_SSLV3_ALERT_BAD_CERTIFICATE ...
#define SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN ...
#define SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE ...
#define SSL_R_TLSV1_ALERT_PROTOCOL_VERSION ...
#define SSL_R_TLSV1_ALERT_INTERNAL_ERROR ...
#define SSL_R_TLSV1_ALERT_DECODE_ERROR ...
#define SSL_R_TLSV1_UNRECOGNIZED_NAME ...
#define SSL_R_VERSION_TOO_LOW ...
#define SSL_R_BAD_PACKET_LENGTH ...
#define SSL_R_LENGTH_MISMATCH ...
#define SSL_R_NO_CERTIFICATE_ASSIGNED ...
#define SSL_R_NO_PRIVATE_KEY_ASSIGNED ...
#define SSL_R_CA_MD_TOO_WEAK ...
#define SSL_R_EE_KEY_TOO_SMALL ...
#define X509_R_KEY_VALUES_MISMATCH ...
#define X509_R_CERT_ALREADY_IN_HASH_TABLE ...
#define PEM_R_NO_START_LINE ...
#define PEM_R_BAD_END_LINE ...

/* driving an SSL* (what the loop does, and what the tests do from Python) */
int SSL_do_handshake(SSL *ssl);
int SSL_read(SSL *ssl, void *buf, int num);
int SSL_write(SSL *ssl, const void *buf, int num);
int SSL_get_error(const SSL *ssl, int ret);
int SSL_shutdown(SSL *ssl);
void SSL_free(SSL *ssl);
int SSL_pending(const SSL *ssl);
int SSL_is_init_finished(const SSL *ssl);
void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len);
const char *SSL_get_servername(const SSL *ssl, const int type);
#define TLSEXT_NAMETYPE_host_name ...
int SSL_version(const SSL *ssl);
const char *SSL_get_version(const SSL *ssl);
int SSL_session_reused(const SSL *ssl);
long SSL_get_verify_result(const SSL *ssl);
SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl);
BIO *SSL_get_rbio(const SSL *ssl);
BIO *SSL_get_wbio(const SSL *ssl);
void SSL_set0_rbio(SSL *ssl, BIO *rbio);
void SSL_set0_wbio(SSL *ssl, BIO *wbio);
int SSL_set1_groups_list(SSL *ssl, char *list);
int SSL_get_fd(const SSL *ssl);
int SSL_get_wfd(const SSL *ssl);

/* BIOs: the loop swaps a drained memory rbio for a socket one */
BIO *BIO_new_socket(int sock, int close_flag);
BIO *BIO_new(const BIO_METHOD *type);
const BIO_METHOD *BIO_s_mem(void);
int BIO_write(BIO *b, const void *data, int dlen);
size_t BIO_ctrl_pending(BIO *b);
int BIO_free(BIO *a);

/* contexts */
void SSL_CTX_free(SSL_CTX *ctx);
int SSL_CTX_up_ref(SSL_CTX *ctx);
int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath);

/* the error queue */
unsigned long ERR_get_error(void);
unsigned long ERR_peek_error(void);
unsigned long ERR_peek_last_error(void);
void ERR_clear_error(void);
int ERR_GET_LIB(unsigned long e);
int ERR_GET_REASON(unsigned long e);
const char *ERR_lib_error_string(unsigned long e);
const char *ERR_reason_error_string(unsigned long e);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
const char *X509_verify_cert_error_string(long n);
const char *OpenSSL_version(int type);
#define OPENSSL_VERSION ...

/* elbasy's C part */
extern "Python+C" SSL_CTX *elb_sni_miss(SSL *ssl, const char *name);

SSL_CTX *elb_server_ctx_new(size_t table_size);
SSL_CTX *elb_leaf_ctx_new(const char *chain, size_t chain_len, const char *key, size_t key_len);
int elb_sni_insert(SSL_CTX *server, const char *name, SSL_CTX *leaf, int64_t renew_at);
int elb_sni_remove(SSL_CTX *server, const char *name);
void elb_sni_clear(SSL_CTX *server);
void elb_sni_set_now(SSL_CTX *server, int64_t now);
int elb_sni_stats(SSL_CTX *server, uint64_t *out);
uintptr_t elb_server_ssl(SSL_CTX *ctx, int fd, const char *fallback_name,
                         const char *early, size_t early_len);
uintptr_t elb_server_ssl_over(SSL_CTX *ctx, SSL *outer, const char *fallback_name);
const char *elb_ssl_name(SSL *ssl);
int elb_ssl_set_note(SSL *ssl, const char *text);
const char *elb_ssl_note(SSL *ssl);

SSL_CTX *elb_client_ctx_new(size_t cache_size);
int elb_client_ctx_load_defaults(SSL_CTX *ctx, const char *cafile, const char *capath);
uintptr_t elb_client_ssl(SSL_CTX *ctx, int fd, const char *host);
size_t elb_client_sessions(SSL_CTX *ctx);

unsigned long elb_ssl_failure(SSL *ssl, long *verify_result, char *out, size_t cap);
"""

# what the module cffi generates includes: the OpenSSL headers of the calls
# CDEF names, then elbasy's
PREAMBLE = """
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "elbasy_tls_binding.h"
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "elbasy._tls",
    PREAMBLE,
    sources=[os.path.join(C_DIR, "elbasy_tls_binding.c")],
    include_dirs=[C_DIR],
    depends=[os.path.join(C_DIR, "elbasy_tls_binding.h")],
    libraries=["ssl", "crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir="build", verbose=True)
