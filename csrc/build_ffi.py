"""cffi out-of-line API-mode build of alpc._alpc_native (run by setup.py / `make build`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ("alpc_native.h", "alpc_native.c", "qlpc.h", "qlpc.c")
# The headers double as the cdef, in this order.
HEADERS = ("alpc_native.h", "qlpc.h")


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def cdef_text() -> str:
    lines = []
    for name in HEADERS:
        header = (HERE / name).read_text()
        lines += [line for line in header.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(re.sub(r"/\*.*?\*/", "", cdef_text(), flags=re.S))
ffibuilder.set_source(
    "alpc._alpc_native",
    '#include "alpc_native.h"\n#include "qlpc.h"',
    # setuptools insists on paths relative to setup.py, which sits one level up.
    sources=["csrc/alpc_native.c", "csrc/qlpc.c"],
    include_dirs=["csrc"],
    define_macros=[("ALPC_SOURCE_HASH", f'"{source_hash()}"')],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-pthread"],
    # Quick-LPC's watcher is a thread (glibc >= 2.34 has pthreads in libc; older ones need this).
    extra_link_args=["-pthread"],
)

