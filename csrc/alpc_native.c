/* alpc native fast path: bounds-checked parsing of peer-supplied frames. */
#include "alpc_native.h"

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

const char *alpc_source_hash(void) { return ALPC_SOURCE_HASH; }
