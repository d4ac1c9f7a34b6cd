/* Quick-LPC: one connection's pair of shared-memory rings with futex wake-ups
 * (layout in qlpc.h). Every call runs with the GIL released.
 *
 * Trust: the region is writable by both processes, so nothing this side
 * decides rests on a word the peer could have written, except where a lie
 * only hurts the liar: our indices and counters live in the private struct
 * and are only published; the peer's indices are checked against the ring
 * size, and an entry's header is copied out before it is checked.
 *
 * Waking: a waiter spins only while the peer runs on another CPU (each side
 * publishes sched_getcpu() and whether it is running, spinning, blocked in
 * the futex or waiting in poll()), and only for about twice what the peer has
 * been taking to answer (each entry carries its posting time); otherwise it
 * blocks in FUTEX_WAIT at once. A producer calls FUTEX_WAKE only when the
 * consumer says it is blocked, and rings a socket doorbell (the caller sends
 * it) only when the consumer says it waits in poll().
 *
 * Death: a per-process watcher thread holds the connections' sockets and
 * pidfds in an epoll set; when a peer hangs up or its process exits it wakes
 * that connection's waiter at once, which then returns QLPC_CHECK so the
 * caller reads the socket and sees why.
 *
 * Identity: a socket message carries its writer's SCM_CREDENTIALS; a ring
 * entry carries nothing the kernel vouches for. So a side taking an entry
 * that becomes a Message asks the kernel for the peer process's current
 * credentials through its pidfd (PIDFD_GET_INFO) before taking it: they are
 * those of the only process that can have written it, at or after the write
 * (the region is mapped by the two connected processes alone: the memfd is
 * closed once mapped, and MADV_DONTFORK keeps it from forked children).
 */
#define _GNU_SOURCE
#include "qlpc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define REGION_MAGIC 0x43504c51u /* "QLPC" */
#define REGION_VERSION 3u /* 2: bulk areas after the rings; 3: views into them (side.bulk_held) */
#define BULK_ALIGN 4096u
#define ATTACHED 0x41545421u
#define SIDE_OFFSET 128u
#define SIDE_SIZE 128u
/* A blocked waiter looks at its socket at least this often, whatever the
 * peer claims (a peer that never rings the bell only delays itself). */
#define SAFETY_SLICE_NS 1000000000LL
/* However quick the peer has been, a spin may last this long (jitter). */
#define SPIN_FLOOR_NS 10000u
#define WATCH_STACK (64 * 1024)
#define NO_DEADLINE UINT64_MAX

/* PIDFD_GET_INFO (Linux 6.13, include/uapi/linux/pidfd.h), which the build's
 * headers may predate. This is its first version (PIDFD_INFO_SIZE_VER0); the
 * kernel copies what fits the size passed, whatever its own version. */
struct pidfd_info_v0 {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    uint32_t exit_code;
};
_Static_assert(sizeof(struct pidfd_info_v0) == 64, "PIDFD_INFO_SIZE_VER0 is 64 bytes");
#define PIDFD_GET_INFO_V0 _IOWR(0xFF, 11, struct pidfd_info_v0)
#define PIDFD_INFO_CREDS_BIT (1ULL << 1)

/* What a side is doing, as a receiver. */
enum { ST_BUSY = 0, ST_SPIN = 1, ST_FUTEX = 2, ST_POLL = 3 };

_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_LLONG_LOCK_FREE == 2,
               "shared-memory atomics must be lock-free");

struct region_header {
    uint32_t magic, version, slots, slot_size;
};

/* Written by its side only; the other side reads. */
struct side {
    _Atomic uint32_t seq;        /* futex word: bumped on every ring post and socket write */
    _Atomic uint32_t tail;       /* entries published into this side's ring */
    _Atomic uint32_t head;       /* entries taken from the peer's ring */
    _Atomic uint32_t state;      /* ST_* */
    _Atomic int32_t cpu;         /* where this side last ran */
    _Atomic uint32_t attached;   /* ATTACHED once the client uses the rings */
    _Atomic uint32_t sock_sends; /* socket writes so far */
    _Atomic uint32_t bulk_held;  /* 1 while this side holds a view of the peer's bulk area */
    _Atomic uint64_t consumed;   /* socket bytes of the peer read and dispatched */
};
_Static_assert(sizeof(struct side) <= SIDE_SIZE, "side words fit their cache lines");

struct entry {
    uint32_t kind, length, message_id, callback_id, sender_tid, reserved;
    uint64_t posted_ns; /* CLOCK_MONOTONIC when posted: how long the peer took */
};
_Static_assert(sizeof(struct entry) == QLPC_ENTRY_HEADER, "entry header is 32 bytes");

struct watch;

struct qlpc_chan {
    _Atomic uint32_t users;    /* calls in progress */
    _Atomic uint32_t closing;
    _Atomic uint32_t hangup;   /* set by the watcher */
    _Atomic uint32_t posting;  /* one producer at a time */
    _Atomic uint32_t taking;   /* one consumer at a time */
    _Atomic uint32_t woke;     /* we woke the peer since our last wait */
    _Atomic uint32_t calling;  /* client: a request is in flight through the ring */
    _Atomic uint32_t kicked;   /* client: its reply came over the socket (qlpc_kick) */
    _Atomic uint32_t calling_id;
    uint32_t next_id;          /* client: ring request ids (under calling) */
    _Atomic uint64_t sent;     /* socket bytes we wrote */
    _Atomic uint64_t ordered;  /* `sent` after our last write that carried a message */
    _Atomic uint64_t counts[QLPC_COUNTERS];
    uint64_t consumed;         /* socket bytes we dispatched (one reader at a time) */
    uint8_t *base;
    uint64_t size;
    struct side *me, *peer;
    uint8_t *out_ring, *in_ring;
    uint8_t *out_bulk, *in_bulk;
    uint32_t in_max;           /* longest entry we take, in a slot or bulk (qlpc_limit_bulk) */
    uint32_t bulk_until;       /* our tail just after our last bulk post (under posting) */
    _Atomic uint32_t lent;     /* our bulk area is lent to a view being filled (qlpc_lend_bulk) */
    _Atomic uint32_t loan;     /* the number of that loan, or of the last one (stored before lent) */
    uint32_t slots, slot_size, mask, payload_max;
    uint32_t role, in_kind;
    uint32_t tail;             /* what we published (under posting) */
    uint32_t head;             /* what we took (under taking) */
    uint32_t sock_seen;        /* the peer's sock_sends when the socket was last found empty */
    uint32_t force_poll;       /* look at the socket on the next check */
    uint32_t spin_max_ns;
    uint32_t expect_ns;        /* how long the peer has been taking to answer (average) */
    uint32_t cred_gen;         /* bumped when attested credentials differ from the last (under taking) */
    uint32_t cred_pid, cred_uid, cred_gid;
    int sock, pidfd;           /* our duplicates */
    int released;              /* mapping and fds gone (under close_lock) */
    pthread_mutex_t close_lock;
    uint64_t token;
    struct watch *watch;       /* under g_lock */
    struct qlpc_chan *next;
    struct qlpc_chan *next_chan; /* every channel not yet freed (g_chans, under g_lock) */
};

/* ---- small helpers ---------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield" ::: "memory");
#else
    __asm__ volatile("" ::: "memory");
#endif
}

/* 1 if a signal interrupted the wait, else 0 (woken, timed out, or the word had changed). */
static int futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t ns, int private_)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000LL), .tv_nsec = (long)(ns % 1000000000LL)};
    long rc = syscall(SYS_futex, (uint32_t *)word, private_ ? FUTEX_WAIT_PRIVATE : FUTEX_WAIT, expected, &ts,
                      NULL, 0);
    return rc != 0 && errno == EINTR;
}

static void futex_wake(_Atomic uint32_t *word, int private_)
{
    syscall(SYS_futex, (uint32_t *)word, private_ ? FUTEX_WAKE_PRIVATE : FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static _Thread_local uint32_t t_tid;
/* The callback id of the reply this thread's last reply call posted, 0 if it posted none:
 * what a caller whose status a signal handler cut off asks (qlpc_reply_posted). */
static _Thread_local uint32_t t_reply_posted;

static uint32_t my_tid(void)
{
    if (t_tid == 0)
        t_tid = (uint32_t)syscall(SYS_gettid);
    return t_tid;
}

static int this_cpu(void)
{
    int cpu = sched_getcpu();
    return cpu < 0 ? -1 : cpu;
}

static inline void count(qlpc_chan *ch, int which)
{
    atomic_fetch_add_explicit(&ch->counts[which], 1, memory_order_relaxed);
}

/* Every call that touches the mapping holds a use; close waits for them. */
static int enter(qlpc_chan *ch)
{
    atomic_fetch_add(&ch->users, 1);
    if (atomic_load(&ch->closing)) {
        if (atomic_fetch_sub(&ch->users, 1) == 1)
            futex_wake(&ch->users, 1);
        return 0;
    }
    return 1;
}

static void leave(qlpc_chan *ch)
{
    if (atomic_fetch_sub(&ch->users, 1) == 1 && atomic_load(&ch->closing))
        futex_wake(&ch->users, 1);
}

/* Wake our own waiter, which sleeps on the peer's seq word. */
static void poke(qlpc_chan *ch)
{
    atomic_fetch_add(&ch->peer->seq, 1);
    futex_wake(&ch->peer->seq, 0);
}

/* ---- the watcher: wakes a connection's waiter when its peer goes ------------ */

struct watch {
    int epfd, evfd;
    pthread_t thread;
    unsigned count;
    qlpc_chan *list;
    struct watch *next_all;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct watch *g_watch;  /* the one new channels join */
static struct watch *g_all;    /* every watch with a live thread */
static uint64_t g_token;
static unsigned g_holds;       /* qlpc_hold calls not yet released */
static qlpc_chan *g_chans;     /* every channel not yet freed: a forked child disowns them all */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void hung_up(qlpc_chan *ch)
{
    atomic_store(&ch->hangup, 1);
    poke(ch);
}

static void *watch_main(void *arg)
{
    struct watch *w = arg;
    struct epoll_event events[16];

    for (;;) {
        int n = epoll_wait(w->epfd, events, 16, -1);
        int stop = 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL; /* waiters fall back to their safety slice */
        }
        pthread_mutex_lock(&g_lock);
        for (int i = 0; i < n; i++) {
            uint64_t token = events[i].data.u64;
            if (token == 0) {
                stop = 1;
                continue;
            }
            for (qlpc_chan *c = w->list; c != NULL; c = c->next) {
                if (c->token == token) {
                    hung_up(c);
                    break;
                }
            }
        }
        pthread_mutex_unlock(&g_lock);
        if (stop)
            return NULL;
    }
}

static void forget_watch(struct watch *w)
{
    struct watch **link = &g_all;
    while (*link != NULL && *link != w)
        link = &(*link)->next_all;
    if (*link == w)
        *link = w->next_all;
}

/* Called with g_lock held. */
static struct watch *watch_start(void)
{
    struct watch *w = calloc(1, sizeof *w);
    pthread_attr_t attr;
    sigset_t all, old;
    int rc;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};

    if (w == NULL)
        return NULL;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->epfd < 0 || w->evfd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &ev) != 0)
        goto fail;
    if (pthread_attr_init(&attr) != 0)
        goto fail;
    pthread_attr_setstacksize(&attr, WATCH_STACK);
    /* Signals are the application's business: the watcher takes none. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&w->thread, &attr, watch_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        goto fail;
    }
    w->next_all = g_all;
    g_all = w;
    return w;
fail:
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->evfd >= 0)
        close(w->evfd);
    free(w);
    return NULL;
}

static void watch_stop(struct watch *w)
{
    uint64_t one = 1;
    while (write(w->evfd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    pthread_join(w->thread, NULL);
    pthread_mutex_lock(&g_lock);
    forget_watch(w);
    pthread_mutex_unlock(&g_lock);
    close(w->epfd);
    close(w->evfd);
    free(w);
}

static void before_fork(void) { pthread_mutex_lock(&g_lock); }

static void after_fork_parent(void) { pthread_mutex_unlock(&g_lock); }

/* A forked child's copy of a channel: its rings are not mapped here
 * (MADV_DONTFORK), so every call must find it closed, and closing it must
 * touch nothing but the child's copies of the fds: no wake through the
 * region, and no munmap (the child may have mapped something else at that
 * address since). The parent's threads in calls on it, or closing it, are
 * not here: their uses and lock would hold the child's close forever. */
static void disown(qlpc_chan *c)
{
    c->watch = NULL;
    atomic_store(&c->users, 0);
    atomic_store(&c->closing, 1);
    pthread_mutex_init(&c->close_lock, NULL);
    if (!c->released) {
        if (c->sock >= 0)
            close(c->sock);
        if (c->pidfd >= 0)
            close(c->pidfd);
    }
    c->sock = c->pidfd = -1;
    c->base = NULL;
    c->released = 1;
}

/* The child has no watcher threads: drop every watch, and disown every
 * channel (the child never uses the parent's rings). */
static void after_fork_child(void)
{
    struct watch *w = g_all;
    for (qlpc_chan *c = g_chans; c != NULL; c = c->next_chan)
        disown(c);
    while (w != NULL) {
        struct watch *next = w->next_all;
        close(w->epfd);
        close(w->evfd);
        free(w);
        w = next;
    }
    g_all = NULL;
    g_watch = NULL;
    g_holds = 0;
    t_tid = 0;
    pthread_mutex_unlock(&g_lock);
}

static void install_fork_handlers(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* The current watch, started if there is none. Called with g_lock held. */
static struct watch *current_watch(void)
{
    if (g_watch == NULL)
        g_watch = watch_start();
    return g_watch;
}

/* Is w idle and not kept alive by a hold? Then it should stop. Called with g_lock held. */
static int idle(struct watch *w)
{
    return w->count == 0 && !(w == g_watch && g_holds > 0);
}

int qlpc_hold(void)
{
    int rc = 0;

    pthread_once(&g_once, install_fork_handlers);
    pthread_mutex_lock(&g_lock);
    if (current_watch() == NULL)
        rc = QLPC_E_SYSTEM;
    else
        g_holds++;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

void qlpc_unhold(void)
{
    struct watch *stop = NULL;

    pthread_mutex_lock(&g_lock);
    if (g_holds > 0)
        g_holds--;
    if (g_watch != NULL && idle(g_watch)) {
        stop = g_watch;
        g_watch = NULL;
    }
    pthread_mutex_unlock(&g_lock);
    if (stop != NULL)
        watch_stop(stop);
}

static int watch_add(qlpc_chan *ch)
{
    struct epoll_event ev;
    struct watch *w;
    int saved;

    pthread_once(&g_once, install_fork_handlers);
    pthread_mutex_lock(&g_lock);
    w = current_watch();
    if (w == NULL) {
        pthread_mutex_unlock(&g_lock);
        return -1;
    }
    ch->token = ++g_token;
    /* Hang-up only: the data on the socket is the application's to read. */
    ev.events = EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLONESHOT;
    ev.data.u64 = ch->token;
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, ch->sock, &ev) != 0)
        goto fail;
    if (ch->pidfd >= 0) {
        ev.events = EPOLLIN | EPOLLONESHOT;
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, ch->pidfd, &ev) != 0) {
            saved = errno;
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, ch->sock, NULL);
            errno = saved;
            goto fail;
        }
    }
    ch->next = w->list;
    w->list = ch;
    w->count++;
    ch->watch = w;
    ch->next_chan = g_chans;
    g_chans = ch;
    pthread_mutex_unlock(&g_lock);
    return 0;
fail:
    saved = errno;
    if (idle(w)) {
        g_watch = NULL;
        pthread_mutex_unlock(&g_lock);
        watch_stop(w);
    } else {
        pthread_mutex_unlock(&g_lock);
    }
    errno = saved;
    return -1;
}

static void watch_remove(qlpc_chan *ch)
{
    struct watch *stop = NULL;

    pthread_mutex_lock(&g_lock);
    struct watch *w = ch->watch;
    if (w != NULL) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, ch->sock, NULL);
        if (ch->pidfd >= 0)
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, ch->pidfd, NULL);
        for (qlpc_chan **link = &w->list; *link != NULL; link = &(*link)->next) {
            if (*link == ch) {
                *link = ch->next;
                break;
            }
        }
        ch->watch = NULL;
        w->count--;
        if (idle(w)) {
            /* The last one out stops the thread (unless a port holds it), so an
             * idle process keeps no thread and no fds; the next channel starts
             * a fresh watch. */
            if (g_watch == w)
                g_watch = NULL;
            stop = w;
        }
    }
    pthread_mutex_unlock(&g_lock);
    if (stop != NULL)
        watch_stop(stop);
}

/* ---- opening and closing ------------------------------------------------------ */

/* Where the bulk areas start: the first page after the rings. */
static uint64_t bulk_offset(uint32_t slots, uint32_t slot_size)
{
    uint64_t rings = QLPC_REGION_HEADER + 2u * (uint64_t)slots * slot_size;
    return (rings + BULK_ALIGN - 1) / BULK_ALIGN * BULK_ALIGN;
}

uint64_t qlpc_region_size(uint32_t slots, uint32_t slot_size)
{
    if (slots < QLPC_MIN_SLOTS || slots > QLPC_MAX_SLOTS || (slots & (slots - 1)) != 0)
        return 0;
    if (slot_size < QLPC_MIN_SLOT_SIZE || slot_size > QLPC_MAX_SLOT_SIZE || slot_size % 64 != 0)
        return 0;
    return bulk_offset(slots, slot_size) + 2u * (uint64_t)QLPC_BULK_SIZE;
}

static void release(qlpc_chan *ch)
{
    /* Each field is cleared before its fd is closed: a fork meanwhile must not
     * have the child close a number this process may have reused since. */
    int sock = ch->sock, pidfd = ch->pidfd;

    if (ch->base != NULL)
        munmap(ch->base, ch->size);
    ch->base = NULL;
    ch->sock = ch->pidfd = -1;
    if (sock >= 0)
        close(sock);
    if (pidfd >= 0)
        close(pidfd);
}

static int check_layout(qlpc_chan *ch)
{
    struct region_header header;
    /* A private copy: the server could rewrite the header while we look. */
    memcpy(&header, ch->base, sizeof header);
    if (header.magic != REGION_MAGIC || header.version != REGION_VERSION || header.slots != ch->slots ||
        header.slot_size != ch->slot_size)
        return QLPC_E_LAYOUT;
    return 0;
}

qlpc_chan *qlpc_open(int memfd, uint64_t size, uint32_t slots, uint32_t slot_size, int role,
                     int sock_fd, int pidfd, uint32_t spin_ns, int *error)
{
    uint64_t need = qlpc_region_size(slots, slot_size);
    qlpc_chan *ch;
    int rc;

    if (error == NULL)
        return NULL;
    *error = QLPC_E_ARGS;
    if (need == 0 || size != need || (role != QLPC_SERVER && role != QLPC_CLIENT) || memfd < 0 || sock_fd < 0)
        return NULL;
    ch = calloc(1, sizeof *ch);
    if (ch == NULL) {
        *error = QLPC_E_SYSTEM;
        return NULL;
    }
    ch->sock = ch->pidfd = -1;
    ch->slots = slots;
    ch->slot_size = slot_size;
    ch->mask = slots - 1;
    ch->payload_max = slot_size - QLPC_ENTRY_HEADER;
    ch->in_max = QLPC_BULK_SIZE;
    ch->role = (uint32_t)role;
    ch->in_kind = role == QLPC_SERVER ? QLPC_REQUEST : QLPC_REPLY;
    ch->size = size;
    ch->spin_max_ns = spin_ns;
    ch->expect_ns = spin_ns / 2;
    pthread_mutex_init(&ch->close_lock, NULL);
    *error = QLPC_E_SYSTEM;
    ch->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (ch->base == MAP_FAILED) {
        ch->base = NULL;
        goto fail;
    }
    /* A forked child (a privilege-separated one, say) must not write ring
     * entries that would be taken as this process's, with its credentials. */
    if (madvise(ch->base, size, MADV_DONTFORK) != 0)
        goto fail;
    {
        struct side *server = (struct side *)(ch->base + SIDE_OFFSET);
        struct side *client = (struct side *)(ch->base + SIDE_OFFSET + SIDE_SIZE);
        uint8_t *server_ring = ch->base + QLPC_REGION_HEADER;
        uint8_t *client_ring = server_ring + (size_t)slots * slot_size;
        ch->me = role == QLPC_SERVER ? server : client;
        ch->peer = role == QLPC_SERVER ? client : server;
        ch->out_ring = role == QLPC_SERVER ? server_ring : client_ring;
        ch->in_ring = role == QLPC_SERVER ? client_ring : server_ring;
        uint8_t *server_bulk = ch->base + bulk_offset(slots, slot_size);
        uint8_t *client_bulk = server_bulk + QLPC_BULK_SIZE;
        ch->out_bulk = role == QLPC_SERVER ? server_bulk : client_bulk;
        ch->in_bulk = role == QLPC_SERVER ? client_bulk : server_bulk;
    }
    if (role == QLPC_SERVER) {
        struct region_header header = {REGION_MAGIC, REGION_VERSION, slots, slot_size};
        memcpy(ch->base, &header, sizeof header);
        /* Until it first waits in the futex, the server waits in poll(). */
        atomic_store(&ch->me->state, ST_POLL);
        atomic_store(&ch->me->cpu, -1);
    } else {
        rc = check_layout(ch);
        if (rc != 0) {
            *error = rc;
            goto fail;
        }
        /* Our words are ours from now on, whatever the server left in them. */
        atomic_store(&ch->me->tail, 0);
        atomic_store(&ch->me->head, 0);
        atomic_store(&ch->me->consumed, 0);
        atomic_store(&ch->me->bulk_held, 0);
        atomic_store(&ch->me->state, ST_BUSY);
        atomic_store(&ch->me->cpu, this_cpu());
    }
    ch->sock = fcntl(sock_fd, F_DUPFD_CLOEXEC, 3);
    if (ch->sock < 0)
        goto fail;
    if (pidfd >= 0) {
        ch->pidfd = fcntl(pidfd, F_DUPFD_CLOEXEC, 3);
        if (ch->pidfd < 0)
            goto fail;
    }
    if (watch_add(ch) != 0)
        goto fail;
    if (role == QLPC_CLIENT)
        atomic_store(&ch->me->attached, ATTACHED);
    *error = 0;
    return ch;
fail:
    rc = errno;
    release(ch);
    pthread_mutex_destroy(&ch->close_lock);
    free(ch);
    errno = rc;
    return NULL;
}

void qlpc_kick(qlpc_chan *ch)
{
    if (ch == NULL || !enter(ch))
        return;
    atomic_store(&ch->kicked, 1);
    /* Bumping the word it sleeps on: a waiter between its last look and its
     * futex_wait does not sleep through this. */
    poke(ch);
    leave(ch);
}

void qlpc_close(qlpc_chan *ch)
{
    uint32_t users;

    if (ch == NULL)
        return;
    pthread_mutex_lock(&ch->close_lock);
    if (ch->released) {
        pthread_mutex_unlock(&ch->close_lock);
        return;
    }
    atomic_store(&ch->closing, 1);
    /* Wake a waiter of ours, then stop watching (the watcher may be waking it too). */
    poke(ch);
    watch_remove(ch);
    /* Calls in progress see `closing` within a spin step or a futex wake. */
    while ((users = atomic_load(&ch->users)) != 0)
        futex_wait(&ch->users, users, 10000000, 1);
    release(ch);
    ch->released = 1;
    pthread_mutex_unlock(&ch->close_lock);
}

void qlpc_free(qlpc_chan *ch)
{
    if (ch == NULL)
        return;
    qlpc_close(ch);
    pthread_mutex_lock(&g_lock);
    for (qlpc_chan **link = &g_chans; *link != NULL; link = &(*link)->next_chan) {
        if (*link == ch) {
            *link = ch->next_chan;
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_destroy(&ch->close_lock);
    free(ch);
}

int qlpc_peer_attached(qlpc_chan *ch)
{
    int attached;

    if (ch == NULL || !enter(ch))
        return 0;
    attached = atomic_load_explicit(&ch->peer->attached, memory_order_acquire) == ATTACHED;
    leave(ch);
    return attached;
}

uint32_t qlpc_payload_max(qlpc_chan *ch) { return ch == NULL ? 0 : ch->payload_max; }

void qlpc_limit_bulk(qlpc_chan *ch, uint32_t max)
{
    if (ch != NULL)
        ch->in_max = max < QLPC_BULK_SIZE ? max : QLPC_BULK_SIZE;
}

uint64_t qlpc_count(qlpc_chan *ch, int which)
{
    if (ch == NULL || which < 0 || which >= QLPC_COUNTERS)
        return 0;
    return atomic_load_explicit(&ch->counts[which], memory_order_relaxed);
}

/* ---- producing ----------------------------------------------------------------- */

/* Does our bulk area still hold a body the peer has not copied out, or holds as a view?
 * `used` is how many of our entries the peer has not taken; the bulk one is among them
 * while fewer were posted after it. The peer sets bulk_held before its head passes the
 * entry, so a head read first shows one or the other. (A lying head or a view never
 * released makes it look in use: the area is kept, only the liar loses.) */
static int bulk_in_use(const qlpc_chan *ch, uint32_t used)
{
    return used > ch->tail - ch->bulk_until || atomic_load_explicit(&ch->peer->bulk_held, memory_order_acquire);
}

/* How many of our entries the peer has not taken yet (under posting). */
static uint32_t unconsumed(const qlpc_chan *ch)
{
    return ch->tail - atomic_load_explicit(&ch->peer->head, memory_order_acquire);
}

/* After publishing: wake the consumer if it sleeps. 0, or QLPC_DOORBELL when it
 * waits in poll() and only a socket write reaches it (the caller sends one). */
static int ring_bell(qlpc_chan *ch, int doorbell)
{
    atomic_fetch_add(&ch->me->seq, 1);
    for (;;) {
        uint32_t state = atomic_load(&ch->peer->state);
        if (state == ST_BUSY || state == ST_SPIN)
            return 0;
        if (state == ST_POLL) {
            if (!doorbell)
                return 0;
            /* Only the first post after it armed rings; the rest ride along. */
            if (atomic_compare_exchange_strong(&ch->peer->state, &state, ST_BUSY))
                return QLPC_DOORBELL;
            continue;
        }
        /* ST_FUTEX, or a value no honest peer writes: waking is always safe. */
        futex_wake(&ch->me->seq, 0);
        count(ch, QLPC_WAKES);
        atomic_store_explicit(&ch->woke, 1, memory_order_relaxed);
        return 0;
    }
}

static int post(qlpc_chan *ch, uint32_t kind, uint32_t message_id, uint32_t callback_id, const char *data,
                uint32_t len)
{
    int rc;
    /* No data: the body is in place in our lent bulk area (a view). */
    int in_place = data == NULL && len != 0;
    /* Too large for a slot: the bulk area, which holds one message at a time. */
    int bulk = in_place || len > ch->payload_max;

    if (len > QLPC_BULK_SIZE)
        return QLPC_TOO_LARGE;
    if (atomic_exchange_explicit(&ch->posting, 1, memory_order_acquire))
        return QLPC_BUSY;
    if (in_place != (int)atomic_load_explicit(&ch->lent, memory_order_relaxed) && (in_place || bulk)) {
        /* In place needs the loan; a copy must not overwrite a view being filled. */
        rc = in_place ? QLPC_E_ARGS : QLPC_FULL;
    } else if (atomic_load_explicit(&ch->peer->consumed, memory_order_acquire) <
        atomic_load_explicit(&ch->ordered, memory_order_relaxed)) {
        rc = QLPC_ORDER;
    } else {
        uint32_t used = unconsumed(ch);
        if (used > ch->slots) {
            rc = QLPC_E_INDEX;
        } else if (used == ch->slots) {
            rc = QLPC_FULL;
        } else if (bulk && bulk_in_use(ch, used)) {
            rc = QLPC_FULL; /* the peer has not copied our last bulk body out: it would change under the copy */
        } else {
            uint8_t *slot = ch->out_ring + (size_t)(ch->tail & ch->mask) * ch->slot_size;
            uint32_t flags = bulk ? QLPC_BULK | (in_place ? QLPC_VIEW : 0) : 0;
            struct entry header = {kind | flags, len, message_id, callback_id, my_tid(), 0, now_ns()};
            /* The bytes first: the consumer reads them only after the tail below. */
            if (in_place)
                atomic_store_explicit(&ch->lent, 0, memory_order_relaxed);
            else if (bulk)
                memcpy(ch->out_bulk, data, len);
            else if (len != 0)
                memcpy(slot + QLPC_ENTRY_HEADER, data, len);
            memcpy(slot, &header, sizeof header);
            ch->tail++;
            if (bulk)
                ch->bulk_until = ch->tail;
            atomic_store_explicit(&ch->me->tail, ch->tail, memory_order_release);
            if (kind == QLPC_REPLY)
                t_reply_posted = callback_id;
            atomic_fetch_add_explicit(&ch->counts[QLPC_MESSAGES_OUT], 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&ch->counts[QLPC_BYTES_OUT], len, memory_order_relaxed);
            rc = ring_bell(ch, 1);
        }
    }
    atomic_store_explicit(&ch->posting, 0, memory_order_release);
    return rc;
}

/* Under the producer's turn, with our bulk area free (not lent, holding no body the peer has
 * not taken, not held as a view): act on it. act's status, QLPC_FULL when the area is not
 * free, QLPC_BUSY while another thread posts, or QLPC_CLOSED. */
static int on_free_area(qlpc_chan *ch, int (*act)(qlpc_chan *, uint32_t), uint32_t arg)
{
    int rc;

    if (ch == NULL)
        return QLPC_E_ARGS;
    if (!enter(ch))
        return QLPC_CLOSED;
    if (atomic_exchange_explicit(&ch->posting, 1, memory_order_acquire)) {
        leave(ch);
        return QLPC_BUSY;
    }
    rc = atomic_load(&ch->lent) || bulk_in_use(ch, unconsumed(ch)) ? QLPC_FULL : act(ch, arg);
    atomic_store_explicit(&ch->posting, 0, memory_order_release);
    leave(ch);
    return rc;
}

static int remove_pages(qlpc_chan *ch, uint32_t unused)
{
    (void)unused;
    return madvise(ch->out_bulk, QLPC_BULK_SIZE, MADV_REMOVE) == 0 ? 0 : QLPC_E_SYSTEM;
}

static int lend(qlpc_chan *ch, uint32_t loan)
{
    atomic_store(&ch->loan, loan);
    atomic_store(&ch->lent, 1);
    return (int)loan;
}

int qlpc_trim_bulk(qlpc_chan *ch) { return on_free_area(ch, remove_pages, 0); }

int qlpc_lend_bulk(qlpc_chan *ch, uint32_t loan)
{
    if (loan == 0 || loan > (uint32_t)INT_MAX)
        return QLPC_E_ARGS;
    return on_free_area(ch, lend, loan);
}

/* 1 while `loan` is the loan in force. Only its holder ends it (posting in place or
 * unlending), and a new loan is made only once lent is 0, storing its number first: so the
 * holder, reading lent then the number, never mistakes another's loan for its own. */
static int in_force(qlpc_chan *ch, uint32_t loan)
{
    return atomic_load(&ch->lent) != 0 && atomic_load(&ch->loan) == loan;
}

void qlpc_unlend_bulk(qlpc_chan *ch, uint32_t loan)
{
    if (ch != NULL && in_force(ch, loan))
        atomic_store(&ch->lent, 0);
}

int qlpc_map_bulk(qlpc_chan *ch, int own, void *at)
{
    uint8_t *area;
    void *mapped;
    int rc = 0;

    if (ch == NULL || at == NULL || (uintptr_t)at % BULK_ALIGN != 0)
        return QLPC_E_ARGS;
    if (!enter(ch))
        return QLPC_CLOSED;
    area = own ? ch->out_bulk : ch->in_bulk;
    /* An old size of 0 duplicates a shared mapping: the same pages, a second address. */
    mapped = mremap(area, 0, QLPC_BULK_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, at);
    if (mapped != at || (!own && mprotect(at, QLPC_BULK_SIZE, PROT_READ) != 0) ||
        madvise(at, QLPC_BULK_SIZE, MADV_DOFORK) != 0)
        rc = QLPC_E_SYSTEM;
    leave(ch);
    return rc;
}

int qlpc_loan_in_force(qlpc_chan *ch, uint32_t loan)
{
    return ch != NULL && in_force(ch, loan);
}

void qlpc_sent(qlpc_chan *ch, uint64_t nbytes, int ordered)
{
    uint64_t total;

    if (ch == NULL || !enter(ch))
        return;
    total = atomic_fetch_add(&ch->sent, nbytes) + nbytes;
    /* Writes are serialised by the caller's send lock: the last ordered one sets this. */
    if (ordered)
        atomic_store(&ch->ordered, total);
    atomic_fetch_add(&ch->me->sock_sends, 1);
    /* A consumer in poll() sees the socket itself; one in the futex needs waking. */
    ring_bell(ch, 0);
    leave(ch);
}

void qlpc_consumed(qlpc_chan *ch, uint64_t nbytes)
{
    if (ch == NULL || !enter(ch))
        return;
    ch->consumed += nbytes;
    atomic_store_explicit(&ch->me->consumed, ch->consumed, memory_order_release);
    leave(ch);
}

/* ---- consuming ------------------------------------------------------------------ */

/* Entries waiting in the peer's ring (> 0), none (0), or QLPC_E_INDEX. */
static int available(qlpc_chan *ch)
{
    uint32_t waiting = atomic_load_explicit(&ch->peer->tail, memory_order_acquire) - ch->head;
    if (waiting > ch->slots)
        return QLPC_E_INDEX;
    return waiting != 0;
}

int qlpc_waiting(qlpc_chan *ch)
{
    int rc;

    if (ch == NULL || !enter(ch))
        return QLPC_CLOSED;
    rc = available(ch);
    leave(ch);
    return rc;
}

/* Has the socket anything for us (data, hang-up, or the peer's process gone)? */
static int socket_stirred(qlpc_chan *ch)
{
    uint32_t sends;
    struct pollfd fds[2];

    if (atomic_load(&ch->hangup))
        return 1;
    sends = atomic_load_explicit(&ch->peer->sock_sends, memory_order_acquire);
    if (sends == ch->sock_seen && !ch->force_poll)
        return 0;
    fds[0] = (struct pollfd){.fd = ch->sock, .events = POLLIN};
    fds[1] = (struct pollfd){.fd = ch->pidfd, .events = POLLIN};
    if (poll(fds, ch->pidfd >= 0 ? 2 : 1, 0) > 0)
        return 1;
    ch->sock_seen = sends;
    ch->force_poll = 0;
    return 0;
}

/* 1 when an entry waits, a status when the caller must act, 0 to keep waiting. */
static int ready(qlpc_chan *ch)
{
    int rc = available(ch);
    if (rc != 0)
        return rc;
    if (atomic_load(&ch->closing))
        return QLPC_CLOSED;
    if (atomic_exchange(&ch->kicked, 0))
        return QLPC_CHECK;
    if (socket_stirred(ch))
        return QLPC_CHECK;
    return 0;
}

/* How long to spin: about twice what the peer has been taking to answer,
 * and not at all when that exceeds the budget (a block costs less then). */
static uint64_t spin_budget(const qlpc_chan *ch)
{
    uint64_t budget = 2u * (uint64_t)ch->expect_ns;
    if (ch->expect_ns > ch->spin_max_ns)
        return 0;
    if (budget < SPIN_FLOOR_NS)
        budget = SPIN_FLOOR_NS;
    return budget < ch->spin_max_ns ? budget : ch->spin_max_ns;
}

/* Learn from one answer: it was posted `posted` ns (the peer's clock stamp,
 * CLOCK_MONOTONIC is system-wide) after we began to wait at `since`. That
 * covers the peer's wake-up when we had to wake it, but not our own. A lie
 * only changes how long we spin, within the budget. */
static void learn(qlpc_chan *ch, uint64_t since, uint64_t posted)
{
    uint64_t cap = 4u * (uint64_t)ch->spin_max_ns;
    uint64_t sample = posted > since ? posted - since : 0;
    if (sample > cap)
        sample = cap;
    ch->expect_ns = (uint32_t)((3u * (uint64_t)ch->expect_ns + sample) / 4u);
}

/* Spinning pays only while the peer can answer meanwhile: it runs on another
 * CPU, and is running (or is being woken by us). */
static int worth_spinning(qlpc_chan *ch, int cpu, int woke)
{
    int32_t peer_cpu = atomic_load_explicit(&ch->peer->cpu, memory_order_relaxed);
    uint32_t state;

    state = atomic_load_explicit(&ch->peer->state, memory_order_relaxed);
    if (spin_budget(ch) == 0 || cpu < 0 || peer_cpu < 0 || peer_cpu == cpu)
        return 0;
    return state == ST_BUSY || state == ST_SPIN || (state == ST_FUTEX && woke);
}

/* Spin until an entry shows up (1, or QLPC_E_INDEX if the peer's index lies)
 * or spinning stops paying (0). */
static int spin(qlpc_chan *ch, int cpu, int woke, uint64_t deadline)
{
    uint64_t limit = now_ns() + spin_budget(ch);
    uint32_t sends = atomic_load_explicit(&ch->peer->sock_sends, memory_order_relaxed);

    if (limit > deadline)
        limit = deadline;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        if (atomic_load_explicit(&ch->peer->tail, memory_order_acquire) != ch->head) {
            count(ch, QLPC_SPINS_CAUGHT);
            /* The peer's index is checked as on every other path: a lying one
             * must not send take() to a stale slot. */
            return available(ch);
        }
        if ((i & 31) != 0)
            continue;
        if (atomic_load(&ch->closing) || atomic_load(&ch->hangup) ||
            atomic_load_explicit(&ch->peer->sock_sends, memory_order_relaxed) != sends ||
            now_ns() >= limit || !worth_spinning(ch, cpu, woke)) {
            count(ch, QLPC_SPINS_MISSED);
            return 0;
        }
    }
}

/* Wait until an entry waits (1) or a status: QLPC_TIMEOUT, QLPC_CHECK,
 * QLPC_CLOSED, QLPC_E_INDEX. `deadline` is absolute (CLOCK_MONOTONIC ns,
 * NO_DEADLINE for none, 0 to only look). *since is when the waiting began,
 * 0 if there was none. */
static int wait_entry(qlpc_chan *ch, uint64_t deadline, uint64_t *since)
{
    int cpu = this_cpu();
    /* A peer we just woke is about to run: worth waiting for, across CPUs. */
    int woke = (int)atomic_exchange_explicit(&ch->woke, 0, memory_order_relaxed);
    int rc;

    atomic_store_explicit(&ch->me->cpu, cpu, memory_order_relaxed);
    atomic_store_explicit(&ch->me->state, ST_SPIN, memory_order_relaxed);
    *since = 0;
    rc = ready(ch);
    if (rc != 0)
        return rc;
    if (deadline == 0 || (*since = now_ns()) >= deadline) {
        *since = 0;
        return QLPC_TIMEOUT;
    }
    for (;;) {
        uint32_t seen;
        uint64_t now;
        int64_t slice;
        int interrupted;

        if (worth_spinning(ch, cpu, woke) && (rc = spin(ch, cpu, woke, deadline)) != 0)
            return rc;
        /* Announce the sleep before the last look, so a producer that posts
         * after that look sees it and wakes us (both sides use seq_cst). */
        atomic_store(&ch->me->state, ST_FUTEX);
        seen = atomic_load(&ch->peer->seq);
        rc = ready(ch);
        now = now_ns();
        if (rc == 0 && now >= deadline)
            rc = QLPC_TIMEOUT;
        if (rc != 0) {
            atomic_store_explicit(&ch->me->state, ST_SPIN, memory_order_relaxed);
            return rc;
        }
        slice = deadline - now > (uint64_t)SAFETY_SLICE_NS ? SAFETY_SLICE_NS : (int64_t)(deadline - now);
        count(ch, QLPC_SLEEPS);
        interrupted = futex_wait(&ch->peer->seq, seen, slice, 0);
        atomic_store_explicit(&ch->me->state, ST_SPIN, memory_order_relaxed);
        if (slice == SAFETY_SLICE_NS && atomic_load(&ch->peer->seq) == seen)
            ch->force_poll = 1;
        cpu = this_cpu();
        atomic_store_explicit(&ch->me->cpu, cpu, memory_order_relaxed);
        woke = 0;
        rc = ready(ch);
        if (rc != 0)
            return rc;
        /* Back to Python, whose handler may raise (Ctrl-C); the caller waits on. */
        if (interrupted)
            return QLPC_INTR;
    }
}

/* The process behind pidfd, with its current real uid and gid, into info:
 * 0 or an errno (ESRCH: it is gone; ENOTTY, EINVAL or EOPNOTSUPP: the
 * kernel predates PIDFD_GET_INFO). */
static int read_creds(int pidfd, qlpc_info *info)
{
    struct pidfd_info_v0 kernel;

    memset(&kernel, 0, sizeof kernel);
    kernel.mask = PIDFD_INFO_CREDS_BIT;
    while (ioctl(pidfd, PIDFD_GET_INFO_V0, &kernel) != 0) {
        if (errno != EINTR)
            return errno;
    }
    if ((kernel.mask & PIDFD_INFO_CREDS_BIT) == 0)
        return EOPNOTSUPP;
    info->pid = kernel.pid;
    info->uid = kernel.ruid;
    info->gid = kernel.rgid;
    return 0;
}

/* Attest an entry about to be taken (the caller holds `taking`): 0, with
 * info->attested set to the credentials' generation when the kernel could
 * tell them, or QLPC_CHECK when the peer's process is gone: the entry stays,
 * and the caller's socket read reports the death. */
static int attest_peer(qlpc_chan *ch, qlpc_info *info)
{
    int err;

    info->attested = 0;
    if (ch->pidfd < 0)
        return 0;
    err = read_creds(ch->pidfd, info);
    if (err == ESRCH) {
        atomic_store(&ch->hangup, 1);
        return QLPC_CHECK;
    }
    if (err != 0)
        return 0;
    if (ch->cred_gen == 0 || info->pid != ch->cred_pid || info->uid != ch->cred_uid || info->gid != ch->cred_gid) {
        ch->cred_gen = ch->cred_gen == UINT32_MAX ? 1 : ch->cred_gen + 1;
        ch->cred_pid = info->pid;
        ch->cred_uid = info->uid;
        ch->cred_gid = info->gid;
    }
    info->attested = ch->cred_gen;
    return 0;
}

int qlpc_attest_probe(void)
{
    qlpc_info info;
    int err, pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);

    if (pidfd < 0)
        return errno;
    err = read_creds(pidfd, &info);
    close(pidfd);
    return err;
}

/* A call outside a wait that reads the peer's ring: hold a use and the consumer's turn.
 * 0, or QLPC_CLOSED / QLPC_BUSY (then neither is held). */
static int begin_taking(qlpc_chan *ch)
{
    if (!enter(ch))
        return QLPC_CLOSED;
    if (atomic_exchange_explicit(&ch->taking, 1, memory_order_acquire)) {
        leave(ch);
        return QLPC_BUSY;
    }
    return 0;
}

int qlpc_attest(qlpc_chan *ch, qlpc_info *info)
{
    int rc;

    if (ch == NULL || info == NULL)
        return QLPC_E_ARGS;
    if ((rc = begin_taking(ch)) != 0)
        return rc;
    rc = attest_peer(ch, info);
    atomic_store_explicit(&ch->taking, 0, memory_order_release);
    leave(ch);
    return rc;
}

/* An entry was taken (copied out, or dropped): the producer may reuse its slot and bulk area. */
static void advance(qlpc_chan *ch, uint32_t length)
{
    ch->head++;
    atomic_store_explicit(&ch->me->head, ch->head, memory_order_release);
    atomic_fetch_add_explicit(&ch->counts[QLPC_MESSAGES_IN], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&ch->counts[QLPC_BYTES_IN], length, memory_order_relaxed);
}

/* Copy the next entry out, then check it: its length, kind and ids. We had
 * been waiting for it since `since` (0: it was there at once). With `attest`
 * a reply to `want` (or a request) is attested before it is taken. A bulk
 * entry is only described in info (QLPC_LARGE): qlpc_take_bulk takes it, into
 * memory the caller sized; a stale one (a reply to another request) is dropped. */
static int take(qlpc_chan *ch, qlpc_info *info, char *buf, uint64_t since, int attest, uint32_t want)
{
    const uint8_t *slot = ch->in_ring + (size_t)(ch->head & ch->mask) * ch->slot_size;
    struct entry header;
    int bulk, stale;

    memcpy(&header, slot, sizeof header);
    if (header.kind != ch->in_kind && (header.kind & ~(uint32_t)QLPC_VIEW) != (ch->in_kind | QLPC_BULK))
        return QLPC_E_KIND;
    bulk = header.kind != ch->in_kind;
    /* A slot's payload at most, the bulk area's for a bulk entry; and this side's message size
     * limit for either (the socket's frame decoder holds any frame to it too). */
    if (header.length > (bulk ? QLPC_BULK_SIZE : ch->payload_max) || header.length > ch->in_max)
        return QLPC_E_LENGTH;
    if (header.reserved != 0)
        return QLPC_E_RESERVED;
    if (ch->in_kind == QLPC_REQUEST ? (header.message_id & QLPC_ID_BIT) == 0 || header.callback_id != 0
                                    : (header.callback_id & QLPC_ID_BIT) == 0 || header.message_id != 0)
        return QLPC_E_RESERVED;
    stale = want != 0 && header.callback_id != want;
    if (attest && !stale) {
        int rc = attest_peer(ch, info);
        if (rc != 0)
            return rc;
    }
    info->message_id = header.message_id;
    info->callback_id = header.callback_id;
    info->sender_tid = header.sender_tid;
    info->length = header.length;
    info->bulk = (uint32_t)bulk;
    info->view = (header.kind & QLPC_VIEW) != 0;
    if (since != 0)
        learn(ch, since, header.posted_ns);
    if (bulk && !stale)
        return QLPC_LARGE; /* the caller allocates, then qlpc_take_bulk copies and takes */
    if (!bulk)
        memcpy(buf, slot + QLPC_ENTRY_HEADER, header.length);
    advance(ch, header.length);
    info->taken = 1;
    return (int)header.length;
}

/* Wait for the next entry; with `want` != 0, skip replies to other requests. */
static int receive(qlpc_chan *ch, uint32_t want, uint64_t deadline, qlpc_info *info, char *buf, int attest)
{
    int rc;

    if (atomic_exchange_explicit(&ch->taking, 1, memory_order_acquire))
        return QLPC_BUSY;
    for (;;) {
        uint64_t since;
        rc = wait_entry(ch, deadline, &since);
        if (rc == 1)
            rc = take(ch, info, buf, since, attest, want);
        else if (rc == QLPC_CHECK && since != 0)
            /* A message too large for the ring came by the socket: the peer's pace
             * all the same, which the next wait's spin should match. */
            learn(ch, since, now_ns());
        if (rc < 0 || want == 0 || info->callback_id == want)
            break;
        /* A late reply to a request whose caller gave up: drop it. A peer that
         * keeps them coming must not hold us past our deadline or a close
         * (wait_entry looks at neither while entries wait). */
        info->dropped++;
        if (atomic_load(&ch->closing)) {
            rc = QLPC_CLOSED;
            break;
        }
        if (now_ns() >= deadline) {
            rc = QLPC_TIMEOUT;
            break;
        }
    }
    atomic_store_explicit(&ch->taking, 0, memory_order_release);
    return rc;
}

/* A caller's deadline in our terms: -1 is none; any moment already past only looks. */
static uint64_t absolute(int64_t deadline_ns)
{
    return deadline_ns < 0 ? NO_DEADLINE : deadline_ns == 0 ? 1 : (uint64_t)deadline_ns;
}

static int start_call(qlpc_chan *ch, uint32_t role, qlpc_info *info, char *buf)
{
    if (ch == NULL || info == NULL || buf == NULL || ch->role != role)
        return QLPC_E_ARGS;
    info->posted = 0;
    info->dropped = 0;
    info->taken = 0;
    info->bulk = 0;
    info->view = 0;
    info->attested = 0;
    if (!enter(ch))
        return QLPC_CLOSED;
    return 0;
}

static int end_call(qlpc_chan *ch, int rc)
{
    atomic_store_explicit(&ch->me->state, ST_BUSY, memory_order_relaxed);
    leave(ch);
    return rc;
}

/* The call in flight got its reply, or its caller gave up on it. */
static void call_over(qlpc_chan *ch)
{
    atomic_store_explicit(&ch->calling_id, 0, memory_order_relaxed);
    atomic_store_explicit(&ch->calling, 0, memory_order_release);
}

int qlpc_call(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, const char *data, uint32_t len,
              int64_t deadline_ns)
{
    uint32_t id;
    int rc = start_call(ch, QLPC_CLIENT, info, buf);

    if (rc != 0)
        return rc;
    /* A peer that hung up gets nothing new: the caller reads the socket and sees why. */
    if (atomic_load(&ch->hangup))
        return end_call(ch, QLPC_CHECK);
    if (atomic_exchange_explicit(&ch->calling, 1, memory_order_acquire))
        return end_call(ch, QLPC_BUSY);
    ch->next_id = (ch->next_id + 1) & (QLPC_ID_BIT - 1);
    if (ch->next_id == 0)
        ch->next_id = 1;
    id = QLPC_ID_BIT | ch->next_id;
    /* Published before the post: a reply over the socket may beat our return. */
    atomic_store_explicit(&ch->calling_id, id, memory_order_relaxed);
    info->message_id = id;
    rc = post(ch, QLPC_REQUEST, id, 0, data, len);
    if (rc != 0 && rc != QLPC_DOORBELL) {
        call_over(ch);
        return end_call(ch, rc);
    }
    info->posted = 1;
    if (rc == QLPC_DOORBELL)
        return end_call(ch, rc);
    rc = receive(ch, id, absolute(deadline_ns), info, buf, attest);
    if (rc >= 0)
        call_over(ch);
    return end_call(ch, rc);
}

int qlpc_wait_reply(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, int64_t deadline_ns)
{
    uint32_t id;
    int rc = start_call(ch, QLPC_CLIENT, info, buf);

    if (rc != 0)
        return rc;
    id = atomic_load_explicit(&ch->calling_id, memory_order_relaxed);
    if (id == 0)
        return end_call(ch, QLPC_E_ARGS);
    rc = receive(ch, id, absolute(deadline_ns), info, buf, attest);
    if (rc >= 0)
        call_over(ch);
    return end_call(ch, rc);
}

void qlpc_call_done(qlpc_chan *ch)
{
    if (ch != NULL)
        call_over(ch);
}

uint32_t qlpc_in_flight(qlpc_chan *ch)
{
    return ch == NULL ? 0 : atomic_load_explicit(&ch->calling_id, memory_order_relaxed);
}

/* Take the bulk entry info describes: copy it into dst, or (dst NULL and `as_view`) hold the
 * peer's area for a view of it. Its length, or a status (see qlpc_take_bulk). */
static int take_described(qlpc_chan *ch, qlpc_info *info, char *dst, uint32_t len, int as_view)
{
    struct entry header;
    int rc;

    if ((rc = begin_taking(ch)) != 0)
        return rc;
    rc = available(ch);
    if (rc == 1) {
        /* Still the entry the wait described? Its header is copied and checked again, as
         * the peer may have rewritten it since: then it is not taken, and the next wait
         * checks it afresh (only the peer's connection loses time). */
        memcpy(&header, ch->in_ring + (size_t)(ch->head & ch->mask) * ch->slot_size, sizeof header);
        if ((header.kind & ~(uint32_t)QLPC_VIEW) != (ch->in_kind | QLPC_BULK) || header.length != len ||
            header.message_id != info->message_id || header.callback_id != info->callback_id ||
            (as_view && !(header.kind & QLPC_VIEW))) {
            rc = QLPC_BUSY;
        } else if (as_view && atomic_load(&ch->me->bulk_held)) {
            rc = QLPC_E_VIEW;
        } else {
            if (as_view)
                atomic_store(&ch->me->bulk_held, 1); /* before the head: see bulk_in_use */
            else if (len != 0)
                memcpy(dst, ch->in_bulk, len);
            advance(ch, len);
            info->taken = 1;
            info->view = (uint32_t)as_view;
            rc = (int)len;
        }
    } else if (rc == 0) {
        rc = QLPC_BUSY;
    }
    atomic_store_explicit(&ch->taking, 0, memory_order_release);
    if (rc >= 0 && ch->role == QLPC_CLIENT && info->callback_id == atomic_load(&ch->calling_id))
        call_over(ch);
    leave(ch);
    return rc;
}

int qlpc_take_bulk(qlpc_chan *ch, qlpc_info *info, char *dst, uint32_t len)
{
    if (ch == NULL || info == NULL || !info->bulk || len != info->length || (dst == NULL && len != 0))
        return QLPC_E_ARGS;
    return take_described(ch, info, dst, len, 0);
}

int qlpc_take_view(qlpc_chan *ch, qlpc_info *info)
{
    if (ch == NULL || info == NULL || !info->bulk || !info->view)
        return QLPC_E_ARGS;
    return take_described(ch, info, NULL, info->length, 1);
}

void qlpc_release_view(qlpc_chan *ch)
{
    if (ch == NULL || !enter(ch))
        return;
    atomic_store_explicit(&ch->me->bulk_held, 0, memory_order_release);
    leave(ch);
}

int qlpc_reply_wait(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, uint32_t callback_id,
                    const char *data, uint32_t len, int64_t timeout_ns)
{
    int rc;

    if (callback_id != 0)
        t_reply_posted = 0;
    rc = start_call(ch, QLPC_SERVER, info, buf);
    if (rc != 0)
        return rc;
    if (callback_id != 0) {
        rc = post(ch, QLPC_REPLY, 0, callback_id, data, len);
        if (rc != 0 && rc != QLPC_DOORBELL)
            return end_call(ch, rc);
        info->posted = 1;
        if (rc == QLPC_DOORBELL)
            return end_call(ch, rc);
    }
    return end_call(ch, receive(ch, 0, timeout_ns < 0 ? NO_DEADLINE : timeout_ns == 0 ? 0 : now_ns() + (uint64_t)timeout_ns,
                                info, buf, attest));
}

int qlpc_reply(qlpc_chan *ch, uint32_t callback_id, const char *data, uint32_t len)
{
    int rc;

    t_reply_posted = 0;
    if (ch == NULL || ch->role != QLPC_SERVER || callback_id == 0)
        return QLPC_E_ARGS;
    if (!enter(ch))
        return QLPC_CLOSED;
    rc = post(ch, QLPC_REPLY, 0, callback_id, data, len);
    leave(ch);
    return rc;
}

uint32_t qlpc_reply_posted(void)
{
    return t_reply_posted;
}

int qlpc_arm_poll(qlpc_chan *ch)
{
    int rc;

    if (ch == NULL || !enter(ch))
        return QLPC_CLOSED;
    if (atomic_exchange_explicit(&ch->taking, 1, memory_order_acquire)) {
        /* Another thread is taking entries right now; it will deliver them. */
        leave(ch);
        return 0;
    }
    atomic_store(&ch->me->state, ST_POLL);
    rc = available(ch);
    atomic_store_explicit(&ch->taking, 0, memory_order_release);
    leave(ch);
    return rc;
}

void qlpc_disarm_poll(qlpc_chan *ch)
{
    uint32_t armed = ST_POLL;

    if (ch == NULL || !enter(ch))
        return;
    /* Only from ST_POLL: a peer that rang the doorbell has set ST_BUSY already. */
    atomic_compare_exchange_strong(&ch->me->state, &armed, ST_BUSY);
    leave(ch);
}
