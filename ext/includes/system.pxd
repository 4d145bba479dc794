# The kernel and libc calls of the loop, declared once: epoll, sockets,
# pipes and splice(2), fds. Only what the loop calls is named here; how each
# call can fail is commented where the loop handles it.

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLEXCLUSIVE


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass

    struct sockaddr_storage:
        unsigned short ss_family

    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        MSG_PEEK
        MSG_DONTWAIT
        SHUT_WR
        ECONNABORTED
        ENOBUFS
        ENOMEM


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t n,
                   unsigned int flags)
    int pipe2(int *fds, int flags)
    int fcntl(int fd, int cmd, ...)
    int open(const char *path, int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        O_RDONLY


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t n)
