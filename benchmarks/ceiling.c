/* The C ceiling for the alpc benchmarks: what the machine itself can do.
 *
 *   ceiling MECHANISM PATTERN SIZE REPLY BATCH CLIENT_CPU SERVER_CPU
 *           WARMUP WARMUP_CAP_MS MIN_ITERS MAX_ITERS TIME_CAP_MS [PATH]
 *
 * MECHANISM/PATTERN: memcpy/copy, uds/rr, uds/oneway, uds/connect, futex/rr,
 * futex/stream, inplace/rr, inplace/stream.
 * Prints one sample per line: nanoseconds per operation (for the stream
 * patterns, per message: a batch's time divided by BATCH). The server half is
 * a forked child pinned to SERVER_CPU that dies with its parent. Every wait
 * has a timeout, so a lost peer ends the run with an error instead of a hang.
 * Built by the harness (benchmarks/native.py) with -Wall -Wextra -Werror.
 *
 * Payloads are the Python harness's (byte i is i mod 256), and every receiver
 * of a request or stream message checks it as benchmarks/runner.py's
 * payload_checker does: the first message byte for byte, later ones by one
 * byte in every CHECK_STRIDE.
 *
 * The two shared-memory ceilings (futex hand-offs, no kernel copy):
 *   futex   - the copy ceiling: the sender copies its payload into shared
 *             memory, the receiver copies it out into its own buffer and
 *             checks it there (what alpc's automatic section path does).
 *   inplace - the zero-copy ceiling: the sender writes its payload into
 *             shared memory once (a memcpy from its private payload, as the
 *             Python sender fills a view) and the receiver checks it where
 *             it lies, copying nothing (what a section view does at best).
 * rr: one message, then a reply (for throughput an 8-byte acknowledgement in
 * shared memory). stream: BATCH messages through a ring of about 4 MiB (2 to
 * BATCH slots; the sender waits for a free slot), then the sender waits until
 * the receiver has checked and freed all of them.
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
/* Less than a page and prime to the payload's 256-byte period, as in runner.py. */
#define CHECK_STRIDE 4095
/* The one-way ring's size (the shared-memory peers use 4 MiB rings too). */
#define RING_BYTES (4u << 20)

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

/* The harness's payload: byte i is i mod 256 (one period, then doubling copies). */
static void fill_pattern(char *buf, size_t size) {
    size_t done = size < 256 ? size : 256;
    for (size_t i = 0; i < done; i++) buf[i] = (char)i;
    while (done < size) {
        size_t more = done < size - done ? done : size - done;
        memcpy(buf + done, buf, more);
        done += more;
    }
}

/* The receiver's check of one message against the payload (see the header comment). */
static void check_message(const struct params *p, const char *data, const char *payload) {
    static int first_checked = 0;
    int same = 1;
    if (!first_checked) {
        same = memcmp(data, payload, p->size) == 0;
        first_checked = 1;
    } else {
        for (size_t i = 0; i < p->size && same; i += CHECK_STRIDE) same = data[i] == payload[i];
    }
    if (!same) {
        errno = EPROTO;
        die("a message differs from the payload");
    }
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

/* Each sample is `inner` calls of op, divided by `inner * per_op` (per_op:
 * messages one op moves, for per-message stream samples). */
static void measure(const struct params *p, op_fn op, void *arg, long inner, long per_op) {
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
        samples[n++] = (double)(now_ns() - t0) / (double)(inner * per_op);
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
    measure(p, copy_op, &a, inner, 1);
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
    while (read_full(a->fd, a->in, p->size)) {
        check_message(p, a->in, a->out);
        write_full(a->fd, a->out, p->reply);
    }
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
    fill_pattern(server.out, biggest);
    pid_t pid = fork_server(p, uds_serve, &server);
    close(fds[1]);
    struct uds_arg client = {fds[0], server.out, server.in};
    measure(p, strcmp(p->pattern, "oneway") == 0 ? uds_oneway_op : uds_rr_op, &client, 1, 1);
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
    measure(p, connect_op, &a, 1, 1);
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
        check_message(p, a->dst, a->src);
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
    fill_pattern(a.src, biggest);
    atomic_store(a.state, IDLE);
    pid_t pid = fork_server(p, futex_serve, &a);
    measure(p, futex_op, &a, 1, 1);
    stop_server(pid);
}

/* ---- inplace/rr: the zero-copy request/reply ceiling ---- */

struct inplace_arg { _Atomic uint32_t *state; char *slot; uint64_t *reply; char *src; };

static void inplace_serve(const struct params *p, void *arg) {
    struct inplace_arg *a = arg;
    for (;;) {
        futex_wait_for(a->state, REQUESTED);
        check_message(p, a->slot, a->src);
        *a->reply = p->size;
        futex_set(a->state, REPLIED);
    }
}

static void inplace_op(const struct params *p, void *arg) {
    struct inplace_arg *a = arg;
    memcpy(a->slot, a->src, p->size);
    futex_set(a->state, REQUESTED);
    futex_wait_for(a->state, REPLIED);
    if (*a->reply != p->size) {
        errno = EPROTO;
        die("wrong acknowledgement");
    }
}

static void run_inplace_rr(const struct params *p) {
    char *shared = alloc_touched(128 + p->size, 1);
    struct inplace_arg a = {(_Atomic uint32_t *)shared, shared + 128, (uint64_t *)(shared + 64),
                            alloc_touched(p->size, 0)};
    fill_pattern(a.src, p->size);
    atomic_store(a.state, IDLE);
    pid_t pid = fork_server(p, inplace_serve, &a);
    measure(p, inplace_op, &a, 1, 1);
    stop_server(pid);
}

/* ---- futex/stream and inplace/stream: one-way messages through a ring ---- */

/* head: messages the sender published; tail: messages the receiver checked
 * and freed. Each side wakes the other only when it says it sleeps (the
 * *_sleeping flags), so a flowing stream makes no system calls: the best
 * case, not a wake-up per message. Each word on its own cache line. */
struct ring {
    _Atomic uint32_t head; char pad1[60];
    _Atomic uint32_t head_sleeping; char pad2[60];
    _Atomic uint32_t tail; char pad3[60];
    _Atomic uint32_t tail_sleeping; char pad4[60];
};

struct stream_arg { struct ring *ring; char *slots, *src, *dst; uint32_t nslots; int inplace; };

/* Waits while *word still holds `seen`, saying so in *sleeping; returns the new value.
 * The flag is set before the word is read again (both seq_cst), and the
 * publisher stores the word before it reads the flag: one of them sees the
 * other, so no wake-up is lost. FUTEX_WAIT itself rechecks the word. */
static uint32_t ring_wait(_Atomic uint32_t *word, _Atomic uint32_t *sleeping, uint32_t seen) {
    struct timespec timeout = {.tv_sec = WAIT_SECONDS, .tv_nsec = 0};
    uint32_t now;
    while ((now = atomic_load_explicit(word, memory_order_acquire)) == seen) {
        atomic_store(sleeping, 1);
        if ((now = atomic_load(word)) != seen) break;
        long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, seen, &timeout, NULL, 0);
        if (rc != 0 && errno == ETIMEDOUT) die("futex wait");
    }
    atomic_store(sleeping, 0);
    return now;
}

static void ring_publish(_Atomic uint32_t *word, _Atomic uint32_t *sleeping, uint32_t value) {
    atomic_store(word, value);
    if (atomic_load(sleeping)) syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static void stream_serve(const struct params *p, void *arg) {
    struct stream_arg *a = arg;
    struct ring *r = a->ring;
    uint32_t tail = 0;
    for (;;) {
        uint32_t head = ring_wait(&r->head, &r->head_sleeping, tail);
        while (tail != head) {
            char *slot = a->slots + (size_t)(tail % a->nslots) * p->size;
            if (a->inplace) {
                check_message(p, slot, a->src);
            } else {
                memcpy(a->dst, slot, p->size);
                check_message(p, a->dst, a->src);
            }
            ring_publish(&r->tail, &r->tail_sleeping, ++tail);
        }
    }
}

static void stream_op(const struct params *p, void *arg) {
    struct stream_arg *a = arg;
    struct ring *r = a->ring;
    uint32_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    for (long i = 0; i < p->batch; i++) {
        uint32_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        while (head - tail >= a->nslots) tail = ring_wait(&r->tail, &r->tail_sleeping, tail);
        memcpy(a->slots + (size_t)(head % a->nslots) * p->size, a->src, p->size);
        ring_publish(&r->head, &r->head_sleeping, ++head);
    }
    /* The sync: every message of the batch was received and checked. */
    uint32_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    while (tail != head) tail = ring_wait(&r->tail, &r->tail_sleeping, tail);
}

static void run_stream(const struct params *p, int inplace) {
    /* A ring of about RING_BYTES stays in cache, as the Python peers' rings and
     * alpc's reused section ranges do; a deeper one is slower, not faster. */
    size_t fit = RING_BYTES / p->size;
    uint32_t nslots = (uint32_t)(fit < 2 ? 2 : fit > (size_t)p->batch ? (size_t)p->batch : fit);
    char *shared = alloc_touched(sizeof(struct ring) + (size_t)nslots * p->size, 1);
    struct stream_arg a = {(struct ring *)shared, shared + sizeof(struct ring), alloc_touched(p->size, 0),
                           inplace ? NULL : alloc_touched(p->size, 0), nslots, inplace};
    fill_pattern(a.src, p->size);
    atomic_store(&a.ring->head, 0);
    atomic_store(&a.ring->head_sleeping, 0);
    atomic_store(&a.ring->tail, 0);
    atomic_store(&a.ring->tail_sleeping, 0);
    pid_t pid = fork_server(p, stream_serve, &a);
    measure(p, stream_op, &a, 1, p->batch);
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
    else if (strcmp(p.mechanism, "futex") == 0 && strcmp(p.pattern, "stream") == 0) run_stream(&p, 0);
    else if (strcmp(p.mechanism, "inplace") == 0 && strcmp(p.pattern, "rr") == 0) run_inplace_rr(&p);
    else if (strcmp(p.mechanism, "inplace") == 0 && strcmp(p.pattern, "stream") == 0) run_stream(&p, 1);
    else usage();
    return fflush(stdout) == 0 ? 0 : 2;
}
