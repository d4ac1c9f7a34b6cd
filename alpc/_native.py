"""The only importer of the compiled extension, and its pure-Python twin.

``ALPC_PUREPYTHON=1`` selects the twin. Without it the extension is used when it
is built; ``ALPC_REQUIRE_NATIVE=1`` turns a missing extension into an error
instead of a fallback. A build older than ``csrc/`` is always an error, since it
would silently run code that no longer matches the sources.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import NativeBuildError

__all__ = [
    "E_ATTR",
    "E_DATA",
    "E_FDS",
    "E_FLAGS",
    "E_MAGIC",
    "E_RESERVED",
    "E_TYPE",
    "E_VERSION",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "SCAN_BATCH",
    "ScanLimits",
    "scan_frames",
    "source_hash",
]

log = logging.getLogger(__name__)

HEADER_SIZE = 40
SCAN_BATCH = 256
E_MAGIC, E_VERSION, E_TYPE, E_FLAGS, E_RESERVED, E_DATA, E_ATTR, E_FDS = range(-1, -9, -1)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("alpc_native.h", "alpc_native.c")


def source_hash(csrc: Path = _CSRC) -> str | None:
    """Hash of the C sources as build_ffi.py computes it; None outside a source tree."""
    if not all((csrc / name).is_file() for name in _SOURCES):
        return None
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((csrc / name).read_bytes())
    return digest.hexdigest()[:16]


def _load_extension() -> tuple[Any, Any] | None:
    if os.environ.get("ALPC_PUREPYTHON") == "1":
        return None
    try:
        from . import _alpc_native  # type: ignore[attr-defined]
    except ImportError as exc:
        if os.environ.get("ALPC_REQUIRE_NATIVE") == "1":
            raise NativeBuildError(f"the C extension is not built ({exc}); run `make build`") from exc
        log.warning("alpc C extension not built; using the pure-Python twin")
        return None
    ffi, lib = _alpc_native.ffi, _alpc_native.lib
    built = ffi.string(lib.alpc_source_hash()).decode()
    expected = source_hash()
    if expected is not None and built != expected:
        raise NativeBuildError(
            f"the C extension is stale (built from {built}, csrc/ is {expected}); run `make build`"
        )
    return ffi, lib


_ext = _load_extension()
IMPLEMENTATION = "python" if _ext is None else "c"


class ScanLimits:
    """Frame limits in the form both implementations of scan_frames take."""

    __slots__ = ("c_struct", "flag_mask", "max_attr", "max_data", "max_fds", "type_mask")

    def __init__(self, *, max_data: int, max_attr: int, type_mask: int, flag_mask: int, max_fds: int):
        self.max_data = max_data
        self.max_attr = max_attr
        self.type_mask = type_mask
        self.flag_mask = flag_mask
        self.max_fds = max_fds
        self.c_struct: Any = None
        if _ext is not None:
            self.c_struct = _ext[0].new(
                "alpc_limits *",
                {"max_data": max_data, "max_attr": max_attr, "type_mask": type_mask,
                 "flag_mask": flag_mask, "max_fds": max_fds},
            )


_HEADER_FIELDS = struct.Struct("<HBBIIIIIIIHHI")
_MAGIC = 0xA1C5
_VERSION = 1


def _check_header_py(buf: bytes, pos: int, lim: ScanLimits) -> tuple[int, int]:
    (magic, version, mtype, flags, data_len, attr_len, _, _, _, _,
     n_fds, res16, res32) = _HEADER_FIELDS.unpack_from(buf, pos)
    if magic != _MAGIC:
        return E_MAGIC, 0
    if version != _VERSION:
        return E_VERSION, 0
    if mtype >= 64 or not (lim.type_mask >> mtype) & 1:
        return E_TYPE, 0
    if flags & ~lim.flag_mask:
        return E_FLAGS, 0
    if res16 or res32:
        return E_RESERVED, 0
    if data_len > lim.max_data:
        return E_DATA, 0
    if attr_len > lim.max_attr:
        return E_ATTR, 0
    if n_fds > lim.max_fds:
        return E_FDS, 0
    return 0, HEADER_SIZE + attr_len + data_len


def _scan_frames_py(buf: bytes, start: int, lim: ScanLimits) -> tuple[list[int], int]:
    ends: list[int] = []
    pos = start
    size = len(buf)
    while len(ends) < SCAN_BATCH and size - pos >= HEADER_SIZE:
        error, frame_len = _check_header_py(buf, pos, lim)
        if error:
            return ends, error
        if size - pos < frame_len:
            break
        pos += frame_len
        ends.append(pos)
    return ends, 0


def _scan_frames_c(buf: bytes, start: int, lim: ScanLimits) -> tuple[list[int], int]:
    assert _ext is not None
    ffi, lib = _ext
    ends = ffi.new("size_t[]", SCAN_BATCH)
    count = ffi.new("size_t *")
    error = lib.alpc_scan_frames(ffi.from_buffer(buf), len(buf), start, lim.c_struct, ends, SCAN_BATCH, count)
    return ffi.unpack(ends, count[0]), error


ScanFunction = Callable[[bytes, int, ScanLimits], tuple[list[int], int]]

# End offsets of the complete frames in ``buf[start:]`` and the first header
# error (0 if none). The header of a trailing incomplete frame is validated too,
# so a lying length is caught as soon as its header arrives.
scan_frames: ScanFunction = _scan_frames_py if _ext is None else _scan_frames_c
