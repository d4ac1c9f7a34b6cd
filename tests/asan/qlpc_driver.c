/* Drives the Quick-LPC ring code of csrc/qlpc.c against a hostile peer,
 * built with -fsanitize=address,undefined by `make asan`.
 *
 * The driver opens one real side of a channel (server or client) on a real
 * memfd and plays the other side itself: before every call it writes what a
 * malicious peer could write into its own words and ring (indices far ahead
 * or behind, lengths past a slot or the bulk area, wrong kinds, bulk entries,
 * ids without the ring bit, reserved words set, garbage states, a rewritten
 * region header). The side under test must answer with a payload no longer
 * than a slot, QLPC_LARGE for a bulk entry no longer than the bulk area (then
 * taken into a buffer of exactly its length), or a status, never read or write
 * outside the mapping or its buffers (the receive buffer is allocated at
 * exactly qlpc_payload_max bytes), and never block:
 * every wait has a deadline already due. Calls attest what they take now and
 * then, against a pidfd of the driver itself (the kernel's answer must name it).
 *
 *     qlpc_driver [ITERATIONS] [SEED]
 *
 * Prints "qlpc asan: N inputs, F failures" and exits 1 if F > 0.
 */
#define _GNU_SOURCE
#include "qlpc.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The side words as csrc/qlpc.c lays them out (struct side): byte offsets. */
enum {
    SIDE_SERVER = 128,
    SIDE_CLIENT = 256,
    W_SEQ = 0,
    W_TAIL = 4,
    W_HEAD = 8,
    W_STATE = 12,
    W_CPU = 16,
    W_ATTACHED = 20,
    W_SOCK_SENDS = 24,
    W_BULK_HELD = 28,
    W_CONSUMED = 32,
};

static uint64_t state = 0x9E3779B97F4A7C15ull;
static unsigned long inputs, failures;
/* How often each outcome came up: index 0 counts payloads, 1 + (-status) the statuses. */
static unsigned long seen[1 - QLPC_E_VIEW + 1];

static uint64_t next(void)
{
    /* xorshift64*: fast, and reproducible from the seed. */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}

static uint64_t below(uint64_t n) { return n ? next() % n : 0; }

/* The "peer" process whose credentials attesting calls read: this one. */
static int self_pidfd = -1;
static unsigned long attested;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            failures++;                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fputc('\n', stderr);                                 \
        }                                                        \
    } while (0)

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, sizeof v); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, sizeof v); }
static uint32_t get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* A u32 a hostile peer might pick: near `around`, at an edge, or anything. */
static uint32_t pick_index(uint32_t around, uint32_t slots)
{
    switch (below(6)) {
    case 0: return around;
    case 1: return around + 1;
    case 2: return around + (uint32_t)below(slots + 3);
    case 3: return around - (uint32_t)below(3);
    case 4: return around + slots + 1 + (uint32_t)below(1u << 20);
    default: return (uint32_t)next();
    }
}

static uint32_t pick_length(uint32_t payload_max)
{
    switch (below(7)) {
    case 0: return 0;
    case 1: return payload_max;
    case 2: return payload_max + 1;
    case 3: return (uint32_t)below(payload_max + 1);
    case 4: return UINT32_MAX;
    case 5: return below(2) ? QLPC_BULK_SIZE : QLPC_BULK_SIZE + 1u;
    default: return below(2) ? 0x80000000u : (uint32_t)next();
    }
}

struct rig {
    int memfd, sock[2];
    uint8_t *base;       /* the driver's own mapping: the hostile peer writes here */
    uint64_t size;
    uint32_t slots, slot_size;
    qlpc_chan *ch;       /* the side under test */
    int role;
    uint32_t loan;       /* the last loan of our bulk area (0: none yet) */
    uint32_t loans;      /* loans asked for: the next one's number is one more */
    char *buf;           /* exactly qlpc_payload_max bytes */
};

static int rig_open(struct rig *r, int role)
{
    static const uint32_t slot_choices[] = {1, 2, 8, 64};
    static const uint32_t size_choices[] = {64, 128, 512, 4096};
    int error = 0;

    memset(r, 0, sizeof *r);
    r->role = role;
    r->slots = slot_choices[below(4)];
    r->slot_size = size_choices[below(4)];
    r->size = qlpc_region_size(r->slots, r->slot_size);
    r->memfd = memfd_create("qlpc-asan", MFD_CLOEXEC);
    if (r->memfd < 0 || ftruncate(r->memfd, (off_t)r->size) != 0 ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, r->sock) != 0) {
        perror("qlpc_driver: set-up");
        exit(2);
    }
    r->base = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
    if (r->base == MAP_FAILED) {
        perror("qlpc_driver: mmap");
        exit(2);
    }
    if (role == QLPC_CLIENT) {
        /* The (hostile) server initialised the region: usually right, sometimes not. */
        uint32_t header[4] = {0x43504c51u, 3u, r->slots, r->slot_size};
        int lie = below(8) == 0;
        if (lie)
            header[below(4)] ^= 1u << below(32);
        memcpy(r->base, header, sizeof header);
        r->ch = qlpc_open(r->memfd, r->size, r->slots, r->slot_size, role, r->sock[0], self_pidfd, 0, &error);
        inputs++;
        CHECK((r->ch == NULL) == lie, "client open with %s header: %s (error %d)", lie ? "a wrong" : "the right",
              r->ch ? "opened" : "refused", error);
        CHECK(r->ch != NULL || error == QLPC_E_LAYOUT, "a wrong header gave error %d", error);
        if (r->ch == NULL && error == QLPC_E_LAYOUT)
            seen[1 - QLPC_E_LAYOUT]++;
        if (r->ch == NULL)
            return 0;
    } else {
        r->ch = qlpc_open(r->memfd, r->size, r->slots, r->slot_size, role, r->sock[0], self_pidfd, 0, &error);
        if (r->ch == NULL) {
            fprintf(stderr, "qlpc_driver: server open failed: %d (%s)\n", error, strerror(errno));
            exit(2);
        }
    }
    r->buf = malloc(qlpc_payload_max(r->ch));
    if (r->buf == NULL)
        exit(2);
    return 1;
}

static void rig_close(struct rig *r)
{
    qlpc_free(r->ch);
    free(r->buf);
    munmap(r->base, r->size);
    close(r->memfd);
    close(r->sock[0]);
    close(r->sock[1]);
}

/* The hostile peer writes its words and the entry the side under test reads next. */
static void misbehave(struct rig *r)
{
    uint8_t *me = r->base + (r->role == QLPC_SERVER ? SIDE_SERVER : SIDE_CLIENT);
    uint8_t *peer = r->base + (r->role == QLPC_SERVER ? SIDE_CLIENT : SIDE_SERVER);
    uint8_t *server_ring = r->base + QLPC_REGION_HEADER;
    uint8_t *in_ring = r->role == QLPC_SERVER ? server_ring + (size_t)r->slots * r->slot_size : server_ring;
    uint32_t payload_max = r->slot_size - QLPC_ENTRY_HEADER;
    uint32_t my_head = get32(me + W_HEAD), my_tail = get32(me + W_TAIL);
    uint32_t in_kind = r->role == QLPC_SERVER ? QLPC_REQUEST : QLPC_REPLY;
    uint8_t *slot = in_ring + (size_t)(my_head & (r->slots - 1)) * r->slot_size;
    uint32_t id = (uint32_t)below(2) ? (QLPC_ID_BIT | (uint32_t)below(1000)) : (uint32_t)next();
    uint32_t calling = qlpc_in_flight(r->ch);

    put32(peer + W_TAIL, pick_index(my_head, r->slots));
    put32(peer + W_HEAD, pick_index(my_tail - r->slots, r->slots));
    put32(peer + W_STATE, below(4) ? (uint32_t)below(4) : (uint32_t)next());
    put32(peer + W_CPU, (uint32_t)next());
    put32(peer + W_ATTACHED, below(2) ? 0x41545421u : (uint32_t)next());
    put32(peer + W_SOCK_SENDS, (uint32_t)next());
    put32(peer + W_BULK_HELD, below(2) ? (uint32_t)below(2) : (uint32_t)next());
    /* Behind what we sent (our next post must wait), far ahead, or anything. */
    put64(peer + W_CONSUMED, below(3) == 0 ? 0 : below(2) ? UINT64_MAX : next());
    put32(peer + W_SEQ, (uint32_t)next());

    put32(slot + 0, below(4) ? in_kind | (below(3) ? 0 : QLPC_BULK | (below(2) ? QLPC_VIEW : 0))
                             : (uint32_t)below(4) | (below(2) ? 0 : QLPC_BULK) | (below(2) ? 0 : QLPC_VIEW));
    put32(slot + 4, pick_length(payload_max));
    if (in_kind == QLPC_REQUEST) {
        put32(slot + 8, id);
        put32(slot + 12, below(6) ? 0 : (uint32_t)next());
    } else {
        put32(slot + 8, below(6) ? 0 : (uint32_t)next());
        put32(slot + 12, below(2) && calling ? calling : id);
    }
    put32(slot + 16, (uint32_t)next());
    put32(slot + 20, below(6) ? 0 : (uint32_t)next());
    put64(slot + 24, next());
    /* A server that rewrites the header after connect changes nothing the client relies on. */
    if (r->role == QLPC_CLIENT && below(16) == 0)
        put32(r->base + (size_t)(4 * below(4)), (uint32_t)next());
}

static int is_status(int rc)
{
    return (rc <= QLPC_TIMEOUT && rc >= QLPC_LARGE) || (rc <= QLPC_E_INDEX && rc >= QLPC_E_VIEW);
}

static void check_result(struct rig *r, const char *what, int rc)
{
    inputs++;
    if (rc >= 0)
        seen[0]++;
    else if (rc >= QLPC_E_VIEW)
        seen[1 - rc]++;
    CHECK((rc >= 0 && (uint32_t)rc <= qlpc_payload_max(r->ch)) || is_status(rc), "%s returned %d", what, rc);
    CHECK(rc != QLPC_E_ARGS && rc != QLPC_E_SYSTEM && rc != QLPC_INTR && rc != QLPC_BUSY,
          "%s returned %d: not a peer's doing", what, rc);
}

/* After QLPC_LARGE: the entry described must fit the bulk area; take it into a buffer of
 * exactly its length (ASan sees any write past it), sometimes after the peer rewrote it. */
static int take_large(struct rig *r, qlpc_info *info, int rc)
{
    char *body;

    if (rc != QLPC_LARGE)
        return rc;
    CHECK(info->bulk && info->length <= QLPC_BULK_SIZE && !info->taken, "QLPC_LARGE for a %u-byte entry (bulk %u)",
          info->length, info->bulk);
    if (below(8) == 0)
        misbehave(r);
    if (info->view && below(2)) {
        /* Written in place: held as a view (read through, as the caller's view would), then
         * released now or left held (the next view entry is then a protocol error). */
        rc = qlpc_take_view(r->ch, info);
        inputs++;
        CHECK(rc == (int)info->length || rc == QLPC_BUSY || rc == QLPC_E_INDEX || rc == QLPC_E_VIEW,
              "take_view returned %d for %u bytes", rc, info->length);
        if (rc == QLPC_E_VIEW)
            seen[1 - QLPC_E_VIEW]++;
        if (rc >= 0) {
            volatile uint8_t sum = 0;
            const uint8_t *area = r->base + r->size - 2u * QLPC_BULK_SIZE +
                                  (r->role == QLPC_SERVER ? QLPC_BULK_SIZE : 0);
            for (uint32_t i = 0; i < info->length; i += 4096)
                sum ^= area[i];
            seen[0]++;
            if (below(2))
                qlpc_release_view(r->ch);
        }
        return rc == QLPC_BUSY ? QLPC_TIMEOUT : rc;
    }
    body = malloc(info->length ? info->length : 1);
    if (body == NULL)
        exit(2);
    rc = qlpc_take_bulk(r->ch, info, body, info->length);
    free(body);
    inputs++;
    CHECK(rc == (int)info->length || rc == QLPC_BUSY || rc == QLPC_E_INDEX, "take_bulk returned %d for %u bytes", rc,
          info->length);
    if (rc >= 0)
        seen[0]++;
    return rc == QLPC_BUSY ? QLPC_TIMEOUT : rc;
}

/* What an attesting call that took an entry says about its writer: this process, or nothing. */
static void check_attested(const qlpc_info *info, int attest, int rc)
{
    if (rc < 0 || !attest) {
        CHECK(!info->attested || rc < 0, "a call that did not attest says it did");
        return;
    }
    CHECK(!info->attested || (info->pid == (uint32_t)getpid() && info->uid == (uint32_t)getuid() &&
                              info->gid == (uint32_t)getgid()),
          "attested as pid %u uid %u gid %u", info->pid, info->uid, info->gid);
    attested += info->attested != 0;
}

/* Sometimes lend our bulk area to a "view" and post it in place (data NULL, a body already
 * there): the data to post, and its length (never 0 in place). */
static const char *lend_maybe(struct rig *r, const char *copy, uint32_t cap, uint32_t *len)
{
    int rc;

    if (below(4) != 0)
        return copy;
    rc = qlpc_lend_bulk(r->ch, ++r->loans);
    inputs++;
    CHECK(rc == (int)r->loans || rc == QLPC_FULL, "lend_bulk %u returned %d", r->loans, rc);
    CHECK(qlpc_lend_bulk(r->ch, 0) == QLPC_E_ARGS && qlpc_lend_bulk(r->ch, (uint32_t)INT_MAX + 1) == QLPC_E_ARGS,
          "loan numbers out of range were not refused");
    if (rc <= 0)
        return copy;
    CHECK(qlpc_loan_in_force(r->ch, (uint32_t)rc) && (r->loan == 0 || !qlpc_loan_in_force(r->ch, r->loan)),
          "loan %d not told apart from the last one, %u", rc, r->loan);
    r->loan = (uint32_t)rc;
    *len = 1 + (uint32_t)below(cap);
    return NULL;
}

/* A loan the post did not end: end it now, or sometimes keep it for a while (copies into
 * the area must then be refused, which the ring's consumer would see as a changed body). */
static void end_loan(struct rig *r)
{
    if (r->loan != 0 && qlpc_loan_in_force(r->ch, r->loan) && below(4) != 0)
        qlpc_unlend_bulk(r->ch, r->loan - (uint32_t)below(2)); /* (now and then a stale number: a no-op) */
}

/* Now and then map a bulk area again, as a view's Python mapping does: the same bytes as the
 * region's (the peer writes them at will), the peer's area read-only. */
static void map_again(struct rig *r)
{
    int own = (int)below(2), rc;
    int client_area = (r->role == QLPC_CLIENT) == own;
    const uint8_t *area = r->base + r->size - (client_area ? 1u : 2u) * QLPC_BULK_SIZE;
    void *at;

    if (below(64) != 0)
        return;
    at = mmap(NULL, QLPC_BULK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (at == MAP_FAILED)
        exit(2);
    rc = qlpc_map_bulk(r->ch, own, at);
    inputs++;
    CHECK(rc == 0, "map_bulk returned %d", rc);
    if (rc == 0)
        CHECK(memcmp(at, area, 4096) == 0 && memcmp((uint8_t *)at + QLPC_BULK_SIZE - 4096,
                                                    area + QLPC_BULK_SIZE - 4096, 4096) == 0,
              "a bulk area mapped again differs from the region's");
    munmap(at, QLPC_BULK_SIZE);
}

/* What either side does after its turn: now and then a trim, the end of a loan, a bulk area
 * mapped again, and the socket bytes it wrote and read. */
static void between_turns(struct rig *r)
{
    if (below(16) == 0) {
        int rc = qlpc_trim_bulk(r->ch);
        inputs++;
        CHECK(rc == 0 || rc == QLPC_FULL, "trim_bulk returned %d", rc);
    }
    end_loan(r);
    map_again(r);
    qlpc_sent(r->ch, below(4096), (int)below(2));
    qlpc_consumed(r->ch, below(4096));
}

static void drive_server(struct rig *r)
{
    qlpc_info info;
    static char reply[8192];  /* past a slot of every geometry: the bulk area */
    uint32_t len = (uint32_t)below(sizeof reply + 1);
    int rc, attest = (int)below(2);

    const char *data = lend_maybe(r, reply, sizeof reply, &len);

    memset(reply, 0x5a, sizeof reply);
    memset(&info, 0, sizeof info);
    misbehave(r);
    switch (below(3)) {
    case 0:
        rc = qlpc_reply_wait(r->ch, &info, r->buf, attest, 0, NULL, 0, 0);
        check_result(r, "reply_wait(receive only)", rc);
        rc = take_large(r, &info, rc);
        check_attested(&info, attest, rc);
        break;
    case 1:
        rc = qlpc_reply_wait(r->ch, &info, r->buf, attest, QLPC_ID_BIT | 7u, data, len, 0);
        check_result(r, "reply_wait(reply, receive)", rc);
        rc = take_large(r, &info, rc);
        check_attested(&info, attest, rc);
        break;
    default:
        rc = qlpc_reply(r->ch, QLPC_ID_BIT | 9u, data, len);
        check_result(r, "reply", rc);
        rc = qlpc_arm_poll(r->ch);
        check_result(r, "arm_poll", rc);
        CHECK(rc <= 1, "arm_poll returned %d", rc);
        break;
    }
    between_turns(r);
}

/* The id of the request the client last put in its ring (the entry before its tail). */
static uint32_t posted_id(struct rig *r)
{
    uint8_t *client_ring = r->base + QLPC_REGION_HEADER + (size_t)r->slots * r->slot_size;
    uint32_t last = get32(r->base + SIDE_CLIENT + W_TAIL) - 1;
    return get32(client_ring + (size_t)(last & (r->slots - 1)) * r->slot_size + 8);
}

static void drive_client(struct rig *r)
{
    qlpc_info info;
    static char request[8192];
    uint32_t len = (uint32_t)below(sizeof request + 1);
    int rc, attest = (int)below(2);

    const char *data = lend_maybe(r, request, sizeof request, &len);

    memset(request, 0xa5, sizeof request);
    memset(&info, 0, sizeof info);
    misbehave(r);
    uint32_t want = qlpc_in_flight(r->ch);

    if (want != 0 && below(2)) {
        rc = qlpc_wait_reply(r->ch, &info, r->buf, attest, 0);
        check_result(r, "wait_reply", rc);
        rc = take_large(r, &info, rc);
    } else {
        if (want != 0)
            qlpc_call_done(r->ch);
        rc = qlpc_call(r->ch, &info, r->buf, attest, data, len, 0);
        check_result(r, "call", rc);
        CHECK(rc < 0 || info.posted, "call returned a reply (%d) without posting its request", rc);
        want = posted_id(r);
        rc = take_large(r, &info, rc);
    }
    if (rc >= 0)
        CHECK(info.callback_id == want, "a reply to %u taken for call %u", info.callback_id, want);
    check_attested(&info, attest, rc);
    between_turns(r);
}

int main(int argc, char **argv)
{
    unsigned long iterations = argc > 1 ? strtoul(argv[1], NULL, 10) : 2000000;
    unsigned long per_rig;
    struct rig r;

    if (argc > 2)
        state ^= strtoull(argv[2], NULL, 10) * 0x9E3779B97F4A7C15ull;
    self_pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    /* Fresh channels now and then: geometries change, and opening is covered too. */
    per_rig = iterations / 64 + 1;
    for (unsigned long done = 0; done < iterations;) {
        int role = below(2) ? QLPC_SERVER : QLPC_CLIENT;
        if (!rig_open(&r, role)) {
            qlpc_free(NULL);
            munmap(r.base, r.size);
            close(r.memfd);
            close(r.sock[0]);
            close(r.sock[1]);
            done++;
            continue;
        }
        for (unsigned long i = 0; i < per_rig && done < iterations; i++, done++) {
            if (role == QLPC_SERVER)
                drive_server(&r);
            else
                drive_client(&r);
        }
        rig_close(&r);
    }
    /* A run long enough must have reached every check, or the peer model went stale. */
    if (iterations >= 100000) {
        static const int expected[] = {QLPC_TIMEOUT, QLPC_LARGE, QLPC_FULL, QLPC_ORDER, QLPC_DOORBELL, QLPC_E_INDEX,
                                       QLPC_E_KIND, QLPC_E_LENGTH, QLPC_E_RESERVED, QLPC_E_LAYOUT, QLPC_E_VIEW};
        CHECK(seen[0] > 0, "no payload was ever received");
        CHECK(attested > 0 || qlpc_attest_probe() != 0, "no entry taken was ever attested");
        for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++)
            CHECK(seen[1 - expected[i]] > 0, "status %d never came up", expected[i]);
    }
    printf("qlpc asan: %lu inputs, %lu payloads, %lu attested, %lu failures\n", inputs, seen[0], attested,
           failures);
    return failures ? 1 : 0;
}
