/* elbasy._tls's C: the SNI table, server and client contexts, session
 * cache and failure reasons. What each part does is in elbasy_tls_binding.h;
 * ext/tls_build.py compiles this file into the cffi module.
 */
#include "elbasy_tls_binding.h"

#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define ELB_NAME_MAX 253
static const unsigned char ELB_ALPN[] = "\x08http/1.1";
static const unsigned char ELB_SID_CTX[] = "elbasy";

/* ------------------------------------------------------------------ a bounded map
 * Chained hash, string keys (strdup'd), void* values released by `release`.
 * Bounded by `max`: when full, the oldest inserted entry is dropped (entries
 * are also on a list in insertion order; replacing a value keeps the place).
 */
typedef struct elb_entry {
    char *key;
    void *val;
    int64_t renew_at;
    struct elb_entry *next;               /* bucket chain */
    struct elb_entry *older, *newer;      /* insertion order */
} elb_entry;

typedef struct {
    elb_entry **buckets;
    size_t nbuckets;    /* a power of two */
    elb_entry *oldest, *newest;
    size_t max, count;
    void (*release)(void *);
} elb_map;

static uint64_t elb_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

static int elb_map_init(elb_map *m, size_t max, void (*release)(void *))
{
    if (max < 1)
        max = 1;
    size_t n = 16;
    while (n < 2 * max)
        n <<= 1;
    m->buckets = calloc(n, sizeof(*m->buckets));
    if (m->buckets == NULL)
        return 0;
    m->nbuckets = n;
    m->max = max;
    m->count = 0;
    m->oldest = m->newest = NULL;
    m->release = release;
    return 1;
}

static elb_entry *elb_map_get(elb_map *m, const char *key)
{
    elb_entry *e = m->buckets[elb_hash(key) & (m->nbuckets - 1)];
    for (; e != NULL; e = e->next)
        if (strcmp(e->key, key) == 0)
            return e;
    return NULL;
}

static void elb_map_drop(elb_map *m, elb_entry *victim)
{
    elb_entry **p = &m->buckets[elb_hash(victim->key) & (m->nbuckets - 1)];
    while (*p != victim)
        p = &(*p)->next;
    *p = victim->next;
    if (victim->older != NULL)
        victim->older->newer = victim->newer;
    else
        m->oldest = victim->newer;
    if (victim->newer != NULL)
        victim->newer->older = victim->older;
    else
        m->newest = victim->older;
    m->count--;
    m->release(victim->val);
    free(victim->key);
    free(victim);
}

/* Takes over one reference of `val` on success (returns 1); 0 when out of memory. */
static int elb_map_put(elb_map *m, const char *key, void *val, int64_t renew_at)
{
    elb_entry *e = elb_map_get(m, key);
    if (e != NULL) {
        m->release(e->val);
        e->val = val;
        e->renew_at = renew_at;
        return 1;
    }
    e = calloc(1, sizeof(*e));
    if (e == NULL || (e->key = strdup(key)) == NULL) {
        free(e);
        return 0;
    }
    if (m->count >= m->max)
        elb_map_drop(m, m->oldest);  /* full: the oldest inserted entry goes */
    e->val = val;
    e->renew_at = renew_at;
    size_t b = elb_hash(key) & (m->nbuckets - 1);
    e->next = m->buckets[b];
    m->buckets[b] = e;
    e->older = m->newest;
    e->newer = NULL;
    if (m->newest != NULL)
        m->newest->newer = e;
    else
        m->oldest = e;
    m->newest = e;
    m->count++;
    return 1;
}

static void elb_map_clear(elb_map *m)
{
    while (m->oldest != NULL)
        elb_map_drop(m, m->oldest);
}

static void elb_map_free(elb_map *m)
{
    elb_map_clear(m);
    free(m->buckets);
    m->buckets = NULL;
}

static void elb_release_ctx(void *p) { SSL_CTX_free((SSL_CTX *)p); }
static void elb_release_session(void *p) { SSL_SESSION_free((SSL_SESSION *)p); }

/* ------------------------------------------------------------------ ex_data */

typedef struct {
    elb_map table;
    SSL_CTX *owner;  /* the default ctx whose ex_data holds this (not a reference) */
    uint64_t hits, misses;
    int64_t now;  /* 0: the wall clock */
} elb_server;

typedef struct {
    elb_map sessions;
} elb_client;

static int elb_ssl_name_idx = -1;     /* SSL: the fallback name / upstream host */
static int elb_ssl_note_idx = -1;     /* SSL: why Python could not serve a name */
static int elb_server_idx = -1;       /* SSL_CTX: elb_server */
static int elb_client_idx = -1;       /* SSL_CTX: elb_client */

static void elb_free_name(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                          long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    free(ptr);
}

static void elb_free_server(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                            long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    elb_server *st = ptr;
    if (st != NULL) {
        elb_map_free(&st->table);
        free(st);
    }
}

static void elb_free_client(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                            long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    elb_client *st = ptr;
    if (st != NULL) {
        elb_map_free(&st->sessions);
        free(st);
    }
}

static int elb_init(void)
{
    if (elb_ssl_name_idx < 0)
        elb_ssl_name_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, elb_free_name);
    if (elb_ssl_note_idx < 0)
        elb_ssl_note_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, elb_free_name);
    if (elb_server_idx < 0)
        elb_server_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, elb_free_server);
    if (elb_client_idx < 0)
        elb_client_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, elb_free_client);
    return elb_ssl_name_idx >= 0 && elb_ssl_note_idx >= 0
           && elb_server_idx >= 0 && elb_client_idx >= 0;
}

static elb_server *elb_server_of(SSL_CTX *ctx)
{
    return elb_server_idx < 0 ? NULL : SSL_CTX_get_ex_data(ctx, elb_server_idx);
}

static elb_client *elb_client_of(SSL_CTX *ctx)
{
    return elb_client_idx < 0 ? NULL : SSL_CTX_get_ex_data(ctx, elb_client_idx);
}

/* Lower-case `in` into `out` (ELB_NAME_MAX + 3 bytes), dropping one trailing dot. */
static int elb_lower(const char *in, char *out)
{
    size_t n = strlen(in);
    if (n > 0 && in[n - 1] == '.')
        n--;
    if (n == 0 || n > ELB_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    out[n] = '\0';
    return 1;
}

/* ------------------------------------------------------------------ shared settings */

static void elb_common(SSL_CTX *ctx)
{
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                              | SSL_MODE_RELEASE_BUFFERS);
}

static int elb_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                           const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl; (void)arg;
    unsigned char *sel = NULL;
    unsigned char sel_len = 0;
    if (SSL_select_next_proto(&sel, &sel_len, ELB_ALPN, sizeof(ELB_ALPN) - 1, in, inlen)
        != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    *outlen = sel_len;
    return SSL_TLSEXT_ERR_OK;
}

static int elb_server_common(SSL_CTX *ctx)
{
    elb_common(ctx);
    SSL_CTX_set_alpn_select_cb(ctx, elb_alpn_select, NULL);
    return SSL_CTX_set_session_id_context(ctx, ELB_SID_CTX, sizeof(ELB_SID_CTX) - 1);
}

/* ------------------------------------------------------------------ server side */

static int64_t elb_now(elb_server *st)
{
    return st->now != 0 ? st->now : (int64_t)time(NULL);
}

static SSL_CTX *elb_sni_lookup(elb_server *st, const char *name)
{
    int64_t now = elb_now(st);
    elb_entry *e = elb_map_get(&st->table, name);
    if (e == NULL || e->renew_at <= now) {
        const char *dot = strchr(name, '.');
        if (dot == NULL || dot[1] == '\0')
            return NULL;
        char wild[ELB_NAME_MAX + 3];
        wild[0] = '*';
        strcpy(wild + 1, dot);
        e = elb_map_get(&st->table, wild);
        if (e == NULL || e->renew_at <= now)
            return NULL;
    }
    return e->val;
}

static int elb_servername_cb(SSL *ssl, int *al, void *arg)
{
    elb_server *st = arg;
    if (st != NULL && SSL_get_SSL_CTX(ssl) != st->owner)
        return SSL_TLSEXT_ERR_OK;  /* a second ClientHello (after a HelloRetryRequest): the
                                      leaf was chosen on the first one */
    const char *raw = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    /* No SNI, or one no host name can be: some clients (Go's, through a proxy)
       send "host:port". The CONNECT host stands in for either. */
    if (raw == NULL || strchr(raw, ':') != NULL)
        raw = SSL_get_ex_data(ssl, elb_ssl_name_idx);
    char name[ELB_NAME_MAX + 3];
    if (st == NULL || raw == NULL) {
        *al = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    SSL_CTX *ctx = NULL;
    if (elb_lower(raw, name)) {
        ctx = elb_sni_lookup(st, name);
    } else {
        /* too long or empty: let Python refuse it with a reason */
        strncpy(name, raw, sizeof(name) - 1);
        name[sizeof(name) - 1] = '\0';
    }
    if (ctx != NULL) {
        st->hits++;
    } else {
        st->misses++;
        ctx = elb_sni_miss(ssl, name);
    }
    if (ctx == NULL || SSL_set_SSL_CTX(ssl, ctx) == NULL) {
        *al = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

SSL_CTX *elb_server_ctx_new(size_t table_size)
{
    if (!elb_init())
        return NULL;
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        return NULL;
    elb_server *st = calloc(1, sizeof(*st));
    if (st == NULL || !elb_map_init(&st->table, table_size, elb_release_ctx)) {
        free(st);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (!SSL_CTX_set_ex_data(ctx, elb_server_idx, st)) {
        elb_map_free(&st->table);
        free(st);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (!elb_server_common(ctx)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* session tickets stay on (the default); this ctx's keys encrypt them */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    SSL_CTX_set_num_tickets(ctx, 1);  /* TLS 1.3: one ticket per handshake (OpenSSL sends 2) */
    SSL_CTX_sess_set_cache_size(ctx, 4096);
    st->owner = ctx;
    /* the callback and its argument are found through the session ctx even after
       SSL_set_SSL_CTX has switched the SSL to a leaf */
    SSL_CTX_set_tlsext_servername_callback(ctx, elb_servername_cb);
    SSL_CTX_set_tlsext_servername_arg(ctx, st);
    return ctx;
}

SSL_CTX *elb_leaf_ctx_new(const char *chain, size_t chain_len, const char *key, size_t key_len)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *pkey = NULL;
    if (ctx == NULL || !elb_server_common(ctx))
        goto fail;
    if (chain_len > INT32_MAX || key_len > INT32_MAX)
        goto fail;
    bio = BIO_new_mem_buf(chain, (int)chain_len);
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL)
        goto fail;
    if (SSL_CTX_use_certificate(ctx, cert) != 1)
        goto fail;
    X509_free(cert);
    cert = NULL;
    for (;;) {
        X509 *extra = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (extra == NULL) {
            unsigned long e = ERR_peek_last_error();
            if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE)
                ERR_clear_error();  /* the end of the chain */
            else
                goto fail;
            break;
        }
        if (SSL_CTX_add0_chain_cert(ctx, extra) != 1) {
            X509_free(extra);
            goto fail;
        }
    }
    BIO_free(bio);
    bio = BIO_new_mem_buf(key, (int)key_len);
    if (bio == NULL || (pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL)
        goto fail;
    if (SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    return ctx;
fail:
    EVP_PKEY_free(pkey);
    X509_free(cert);
    BIO_free(bio);
    SSL_CTX_free(ctx);
    return NULL;
}

int elb_sni_insert(SSL_CTX *server, const char *name, SSL_CTX *leaf, int64_t renew_at)
{
    elb_server *st = elb_server_of(server);
    char key[ELB_NAME_MAX + 3];
    if (st == NULL || !elb_lower(name, key) || !SSL_CTX_up_ref(leaf))
        return 0;
    if (!elb_map_put(&st->table, key, leaf, renew_at)) {
        SSL_CTX_free(leaf);
        return 0;
    }
    return 1;
}

int elb_sni_remove(SSL_CTX *server, const char *name)
{
    elb_server *st = elb_server_of(server);
    char key[ELB_NAME_MAX + 3];
    elb_entry *e;
    if (st == NULL || !elb_lower(name, key) || (e = elb_map_get(&st->table, key)) == NULL)
        return 0;
    elb_map_drop(&st->table, e);
    return 1;
}

void elb_sni_clear(SSL_CTX *server)
{
    elb_server *st = elb_server_of(server);
    if (st != NULL)
        elb_map_clear(&st->table);
}

void elb_sni_set_now(SSL_CTX *server, int64_t now)
{
    elb_server *st = elb_server_of(server);
    if (st != NULL)
        st->now = now;
}

/* out: hits, misses, entries, capacity */
int elb_sni_stats(SSL_CTX *server, uint64_t *out)
{
    elb_server *st = elb_server_of(server);
    if (st == NULL)
        return 0;
    out[0] = st->hits;
    out[1] = st->misses;
    out[2] = st->table.count;
    out[3] = st->table.max;
    return 1;
}

static int elb_set_name(SSL *ssl, const char *name)
{
    if (name == NULL || *name == '\0')
        return 1;
    char *copy = strdup(name);
    if (copy == NULL || !SSL_set_ex_data(ssl, elb_ssl_name_idx, copy)) {
        free(copy);
        return 0;
    }
    return 1;
}

const char *elb_ssl_name(SSL *ssl)
{
    return elb_ssl_name_idx < 0 ? NULL : SSL_get_ex_data(ssl, elb_ssl_name_idx);
}

/* A note on the SSL (freed with it): why the SNI handler failed, for error_for. */
int elb_ssl_set_note(SSL *ssl, const char *text)
{
    if (elb_ssl_note_idx < 0)
        return 0;
    char *copy = strdup(text);
    if (copy == NULL)
        return 0;
    free(SSL_get_ex_data(ssl, elb_ssl_note_idx));
    if (!SSL_set_ex_data(ssl, elb_ssl_note_idx, copy)) {
        free(copy);
        return 0;
    }
    return 1;
}

const char *elb_ssl_note(SSL *ssl)
{
    return elb_ssl_note_idx < 0 ? NULL : SSL_get_ex_data(ssl, elb_ssl_note_idx);
}

uintptr_t elb_server_ssl(SSL_CTX *ctx, int fd, const char *fallback_name,
                         const char *early, size_t early_len)
{
    if (!elb_init())
        return 0;
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL)
        return 0;
    if (!elb_set_name(ssl, fallback_name))
        goto fail;
    if (early_len == 0) {
        if (SSL_set_fd(ssl, fd) != 1)  /* a socket BIO with BIO_NOCLOSE */
            goto fail;
    } else {
        if (early_len > INT32_MAX)
            goto fail;
        BIO *rbio = BIO_new(BIO_s_mem());
        if (rbio == NULL)
            goto fail;
        BIO_set_mem_eof_return(rbio, -1);  /* drained means "retry", not EOF */
        if (BIO_write(rbio, early, (int)early_len) != (int)early_len) {
            BIO_free(rbio);
            goto fail;
        }
        BIO *wbio = BIO_new_socket(fd, BIO_NOCLOSE);
        if (wbio == NULL) {
            BIO_free(rbio);
            goto fail;
        }
        SSL_set_bio(ssl, rbio, wbio);
    }
    SSL_set_accept_state(ssl);
    return (uintptr_t)ssl;
fail:
    SSL_free(ssl);
    return 0;
}

uintptr_t elb_server_ssl_over(SSL_CTX *ctx, SSL *outer, const char *fallback_name)
{
    if (!elb_init() || outer == NULL)
        return 0;
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL)
        return 0;
    if (!elb_set_name(ssl, fallback_name))
        goto fail;
    /* an SSL filter BIO over the outer session: what the inner one reads and
     * writes is the outer one's plaintext; a retry on the outer one (it waits
     * for its socket) is a retry on the inner one. BIO_NOCLOSE: the loop frees
     * the outer SSL* itself, after the inner one. */
    BIO *bio = BIO_new(BIO_f_ssl());
    if (bio == NULL)
        goto fail;
    BIO_set_ssl(bio, outer, BIO_NOCLOSE);
    SSL_set_bio(ssl, bio, bio);  /* one BIO both ways: one reference taken */
    SSL_set_accept_state(ssl);
    return (uintptr_t)ssl;
fail:
    SSL_free(ssl);
    return 0;
}

/* ------------------------------------------------------------------ client side */

static int elb_new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    elb_client *st = elb_client_of(SSL_get_SSL_CTX(ssl));
    const char *host = SSL_get_ex_data(ssl, elb_ssl_name_idx);
    if (st == NULL || host == NULL || !SSL_SESSION_is_resumable(sess))
        return 0;
    /* the map takes our reference; returning 1 tells OpenSSL we kept it */
    return elb_map_put(&st->sessions, host, sess, 0);
}

SSL_CTX *elb_client_ctx_new(size_t cache_size)
{
    if (!elb_init())
        return NULL;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL)
        return NULL;
    elb_client *st = calloc(1, sizeof(*st));
    if (st == NULL || !elb_map_init(&st->sessions, cache_size, elb_release_session)) {
        free(st);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (!SSL_CTX_set_ex_data(ctx, elb_client_idx, st)) {
        elb_map_free(&st->sessions);
        free(st);
        SSL_CTX_free(ctx);
        return NULL;
    }
    elb_common(ctx);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_set_alpn_protos(ctx, ELB_ALPN, sizeof(ELB_ALPN) - 1) != 0) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, elb_new_session_cb);
    return ctx;
}

/* The default paths (SSL_CERT_FILE, SSL_CERT_DIR, OpenSSL's OPENSSLDIR) and then, as
 * a fallback for a libssl built elsewhere, the system bundle the caller found. A
 * missing fallback file is not an error. */
int elb_client_ctx_load_defaults(SSL_CTX *ctx, const char *cafile, const char *capath)
{
    int ok = SSL_CTX_set_default_verify_paths(ctx);
    if (cafile != NULL && *cafile != '\0')
        ok |= SSL_CTX_load_verify_locations(ctx, cafile, NULL);
    if (capath != NULL && *capath != '\0')
        ok |= SSL_CTX_load_verify_locations(ctx, NULL, capath);
    ERR_clear_error();
    return ok;
}

static int elb_is_ip(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

uintptr_t elb_client_ssl(SSL_CTX *ctx, int fd, const char *host)
{
    if (!elb_init())
        return 0;
    char bare[ELB_NAME_MAX + 3];
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']')
        host++, n -= 2;
    if (n == 0 || n > ELB_NAME_MAX)
        return 0;
    memcpy(bare, host, n);
    bare[n] = '\0';
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL)
        return 0;
    if (!elb_set_name(ssl, bare) || SSL_set_fd(ssl, fd) != 1)
        goto fail;
    if (elb_is_ip(bare)) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), bare) != 1)
            goto fail;
    } else {
        if (SSL_set_tlsext_host_name(ssl, bare) != 1 || SSL_set1_host(ssl, bare) != 1)
            goto fail;
        SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    }
    elb_client *st = elb_client_of(ctx);
    elb_entry *e = st == NULL ? NULL : elb_map_get(&st->sessions, bare);
    if (e != NULL) {
        SSL_SESSION *sess = e->val;
        if (SSL_set_session(ssl, sess) != 1)
            ERR_clear_error();  /* a full handshake, then */
        if (SSL_SESSION_get_protocol_version(sess) >= TLS1_3_VERSION)
            elb_map_drop(&st->sessions, e);  /* tickets are single use */
    }
    SSL_set_connect_state(ssl);
    return (uintptr_t)ssl;
fail:
    SSL_free(ssl);
    return 0;
}

size_t elb_client_sessions(SSL_CTX *ctx)
{
    elb_client *st = elb_client_of(ctx);
    return st == NULL ? 0 : st->sessions.count;
}

/* ------------------------------------------------------------------ failures */

/* Why a handshake failed: the verify result in *verify_result, the text in `out`,
 * the first error of the queue returned (0 if none). Clears the queue. */
unsigned long elb_ssl_failure(SSL *ssl, long *verify_result, char *out, size_t cap)
{
    long vr = ssl == NULL ? X509_V_OK : SSL_get_verify_result(ssl);
    unsigned long code = ERR_get_error();
    *verify_result = vr;
    if (cap == 0)
        goto done;
    out[0] = '\0';
    if (vr != X509_V_OK) {
        snprintf(out, cap, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    } else if (code != 0) {
        const char *reason = ERR_reason_error_string(code);
        if (reason != NULL)
            snprintf(out, cap, "%s", reason);
        else
            ERR_error_string_n(code, out, cap);
    } else {
        snprintf(out, cap, "the connection closed during the handshake");
    }
done:
    ERR_clear_error();
    return code;
}
