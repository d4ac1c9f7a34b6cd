"""The only importer of the compiled extension, and its pure-Python twin.

``ALPC_PUREPYTHON=1`` selects the twin. Without it the extension is used when it
is built; ``ALPC_REQUIRE_NATIVE=1`` turns a missing extension into an error
instead of a fallback. A build older than ``csrc/`` is always an error, since it
would silently run code that no longer matches the sources.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .errors import NativeBuildError, ProtocolError, QuotaExceeded, SectionError

__all__ = [
    "ATTR_SIZES",
    "COPY_IN_C_ABOVE",
    "E_ATTR",
    "E_ATTR_DUP",
    "E_ATTR_KIND",
    "E_ATTR_LENGTH",
    "E_ATTR_TRUNC",
    "E_ATTR_VALUE",
    "E_DATA",
    "E_FDS",
    "E_FLAGS",
    "E_MAGIC",
    "E_RANGE",
    "E_TIMEOUT",
    "E_WATCH",
    "RECV_CRED",
    "RECV_CRED_CHANGED",
    "RECV_NOFILE",
    "RECV_SIZE",
    "RECV_TRUNCATED",
    "RECV_WATCHED",
    "E_RESERVED",
    "E_TYPE",
    "E_VERSION",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "MAX_SPIN_US",
    "SCAN_BATCH",
    "QUICK_COUNTERS",
    "QUICK_DEFAULTS",
    "QUICK_ERRORS",
    "QUICK_UNAVAILABLE",
    "Q_BUSY",
    "Q_CHECK",
    "Q_CLOSED",
    "Q_DOORBELL",
    "Q_E_ARGS",
    "Q_E_INDEX",
    "Q_E_KIND",
    "Q_E_LAYOUT",
    "Q_E_LENGTH",
    "Q_E_RESERVED",
    "Q_E_SYSTEM",
    "Q_E_VIEW",
    "Q_FULL",
    "Q_INTR",
    "Q_LARGE",
    "Q_ORDER",
    "Q_TIMEOUT",
    "Q_TOO_LARGE",
    "Pinned",
    "QuickRing",
    "WaitRecv",
    "ScanLimits",
    "buffer_address",
    "check_range",
    "copy_into",
    "copy_out",
    "epoll_wait",
    "getsockopt_bytes",
    "MAX_READY",
    "parse_attributes",
    "quick_attest_probe",
    "quick_hold",
    "quick_region_size",
    "quick_unhold",
    "scan_frames",
    "recv_cred",
    "recv_state",
    "take_lost_read",
    "send_room",
    "sock_send",
    "sock_wait_recv",
    "source_hash",
    "vm_read",
    "vm_write",
]

log = logging.getLogger(__name__)

HEADER_SIZE = 40
SCAN_BATCH = 256
E_MAGIC, E_VERSION, E_TYPE, E_FLAGS, E_RESERVED, E_DATA, E_ATTR, E_FDS = range(-1, -9, -1)
E_ATTR_KIND, E_ATTR_LENGTH, E_ATTR_DUP, E_ATTR_TRUNC, E_ATTR_VALUE, E_RANGE = range(-10, -16, -1)
# sock_wait_recv: the wait timed out / only the watched fd (a pidfd) fired.
E_TIMEOUT, E_WATCH = -16, -17
# Value sizes of the attribute kinds (SECTION_REF, SECTION_NEW, GRANT, RANGE).
ATTR_SIZES = {1: 24, 2: 16, 3: 24, 4: 16, 5: 8}
_SECTION_FLAGS = 3
_ACCESS_FLAGS = 3

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("alpc_native.h", "alpc_native.c", "qlpc.h", "qlpc.c")


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


# -- attributes and ranges from a peer ---------------------------------------------

AttrFields = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int]
_NO_ATTRS: AttrFields = (0,) * 14
_TLV = struct.Struct("<HH")
_ATTR_VALUES = {1: struct.Struct("<IIQQ"), 2: struct.Struct("<IIQ"), 3: struct.Struct("<QQII"), 4: struct.Struct("<QQ"),
                5: struct.Struct("<Q")}


def _parse_attributes_py(raw: bytes, allowed: int) -> tuple[int, AttrFields]:
    present = 0
    values: dict[int, tuple[int, ...]] = {}
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _TLV.size:
            return E_ATTR_TRUNC, _NO_ATTRS
        kind, length = _TLV.unpack_from(raw, pos)
        pos += _TLV.size
        if kind >= 32 or not (allowed >> kind) & 1 or kind not in ATTR_SIZES:
            return E_ATTR_KIND, _NO_ATTRS
        if length != ATTR_SIZES[kind]:
            return E_ATTR_LENGTH, _NO_ATTRS
        if len(raw) - pos < length:
            return E_ATTR_TRUNC, _NO_ATTRS
        if present & (1 << kind):
            return E_ATTR_DUP, _NO_ATTRS
        present |= 1 << kind
        value = _ATTR_VALUES[kind].unpack_from(raw, pos)
        if (kind in (1, 2) and value[1] & ~_SECTION_FLAGS) or (kind == 3 and (value[3] or value[2] & ~_ACCESS_FLAGS)):
            return E_ATTR_VALUE, _NO_ATTRS
        values[kind] = value
        pos += length
    ref = values.get(1, (0, 0, 0, 0))
    new = values.get(2, (0, 0, 0))
    grant = values.get(3, (0, 0, 0, 0))[:3]
    span = values.get(4, (0, 0))
    deadline = values.get(5, (0,))
    return 0, (present, *ref, *new, *grant, *span, *deadline)  # type: ignore[return-value]


def _parse_attributes_c(raw: bytes, allowed: int) -> tuple[int, AttrFields]:
    assert _ext is not None
    ffi, lib = _ext
    out = ffi.new("alpc_attrs *")
    error = lib.alpc_parse_attrs(ffi.from_buffer(raw), len(raw), allowed, out)
    if error:
        return error, _NO_ATTRS
    return 0, (out.present, out.ref_section, out.ref_flags, out.ref_offset, out.ref_length,
               out.new_section, out.new_flags, out.new_size, out.grant_address, out.grant_length,
               out.grant_access, out.range_offset, out.range_length, out.deadline_ns)


# (error, fields): fields are present-bits, then SECTION_REF (id, flags, offset,
# length), SECTION_NEW (id, flags, size), GRANT (address, length, access) and
# RANGE (offset, length) and DEADLINE (CLOCK_MONOTONIC ns), zero where absent.
parse_attributes: Callable[[bytes, int], tuple[int, AttrFields]] = (
    _parse_attributes_py if _ext is None else _parse_attributes_c
)


def _check_range_py(offset: int, length: int, size: int, max_length: int) -> bool:
    return 0 <= offset <= size and 0 < length <= max_length and length <= size - offset


def _check_range_c(offset: int, length: int, size: int, max_length: int) -> bool:
    assert _ext is not None
    either = offset | length | size | max_length  # negative if one is, >= 2**64 if one is
    if either < 0 or either >> 64:
        # cffi would raise OverflowError for an operand outside uint64_t: answer as the twin does.
        return _check_range_py(offset, length, size, max_length)
    return bool(_ext[1].alpc_check_range(offset, length, size, max_length) == 0)


# Is [offset, offset + length) a non-empty range inside a section of ``size``
# bytes, no longer than max_length? Every operand comes from a peer.
check_range: Callable[[int, int, int, int], bool] = _check_range_py if _ext is None else _check_range_c


# -- copies ------------------------------------------------------------------------

# Below this, a C call costs more than it saves; above it the copy runs in C
# with the GIL released so other threads keep running.
COPY_IN_C_ABOVE = 256 * 1024
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def copy_into(dst: memoryview, src: Any) -> None:
    """dst[:] = src, for a writable byte memoryview and a buffer of the same size."""
    if _ext is None or dst.nbytes < COPY_IN_C_ABOVE:
        dst[:] = src if not isinstance(src, memoryview) else src.cast("B")
        return
    ffi, lib = _ext
    with ffi.from_buffer(dst, require_writable=True) as target, ffi.from_buffer(src) as source:
        if len(source) != len(target):
            raise ValueError(f"copy of {len(source)} bytes into {len(target)}")
        lib.alpc_copy(target, source, len(target))


def copy_out(src: memoryview) -> bytes:
    """bytes(src), copied in C with the GIL released when it is large."""
    if _ext is None or src.nbytes < COPY_IN_C_ABOVE:
        return bytes(src)
    ffi, lib = _ext
    # An uninitialised bytes object (the C API allows filling it before anyone
    # else sees it), so the page faults of a fresh buffer happen without the GIL.
    result: bytes = _new_bytes(None, src.nbytes)
    with ffi.from_buffer(result) as target, ffi.from_buffer(src) as source:
        lib.alpc_copy_fresh(target, source, len(source))
    return result


# -- direct access to a client's memory --------------------------------------------


class Pinned(Protocol):
    """A buffer held in place so its address can be granted to a peer."""

    address: int
    length: int

    def release(self) -> None: ...


class _PinnedC:
    __slots__ = ("_cdata", "address", "length")

    def __init__(self, obj: Any, writable: bool) -> None:
        assert _ext is not None
        ffi = _ext[0]
        self._cdata: Any = ffi.from_buffer(obj, require_writable=writable)
        self.address = int(ffi.cast("uintptr_t", self._cdata))
        self.length = len(self._cdata)

    def release(self) -> None:
        if self._cdata is not None:
            _ext[0].release(self._cdata)  # type: ignore[index]
            self._cdata = None


class _PinnedPy:
    __slots__ = ("_keep", "address", "length")

    def __init__(self, obj: Any, writable: bool) -> None:
        if writable or not isinstance(obj, bytes):
            view = memoryview(obj).cast("B")
            if not view.readonly:
                array = (ctypes.c_char * view.nbytes).from_buffer(view)
                self._keep: Any = (view, array)
                self.address = ctypes.addressof(array)
                self.length = view.nbytes
                return
            if writable:
                raise SectionError("a writable grant needs a writable buffer")
            obj = bytes(view)
        pointer = ctypes.c_char_p(obj)
        self._keep = (obj, pointer)
        self.address = ctypes.cast(pointer, ctypes.c_void_p).value or 0
        self.length = len(obj)

    def release(self) -> None:
        self._keep = None


def buffer_address(obj: Any, writable: bool) -> Pinned:
    """Pin ``obj`` (a contiguous buffer) and return its address and length."""
    if _ext is None:
        return _PinnedPy(obj, writable)
    try:
        return _PinnedC(obj, writable)
    except (TypeError, BufferError) as exc:
        raise SectionError(f"cannot grant {type(obj).__name__}: {exc}") from None


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)


def _vm_move_py(write: bool, pid: int, base: int, grant_len: int, offset: int, local: Any) -> int:
    view = memoryview(local).cast("B")
    if (offset < 0 or offset > grant_len or view.nbytes > grant_len - offset
            or base < 0 or base > (1 << 64) - 1 - grant_len):
        return E_RANGE
    pinned = _PinnedPy(local, writable=not write)
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    done = 0
    try:
        while done < pinned.length:
            mine = _IoVec(pinned.address + done, pinned.length - done)
            theirs = _IoVec(base + offset + done, pinned.length - done)
            moved = call(pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
            if moved < 0:
                err = ctypes.get_errno()
                if err == 4:  # EINTR
                    continue
                return -err
            if moved == 0:
                return -14  # EFAULT
            done += moved
    finally:
        pinned.release()
    return done


def _vm_move_c(write: bool, pid: int, base: int, grant_len: int, offset: int, local: Any) -> int:
    assert _ext is not None
    ffi, lib = _ext
    either = offset | base | grant_len
    if either < 0 or either >> 64:
        return E_RANGE  # outside uint64_t (cffi would raise OverflowError), as the twin answers
    try:
        buf = ffi.from_buffer(local, require_writable=not write)
    except (BufferError, TypeError) as exc:
        raise SectionError(f"cannot {'write from' if write else 'read into'} {type(local).__name__}: {exc}") from None
    with buf:
        call = lib.alpc_vm_write if write else lib.alpc_vm_read
        return int(call(pid, base, grant_len, offset, buf, len(buf)))


def vm_read(pid: int, base: int, grant_len: int, offset: int, into: Any) -> int:
    """Fill ``into`` from the grant of ``pid``; bytes read, E_RANGE, or -errno."""
    return (_vm_move_py if _ext is None else _vm_move_c)(False, pid, base, grant_len, offset, into)


def vm_write(pid: int, base: int, grant_len: int, offset: int, data: Any) -> int:
    """Write ``data`` into the grant of ``pid``; bytes written, E_RANGE, or -errno."""
    return (_vm_move_py if _ext is None else _vm_move_c)(True, pid, base, grant_len, offset, data)


def getsockopt_bytes(fd: int, level: int, option: int, size: int) -> bytes:
    """getsockopt() into a buffer of ``size`` bytes; OSError with the errno on failure.

    CPython's ``socket.getsockopt`` refuses a buffer over 1024 bytes, too small for
    SO_PEERGROUPS of a process in more than 256 groups (up to NGROUPS_MAX, 65536).
    """
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)  # socklen_t
    if _libc.getsockopt(fd, level, option, buffer, ctypes.byref(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buffer.raw[:length.value]


# -- the socket path of every message ------------------------------------------------
#
# One C call per send and one per wait-and-read, the GIL released inside: the
# per-message cost of a small frame is then the two system calls and little
# else. Without the extension these are None and ``transport.Stream`` uses its
# own pure-Python twins (only ``transport`` may touch socket objects).

RECV_SIZE = 64 * 1024
# A section's fd and up to 253 handles (quotas caps max_handles_per_message); csrc takes 256.
_MAX_RECV_FDS = 256
# What sock_wait_recv's flags say of a read (csrc/alpc_native.h).
RECV_CRED, RECV_CRED_CHANGED, RECV_TRUNCATED, RECV_WATCHED, RECV_NOFILE = 1, 2, 4, 8, 16
_scratch = threading.local()


def _sock_send_c(fd: int, data: bytes) -> int:
    """Bytes written by one non-blocking send, or -errno."""
    assert _ext is not None
    return int(_ext[1].alpc_sock_send(fd, data, len(data)))


def _recv_scratch() -> tuple[Any, Any, Any, Any, Any]:
    scratch = getattr(_scratch, "c", None)
    if scratch is None:
        assert _ext is not None
        ffi = _ext[0]
        buf = ffi.new("uint8_t[]", RECV_SIZE)
        scratch = _scratch.c = (buf, ffi.buffer(buf), ffi.new("int[]", _MAX_RECV_FDS), ffi.new("int *"),
                                ffi.new("int *"))
    return scratch


def _recv_state_c() -> Any:
    """Per socket: the last SCM_CREDENTIALS its reads brought (none yet), and the bytes the
    last read took, for sock_wait_recv."""
    assert _ext is not None
    return _ext[0].new("int32_t[4]", [-1, -1, -1, 0])


def _recv_cred_c(state: Any) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the last SCM_CREDENTIALS in ``state``."""
    return int(state[0]), int(state[1]), int(state[2])


class WaitRecv(Protocol):
    def __call__(self, fd: int, watch: int, timeout_ms: int, max_fds: int, state: Any,
                 spin_us: int = 0, watch2: int = -1) -> tuple[int, bytes, list[int], int]: ...


def _sock_wait_recv_c(fd: int, watch: int, timeout_ms: int, max_fds: int,
                      state: Any, spin_us: int = 0, watch2: int = -1) -> tuple[int, bytes, list[int], int]:
    """(n, data, fds, flags): n bytes read (0: end of stream), E_TIMEOUT, E_WATCH or -errno;
    flags (RECV_*) say whether SCM_CREDENTIALS came (and changed: ``recv_cred(state)``),
    whether fds were truncated and whether ``watch``/``watch2`` fired too. ``spin_us``
    (at most MAX_SPIN_US): poll without sleeping that long first."""
    assert _ext is not None
    buf, view, fds, nfds, flags = _recv_scratch()
    try:
        n = _ext[1].alpc_sock_wait_recv(fd, watch, watch2, timeout_ms, spin_us, buf, RECV_SIZE, fds, max_fds, nfds,
                                        state, flags)
    except BaseException:
        # A signal handler raised as the call returned (CPython runs it then): what it read
        # left the socket, so keep it for the caller (take_lost_read) rather than lose it.
        n = state[3]
        if n > 0:
            count = nfds[0]
            _scratch.lost = (n, view[0:n], [fds[i] for i in range(count)], flags[0])
        raise
    if n <= 0:
        return n, b"", [], 0
    count = nfds[0]
    return n, view[0:n], ([fds[i] for i in range(count)] if count else []), flags[0]


def take_lost_read() -> tuple[int, bytes, list[int], int] | None:
    """What sock_wait_recv read on this thread as a signal handler raised (see there), once."""
    lost: tuple[int, bytes, list[int], int] | None = getattr(_scratch, "lost", None)
    _scratch.lost = None
    return lost


sock_send: Callable[[int, bytes], int] | None = None if _ext is None else _sock_send_c


def _send_room_c(fd: int) -> int:
    """Bytes fd's send buffer still takes before a write waits, or -errno."""
    assert _ext is not None
    return int(_ext[1].alpc_send_room(fd))


send_room: Callable[[int], int] | None = None if _ext is None else _send_room_c
sock_wait_recv: WaitRecv | None = None if _ext is None else _sock_wait_recv_c
# The longest spin sock_wait_recv takes (csrc: ALPC_MAX_SPIN_US).
MAX_SPIN_US = 1000
recv_state: Callable[[], Any] | None = None if _ext is None else _recv_state_c
recv_cred: Callable[[Any], tuple[int, int, int]] = _recv_cred_c


class EpollWait(Protocol):
    def __call__(self, epfd: int, watch: int, timeout_ms: int, spin_us: int) -> tuple[int, list[int], bool]: ...


# The most events one epoll_wait call takes (csrc: ALPC_MAX_READY).
MAX_READY = 256


def _epoll_scratch() -> tuple[Any, Any]:
    scratch = getattr(_scratch, "epoll", None)
    if scratch is None:
        assert _ext is not None
        scratch = _scratch.epoll = (_ext[0].new("int[]", MAX_READY), _ext[0].new("int *"))
    return scratch


def _epoll_wait_c(epfd: int, watch: int, timeout_ms: int, spin_us: int) -> tuple[int, list[int], bool]:
    """(n, ready fds, whether ``watch`` fired): n events (0: only ``watch``), E_TIMEOUT or -errno.

    One call for what a multiplexer's wait needs: spin (at most MAX_SPIN_US),
    sleep on the epoll set and one fd outside it, then take the set's events.
    """
    assert _ext is not None
    ready, watch_fired = _epoll_scratch()
    n = _ext[1].alpc_epoll_wait(epfd, watch, timeout_ms, spin_us, ready, MAX_READY, watch_fired)
    if n < 0:
        return n, [], False
    return n, [ready[i] for i in range(n)], bool(watch_fired[0])


epoll_wait: EpollWait | None = None if _ext is None else _epoll_wait_c


# -- Quick-LPC rings (csrc/qlpc.c) --------------------------------------------------
#
# Quick-LPC exists only with the C extension: its whole point is a round trip
# with the GIL released and no Python in the wait. Without the extension the
# connect negotiation declines it (QUICK_UNAVAILABLE says why) and connections
# use the socket path; nothing pretends to be the fast path.

QUICK_UNAVAILABLE: str | None = (
    "Quick-LPC needs the C extension (ALPC_PUREPYTHON=1 or the extension is not built)" if _ext is None else None
)
# Geometry limits and statuses, mirrored from qlpc.h (tests check they agree).
QUICK_DEFAULTS = {"region_header": 512, "entry_header": 32, "max_slots": 1024, "min_slot": 64, "max_slot": 65536,
                  "bulk_size": 1 << 20, "bulk_align": 4096}
Q_TIMEOUT, Q_CHECK, Q_CLOSED, Q_FULL, Q_ORDER, Q_TOO_LARGE, Q_DOORBELL, Q_BUSY, Q_INTR, Q_LARGE = range(-1, -11, -1)
Q_E_INDEX, Q_E_KIND, Q_E_LENGTH, Q_E_RESERVED, Q_E_LAYOUT, Q_E_ARGS, Q_E_SYSTEM, Q_E_VIEW = range(-20, -28, -1)
QUICK_COUNTERS = ("messages_in", "bytes_in", "messages_out", "bytes_out", "spins_caught", "spins_missed",
                  "sleeps", "wakes")
QUICK_ERRORS = {
    Q_E_INDEX: "a ring index claims more entries than the ring holds",
    Q_E_KIND: "a ring entry of the wrong kind for its direction",
    Q_E_LENGTH: "a ring entry longer than its slot (or than this side's max_message_length)",
    Q_E_RESERVED: "a ring entry with reserved words set or a missing id",
    Q_E_LAYOUT: "the ring region's header does not match the agreed geometry",
    Q_E_VIEW: "a ring view entry while this side still held the peer's last view",
}


def quick_attest_probe() -> int | None:
    """0 when the kernel attests ring messages (PIDFD_GET_INFO), else the errno that says
    why not; None without the C extension. A system call or two: callers cache it."""
    return None if _ext is None else int(_ext[1].qlpc_attest_probe())


def quick_hold() -> bool:
    """Keep Quick-LPC's watcher thread while no connection needs it; False if it cannot start."""
    return _ext is not None and int(_ext[1].qlpc_hold()) == 0


def quick_unhold() -> None:
    """Release one ``quick_hold``; the thread stops once nothing needs it."""
    if _ext is not None:
        _ext[1].qlpc_unhold()


def quick_region_size(slots: int, slot_size: int) -> int:
    """Bytes of a Quick-LPC region with this geometry, 0 if the geometry is invalid."""
    # Checked before the C too: it takes unsigned ints, so a negative or huge value
    # raised cffi's OverflowError instead of being refused.
    if not 1 <= slots <= QUICK_DEFAULTS["max_slots"] or slots & (slots - 1):
        return 0
    if not QUICK_DEFAULTS["min_slot"] <= slot_size <= QUICK_DEFAULTS["max_slot"] or slot_size % 64:
        return 0
    if _ext is not None:
        return int(_ext[1].qlpc_region_size(slots, slot_size))
    rings = QUICK_DEFAULTS["region_header"] + 2 * slots * slot_size
    align = QUICK_DEFAULTS["bulk_align"]
    return -(-rings // align) * align + 2 * QUICK_DEFAULTS["bulk_size"]


class QuickRing:
    """This side of one connection's Quick-LPC rings: a thin, allocation-free
    wrapper of qlpc.c; every call runs in C with the GIL released.

    The hot calls are bound to this ring's state (its info struct and payload
    buffer, allocated once), so a call passes only what changes:

    - ``call(data, len(data), deadline_ns)``: client, request and wait for its reply
    - ``wait_reply(deadline_ns)``: client, keep waiting for the call in flight
    - ``reply_wait(callback_id, data, len(data), timeout_ns)``: server, reply (0: none) and wait
    - ``unpack(length)``: the payload the last wait received, as bytes
    - ``take_bulk()``: after Q_LARGE (a message too large for a slot waits in the
      peer's bulk area, described in ``info``), copy it into a new ``bulk_body``
      and take it: its length, or a status
    - ``take_view()``: after Q_LARGE with ``info.view`` (the peer wrote it in place),
      take it without a copy and hold the peer's area until ``release_view()``
    - ``lend_bulk(loan)``: lend this side's bulk area to a view filled in place (as
      loan number ``loan``), then post it with ``in_place`` as the data
      (``unlend_bulk(loan)`` if it is not posted)

    They return a payload length (>= 0; the ids are then in ``info``) or a Q_*
    status. Deadlines are absolute CLOCK_MONOTONIC nanoseconds
    (time.monotonic_ns), timeouts relative; -1 means none. The ``*_attested``
    twins also ask the kernel for the peer's credentials as they take an entry
    (``info.attested``, ``info.pid``, ``info.uid``, ``info.gid``); Q_CHECK when its
    process is gone.
    """

    __slots__ = ("_buf", "_ch", "_from_buffer", "_lib", "_take_bulk", "bulk_body", "bulk_max",
                 "call", "call_attested", "in_place", "info", "kick", "payload_max", "post_reply", "release_view",
                 "reply_wait", "reply_wait_attested", "unpack", "wait_reply", "wait_reply_attested", "waiting")

    def __init__(self, memfd: int, size: int, slots: int, slot_size: int, *, server: bool, sock_fd: int,
                 pidfd: int | None, spin_ns: int) -> None:
        if _ext is None:
            raise NativeBuildError(QUICK_UNAVAILABLE or "no C extension")
        ffi, lib = _ext
        error = ffi.new("int *")
        role = lib.QLPC_SERVER if server else lib.QLPC_CLIENT
        ch = lib.qlpc_open(memfd, size, slots, slot_size, role, sock_fd, -1 if pidfd is None else pidfd,
                           spin_ns, error)
        if ch == ffi.NULL:
            code = error[0]
            if code in QUICK_ERRORS:
                raise ProtocolError(QUICK_ERRORS[code])
            raise QuotaExceeded(f"cannot set up the Quick-LPC rings ({os.strerror(ffi.errno) or code})")
        self._ch: Any = ffi.gc(ch, lib.qlpc_free)
        self._lib = lib
        self.payload_max = int(lib.qlpc_payload_max(ch))
        self.bulk_max = int(lib.QLPC_BULK_SIZE)
        self.bulk_body: bytes | None = None
        self.info: Any = ffi.new("qlpc_info *")
        self._buf: Any = ffi.new("char[]", max(self.payload_max, 1))
        self._take_bulk: Callable[[Any, int], int] = partial(lib.qlpc_take_bulk, self._ch, self.info)
        self._from_buffer: Callable[[bytes], Any] = ffi.from_buffer
        self.call: Callable[[bytes, int, int], int] = partial(lib.qlpc_call, self._ch, self.info, self._buf, 0)
        self.call_attested: Callable[[bytes, int, int], int] = partial(
            lib.qlpc_call, self._ch, self.info, self._buf, 1)
        self.wait_reply: Callable[[int], int] = partial(lib.qlpc_wait_reply, self._ch, self.info, self._buf, 0)
        self.wait_reply_attested: Callable[[int], int] = partial(
            lib.qlpc_wait_reply, self._ch, self.info, self._buf, 1)
        self.reply_wait: Callable[[int, bytes, int, int], int] = partial(
            lib.qlpc_reply_wait, self._ch, self.info, self._buf, 0)
        self.reply_wait_attested: Callable[[int, bytes, int, int], int] = partial(
            lib.qlpc_reply_wait, self._ch, self.info, self._buf, 1)
        self.unpack: Callable[[int], bytes] = partial(ffi.unpack, self._buf)
        self.kick: Callable[[], None] = partial(lib.qlpc_kick, self._ch)
        # Server: 1 when requests wait in the ring (none taken), 0 if none, or a status.
        self.waiting: Callable[[], int] = partial(lib.qlpc_waiting, self._ch)
        # reply() bound, for the Message path's every ring reply: (callback_id, data, len(data)).
        self.post_reply: Callable[[int, bytes, int], int] = partial(lib.qlpc_reply, self._ch)
        # The data of a post whose body a lent view wrote in place (see lend_bulk).
        self.in_place: Any = ffi.NULL
        # Bound: a received view's finaliser calls it, and it keeps the channel's struct alive.
        self.release_view: Callable[[], None] = partial(lib.qlpc_release_view, self._ch)

    def limit_bulk(self, max_length: int) -> None:
        """Refuse (Q_E_LENGTH) bulk entries from the peer longer than ``max_length``."""
        self._lib.qlpc_limit_bulk(self._ch, max(0, min(max_length, self.bulk_max)))

    def take_bulk(self) -> int:
        """After Q_LARGE: copy the bulk entry ``info`` describes into ``bulk_body`` (a new
        bytes object, filled before anyone else sees it) and take it. Its length, Q_BUSY
        when it is no longer the next entry (wait again), or a status."""
        length = self.info.length
        body: bytes = _new_bytes(None, length)
        self.bulk_body = body
        # (No `with`: the temporary cdata, and its hold on body, go as the call returns.)
        return int(self._take_bulk(self._from_buffer(body), length))

    def take_view(self) -> int:
        """After Q_LARGE with ``info.view``: take the entry without copying it, holding the
        peer's bulk area for a view of it until ``release_view()``. Its length, Q_BUSY when it
        is no longer the next entry (wait again), or a status (Q_E_VIEW: a view still held)."""
        return int(self._lib.qlpc_take_view(self._ch, self.info))

    def lend_bulk(self, loan: int) -> int:
        """Lend this side's bulk area to a view filled in place, as loan number ``loan`` (1 to
        2**31 - 1, not in use: named by the caller, so a loan whose answer a signal handler cut
        off can still be ended): ``loan``, Q_FULL while the area is in use (or lent), Q_BUSY
        while another thread posts, or Q_CLOSED."""
        return int(self._lib.qlpc_lend_bulk(self._ch, loan))

    def unlend_bulk(self, loan: int) -> None:
        """That loan's view goes unposted: copies may use the area again (nothing if it is over)."""
        self._lib.qlpc_unlend_bulk(self._ch, loan)

    def map_bulk(self, own: bool, address: int) -> int:
        """Map this side's bulk area (``own``, read-write) or the peer's (read-only) again at
        ``address``, over a page-aligned mapping of the caller's: 0, Q_CLOSED or Q_E_SYSTEM."""
        ffi = _ext[0]  # type: ignore[index]
        return int(self._lib.qlpc_map_bulk(self._ch, own, ffi.cast("void *", address)))

    def loan_in_force(self, loan: int) -> bool:
        """Is that loan still in force (a post in place after it did not happen)?"""
        return bool(self._lib.qlpc_loan_in_force(self._ch, loan))

    def trim_bulk(self) -> int:
        """Give this side's bulk area's pages back (0), unless a body in it is still to be
        copied out (Q_FULL) or another thread posts (Q_BUSY)."""
        return int(self._lib.qlpc_trim_bulk(self._ch))

    def reply(self, callback_id: int, data: bytes) -> int:
        """Server: post a reply without waiting (0, Q_DOORBELL, or why it was not posted)."""
        return int(self._lib.qlpc_reply(self._ch, callback_id, data, len(data)))

    def reply_posted(self) -> int:
        """Server: the callback id of the reply this thread's last ``reply`` / ``post_reply`` /
        ``reply_wait`` with a reply posted, 0 if it posted none (for a caller whose status a
        signal handler cut off)."""
        return int(self._lib.qlpc_reply_posted())

    def attest(self) -> int:
        """Attest now what the last call took without attesting (into ``info``): 0, Q_CHECK
        when the peer's process is gone, or Q_CLOSED."""
        return int(self._lib.qlpc_attest(self._ch, self.info))

    def in_flight(self) -> int:
        """Client: the id of the call in flight, 0 if none."""
        return int(self._lib.qlpc_in_flight(self._ch))

    def call_done(self) -> None:
        """Client: the call in flight is over (its reply came over the socket, or it was abandoned)."""
        self._lib.qlpc_call_done(self._ch)

    def sent(self, nbytes: int, ordered: bool = True) -> None:
        self._lib.qlpc_sent(self._ch, nbytes, ordered)

    def consumed(self, nbytes: int) -> None:
        self._lib.qlpc_consumed(self._ch, nbytes)

    def arm_poll(self) -> int:
        return int(self._lib.qlpc_arm_poll(self._ch))

    def disarm_poll(self) -> None:
        self._lib.qlpc_disarm_poll(self._ch)

    def peer_attached(self) -> bool:
        return bool(self._lib.qlpc_peer_attached(self._ch))

    def counts(self) -> dict[str, int]:
        """This side's counters: traffic through the rings and how its waits went."""
        count = self._lib.qlpc_count
        return {name: int(count(self._ch, which)) for which, name in enumerate(QUICK_COUNTERS)}

    def close(self) -> None:
        """Wake every waiter, unmap, stop watching; the object stays safe to call (Q_CLOSED)."""
        self._lib.qlpc_close(self._ch)
