"""cffi out-of-line API-mode build of alpc._alpc_native (run by setup.py / `make build`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ("alpc_native.h", "alpc_native.c")


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def cdef_text() -> str:
    header = (HERE / "alpc_native.h").read_text()
    return "\n".join(line for line in header.splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(re.sub(r"/\*.*?\*/", "", cdef_text(), flags=re.S))
ffibuilder.set_source(
    "alpc._alpc_native",
    '#include "alpc_native.h"',
    # setuptools insists on paths relative to setup.py, which sits one level up.
    sources=["csrc/alpc_native.c"],
    include_dirs=["csrc"],
    define_macros=[("ALPC_SOURCE_HASH", f'"{source_hash()}"')],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11"],
)

