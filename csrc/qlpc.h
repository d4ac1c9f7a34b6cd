/* Quick-LPC: a connection's pair of shared-memory rings with futex wake-ups.
 * This header is also part of the cffi cdef (build_ffi.py strips the include
 * guard): keep it free of other macros.
 *
 * Layout of the region (one sealed memfd, created by the server, mapped
 * read-write by both sides):
 *
 *   0                     region header: magic, version, slots, slot_size
 *   128                   the server's side words (see struct side in qlpc.c)
 *   256                   the client's side words
 *   512                   ring the server produces (replies), slots x slot_size
 *   512 + slots*slot_size ring the client produces (requests)
 *   B (the next page)     the server's bulk area (a reply too large for a slot), QLPC_BULK_SIZE
 *   B + QLPC_BULK_SIZE    the client's bulk area (a request too large for a slot)
 *
 * Every slot starts with a 32-byte entry header (kind, length, message id,
 * callback id, sender tid, three reserved words) followed by the payload.
 * An entry of kind QLPC_BULK | kind carries no payload in its slot: its
 * `length` bytes are at the start of its producer's bulk area, which holds one
 * message at a time (the producer writes it again only once the consumer's
 * head shows that entry taken, and the consumer copies it out before that).
 * With QLPC_VIEW also set, the producer wrote the body in place (a view lent
 * by qlpc_lend_bulk): the consumer may take it as a view (qlpc_take_view)
 * rather than copy it, and then holds the area (its side's `bulk_held`) until
 * it releases the view; the producer writes the area again only after that.
 * Bulk areas are sparse until used: an idle connection costs no memory for them.
 * Each side writes only its own words and its own ring, and keeps its own
 * indices privately: what it reads from the other side is checked first.
 */
#ifndef ALPC_QLPC_H
#define ALPC_QLPC_H

#include <stddef.h>
#include <stdint.h>

enum {
    QLPC_SERVER = 0,
    QLPC_CLIENT = 1,
    QLPC_REQUEST = 1,
    QLPC_REPLY = 2,
    QLPC_BULK = 16,        /* or'ed into an entry's kind: its payload is in the bulk area */
    QLPC_VIEW = 32,        /* or'ed with QLPC_BULK: written in place by a view, and may be taken as one */
    QLPC_BULK_SIZE = 1048576, /* each side's bulk area: the largest message the rings carry */
    QLPC_REGION_HEADER = 512,
    QLPC_ENTRY_HEADER = 32,
    QLPC_MIN_SLOTS = 1,
    QLPC_MAX_SLOTS = 1024,
    QLPC_MIN_SLOT_SIZE = 64,
    QLPC_MAX_SLOT_SIZE = 65536,
    QLPC_ID_BIT = 0x40000000, /* set in the ids of ring requests, never in socket ones */
    /* Statuses. A non-negative result is the length of a received payload. */
    QLPC_TIMEOUT = -1,    /* nothing arrived in time */
    QLPC_CHECK = -2,      /* the socket has something (or the peer hung up): read it */
    QLPC_CLOSED = -3,     /* this side closed the channel */
    QLPC_FULL = -4,       /* the ring has no free slot: send over the socket */
    QLPC_ORDER = -5,      /* the peer has not read all our socket bytes: send over the socket */
    QLPC_TOO_LARGE = -6,  /* the payload does not fit a slot: send over the socket */
    QLPC_DOORBELL = -7,   /* posted; the peer waits in poll(): ring its socket doorbell */
    QLPC_BUSY = -8,       /* another thread is posting: send over the socket */
    QLPC_INTR = -9,       /* a signal arrived while blocked: run its handler, then wait on */
    QLPC_LARGE = -10,     /* the entry waiting is a bulk one (ids and length in info, nothing
                           * taken yet): allocate info->length bytes and call qlpc_take_bulk */
    /* The peer broke the ring protocol; the connection must be dropped. */
    QLPC_E_INDEX = -20,   /* an index claims more entries than the ring holds */
    QLPC_E_KIND = -21,    /* an entry of the wrong kind for this direction */
    QLPC_E_LENGTH = -22,  /* an entry longer than a slot's payload */
    QLPC_E_RESERVED = -23,/* non-zero reserved words, or a zero message id */
    QLPC_E_LAYOUT = -24,  /* the region header does not match what was agreed */
    QLPC_E_ARGS = -25,    /* bad arguments (a bug in the caller) */
    QLPC_E_SYSTEM = -26,  /* mmap, dup or the watcher failed */
    QLPC_E_VIEW = -27,    /* a view entry while this side still holds the peer's last one */
    /* Counters for qlpc_count. */
    QLPC_MESSAGES_IN = 0,
    QLPC_BYTES_IN = 1,
    QLPC_MESSAGES_OUT = 2,
    QLPC_BYTES_OUT = 3,
    QLPC_SPINS_CAUGHT = 4, /* spins that saw the entry arrive */
    QLPC_SPINS_MISSED = 5, /* spins that gave up */
    QLPC_SLEEPS = 6,       /* FUTEX_WAITs */
    QLPC_WAKES = 7,        /* FUTEX_WAKEs sent to the peer */
    QLPC_COUNTERS = 8
};

/* One side's private state of a channel; opaque to Python. */
typedef struct qlpc_chan qlpc_chan;

/* What a wait received besides the payload. */
typedef struct {
    uint32_t message_id;
    uint32_t callback_id;
    uint32_t sender_tid;
    uint32_t posted;   /* 1 when the call's own message went into the ring */
    uint32_t dropped;  /* stale replies (to abandoned requests) skipped */
    uint32_t taken;    /* 1 when the call took an entry (its `length` bytes are in buf): a
                        * signal handler raising as the call returns loses the return value */
    uint32_t length;
    uint32_t bulk;     /* 1 when the entry is (or was, once taken) a bulk one */
    uint32_t view;     /* 1 when that bulk entry was written as a view (QLPC_VIEW) and, once
                        * taken, was taken as one (qlpc_take_view; qlpc_take_bulk clears it) */
    /* Set by a call that attests what it takes (and by qlpc_attest): non-zero when pid,
     * uid and gid below are the kernel's word (PIDFD_GET_INFO on the peer's pidfd, read
     * as the entry was taken) for the process that wrote it, 0 when the kernel cannot
     * say. The value is a generation: it changes whenever the credentials differ from
     * the last ones attested on this channel, so a caller that kept what it built for
     * a generation need not read them again. */
    uint32_t attested;
    uint32_t pid;
    uint32_t uid;      /* real uid and gid, as SCM_CREDENTIALS carries */
    uint32_t gid;
} qlpc_info;

/* Bytes of a region with this geometry, or 0 if the geometry is invalid
 * (slots a power of two in [1, 1024], slot_size a multiple of 64 in
 * [64, 65536]). */
uint64_t qlpc_region_size(uint32_t slots, uint32_t slot_size);

/* 0 when this kernel attests ring messages (PIDFD_GET_INFO, Linux 6.13), else
 * the errno that says why not. Probes each time it is called: cache it. */
int qlpc_attest_probe(void);

/* Map the region in memfd (which stays the caller's) as `role`, and watch
 * sock_fd and pidfd (both duplicated; pidfd may be -1) for the peer hanging
 * up or dying, so a waiter blocked in the futex wakes at once. The server
 * initialises the region; the client checks its header against the
 * geometry agreed at connect. The mapping is MADV_DONTFORK: a forked child
 * has no access to the rings (it would write as this process), and its
 * copies of every channel are closed. spin_ns bounds a wait's spinning. Returns NULL
 * with *error set to a QLPC_E_* code on failure (errno tells more). */
qlpc_chan *qlpc_open(int memfd, uint64_t size, uint32_t slots, uint32_t slot_size, int role,
                     int sock_fd, int pidfd, uint32_t spin_ns, int *error);

/* Stop: wake every waiter (they return QLPC_CLOSED), stop watching, wait
 * for calls in progress to leave, unmap and close the duplicates.
 * Idempotent; the struct itself stays valid until qlpc_free. */
void qlpc_close(qlpc_chan *ch);

/* Keep the watcher thread running even with no channel (a server port that
 * offers the rings holds it, so connections coming and going do not start
 * and stop a thread each). 0 or QLPC_E_SYSTEM. Every hold is released by one
 * qlpc_unhold. */
int qlpc_hold(void);
void qlpc_unhold(void);

/* qlpc_close, then free the struct (the cffi finalizer). */
void qlpc_free(qlpc_chan *ch);

/* 1 once the peer has attached to the rings (the client announces it). */
int qlpc_peer_attached(qlpc_chan *ch);

/* Largest payload a slot carries. */
uint32_t qlpc_payload_max(qlpc_chan *ch);

/* Entries from the peer longer than `max` (at most QLPC_BULK_SIZE, the default), in a slot
 * or in the bulk area, are a protocol error (QLPC_E_LENGTH): this side's message size limit. */
void qlpc_limit_bulk(qlpc_chan *ch, uint32_t max);

/* Give the pages of this side's bulk area back to the system (MADV_REMOVE): 0, QLPC_FULL
 * while the peer has not copied our last bulk body out (nothing is removed then), QLPC_BUSY
 * while another thread posts, QLPC_CLOSED, or QLPC_E_SYSTEM. The next bulk post faults in
 * fresh pages. Only the producer trims its area: it alone knows when nothing is in it. */
int qlpc_trim_bulk(qlpc_chan *ch);

/* Lend this side's bulk area to a view the caller fills in place, as loan number `loan`
 * (1..INT_MAX, the caller's choice: named before the call, a loan whose return value a
 * signal handler lost can still be ended; a number not reused while an older loan of it
 * may be in force): `loan`, QLPC_FULL while the area holds a body the peer has not taken or
 * still holds as a view (or is lent already), QLPC_BUSY while another thread posts,
 * QLPC_CLOSED, QLPC_E_ARGS for a number out of range. While lent, posts
 * that would copy a body into the area get QLPC_FULL; a post with data NULL and len > 0
 * publishes the lent area's first len bytes instead (QLPC_VIEW) and ends the loan.
 * qlpc_unlend_bulk ends it without posting (nothing if that loan is over already). */
int qlpc_lend_bulk(qlpc_chan *ch, uint32_t loan);
void qlpc_unlend_bulk(qlpc_chan *ch, uint32_t loan);

/* 1 while `loan` is in force: a post in place after it did not happen. (Not "is the area
 * lent": another thread may have taken a new loan as soon as a post ended this one.) */
int qlpc_loan_in_force(qlpc_chan *ch, uint32_t loan);

/* After QLPC_LARGE with info->view: take the entry without copying it, and hold
 * the peer's bulk area for the caller's view of it (the caller maps the area
 * itself) until qlpc_release_view. Its length, QLPC_BUSY as qlpc_take_bulk, or a
 * status (QLPC_E_VIEW when the last view is still held: the peer broke the rule). */
int qlpc_take_view(qlpc_chan *ch, qlpc_info *info);

/* The view qlpc_take_view held is released: the peer may write its area again. */
void qlpc_release_view(qlpc_chan *ch);

/* Map a bulk area again at `at` (page-aligned; QLPC_BULK_SIZE bytes that the caller
 * mapped itself, replaced here): this side's own (`own`, read-write: views it lends) or
 * the peer's (read-only: views it receives). The same pages, with no fd: the caller's
 * mapping outlives the channel, and unlike the rings a forked child inherits it. 0,
 * QLPC_CLOSED, QLPC_E_ARGS, or QLPC_E_SYSTEM (errno tells). */
int qlpc_map_bulk(qlpc_chan *ch, int own, void *at);

/* After QLPC_LARGE: copy the bulk entry described by info (its ids and length)
 * into dst, which holds `len` == info->length bytes, and take it. Returns len,
 * QLPC_BUSY when that entry is no longer the next one (another thread took it,
 * or the peer rewrote it: wait again), or a status. A caller that never calls
 * this leaves the entry in the ring, where the next wait finds it again. */
int qlpc_take_bulk(qlpc_chan *ch, qlpc_info *info, char *dst, uint32_t len);

/* Client: send a request through the ring and wait for its reply (replies
 * to abandoned requests are skipped). The request's id, chosen here, has
 * QLPC_ID_BIT set (ids of requests sent over the socket never do) and is in
 * info->message_id. Returns the reply's length (payload in buf, which holds
 * qlpc_payload_max bytes), or a status; info->posted tells whether the
 * request went out (if not, send it over the socket). A payload larger than a
 * slot's goes through the bulk area (QLPC_FULL while the server has not taken
 * the last one yet). A reply from the bulk area returns QLPC_LARGE first. One call is in flight
 * at a time (QLPC_BUSY). deadline_ns is absolute CLOCK_MONOTONIC, -1 none.
 *
 * With `attest` (here, in qlpc_wait_reply and qlpc_reply_wait) the entry
 * taken is attested: the peer's current credentials go into info (see
 * qlpc_info.attested). A peer whose process is gone (reaped) cannot be
 * attested: its entry stays in the ring and the call returns QLPC_CHECK, as
 * for a hang-up (the socket then tells the death). */
int qlpc_call(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, const char *data, uint32_t len,
              int64_t deadline_ns);

/* Client: keep waiting for the reply of the call in flight (after
 * QLPC_CHECK, QLPC_TIMEOUT or QLPC_DOORBELL from qlpc_call). */
int qlpc_wait_reply(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, int64_t deadline_ns);

/* Client: the call in flight is over without a reply from the ring (its reply
 * came over the socket, or the caller gave up: a late reply is dropped). */
void qlpc_call_done(qlpc_chan *ch);

/* Client: the id of the call in flight, 0 if none. */
uint32_t qlpc_in_flight(qlpc_chan *ch);

/* Client: the reply to the call in flight came over the socket and another
 * thread filed it: wake this side's waiter, whose wait returns QLPC_CHECK. */
void qlpc_kick(qlpc_chan *ch);

/* Server: reply to callback_id through the ring (none if it is 0), then wait
 * for the next request (ALPC's reply-and-receive). Returns the request's
 * length with its ids in info, or a status; info->posted tells whether the
 * reply went out. timeout_ns is relative: -1 none, 0 only looks. */
int qlpc_reply_wait(qlpc_chan *ch, qlpc_info *info, char *buf, int attest, uint32_t callback_id,
                    const char *data, uint32_t len, int64_t timeout_ns);

/* Server: reply to callback_id through the ring without waiting for anything.
 * Returns 0 or a status (nothing was posted unless it is 0 or QLPC_DOORBELL). */
int qlpc_reply(qlpc_chan *ch, uint32_t callback_id, const char *data, uint32_t len);

/* Server: the callback id of the reply that this thread's last qlpc_reply, or qlpc_reply_wait
 * with a reply, posted; 0 if that call posted none. A caller whose status a signal handler
 * cut off (CPython runs it as the call returns) asks here whether its reply went. */
uint32_t qlpc_reply_posted(void);

/* We wrote nbytes to the socket: count them and wake a peer blocked in the
 * futex so it looks at the socket. With `ordered` (the write carried a
 * message) a ring message is held back until the peer has read them, keeping
 * the two paths in order; bytes of the runtime alone (releases, credits) may be
 * overtaken, so the release that follows every large socket reply does not send
 * the next ring request to the socket too. */
void qlpc_sent(qlpc_chan *ch, uint64_t nbytes, int ordered);

/* We read and dispatched nbytes from the socket: tell the peer. */
void qlpc_consumed(qlpc_chan *ch, uint64_t nbytes);

/* Server: 1 when entries wait in the client's ring now, 0 if none (none is
 * taken), or a status (QLPC_E_INDEX, QLPC_CLOSED). Only meaningful to the
 * thread that takes entries: a socket read checks it before skipping the ring. */
int qlpc_waiting(qlpc_chan *ch);

/* This side is about to wait in poll() instead of the futex: a peer posting
 * now must ring the socket doorbell. Returns 1 if entries are already
 * waiting (do not block), 0 otherwise, or a status. */
int qlpc_arm_poll(qlpc_chan *ch);

/* This side's wait in poll() is over: a peer posting from now on need not ring
 * the socket doorbell (the next wait arms again, or sleeps in the futex). */
void qlpc_disarm_poll(qlpc_chan *ch);

/* Attest now what the last call took without attesting (info->attested and
 * the ids). 0, QLPC_CHECK when the peer's process is gone, QLPC_CLOSED, or
 * QLPC_BUSY while another thread takes entries. */
int qlpc_attest(qlpc_chan *ch, qlpc_info *info);

/* This side's counters (QLPC_MESSAGES_IN ... QLPC_WAKES). */
uint64_t qlpc_count(qlpc_chan *ch, int which);

#endif
