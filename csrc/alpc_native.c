/* alpc native fast path: bounds-checked parsing of peer-supplied frames,
 * section copies and direct access to a client's granted memory. */
#define _GNU_SOURCE
#include "alpc_native.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef ALPC_SOURCE_HASH
#error "build_ffi.py defines ALPC_SOURCE_HASH"
#endif

#define ALPC_MAGIC 0xA1C5u
#define ALPC_VERSION 1u

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

/* Header offsets, mirrored by wire.HEADER. */
enum {
    OFF_MAGIC = 0, OFF_VERSION = 2, OFF_TYPE = 3, OFF_FLAGS = 4,
    OFF_DATA_LEN = 8, OFF_ATTR_LEN = 12, OFF_NFDS = 32, OFF_RES16 = 34,
    OFF_RES32 = 36
};

static int check_header(const uint8_t *h, const alpc_limits *lim, size_t *frame_len)
{
    uint8_t type = h[OFF_TYPE];
    uint32_t data_len = le32(h + OFF_DATA_LEN);
    uint32_t attr_len = le32(h + OFF_ATTR_LEN);

    if (le16(h + OFF_MAGIC) != ALPC_MAGIC)
        return ALPC_E_MAGIC;
    if (h[OFF_VERSION] != ALPC_VERSION)
        return ALPC_E_VERSION;
    if (type >= 64 || !((lim->type_mask >> type) & 1u))
        return ALPC_E_TYPE;
    if (le32(h + OFF_FLAGS) & ~lim->flag_mask)
        return ALPC_E_FLAGS;
    if (le16(h + OFF_RES16) != 0 || le32(h + OFF_RES32) != 0)
        return ALPC_E_RESERVED;
    if (data_len > lim->max_data)
        return ALPC_E_DATA;
    if (attr_len > lim->max_attr)
        return ALPC_E_ATTR;
    if (le16(h + OFF_NFDS) > lim->max_fds)
        return ALPC_E_FDS;
    /* Both lengths are 32-bit, so the sum cannot overflow a 64-bit size_t. */
    *frame_len = (size_t)ALPC_HEADER_SIZE + attr_len + data_len;
    return 0;
}

int alpc_scan_frames(const uint8_t *buf, size_t len, size_t start,
                     const alpc_limits *lim, size_t *ends, size_t cap,
                     size_t *count)
{
    size_t pos = start;
    size_t n = 0;

    if (count == NULL)
        return ALPC_E_ARGS;
    *count = 0;
    if (buf == NULL || lim == NULL || ends == NULL || start > len)
        return ALPC_E_ARGS;
    while (n < cap && len - pos >= ALPC_HEADER_SIZE) {
        size_t frame_len = 0;
        int rc = check_header(buf + pos, lim, &frame_len);
        if (rc != 0) {
            *count = n;
            return rc;
        }
        if (len - pos < frame_len)
            break;
        pos += frame_len;
        ends[n++] = pos;
    }
    *count = n;
    return 0;
}

static size_t attr_size(uint16_t kind)
{
    switch (kind) {
    case ALPC_ATTR_SECTION_REF: return ALPC_REF_SIZE;
    case ALPC_ATTR_SECTION_NEW: return ALPC_NEW_SIZE;
    case ALPC_ATTR_GRANT: return ALPC_GRANT_SIZE;
    case ALPC_ATTR_RANGE: return ALPC_RANGE_SIZE;
    case ALPC_ATTR_DEADLINE: return ALPC_DEADLINE_SIZE;
    default: return 0;
    }
}

/* Store one attribute value (its length already checked) into out. */
static int store_attr(uint16_t kind, const uint8_t *v, alpc_attrs *out)
{
    switch (kind) {
    case ALPC_ATTR_SECTION_REF:
        out->ref_section = le32(v);
        out->ref_flags = le32(v + 4);
        out->ref_offset = le64(v + 8);
        out->ref_length = le64(v + 16);
        return (out->ref_flags & ~(uint32_t)ALPC_SECTION_FLAGS) ? ALPC_E_ATTR_VALUE : 0;
    case ALPC_ATTR_SECTION_NEW:
        out->new_section = le32(v);
        out->new_flags = le32(v + 4);
        out->new_size = le64(v + 8);
        return (out->new_flags & ~(uint32_t)ALPC_SECTION_FLAGS) ? ALPC_E_ATTR_VALUE : 0;
    case ALPC_ATTR_GRANT:
        out->grant_address = le64(v);
        out->grant_length = le64(v + 8);
        out->grant_access = le32(v + 16);
        if (le32(v + 20) != 0 || (out->grant_access & ~(uint32_t)ALPC_ACCESS_FLAGS))
            return ALPC_E_ATTR_VALUE;
        return 0;
    case ALPC_ATTR_DEADLINE:
        out->deadline_ns = le64(v);
        return 0;
    default: /* ALPC_ATTR_RANGE: attr_size() admitted no other kind */
        out->range_offset = le64(v);
        out->range_length = le64(v + 8);
        return 0;
    }
}

int alpc_parse_attrs(const uint8_t *buf, size_t len, uint32_t allowed, alpc_attrs *out)
{
    size_t pos = 0;

    if (out == NULL || (buf == NULL && len != 0))
        return ALPC_E_ARGS;
    memset(out, 0, sizeof(*out));
    while (pos < len) {
        uint16_t kind, vlen;
        int rc;

        if (len - pos < 4)
            return ALPC_E_ATTR_TRUNC;
        kind = le16(buf + pos);
        vlen = le16(buf + pos + 2);
        pos += 4;
        if (kind >= 32 || !((allowed >> kind) & 1u) || attr_size(kind) == 0)
            return ALPC_E_ATTR_KIND;
        if (vlen != attr_size(kind))
            return ALPC_E_ATTR_LENGTH;
        if (len - pos < vlen)
            return ALPC_E_ATTR_TRUNC;
        if (out->present & (1u << kind))
            return ALPC_E_ATTR_DUP;
        out->present |= 1u << kind;
        rc = store_attr(kind, buf + pos, out);
        if (rc != 0)
            return rc;
        pos += vlen;
    }
    return 0;
}

int alpc_check_range(uint64_t offset, uint64_t length, uint64_t size, uint64_t max_length)
{
    if (length == 0 || length > max_length || offset > size || length > size - offset)
        return ALPC_E_RANGE;
    return 0;
}

void alpc_copy(void *dst, const void *src, size_t n)
{
    if (n != 0)
        memcpy(dst, src, n);
}

#define HUGE_PAGE ((uintptr_t)2 << 20)
#define HUGE_WORTH ((size_t)8 << 20)

void alpc_copy_fresh(void *dst, const void *src, size_t n)
{
#ifdef MADV_HUGEPAGE
    if (n >= HUGE_WORTH) {
        uintptr_t start = ((uintptr_t)dst + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
        uintptr_t end = ((uintptr_t)dst + n) & ~(HUGE_PAGE - 1);
        if (end > start)
            (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
    }
#endif
    alpc_copy(dst, src, n);
}

/* Shared by both directions: check the range, then loop over partial moves. */
static int64_t vm_move(int32_t pid, uint64_t base, uint64_t grant_len, uint64_t offset,
                       void *local, size_t len, int write)
{
    size_t done = 0;

    if (local == NULL && len != 0)
        return ALPC_E_ARGS;
    if (offset > grant_len || len > grant_len - offset || base > UINT64_MAX - grant_len)
        return ALPC_E_RANGE;
    while (done < len) {
        struct iovec mine = {(uint8_t *)local + done, len - done};
        struct iovec theirs = {(void *)(uintptr_t)(base + offset + done), len - done};
        ssize_t moved = write ? process_vm_writev(pid, &mine, 1, &theirs, 1, 0)
                              : process_vm_readv(pid, &mine, 1, &theirs, 1, 0);
        if (moved < 0) {
            if (errno == EINTR)
                continue;
            return -(int64_t)errno;
        }
        if (moved == 0)
            return -(int64_t)EFAULT;
        done += (size_t)moved;
    }
    return (int64_t)done;
}

int64_t alpc_vm_read(int32_t pid, uint64_t base, uint64_t grant_len, uint64_t offset,
                     void *local, size_t len)
{
    return vm_move(pid, base, grant_len, offset, local, len, 0);
}

int64_t alpc_vm_write(int32_t pid, uint64_t base, uint64_t grant_len, uint64_t offset,
                      const void *local, size_t len)
{
    return vm_move(pid, base, grant_len, offset, (void *)(uintptr_t)local, len, 1);
}

const char *alpc_source_hash(void) { return ALPC_SOURCE_HASH; }

int64_t alpc_sock_send(int fd, const uint8_t *buf, size_t len)
{
    ssize_t n;

    if (buf == NULL && len != 0)
        return ALPC_E_ARGS;
    do {
        n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -(int64_t)errno : (int64_t)n;
}

int64_t alpc_send_room(int fd)
{
    int sndbuf = 0, queued = 0;
    socklen_t len = sizeof(sndbuf);

    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) < 0)
        return -(int64_t)errno;
    if (ioctl(fd, TIOCOUTQ, &queued) < 0)
        return -(int64_t)errno;
    return sndbuf > queued ? (int64_t)sndbuf - queued : 0;
}

/* Kept: up to 1 + 253 fds (a section's fd and SCM_MAX_FD - 1 handles). */
#define ALPC_MAX_RECV_FDS 256

#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

/* Walk a read's control messages: keep its fds (up to ALPC_MAX_RECV_FDS, the
 * rest closed), note its SCM_CREDENTIALS, close any SCM_PIDFD (a channel
 * never asks for one). Returns how many fds were kept in received[]. */
static int take_ancillary(struct msghdr *msg, int *received, int32_t *cred, int *flags)
{
    struct cmsghdr *cmsg;
    int kept = 0;

    for (cmsg = CMSG_FIRSTHDR(msg); cmsg != NULL; cmsg = CMSG_NXTHDR(msg, cmsg)) {
        size_t i, got;
        const unsigned char *data = CMSG_DATA(cmsg);

        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_len < CMSG_LEN(0))
            continue;
        if (cmsg->cmsg_type == SCM_CREDENTIALS) {
            struct ucred uc;

            if (cmsg->cmsg_len < CMSG_LEN(sizeof(uc)))
                continue;
            memcpy(&uc, data, sizeof(uc));
            *flags |= ALPC_RECV_CRED;
            if (cred[0] != (int32_t)uc.pid || cred[1] != (int32_t)uc.uid || cred[2] != (int32_t)uc.gid) {
                cred[0] = (int32_t)uc.pid;
                cred[1] = (int32_t)uc.uid;
                cred[2] = (int32_t)uc.gid;
                *flags |= ALPC_RECV_CRED_CHANGED;
            }
            continue;
        }
        if (cmsg->cmsg_type != SCM_RIGHTS && cmsg->cmsg_type != SCM_PIDFD)
            continue;
        got = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (i = 0; i < got; i++) {
            int one;
            memcpy(&one, data + i * sizeof(int), sizeof(one));
            if (cmsg->cmsg_type == SCM_RIGHTS && kept < ALPC_MAX_RECV_FDS)
                received[kept++] = one;
            else
                close(one);
        }
    }
    return kept;
}

static int64_t monotonic_ns(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* poll() without sleeping for up to spin_us: its result, 0 if nothing came. */
static int spin_poll(struct pollfd *pfd, nfds_t count, int spin_us)
{
    int64_t end = monotonic_ns() + (int64_t)spin_us * 1000;
    int rc;

    for (;;) {
        rc = poll(pfd, count, 0);
        if (rc != 0 || monotonic_ns() >= end)
            return rc;
        sched_yield();
    }
}

/* Wait until pfd[0].fd (for pfd[0].events), or any other of the count fds
 * (for POLLIN), is ready: spin for up to spin_us (timeout_ms != 0), then
 * sleep for what is left of timeout_ms (the spin is part of the timeout, not
 * added to it). poll()'s result (-1 with errno set, 0 on timeout), the
 * revents in pfd. EINTR goes back to Python (as -EINTR), which runs its
 * signal handlers before the caller waits again: a blocked call stays
 * interruptible. */
static int wait_ready(struct pollfd *pfd, nfds_t count, int timeout_ms, int spin_us)
{
    struct timespec left;
    int64_t started, left_ns;
    nfds_t i;
    int rc;

    for (i = 0; i < count; i++)
        pfd[i].revents = 0;
    if (spin_us <= 0 || timeout_ms == 0)
        return poll(pfd, count, timeout_ms);
    if (timeout_ms > 0 && (int64_t)spin_us > (int64_t)timeout_ms * 1000)
        spin_us = timeout_ms * 1000;
    started = monotonic_ns();
    rc = spin_poll(pfd, count, spin_us);
    if (rc != 0 || timeout_ms < 0)
        return rc != 0 ? rc : poll(pfd, count, -1);
    left_ns = (int64_t)timeout_ms * 1000000 - (monotonic_ns() - started);
    if (left_ns <= 0)
        return 0;
    left.tv_sec = (time_t)(left_ns / 1000000000);
    left.tv_nsec = (long)(left_ns % 1000000000);
    return ppoll(pfd, count, &left, NULL);
}

/* The fds to wait for: fd, then those of the watches that are >= 0. */
static nfds_t poll_set(struct pollfd *pfd, int fd, short events, const int *watches, int n_watches)
{
    nfds_t count = 1;
    int i;

    pfd[0].fd = fd;
    pfd[0].events = events;
    for (i = 0; i < n_watches; i++) {
        if (watches[i] >= 0) {
            pfd[count].fd = watches[i];
            pfd[count].events = POLLIN;
            count++;
        }
    }
    return count;
}

int64_t alpc_sock_wait_recv(int fd, int watch, int watch2, int timeout_ms, int spin_us, uint8_t *buf, size_t cap,
                            int *fds, int max_fds, int *nfds, int32_t *cred, int *flags)
{
    struct pollfd pfd[3];
    const int watches[2] = {watch, watch2};
    nfds_t count, i;
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int)) +
                   CMSG_SPACE(sizeof(int) * ALPC_MAX_RECV_FDS)];
    } control;
    struct iovec iov;
    struct msghdr msg;
    ssize_t n;
    int rc, kept, truncated;
    int received[ALPC_MAX_RECV_FDS];

    if (buf == NULL || nfds == NULL || cred == NULL || flags == NULL || (fds == NULL && max_fds > 0) ||
        max_fds < 0 || max_fds > ALPC_MAX_RECV_FDS || spin_us < 0 || spin_us > ALPC_MAX_SPIN_US)
        return ALPC_E_ARGS;
    *nfds = 0;
    *flags = 0;
    cred[3] = 0;
    /* A read that must not wait goes straight to recvmsg: an empty socket
     * answers EAGAIN, and the caller (told by its multiplexer that fd is
     * readable) saves a system call per message. */
    if (timeout_ms != 0) {
        count = poll_set(pfd, fd, POLLIN | POLLPRI, watches, 2);
        rc = wait_ready(pfd, count, timeout_ms, spin_us);
        if (rc < 0)
            return -(int64_t)errno;
        if (rc == 0)
            return ALPC_E_TIMEOUT;
        if (pfd[0].revents == 0)
            return ALPC_E_WATCH;
        for (i = 1; i < count; i++)
            if (pfd[i].revents != 0)
                *flags |= ALPC_RECV_WATCHED;
    }
    iov.iov_base = buf;
    iov.iov_len = cap;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    /* Room for the credentials, a stray pidfd and max_fds fds (at least one):
     * a sender attaching more is truncated by the kernel (MSG_CTRUNC), as
     * with the Python twin, whose buffer is sized the same way. */
    msg.msg_controllen = CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int)) +
                         CMSG_SPACE(sizeof(int) * (size_t)(max_fds > 0 ? max_fds : 1));
    do {
        n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == ECONNRESET ? 0 : -(int64_t)errno;
    kept = take_ancillary(&msg, received, cred, flags);
    /* More than the caller takes, or a truncated set: none is trusted, all are closed. */
    truncated = kept > max_fds || (msg.msg_flags & MSG_CTRUNC);
    /* The buffer holds more than max_fds, so a truncated read with fewer is the kernel
     * failing to install them here (EMFILE): our shortage, not the sender's excess. */
    if ((msg.msg_flags & MSG_CTRUNC) && kept < max_fds)
        *flags |= ALPC_RECV_NOFILE;
    /* fds riding on an empty read (a zero-length record) are closed too, as the Python
     * twin does: a caller treats 0 as the end of the stream and takes no fds then. */
    if (truncated || n == 0) {
        while (kept > 0)
            close(received[--kept]);
    }
    if (truncated)
        *flags |= ALPC_RECV_TRUNCATED;
    if (kept > 0)
        memcpy(fds, received, (size_t)kept * sizeof(int));
    *nfds = kept;
    /* Also where a caller finds it when a signal handler raised as this call returned. */
    cred[3] = (int32_t)n;
    return (int64_t)n;
}

int alpc_epoll_wait(int epfd, int watch, int timeout_ms, int spin_us, int *ready, int max_ready,
                    int *watch_fired)
{
    struct pollfd pfd[2];
    struct epoll_event events[ALPC_MAX_READY];
    nfds_t count;
    int rc, n, i;

    if (ready == NULL || watch_fired == NULL || max_ready < 1 || max_ready > ALPC_MAX_READY || spin_us < 0 ||
        spin_us > ALPC_MAX_SPIN_US)
        return ALPC_E_ARGS;
    *watch_fired = 0;
    /* Polling the set's own fd (rather than epoll_wait on it) lets one wait
     * cover a fd that cannot live in the set. */
    count = poll_set(pfd, epfd, POLLIN, &watch, 1);
    rc = wait_ready(pfd, count, timeout_ms, spin_us);
    if (rc < 0)
        return -errno;
    if (rc == 0)
        return ALPC_E_TIMEOUT;
    *watch_fired = count == 2 && pfd[1].revents != 0;
    if (pfd[0].revents == 0)
        return 0;
    if (pfd[0].revents & POLLNVAL)
        return -EBADF;
    do {
        n = epoll_wait(epfd, events, max_ready, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    for (i = 0; i < n; i++)
        ready[i] = events[i].data.fd;
    return n;
}
