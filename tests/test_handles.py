"""Handle kinds decided by the receiver from the kernel's view of each fd; refused fds closed."""

from __future__ import annotations

import ctypes
import gc
import os
import select
import socket
from collections.abc import Iterator

import pytest

from alpc.errors import HandleNotAllowed
from alpc.handles import Handle, ReceivedHandles, check_outgoing, classify, sort_received
from alpc.security import HandleKind

_LIBC = ctypes.CDLL(None, use_errno=True)
_CLOCK_MONOTONIC = 1


def _timerfd() -> int:
    return int(_LIBC.timerfd_create(_CLOCK_MONOTONIC, 0))


def _signalfd() -> int:
    mask = ctypes.create_string_buffer(128)  # an empty sigset_t
    return int(_LIBC.signalfd(-1, mask, 0))


def _inotify() -> int:
    return int(_LIBC.inotify_init1(0))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def fds(tmp_path) -> Iterator[dict[HandleKind, int]]:  # type: ignore[no-untyped-def]
    """One open fd of every kind the classifier knows."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    epoll = select.epoll()
    made = {
        HandleKind.FILE: os.open(path, os.O_RDONLY),
        HandleKind.DIRECTORY: os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        HandleKind.PATH: os.open(path, os.O_PATH),
        HandleKind.SOCKET: left.detach(),
        HandleKind.PIPE: read_end,
        HandleKind.MEMFD: os.memfd_create("k"),
        HandleKind.DEVICE: os.open("/dev/null", os.O_RDONLY),
        HandleKind.EVENTFD: os.eventfd(0),
        HandleKind.PIDFD: os.pidfd_open(os.getpid()),
        HandleKind.EPOLL: os.dup(epoll.fileno()),
        HandleKind.SIGNALFD: _signalfd(),
        HandleKind.TIMERFD: _timerfd(),
        HandleKind.INOTIFY: _inotify(),
    }
    assert all(fd >= 0 for fd in made.values()), made
    yield made
    epoll.close()
    right.close()
    os.close(write_end)
    for fd in made.values():
        if is_open(fd):
            os.close(fd)


def test_every_kind_is_recognised_from_the_fd_itself(fds: dict[HandleKind, int]) -> None:
    for kind, fd in fds.items():
        assert classify(fd) is kind, (kind, os.readlink(f"/proc/self/fd/{fd}"))


def test_a_file_named_like_a_memfd_is_still_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "memfd:fake"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert classify(fd) is HandleKind.FILE
    finally:
        os.close(fd)


def test_refused_kinds_are_closed_on_arrival(fds: dict[HandleKind, int]) -> None:
    allowed = frozenset({HandleKind.FILE, HandleKind.MEMFD})
    received = [fds[HandleKind.SOCKET], fds[HandleKind.FILE], fds[HandleKind.DIRECTORY], fds[HandleKind.MEMFD]]
    kept, refused = sort_received(received, allowed)
    assert kept == [Handle(fds[HandleKind.FILE], HandleKind.FILE), Handle(fds[HandleKind.MEMFD], HandleKind.MEMFD)]
    assert refused == [HandleKind.SOCKET, HandleKind.DIRECTORY]
    assert not is_open(fds[HandleKind.SOCKET]) and not is_open(fds[HandleKind.DIRECTORY])
    assert is_open(fds[HandleKind.FILE])


def test_received_handles_close_unless_taken() -> None:
    first, second = os.pipe()
    box = ReceivedHandles([Handle(first, HandleKind.PIPE)])
    taken = box.take()
    assert taken == (Handle(first, HandleKind.PIPE),) and len(box) == 0
    del box
    gc.collect()
    assert is_open(first)
    os.close(first)
    dropped = ReceivedHandles([Handle(second, HandleKind.PIPE)])
    del dropped
    gc.collect()
    assert not is_open(second)


def test_outgoing_fds_are_checked_against_what_the_peer_takes(fds: dict[HandleKind, int]) -> None:
    check_outgoing([fds[HandleKind.FILE]], frozenset({HandleKind.FILE}), 1)
    with pytest.raises(HandleNotAllowed, match="is a socket; the peer accepts file"):
        check_outgoing([fds[HandleKind.SOCKET]], frozenset({HandleKind.FILE}), 1)
    with pytest.raises(HandleNotAllowed, match="at most 1"):
        check_outgoing([fds[HandleKind.FILE]] * 2, frozenset({HandleKind.FILE}), 1)
    with pytest.raises(HandleNotAllowed, match="cannot be passed"):
        check_outgoing([9999], frozenset({HandleKind.FILE}), 1)
    with pytest.raises(PermissionError):  # HandleNotAllowed is an AccessDenied
        check_outgoing([fds[HandleKind.PIPE]], frozenset(), 4)
