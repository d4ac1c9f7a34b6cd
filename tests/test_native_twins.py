"""csrc/alpc_native.c against its pure-Python twins in alpc/_native.py on the same inputs,
and the C receive path's fd handling."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpc import _native
from alpc.errors import SectionError

needs_c = pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")

# Any Python int a caller may pass: negative, inside u64, and beyond it.
_ANY_INT = st.one_of(st.integers(-(1 << 65), (1 << 66)), st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64, -1]))


def _outcome(call, *args):  # type: ignore[no-untyped-def]
    try:
        return ("ok", call(*args))
    except Exception as exc:  # the exception type is what is compared
        return ("raised", type(exc).__name__)


# -- check_range: twin agreement for every int, not only u64 -----------------------------


@needs_c
def test_check_range_c_agrees_with_twin_beyond_u64() -> None:
    # An offset past 2**64 is simply out of range for the twin; the C wrapper lets
    # cffi raise OverflowError instead of answering False.
    assert _native._check_range_py(1 << 64, 1, 10, 10) is False
    assert _outcome(_native._check_range_c, 1 << 64, 1, 10, 10) == ("ok", False)


@needs_c
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_ANY_INT, _ANY_INT, _ANY_INT, _ANY_INT)
def test_check_range_twins_agree_on_any_int(offset: int, length: int, size: int, max_length: int) -> None:
    assert _outcome(_native._check_range_c, offset, length, size, max_length) == (
        _outcome(_native._check_range_py, offset, length, size, max_length))


def test_section_view_of_an_offset_past_u64_is_a_section_error() -> None:
    from alpc.section import Section

    section = Section.create(4096)
    try:
        with pytest.raises(SectionError):
            section.view(1 << 64, 1)
        with pytest.raises(SectionError):
            section.view(0, 1 << 64)
    finally:
        section.close()


# -- vm_read / vm_write range checks -------------------------------------------------------


@needs_c
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_ANY_INT, _ANY_INT, _ANY_INT, st.integers(0, 16))
def test_vm_range_checks_agree_with_twin(base: int, grant_len: int, offset: int, size: int) -> None:
    # Only inputs the range check refuses: those never reach process_vm_*.
    py = _outcome(_native._vm_move_py, False, os.getpid(), base, grant_len, offset, bytearray(size))
    if py != ("ok", _native.E_RANGE):
        return
    assert _outcome(_native._vm_move_c, False, os.getpid(), base, grant_len, offset, bytearray(size)) == py


# -- scan_frames and parse_attributes: twins on structured inputs ---------------------------

_HEADER = struct.Struct("<HBBIIIIIIIHHI")


@st.composite
def _frames(draw):  # type: ignore[no-untyped-def]
    out = bytearray()
    for _ in range(draw(st.integers(0, 4))):
        data_len = draw(st.one_of(st.integers(0, 64), st.sampled_from([0xFFFFFFFF, 0x80000000, 0xFFFFFFD8])))
        attr_len = draw(st.one_of(st.integers(0, 64), st.sampled_from([0xFFFFFFFF, 0x80000000, 0xFFFFFFD8])))
        header = _HEADER.pack(
            draw(st.sampled_from([0xA1C5, 0xA1C5, 0xA1C5, 0x1234])),
            draw(st.sampled_from([1, 1, 1, 2])),
            draw(st.integers(0, 255)),
            draw(st.sampled_from([0, 0, 1, 0x80000000, 0xFFFFFFFF])),
            data_len, attr_len, 0, 0, 0, 0,
            draw(st.sampled_from([0, 1, 300, 0xFFFF])),
            draw(st.sampled_from([0, 0, 0, 1])),
            draw(st.sampled_from([0, 0, 0, 1])))
        body = draw(st.binary(max_size=min(data_len, 64) + min(attr_len, 64)))
        out += header + body
    out += draw(st.binary(max_size=50))
    return bytes(out)


@needs_c
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(_frames(), st.integers(0, 60), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF))
def test_scan_frames_twins_agree(buf: bytes, start: int, max_data: int, max_attr: int, type_mask: int,
                                 flag_mask: int, max_fds: int) -> None:
    start = min(start, len(buf))
    limits = _native.ScanLimits(max_data=max_data, max_attr=max_attr, type_mask=type_mask,
                                flag_mask=flag_mask, max_fds=max_fds)
    assert _native._scan_frames_c(buf, start, limits) == _native._scan_frames_py(buf, start, limits)


@st.composite
def _attrs(draw):  # type: ignore[no-untyped-def]
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 31, 32, 0xFFFF]))
        length = draw(st.one_of(st.sampled_from([_native.ATTR_SIZES.get(kind, 8)] * 3), st.integers(0, 0xFFFF)))
        value = draw(st.binary(min_size=min(length, 32), max_size=min(length, 32)))
        out += struct.pack("<HH", kind, length) + value
    out += draw(st.binary(max_size=5))
    return bytes(out)


@needs_c
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(_attrs(), st.integers(0, 0xFFFFFFFF))
def test_parse_attributes_twins_agree(raw: bytes, allowed: int) -> None:
    assert _native._parse_attributes_c(raw, allowed) == _native._parse_attributes_py(raw, allowed)


# -- the C receive path: fds that come with a read ----------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_c
def test_c_read_at_end_of_message_with_fds_does_not_leak_them() -> None:
    # A zero-byte read that still carries SCM_RIGHTS (possible on a
    # SOCK_SEQPACKET socket): the C call keeps the fd in fds[], but the wrapper
    # returns [] for n <= 0, so the fd is neither handed over nor closed.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        state = _native.recv_state()  # type: ignore[misc]
        before = _fd_count()
        left.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        n, data, fds, _ = _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state)  # type: ignore[misc]
        for fd in fds:
            os.close(fd)
        assert n == 0 and data == b""
        assert _fd_count() == before, "the passed fd leaked"
    finally:
        left.close()
        right.close()
        os.close(r)
        os.close(w)


@needs_c
def test_c_read_closes_every_fd_beyond_max_fds() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        state = _native.recv_state()  # type: ignore[misc]
        for max_fds, sent in ((0, 1), (0, 6), (1, 2), (1, 7), (3, 4), (3, 253), (4, 4)):
            before = _fd_count()
            left.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r] * sent))])
            n, _, fds, flags = _native.sock_wait_recv(right.fileno(), -1, 1000, max_fds, state)  # type: ignore[misc]
            assert n == 1
            assert len(fds) == (sent if sent <= max_fds else 0)
            assert bool(flags & _native.RECV_TRUNCATED) == (sent > max_fds)
            for fd in fds:
                os.close(fd)
            assert _fd_count() == before, (max_fds, sent)
    finally:
        left.close()
        right.close()
        os.close(r)
        os.close(w)


def test_a_read_with_a_deadline_months_away_takes_what_is_waiting() -> None:
    """poll and epoll take an int of milliseconds: a deadline past ~24.8 days raised
    OverflowError (C: "does not fit 32-bit int", Python: "timeout is too large") even
    with the data already there. It waits at most that long now."""
    import time

    from alpc.transport import Stream

    sender, receiver = Stream.pair()
    try:
        sender.send([b"hello"])
        got = receiver.read(time.monotonic() + 1e8, 0)
        assert got and bytes(got[0]) == b"hello", got
    finally:
        sender.close()
        receiver.close()
