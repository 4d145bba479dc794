# elbasy's socket helpers and HTTP framing scanners (ext/c/elbasy_io.h):
# non-blocking, never raising, failures reported as errno values.

from libc.stdint cimport int64_t, uint64_t

from system cimport sockaddr_storage


cdef extern from "elbasy_io.h" nogil:
    ctypedef struct elb_chunked:
        int state
        uint64_t remaining
    enum:
        CH_DONE
        ELB_HELLO_NAME
        ELB_HELLO_MORE
        ELB_HELLO_NO_NAME
        ELB_HELLO_BAD
        ELB_HELLO_MAX
    int64_t elb_now_ns()
    void elb_nodelay(int fd)
    void elb_set_reset(int fd)
    int elb_connect(int family, const char *ip, int port, int *out_fd, int *connected)
    int elb_socket_error(int fd)
    int elb_format_peer(const sockaddr_storage *ss, char *out, size_t cap)
    int elb_original_dst(int fd, char *out, size_t cap)
    void elb_fence()
    int elb_peer_key(const sockaddr_storage *ss, unsigned char *out)
    long elb_head_end(const char *buf, size_t length, size_t start)
    long elb_chunked_scan(elb_chunked *st, char *buf, size_t length, size_t *kept)
    int elb_hello_name(const unsigned char *buf, size_t length, unsigned char *out,
                       size_t *out_len)
