/* elbasy data plane: small C helpers the Cython loop calls.
 *
 * Everything here is non-blocking, never raises, and reports failure as an
 * errno value so the loop decides what the peer sees (docs/design.md §7).
 */
#ifndef ELBASY_IO_H
#define ELBASY_IO_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static inline int64_t elb_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void elb_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Make the coming close() a reset, not an orderly end: used when the other
 * side of a tunnel reset (the reset travels on) or an exchange is abandoned. */
static inline void elb_set_reset(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Start a non-blocking connect to a numeric address. Returns 0 with *out_fd
 * set, or an errno with no fd left open. *connected says whether the
 * handshake is already done: on loopback and other near peers it finishes
 * inside connect(), and then the loop need not wait a wake-up for it. */
static inline int elb_connect(int family, const char *ip, int port, int *out_fd, int *connected)
{
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof(ss));
    if (family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, ip, &s6->sin6_addr) != 1)
            return EINVAL;
        len = sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1)
            return EINVAL;
        len = sizeof(*s4);
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    elb_nodelay(fd);
    *connected = 0;
    if (connect(fd, (struct sockaddr *)&ss, len) == 0) {
        *connected = 1;
    } else if (errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        return err;
    } else {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof(peer);
        *connected = getpeername(fd, (struct sockaddr *)&peer, &plen) == 0;
    }
    *out_fd = fd;
    return 0;
}

static inline int elb_socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

/* Format a peer address as "ip:port" (IPv6 as "[ip]:port"). */
static inline int elb_format_peer(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
        return snprintf(out, cap, "[%s]:%u", ip, ntohs(s6->sin6_port));
    }
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
    return snprintf(out, cap, "%s:%u", ip, ntohs(s4->sin_port));
}

/* Where a client redirected to a --transparent listener (iptables REDIRECT
 * or DNAT) meant to connect, as "address:port" in out (elb_format_peer's
 * form). Returns its length, or 0 when the connection was not redirected
 * (its destination is the listener's own address) or the kernel keeps no
 * record of it (no conntrack). SO_ORIGINAL_DST is netfilter's option, 80 at
 * SOL_IP, and IP6T_SO_ORIGINAL_DST 80 at SOL_IPV6 (linux/netfilter_ipv4.h
 * and netfilter_ipv6/ip6_tables.h). */
#define ELB_SO_ORIGINAL_DST 80

static inline int elb_original_dst(int fd, char *out, size_t cap)
{
    struct sockaddr_storage here, meant;
    socklen_t hlen = sizeof(here), mlen = sizeof(meant);
    memset(&meant, 0, sizeof(meant));
    if (getsockname(fd, (struct sockaddr *)&here, &hlen) != 0)
        return 0;
    if (here.ss_family == AF_INET6) {
        if (getsockopt(fd, SOL_IPV6, ELB_SO_ORIGINAL_DST, &meant, &mlen) != 0)
            return 0;
        meant.ss_family = AF_INET6;
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&here;
        const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)&meant;
        if (a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, 16) == 0)
            return 0;
    } else {
        if (getsockopt(fd, SOL_IP, ELB_SO_ORIGINAL_DST, &meant, &mlen) != 0)
            return 0;
        meant.ss_family = AF_INET;
        const struct sockaddr_in *a = (const struct sockaddr_in *)&here;
        const struct sockaddr_in *b = (const struct sockaddr_in *)&meant;
        if (a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr)
            return 0;
    }
    return elb_format_peer(&meant, out, cap);
}

/* A full memory barrier: a worker's own count, stored, is seen by the other
 * workers before it reads theirs (the connection limits: each of two workers
 * that take a connection at once then sees the other's). */
static inline void elb_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* A client's address as a short key (family byte, then its 4 or 16 bytes):
 * what the per-client connection count is kept by. Returns its length. */
static inline int elb_peer_key(const struct sockaddr_storage *ss, unsigned char *out)
{
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        out[0] = 6;
        memcpy(out + 1, &s6->sin6_addr, 16);
        return 17;
    }
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
    out[0] = 4;
    memcpy(out + 1, &s4->sin_addr, 4);
    return 5;
}

/* Where a request head ends: offset just past the blank line, or -1.
 * Scans from `from` so a head arriving in pieces is scanned once. */
static inline long elb_head_end(const char *buf, size_t len, size_t from)
{
    size_t i = from > 3 ? from - 3 : 0;
    for (; i + 1 < len; i++) {
        const char *p = memchr(buf + i, '\n', len - i);
        if (p == NULL)
            return -1;
        i = (size_t)(p - buf);
        if (i + 1 < len && buf[i + 1] == '\n')
            return (long)(i + 2);
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return (long)(i + 3);
    }
    return -1;
}

/* ---- chunked framing -------------------------------------------------
 * The relay forwards chunked bodies byte for byte; it only needs to know
 * where the message ends and to refuse malformed framing (RFC 9112 §7.1).
 * llhttp validates heads in the policy plane; this tracks body boundaries
 * in the data plane so bodies never cross into Python.
 *
 * Each chunk line is held to the grammar:
 *   chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG,
 *   chunk-ext = *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )
 * and each trailer line to field-name ":" OWS field-value OWS (a token, then
 * SP, HTAB, visible bytes and obs-text). Anything else is bad framing: what
 * a lenient next hop would read differently is refused, never relayed.
 *
 * The trailer section is validated and then left out: only the blank line
 * that ends the message is passed on. elbasy strips the Trailer header and
 * the client's TE, and a trailer may name Content-Length, Transfer-Encoding
 * or Host, which a next hop that merges trailers into the head would trust
 * (RFC 9110 §6.5.1 lets a recipient discard trailers).
 */
enum {
    CH_SIZE = 0, CH_SIZE_ANY, CH_EXT_BWS, CH_EXT_NAME_PRE, CH_EXT_NAME, CH_EXT_NAME_BWS,
    CH_EXT_VALUE_PRE, CH_EXT_TOKEN, CH_EXT_QUOTED, CH_EXT_QUOTED_PAIR, CH_EXT_AFTER,
    CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF,
    CH_TRAILER_START, CH_TRAILER_NAME, CH_TRAILER_VALUE, CH_TRAILER_LF, CH_END_LF, CH_DONE
};

typedef struct {
    int state;
    uint64_t remaining;
} elb_chunked;

static inline int elb_hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* tchar (RFC 9110 §5.6.2) */
static inline int elb_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* SP, HTAB, VCHAR or obs-text: what a field value or a quoted pair may hold */
static inline int elb_vbyte(unsigned char c)
{
    return c == ' ' || c == '\t' || (c >= 0x21 && c != 0x7f);
}

/* Consume up to len bytes of buf. Returns the bytes that belong to the
 * message (== len unless the message ended inside the buffer), or -1 on bad
 * framing; *kept is how many of them to pass on, moved to the front of buf
 * (fewer than returned once trailer lines are left out). st->state ==
 * CH_DONE once the last chunk and trailers are through. */
static inline long elb_chunked_scan(elb_chunked *st, char *buf, size_t len, size_t *kept)
{
    size_t i = 0, w = 0;
    while (i < len && st->state != CH_DONE) {
        unsigned char c = (unsigned char)buf[i];
        int keep = 1;
        switch (st->state) {
        case CH_SIZE:
        case CH_SIZE_ANY: {
            int v = elb_hexval((char)c);
            if (v >= 0) {
                if (st->remaining >> 59) return -1; /* absurd size */
                st->remaining = st->remaining * 16 + (uint64_t)v;
                st->state = CH_SIZE_ANY;
            } else if (st->state == CH_SIZE) {
                return -1;
            } else if (c == ';') {
                st->state = CH_EXT_NAME_PRE;
            } else if (c == ' ' || c == '\t') {
                st->state = CH_EXT_BWS;
            } else if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else {
                return -1;
            }
            break;
        }
        case CH_EXT_BWS: /* whitespace that must lead to ";" */
        case CH_EXT_AFTER: /* just past a quoted value */
            if (c == ';') st->state = CH_EXT_NAME_PRE;
            else if (c == ' ' || c == '\t') st->state = CH_EXT_BWS;
            else if (c == '\r' && st->state == CH_EXT_AFTER) st->state = CH_SIZE_LF;
            else return -1;
            break;
        case CH_EXT_NAME_PRE:
            if (elb_tchar(c)) st->state = CH_EXT_NAME;
            else if (c != ' ' && c != '\t') return -1;
            break;
        case CH_EXT_NAME:
        case CH_EXT_NAME_BWS:
            if (elb_tchar(c) && st->state == CH_EXT_NAME) break;
            if (c == '=') st->state = CH_EXT_VALUE_PRE;
            else if (c == ';') st->state = CH_EXT_NAME_PRE;
            else if (c == ' ' || c == '\t') st->state = CH_EXT_NAME_BWS;
            else if (c == '\r' && st->state == CH_EXT_NAME) st->state = CH_SIZE_LF;
            else return -1;
            break;
        case CH_EXT_VALUE_PRE:
            if (elb_tchar(c)) st->state = CH_EXT_TOKEN;
            else if (c == '"') st->state = CH_EXT_QUOTED;
            else if (c != ' ' && c != '\t') return -1;
            break;
        case CH_EXT_TOKEN:
            if (elb_tchar(c)) break;
            if (c == ';') st->state = CH_EXT_NAME_PRE;
            else if (c == ' ' || c == '\t') st->state = CH_EXT_BWS;
            else if (c == '\r') st->state = CH_SIZE_LF;
            else return -1;
            break;
        case CH_EXT_QUOTED:
            if (c == '"') st->state = CH_EXT_AFTER;
            else if (c == '\\') st->state = CH_EXT_QUOTED_PAIR;
            else if (!elb_vbyte(c)) return -1;
            break;
        case CH_EXT_QUOTED_PAIR:
            if (!elb_vbyte(c)) return -1;
            st->state = CH_EXT_QUOTED;
            break;
        case CH_SIZE_LF:
            if (c != '\n') return -1;
            st->state = st->remaining ? CH_DATA : CH_TRAILER_START;
            break;
        case CH_DATA: {
            size_t take = len - i;
            if (take > st->remaining) take = (size_t)st->remaining;
            st->remaining -= take;
            if (w != i) memmove(buf + w, buf + i, take);
            i += take;
            w += take;
            if (st->remaining == 0) st->state = CH_DATA_CR;
            continue;
        }
        case CH_DATA_CR:
            if (c != '\r') return -1;
            st->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (c != '\n') return -1;
            st->state = CH_SIZE;
            break;
        case CH_TRAILER_START:
            /* a bare LF or other stray byte would end the message early for
             * a lenient next hop: refused rather than let one request hide
             * another */
            if (c == '\r') st->state = CH_END_LF;
            else if (elb_tchar(c)) { st->state = CH_TRAILER_NAME; keep = 0; }
            else return -1;
            break;
        case CH_TRAILER_NAME:
            keep = 0;
            if (c == ':') st->state = CH_TRAILER_VALUE;
            else if (!elb_tchar(c)) return -1;
            break;
        case CH_TRAILER_VALUE:
            keep = 0;
            if (c == '\r') st->state = CH_TRAILER_LF;
            else if (!elb_vbyte(c)) return -1;
            break;
        case CH_TRAILER_LF:
            keep = 0;
            if (c != '\n') return -1;
            st->state = CH_TRAILER_START;
            break;
        case CH_END_LF:
            if (c != '\n') return -1;
            st->state = CH_DONE;
            break;
        }
        if (keep) buf[w++] = (char)c;
        i++;
    }
    *kept = w;
    return (long)i;
}

/* ---- the server name of a TLS ClientHello (a --transparent listener) ----
 *
 * A client sent to elbasy by DNS, /etc/hosts or a REDIRECT rule opens with
 * a ClientHello, and its server_name says where it meant to go. The loop
 * keeps every byte it read (they go on to OpenSSL, or to the upstream of a
 * spliced connection), so this only reads: it gathers the handshake message
 * from the records it came in (usually one) and walks its fields by the
 * lengths RFC 8446 §4.1.2 and RFC 6066 §3 give them.
 *
 * Returns ELB_HELLO_NAME with the host_name's bytes at out[0..*out_len)
 * (1 to 255 printable ASCII bytes, not terminated), ELB_HELLO_MORE when the
 * ClientHello is not all here yet, ELB_HELLO_NO_NAME for a whole one that
 * names no host, ELB_HELLO_BAD for bytes that are not a ClientHello (or one
 * longer than ELB_HELLO_MAX bytes). */
enum {
    ELB_HELLO_NAME = 1,
    ELB_HELLO_MORE = 0,
    ELB_HELLO_NO_NAME = -1,
    ELB_HELLO_BAD = -2,
};
#define ELB_HELLO_MAX 16384

static inline int elb_hello_name(const unsigned char *buf, size_t len,
                                 unsigned char *out, size_t *out_len)
{
    unsigned char msg[ELB_HELLO_MAX];
    size_t have = 0, want = 0, at = 0;
    /* gather the handshake message's bytes out of the records */
    while (1) {
        if (len - at < 5)
            return ELB_HELLO_MORE;
        const unsigned char *rec = buf + at;
        size_t rlen = ((size_t)rec[3] << 8) | rec[4];
        if (rec[0] != 0x16 || rec[1] != 0x03 || rlen == 0 || rlen > 16384)
            return ELB_HELLO_BAD;  /* not a handshake record */
        size_t avail = len - at - 5;
        size_t take = avail < rlen ? avail : rlen;
        if (take > ELB_HELLO_MAX - have)
            take = ELB_HELLO_MAX - have;
        memcpy(msg + have, rec + 5, take);
        have += take;
        if (want == 0 && have >= 4) {
            if (msg[0] != 0x01)  /* handshake type client_hello */
                return ELB_HELLO_BAD;
            want = 4 + (((size_t)msg[1] << 16) | ((size_t)msg[2] << 8) | msg[3]);
            if (want > ELB_HELLO_MAX || want < 4 + 2 + 32 + 1 + 2 + 1)
                return ELB_HELLO_BAD;
        }
        if (want != 0 && have >= want)
            break;
        if (avail < rlen)
            return ELB_HELLO_MORE;  /* the rest of this record is on its way */
        at += 5 + rlen;
    }
    const unsigned char *p = msg + 4 + 2 + 32;  /* legacy_version, random */
    const unsigned char *end = msg + want;
    size_t n;
#define ELB_HELLO_SKIP(bytes)                                      \
    do {                                                           \
        if ((size_t)(end - p) < (bytes)) return ELB_HELLO_BAD;     \
        p += (bytes);                                              \
    } while (0)
    n = p[0];                                                      /* session id */
    ELB_HELLO_SKIP(1);
    ELB_HELLO_SKIP(n);
    if (end - p < 2) return ELB_HELLO_BAD;
    n = ((size_t)p[0] << 8) | p[1];                                /* cipher suites */
    if (n < 2 || n % 2) return ELB_HELLO_BAD;
    ELB_HELLO_SKIP(2);
    ELB_HELLO_SKIP(n);
    if (end - p < 1) return ELB_HELLO_BAD;
    n = p[0];                                                      /* compressions */
    if (n < 1) return ELB_HELLO_BAD;
    ELB_HELLO_SKIP(1);
    ELB_HELLO_SKIP(n);
    if (p == end)
        return ELB_HELLO_NO_NAME;                                  /* no extensions */
    if (end - p < 2) return ELB_HELLO_BAD;
    n = ((size_t)p[0] << 8) | p[1];
    ELB_HELLO_SKIP(2);
    if ((size_t)(end - p) != n) return ELB_HELLO_BAD;
    while (end - p >= 4) {
        size_t type = ((size_t)p[0] << 8) | p[1];
        size_t elen = ((size_t)p[2] << 8) | p[3];
        ELB_HELLO_SKIP(4);
        if ((size_t)(end - p) < elen) return ELB_HELLO_BAD;
        if (type == 0) {                                           /* server_name */
            const unsigned char *q = p, *qend = p + elen;
            if (qend - q < 2 || (((size_t)q[0] << 8) | q[1]) != elen - 2)
                return ELB_HELLO_BAD;
            q += 2;
            while (qend - q >= 3) {
                size_t ntype = q[0], nlen = ((size_t)q[1] << 8) | q[2];
                q += 3;
                if ((size_t)(qend - q) < nlen) return ELB_HELLO_BAD;
                if (ntype == 0) {                                  /* host_name */
                    if (nlen == 0 || nlen > 255) return ELB_HELLO_BAD;
                    for (size_t i = 0; i < nlen; i++)
                        if (q[i] <= 0x20 || q[i] >= 0x7f) return ELB_HELLO_BAD;
                    memcpy(out, q, nlen);
                    *out_len = nlen;
                    return ELB_HELLO_NAME;
                }
                q += nlen;
            }
            return q == qend ? ELB_HELLO_NO_NAME : ELB_HELLO_BAD;
        }
        p += elen;
    }
#undef ELB_HELLO_SKIP
    return p == end ? ELB_HELLO_NO_NAME : ELB_HELLO_BAD;
}

#endif
