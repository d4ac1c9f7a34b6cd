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
    ALPC_E_ARGS = -9
};

typedef struct {
    uint32_t max_data;
    uint32_t max_attr;
    uint64_t type_mask;
    uint32_t flag_mask;
    uint32_t max_fds;
} alpc_limits;

/* Walk the frames in buf[start:len], validating every header (including the
 * header of a trailing incomplete frame) against lim. Stores the end offset of
 * each complete frame in ends[0..*count), at most cap of them. Returns 0, or a
 * negative ALPC_E_* code for the first invalid header (frames before it are
 * still reported in ends/count). */
int alpc_scan_frames(const uint8_t *buf, size_t len, size_t start,
                     const alpc_limits *lim, size_t *ends, size_t cap,
                     size_t *count);

/* Hash of the sources this library was built from, to detect a stale build. */
const char *alpc_source_hash(void);

#endif
