/* alpc native fast path. This header is also the cffi cdef: keep it free of
 * macros other than the include guard, which build_ffi.py strips. */
#ifndef ALPC_NATIVE_H
#define ALPC_NATIVE_H

#include <stddef.h>
#include <stdint.h>

enum {
    ALPC_HEADER_SIZE = 40,
    ALPC_E_MAGIC = -1,
    ALPC_E_VERSION = -2,
    ALPC_E_TYPE = -3,
    ALPC_E_FLAGS = -4,
    ALPC_E_RESERVED = -5,
    ALPC_E_DATA = -6,
    ALPC_E_ATTR = -7,
    ALPC_E_FDS = -8,
    ALPC_E_ARGS = -9,
    ALPC_E_ATTR_KIND = -10,
    ALPC_E_ATTR_LENGTH = -11,
    ALPC_E_ATTR_DUP = -12,
    ALPC_E_ATTR_TRUNC = -13,
    ALPC_E_ATTR_VALUE = -14,
    ALPC_E_RANGE = -15,
    ALPC_E_TIMEOUT = -16,
    ALPC_E_WATCH = -17
};

/* Attribute kinds and their fixed value sizes (mirrored by wire.AttrKind). */
enum {
    ALPC_ATTR_SECTION_REF = 1,
    ALPC_ATTR_SECTION_NEW = 2,
    ALPC_ATTR_GRANT = 3,
    ALPC_ATTR_RANGE = 4,
    ALPC_ATTR_DEADLINE = 5,
    ALPC_REF_SIZE = 24,
    ALPC_NEW_SIZE = 16,
    ALPC_GRANT_SIZE = 24,
    ALPC_RANGE_SIZE = 16,
    ALPC_DEADLINE_SIZE = 8,
    ALPC_SECTION_FLAGS = 3,
    ALPC_ACCESS_FLAGS = 3
};

typedef struct {
    uint32_t max_data;
    uint32_t max_attr;
    uint64_t type_mask;
    uint32_t flag_mask;
    uint32_t max_fds;
} alpc_limits;

/* The attributes of one frame; bit k of present is set when kind k was seen. */
typedef struct {
    uint32_t present;
    uint32_t ref_section;
    uint32_t ref_flags;
    uint64_t ref_offset;
    uint64_t ref_length;
    uint32_t new_section;
    uint32_t new_flags;
    uint64_t new_size;
    uint64_t grant_address;
    uint64_t grant_length;
    uint32_t grant_access;
    uint64_t range_offset;
    uint64_t range_length;
    uint64_t deadline_ns;
} alpc_attrs;

/* Walk the frames in buf[start:len], validating every header (including the
 * header of a trailing incomplete frame) against lim. Stores the end offset of
 * each complete frame in ends[0..*count), at most cap of them. Returns 0, or a
 * negative ALPC_E_* code for the first invalid header (frames before it are
 * still reported in ends/count). */
int alpc_scan_frames(const uint8_t *buf, size_t len, size_t start,
                     const alpc_limits *lim, size_t *ends, size_t cap,
                     size_t *count);

/* Parse a frame's attribute area (TLVs: kind u16, length u16, value) into out.
 * allowed has bit k set for each kind this frame type may carry. Returns 0 or
 * ALPC_E_ATTR_* for an unknown/forbidden kind, a wrong length, a duplicate, a
 * truncated TLV, or unknown flag / non-zero reserved bits in a value. */
int alpc_parse_attrs(const uint8_t *buf, size_t len, uint32_t allowed, alpc_attrs *out);

/* 0 when 0 < length <= max_length and [offset, offset + length) lies inside
 * [0, size), computed without overflow; ALPC_E_RANGE otherwise. */
int alpc_check_range(uint64_t offset, uint64_t length, uint64_t size, uint64_t max_length);

/* memcpy; cffi releases the GIL around it, so large copies run in parallel. */
void alpc_copy(void *dst, const void *src, size_t n);

/* memcpy into a freshly allocated destination: when it is large, first ask
 * for transparent huge pages on its 2 MiB-aligned interior (MADV_HUGEPAGE;
 * refused advice is ignored), so it faults in 512 times fewer pages. */
void alpc_copy_fresh(void *dst, const void *src, size_t n);

/* Move len bytes between local and the grant [base, base + grant_len) of
 * process pid, starting offset bytes into the grant (process_vm_readv /
 * process_vm_writev, retried on partial transfers). The range is checked
 * against the grant first. Returns the bytes moved, ALPC_E_RANGE, or -errno
 * (-EPERM when the kernel refuses access to pid). */
int64_t alpc_vm_read(int32_t pid, uint64_t base, uint64_t grant_len, uint64_t offset,
                     void *local, size_t len);
int64_t alpc_vm_write(int32_t pid, uint64_t base, uint64_t grant_len, uint64_t offset,
                      const void *local, size_t len);

/* One non-blocking send of buf[0..len) (MSG_DONTWAIT | MSG_NOSIGNAL) on a
 * connected stream socket. Returns the bytes written (maybe fewer than len),
 * or -errno (-EAGAIN when the socket buffer is full). */
int64_t alpc_sock_send(int fd, const uint8_t *buf, size_t len);

/* Bytes fd's send buffer still takes before a write waits: SO_SNDBUF less
 * SIOCOUTQ (both in the kernel's accounting, its overhead per buffer
 * included), 0 when full, or -errno. */
int64_t alpc_send_room(int fd);

/* What alpc_sock_wait_recv says of a read besides its bytes. */
enum {
    ALPC_RECV_CRED = 1,          /* it carried SCM_CREDENTIALS (now in cred[0..3)) */
    ALPC_RECV_CRED_CHANGED = 2,  /* ... which differ from what cred[] held before */
    ALPC_RECV_TRUNCATED = 4,     /* more fds than max_fds came (MSG_CTRUNC): all were closed */
    ALPC_RECV_WATCHED = 8,       /* a watched fd was ready too */
    ALPC_RECV_NOFILE = 16        /* ... truncated because this process could not take the fds
                                  * (its fd table is full: EMFILE), not by the sender's count */
};

/* Wait until fd, or watch / watch2 when >= 0 (a peer's pidfd, a multiplexer's
 * epoll set and link), is readable, for
 * up to timeout_ms (-1: no limit); then one non-blocking recvmsg on fd into
 * buf[0..cap), keeping up to max_fds (at most 256) passed fds (SCM_RIGHTS) in
 * fds[0..*nfds); more than max_fds, or a truncated set, are all closed and
 * flagged ALPC_RECV_TRUNCATED. The sender's SCM_CREDENTIALS (pid, uid, gid)
 * go to cred[0..3), which holds the last ones seen on this socket: *flags
 * says whether they came and whether they changed; cred[3] gets the bytes
 * read (0: none), so that a caller whose signal handler raised as the call
 * returned (CPython runs it then) can still take them. Returns the bytes read
 * (0 at end of stream), ALPC_E_TIMEOUT, ALPC_E_WATCH when only the watched fd
 * fired (ALPC_RECV_WATCHED in *flags when one fired beside fd), or -errno
 * (-EAGAIN: woken, or timeout_ms 0, and nothing to read;
 * -EINTR: a signal arrived, so Python can run its handlers). With timeout_ms
 * 0 it does not poll at all (nor look at watch): just the recvmsg. With spin_us > 0 (at most
 * ALPC_MAX_SPIN_US) and a timeout other than 0, it first polls without
 * sleeping for up to spin_us, yielding the CPU between polls: a reply from a
 * peer on another CPU then lands on a CPU that is awake (no wake-up to pay),
 * and a peer on the same CPU runs while this one yields. */
enum { ALPC_MAX_SPIN_US = 1000 };
int64_t alpc_sock_wait_recv(int fd, int watch, int watch2, int timeout_ms, int spin_us, uint8_t *buf, size_t cap,
                            int *fds, int max_fds, int *nfds, int32_t *cred, int *flags);

/* Wait until the epoll set epfd has an event, or watch is readable when
 * watch >= 0 (a fd kept outside the set), for up to timeout_ms (-1: no
 * limit), spinning first for up to spin_us as alpc_sock_wait_recv does. Then
 * takes the set's ready events without sleeping: their fds (epoll data.fd)
 * go to ready[0..n), at most max_ready (at most ALPC_MAX_READY) of them, and
 * *watch_fired says whether watch fired. Returns n (0 when only watch
 * fired), ALPC_E_TIMEOUT, or -errno (-EINTR: a signal arrived). */
enum { ALPC_MAX_READY = 256 };
int alpc_epoll_wait(int epfd, int watch, int timeout_ms, int spin_us, int *ready, int max_ready,
                    int *watch_fired);

/* Hash of the sources this library was built from, to detect a stale build. */
const char *alpc_source_hash(void);

#endif
