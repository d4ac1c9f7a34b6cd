/* Drives the C bounds checks of csrc/alpc_native.c with edge-case and random
 * inputs, built with -fsanitize=address,undefined by `make asan`.
 *
 * Every peer-supplied buffer is allocated at its exact length, so a read one
 * byte past it is an AddressSanitizer error; UBSan catches overflowing
 * arithmetic and misaligned loads. Each result is also checked against a
 * plain reference computed here (ends inside the buffer and increasing, a
 * range accepted exactly when it lies inside, ...).
 *
 *     native_driver [ITERATIONS] [SEED]
 *
 * Prints "asan: N inputs, F failures" and exits 1 if F > 0.
 */
#define _GNU_SOURCE
#include "alpc_native.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t state = 0x9E3779B97F4A7C15ull;
static unsigned long inputs, failures;

static uint64_t next(void)
{
    /* xorshift64*: fast, and reproducible from the seed. */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}

static uint64_t below(uint64_t n) { return n ? next() % n : 0; }

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            failures++;                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fputc('\n', stderr);                           \
        }                                                  \
    } while (0)

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* A valid header (magic, version, type, lengths), later mutated. */
static void header(uint8_t *h, uint8_t type, uint32_t data_len, uint32_t attr_len, uint16_t n_fds)
{
    memset(h, 0, ALPC_HEADER_SIZE);
    put16(h, 0xA1C5);
    h[2] = 1;
    h[3] = type;
    put32(h + 8, data_len);
    put32(h + 12, attr_len);
    put16(h + 32, n_fds);
}

static uint64_t edge64(void)
{
    static const uint64_t edges[] = {0, 1, 2, 63, 64, 4095, 4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                                     0x100000000ull, INT64_MAX, (uint64_t)INT64_MAX + 1, UINT64_MAX - 1, UINT64_MAX};
    return below(4) ? edges[below(sizeof(edges) / sizeof(edges[0]))] : next() >> below(64);
}

/* -- alpc_scan_frames ------------------------------------------------------------ */

static void scan_one(const uint8_t *src, size_t len, size_t start, const alpc_limits *lim, size_t cap)
{
    uint8_t *buf = malloc(len ? len : 1);
    size_t ends[300];
    size_t count = 12345;
    int rc;

    if (buf == NULL)
        abort();
    memcpy(buf, src, len);
    rc = alpc_scan_frames(len ? buf : buf, len, start, lim, ends, cap, &count);
    inputs++;
    if (start > len) {
        CHECK(rc == ALPC_E_ARGS, "start past the end accepted (rc %d)", rc);
    } else {
        size_t prev = start;
        CHECK(rc <= 0 && rc >= ALPC_E_FDS, "scan returned %d", rc);
        CHECK(count <= cap, "count %zu > cap %zu", count, cap);
        for (size_t i = 0; i < count && i < cap; i++) {
            CHECK(ends[i] > prev && ends[i] <= len, "end %zu outside (%zu, %zu]", ends[i], prev, len);
            CHECK(ends[i] - prev >= ALPC_HEADER_SIZE, "frame shorter than a header");
            prev = ends[i];
        }
    }
    free(buf);
}

static void fuzz_scan(void)
{
    uint8_t frames[4096];
    size_t len = 0;
    alpc_limits lim = {
        .max_data = (uint32_t)(below(3) ? below(512) : edge64()),
        .max_attr = (uint32_t)below(256),
        .type_mask = below(4) ? next() : ~0ull,
        .flag_mask = (uint32_t)(below(2) ? 0 : next()),
        .max_fds = (uint32_t)below(8),
    };

    /* A run of plausible frames, then mutations. */
    while (len + ALPC_HEADER_SIZE + 256 < sizeof(frames) && below(6)) {
        uint32_t data_len = (uint32_t)below(128), attr_len = (uint32_t)below(64);
        header(frames + len, (uint8_t)below(70), data_len, attr_len, (uint16_t)below(4));
        len += ALPC_HEADER_SIZE;
        for (uint32_t i = 0; i < data_len + attr_len; i++)
            frames[len++] = (uint8_t)next();
    }
    for (uint64_t flips = below(8); flips; flips--) {
        if (len)
            frames[below(len)] ^= (uint8_t)(1u << below(8));
    }
    if (below(4) == 0 && len >= ALPC_HEADER_SIZE) /* a lying length */
        put32(frames + below(len - ALPC_HEADER_SIZE + 1) + 8, (uint32_t)edge64());
    for (size_t cut = 0; cut < 3; cut++) {
        size_t part = len ? below(len + 1) : 0;
        scan_one(frames, part, below(4) ? 0 : below(part + 2), &lim, below(4) ? 256 : below(300));
    }
}

static void scan_edges(void)
{
    uint8_t h[ALPC_HEADER_SIZE * 2];
    alpc_limits lim = {.max_data = UINT32_MAX, .max_attr = UINT32_MAX, .type_mask = ~0ull,
                       .flag_mask = 0, .max_fds = UINT32_MAX};
    size_t ends[4], count;

    /* Both lengths at their maximum: the frame length must not overflow. */
    header(h, 1, UINT32_MAX, UINT32_MAX, 0);
    scan_one(h, ALPC_HEADER_SIZE, 0, &lim, 4);
    for (size_t len = 0; len <= sizeof(h); len++) {
        header(h, 1, 0, 0, 0);
        header(h + ALPC_HEADER_SIZE, 2, 0, 0, 0);
        scan_one(h, len, 0, &lim, 4);
        scan_one(h, len, len, &lim, 4);
        scan_one(h, len, len + 1, &lim, 4);
    }
    inputs += 3;
    CHECK(alpc_scan_frames(NULL, 0, 0, &lim, ends, 4, &count) == ALPC_E_ARGS, "NULL buffer accepted");
    CHECK(alpc_scan_frames(h, 0, 0, NULL, ends, 4, &count) == ALPC_E_ARGS, "NULL limits accepted");
    CHECK(alpc_scan_frames(h, 0, 0, &lim, ends, 4, NULL) == ALPC_E_ARGS, "NULL count accepted");
}

/* -- alpc_parse_attrs --------------------------------------------------------------- */

static const uint16_t sizes[] = {0, ALPC_REF_SIZE, ALPC_NEW_SIZE, ALPC_GRANT_SIZE, ALPC_RANGE_SIZE};

static void fuzz_attrs(void)
{
    uint8_t raw[256];
    size_t len = 0;
    uint32_t allowed = below(3) ? (uint32_t)next() : 0x1E;
    alpc_attrs out;
    uint8_t *buf;
    int rc;

    while (len + 4 + 32 < sizeof(raw) && below(5)) {
        uint16_t kind = (uint16_t)(below(6) ? 1 + below(4) : next());
        uint16_t vlen = below(6) ? (kind < 5 ? sizes[kind] : (uint16_t)below(40)) : (uint16_t)next();
        put16(raw + len, kind);
        put16(raw + len + 2, vlen);
        len += 4;
        for (uint16_t i = 0; i < 32 && i < vlen && len < sizeof(raw); i++)
            raw[len++] = below(3) ? 0 : (uint8_t)next();
    }
    if (len && below(3) == 0)
        raw[below(len)] ^= (uint8_t)next();
    len = below(4) ? len : below(len + 1); /* often truncated */
    buf = malloc(len ? len : 1);
    if (buf == NULL)
        abort();
    memcpy(buf, raw, len);
    rc = alpc_parse_attrs(buf, len, allowed, &out);
    inputs++;
    CHECK(rc == 0 || (rc <= ALPC_E_ATTR_KIND && rc >= ALPC_E_ATTR_VALUE), "parse_attrs returned %d", rc);
    if (rc == 0) {
        CHECK((out.present & ~allowed) == 0, "present %#x outside allowed %#x", out.present, allowed);
        CHECK((out.ref_flags & ~(uint32_t)ALPC_SECTION_FLAGS) == 0, "unknown ref flags kept");
        CHECK((out.grant_access & ~(uint32_t)ALPC_ACCESS_FLAGS) == 0, "unknown access kept");
    }
    free(buf);
}

static void attrs_edges(void)
{
    alpc_attrs out;
    uint8_t tlv[4];

    inputs += 3;
    CHECK(alpc_parse_attrs(NULL, 0, ~0u, &out) == 0, "empty attributes refused");
    CHECK(alpc_parse_attrs(NULL, 4, ~0u, &out) == ALPC_E_ARGS, "NULL with a length accepted");
    put16(tlv, ALPC_ATTR_SECTION_REF);
    put16(tlv + 2, ALPC_REF_SIZE);
    CHECK(alpc_parse_attrs(tlv, sizeof(tlv), ~0u, &out) == ALPC_E_ATTR_TRUNC, "a value past the end accepted");
}

/* -- ranges, copies and granted memory ------------------------------------------------ */

static void fuzz_ranges(void)
{
    uint64_t offset = edge64(), length = edge64(), size = edge64(), max = edge64();
    unsigned __int128 end = (unsigned __int128)offset + length;
    int expect = (length != 0 && length <= max && end <= size) ? 0 : ALPC_E_RANGE;

    inputs++;
    CHECK(alpc_check_range(offset, length, size, max) == expect,
          "check_range(%llu, %llu, %llu, %llu)", (unsigned long long)offset, (unsigned long long)length,
          (unsigned long long)size, (unsigned long long)max);
}

static void fuzz_vm(void)
{
    size_t grant_len = (size_t)below(512) + 1;
    uint8_t *grant = malloc(grant_len);
    uint8_t local[1024];
    uint64_t offset = below(3) ? below(grant_len + 8) : edge64();
    uint64_t len = below(3) ? below(grant_len + 8) : below(sizeof(local));
    uint64_t base = (uint64_t)(uintptr_t)grant;
    int inside;
    int64_t moved;

    if (grant == NULL)
        abort();
    for (size_t i = 0; i < grant_len; i++)
        grant[i] = (uint8_t)i;
    if (len > sizeof(local))
        len = sizeof(local);
    inside = offset <= grant_len && len <= grant_len - offset;
    moved = below(2) ? alpc_vm_read(getpid(), base, grant_len, offset, local, len)
                     : alpc_vm_write(getpid(), base, grant_len, offset, local, len);
    inputs++;
    if (inside)
        CHECK(moved == (int64_t)len, "an in-bounds move of %llu moved %lld", (unsigned long long)len,
              (long long)moved);
    else
        CHECK(moved == ALPC_E_RANGE, "an out-of-bounds move was attempted (%lld)", (long long)moved);
    inputs++;
    CHECK(alpc_vm_read(getpid(), UINT64_MAX - 4, 16, 0, local, 1) == ALPC_E_RANGE, "a grant wrapping past 2^64");
    free(grant);
}

static void fuzz_copy(void)
{
    size_t n = (size_t)below(4) ? below(4096) : below(16 << 20);
    uint8_t *src = malloc(n ? n : 1), *dst = malloc(n ? n : 1);

    if (src == NULL || dst == NULL)
        abort();
    memset(src, 0x5A, n);
    if (below(2))
        alpc_copy(dst, src, n);
    else
        alpc_copy_fresh(dst, src, n);
    inputs++;
    CHECK(n == 0 || (dst[0] == 0x5A && dst[n - 1] == 0x5A), "copy of %zu bytes", n);
    free(src);
    free(dst);
}

int main(int argc, char **argv)
{
    unsigned long iterations = argc > 1 ? strtoul(argv[1], NULL, 10) : 100000;
    if (argc > 2)
        state = strtoull(argv[2], NULL, 10) | 1;
    scan_edges();
    attrs_edges();
    for (unsigned long i = 0; i < iterations; i++) {
        fuzz_scan();
        fuzz_attrs();
        fuzz_ranges();
        if (i % 16 == 0)
            fuzz_vm();
        if (i % 256 == 0)
            fuzz_copy();
    }
    printf("asan: %lu inputs, %lu failures\n", inputs, failures);
    return failures ? 1 : 0;
}
