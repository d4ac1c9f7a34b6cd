/* The C ceiling for the alpc benchmarks: what the machine itself can do.
 *
 *   ceiling MECHANISM PATTERN SIZE REPLY BATCH CLIENT_CPU SERVER_CPU
 *           WARMUP WARMUP_CAP_MS MIN_ITERS MAX_ITERS TIME_CAP_MS [PATH]
 *
 * MECHANISM/PATTERN: memcpy/copy, uds/rr, futex/rr, uds/oneway, uds/connect.
 * Prints one sample per line: nanoseconds per operation. The server half is a
 * forked child pinned to SERVER_CPU that dies with its parent. Every wait has
 * a timeout, so a lost peer ends the run with an error instead of a hang.
 * Built by the harness (benchmarks/native.py) with -Wall -Wextra -Werror.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WAIT_SECONDS 30

struct params {
    const char *mechanism, *pattern, *path;
    size_t size, reply;
    long batch, warmup, min_iters, max_iters;
    int client_cpu, server_cpu;
    uint64_t warmup_cap_ns, time_cap_ns;
};

static void die(const char *what) {
    fprintf(stderr, "ceiling: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(void) {
    fprintf(stderr, "usage: ceiling MECHANISM PATTERN SIZE REPLY BATCH CLIENT_CPU SERVER_CPU "
                    "WARMUP WARMUP_CAP_MS MIN_ITERS MAX_ITERS TIME_CAP_MS [PATH]\n");
    exit(2);
}

static long parse_long(const char *text, long min, long max) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > max) {
        fprintf(stderr, "ceiling: bad number %s\n", text);
        exit(2);
    }
    return value;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
}

static void *alloc_touched(size_t size, int shared) {
    int flags = MAP_ANONYMOUS | (shared ? MAP_SHARED : MAP_PRIVATE);
    void *p = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    memset(p, 0xa5, size);
    return p;
}

static void set_timeouts(int fd) {
    struct timeval tv = {.tv_sec = WAIT_SECONDS, .tv_usec = 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) die("SO_RCVTIMEO");
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) die("SO_SNDTIMEO");
}

static int read_full(int fd, char *buf, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t got = read(fd, buf + done, size - done);
        if (got == 0) return 0;
        if (got < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        done += (size_t)got;
    }
    return 1;
}

static void write_full(int fd, const char *buf, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t put = write(fd, buf + done, size - done);
        if (put < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        done += (size_t)put;
    }
}

/* Forks the server half: pinned, dies with the parent, never returns. */
static pid_t fork_server(const struct params *p, void (*serve)(const struct params *, void *), void *arg) {
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid > 0) return pid;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(3);
    pin(p->server_cpu);
    serve(p, arg);
    _exit(0);
}

static void stop_server(pid_t pid) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* ---- the measurement loop, the same rules as the Python runner ---- */

typedef void (*op_fn)(const struct params *, void *);

static void measure(const struct params *p, op_fn op, void *arg, long inner) {
    uint64_t start = now_ns();
    for (long i = 0; i < p->warmup && now_ns() - start < p->warmup_cap_ns; i++) op(p, arg);
    double *samples = calloc((size_t)p->max_iters, sizeof *samples);
    if (!samples) die("calloc");
    long n = 0;
    start = now_ns();
    while (n < p->max_iters && (n < p->min_iters || now_ns() - start < p->time_cap_ns)) {
        uint64_t t0 = now_ns();
        for (long k = 0; k < inner; k++) op(p, arg);
        /* Fractional: a run of tiny copies would otherwise round to whole nanoseconds. */
        samples[n++] = (double)(now_ns() - t0) / (double)inner;
    }
    for (long i = 0; i < n; i++) printf("%.3f\n", samples[i]);
    free(samples);
}

/* ---- memcpy: one copy of SIZE bytes, the floor of any data path ---- */

struct copy_arg { char *src, *dst; };

static void copy_op(const struct params *p, void *arg) {
    struct copy_arg *a = arg;
    memcpy(a->dst, a->src, p->size);
    __asm__ volatile("" ::"r"(a->dst) : "memory");
}

static void run_memcpy(const struct params *p) {
    struct copy_arg a = {alloc_touched(p->size, 0), alloc_touched(p->size, 0)};
    /* A single small copy is shorter than reading the clock: time a run of them. */
    long inner = p->size >= (1u << 20) ? 1 : (long)((1u << 20) / (p->size ? p->size : 1));
    if (inner > 4096) inner = 4096;
    measure(p, copy_op, &a, inner);
}

/* ---- uds: request/reply and one-way over a socketpair ---- */

struct uds_arg { int fd; char *out, *in; };

static void uds_serve(const struct params *p, void *arg) {
    struct uds_arg *a = arg;
    if (strcmp(p->pattern, "oneway") == 0) {
        uint64_t count = 0;
        for (;;) {
            for (long i = 0; i < p->batch; i++) {
                if (!read_full(a->fd, a->in, p->size)) return;
                count++;
            }
            write_full(a->fd, (const char *)&count, sizeof count);
            count = 0;
        }
    }
    while (read_full(a->fd, a->in, p->size)) write_full(a->fd, a->out, p->reply);
}

static void uds_rr_op(const struct params *p, void *arg) {
    struct uds_arg *a = arg;
    write_full(a->fd, a->out, p->size);
    if (!read_full(a->fd, a->in, p->reply)) { errno = EPIPE; die("server closed"); }
}

static void uds_oneway_op(const struct params *p, void *arg) {
    struct uds_arg *a = arg;
    uint64_t count = 0;
    for (long i = 0; i < p->batch; i++) write_full(a->fd, a->out, p->size);
    if (!read_full(a->fd, (char *)&count, sizeof count) || count != (uint64_t)p->batch) {
        errno = EPROTO;
        die("batch count");
    }
}

static void run_uds(const struct params *p) {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) die("socketpair");
    set_timeouts(fds[0]);
    set_timeouts(fds[1]);
    size_t biggest = p->size > p->reply ? p->size : p->reply;
    struct uds_arg server = {fds[1], alloc_touched(biggest, 0), alloc_touched(biggest, 0)};
    pid_t pid = fork_server(p, uds_serve, &server);
    close(fds[1]);
    struct uds_arg client = {fds[0], server.out, server.in};
    measure(p, strcmp(p->pattern, "oneway") == 0 ? uds_oneway_op : uds_rr_op, &client, 1);
    close(fds[0]);
    stop_server(pid);
}

/* ---- uds connect: socket + connect + first request/reply per operation ---- */

struct connect_arg { struct sockaddr_un addr; int listener; char *out, *in; };

static void connect_serve(const struct params *p, void *arg) {
    struct connect_arg *a = arg;
    for (;;) {
        int fd = accept(a->listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) continue;
            die("accept");
        }
        set_timeouts(fd);
        if (read_full(fd, a->in, p->size)) {
            write_full(fd, a->out, p->reply);
            read_full(fd, a->in, 1); /* until the client closes */
        }
        close(fd);
    }
}

static void connect_op(const struct params *p, void *arg) {
    struct connect_arg *a = arg;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    set_timeouts(fd);
    if (connect(fd, (struct sockaddr *)&a->addr, sizeof a->addr) != 0) die("connect");
    write_full(fd, a->out, p->size);
    if (!read_full(fd, a->in, p->reply)) { errno = EPIPE; die("server closed"); }
    close(fd);
}

static void run_connect(const struct params *p) {
    struct connect_arg a;
    memset(&a, 0, sizeof a);
    a.addr.sun_family = AF_UNIX;
    if (!p->path || strlen(p->path) >= sizeof a.addr.sun_path) usage();
    strcpy(a.addr.sun_path, p->path);
    a.listener = socket(AF_UNIX, SOCK_STREAM, 0);
    if (a.listener < 0) die("socket");
    if (bind(a.listener, (struct sockaddr *)&a.addr, sizeof a.addr) != 0) die("bind");
    if (listen(a.listener, 128) != 0) die("listen");
    size_t biggest = p->size > p->reply ? p->size : p->reply;
    a.out = alloc_touched(biggest, 0);
    a.in = alloc_touched(biggest, 0);
    pid_t pid = fork_server(p, connect_serve, &a);
    measure(p, connect_op, &a, 1);
    stop_server(pid);
    close(a.listener);
    unlink(p->path);
}

/* ---- futex: request/reply through shared memory, blocking wake-ups ---- */

enum { IDLE = 0, REQUESTED = 1, REPLIED = 2 };

struct futex_arg { _Atomic uint32_t *state; char *req, *rep, *src, *dst; };

static void futex_wait_for(_Atomic uint32_t *word, uint32_t wanted) {
    struct timespec timeout = {.tv_sec = WAIT_SECONDS, .tv_nsec = 0};
    uint32_t seen;
    while ((seen = atomic_load_explicit(word, memory_order_acquire)) != wanted) {
        long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, seen, &timeout, NULL, 0);
        if (rc != 0 && errno == ETIMEDOUT) die("futex wait");
    }
}

static void futex_set(_Atomic uint32_t *word, uint32_t value) {
    atomic_store_explicit(word, value, memory_order_release);
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static void futex_serve(const struct params *p, void *arg) {
    struct futex_arg *a = arg;
    for (;;) {
        futex_wait_for(a->state, REQUESTED);
        memcpy(a->dst, a->req, p->size);
        memcpy(a->rep, a->src, p->reply);
        futex_set(a->state, REPLIED);
    }
}

static void futex_op(const struct params *p, void *arg) {
    struct futex_arg *a = arg;
    memcpy(a->req, a->src, p->size);
    futex_set(a->state, REQUESTED);
    futex_wait_for(a->state, REPLIED);
    memcpy(a->dst, a->rep, p->reply);
}

static void run_futex(const struct params *p) {
    size_t biggest = p->size > p->reply ? p->size : p->reply;
    char *shared = alloc_touched(64 + p->size + p->reply, 1);
    struct futex_arg a = {(_Atomic uint32_t *)shared, shared + 64, shared + 64 + p->size,
                          alloc_touched(biggest, 0), alloc_touched(biggest, 0)};
    atomic_store(a.state, IDLE);
    pid_t pid = fork_server(p, futex_serve, &a);
    measure(p, futex_op, &a, 1);
    stop_server(pid);
}

int main(int argc, char **argv) {
    if (argc != 13 && argc != 14) usage();
    struct params p = {
        .mechanism = argv[1],
        .pattern = argv[2],
        .size = (size_t)parse_long(argv[3], 1, 1L << 34),
        .reply = (size_t)parse_long(argv[4], 1, 1L << 34),
        .batch = parse_long(argv[5], 1, 1L << 30),
        .client_cpu = (int)parse_long(argv[6], 0, CPU_SETSIZE - 1),
        .server_cpu = (int)parse_long(argv[7], 0, CPU_SETSIZE - 1),
        .warmup = parse_long(argv[8], 0, 1L << 30),
        .warmup_cap_ns = (uint64_t)parse_long(argv[9], 0, 1L << 30) * 1000000u,
        .min_iters = parse_long(argv[10], 1, 1L << 30),
        .max_iters = parse_long(argv[11], 1, 1L << 30),
        .time_cap_ns = (uint64_t)parse_long(argv[12], 0, 1L << 30) * 1000000u,
        .path = argc == 14 ? argv[13] : NULL,
    };
    if (p.min_iters > p.max_iters) p.min_iters = p.max_iters;
    pin(p.client_cpu);
    if (strcmp(p.mechanism, "memcpy") == 0) run_memcpy(&p);
    else if (strcmp(p.mechanism, "uds") == 0 && strcmp(p.pattern, "connect") == 0) run_connect(&p);
    else if (strcmp(p.mechanism, "uds") == 0) run_uds(&p);
    else if (strcmp(p.mechanism, "futex") == 0 && strcmp(p.pattern, "rr") == 0) run_futex(&p);
    else usage();
    return fflush(stdout) == 0 ? 0 : 2;
}
