"""Handles (fds) passed in messages: what kind each one is, and who owns it.

The kind of a received fd is decided here, by the receiver, from what the
kernel says about the open file (fstat, fcntl and the /proc/self/fd link),
never from anything the sender wrote. A port admits the kinds it lists
(``PortAttributes.handle_kinds``); any other fd is closed on arrival. No
sockets are touched: only the fds themselves are inspected.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from .errors import HandleNotAllowed
from .security import HandleKind

__all__ = [
    "Classifier",
    "Handle",
    "NOFILE",
    "ReceivedHandles",
    "check_outgoing",
    "classify",
    "close_quietly",
    "sort_received",
]

# Linux's F_GET_SEALS; only memfds (and shmem files) answer it.
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_O_PATH = getattr(os, "O_PATH", 0o10000000)
_ANON = {
    "anon_inode:[eventfd]": HandleKind.EVENTFD,
    "anon_inode:[pidfd]": HandleKind.PIDFD,
    "anon_inode:[timerfd]": HandleKind.TIMERFD,
    "anon_inode:[signalfd]": HandleKind.SIGNALFD,
    "anon_inode:[eventpoll]": HandleKind.EPOLL,
    "anon_inode:inotify": HandleKind.INOTIFY,
}

Classifier = Callable[[int], HandleKind]

# A read's ``truncated`` (transport.ChannelRead) when its fds were lost because this process
# could not take them (its fd table was full: EMFILE), rather than because the sender attached
# more than it may (True, 1): the connection cannot go on, but the sender broke no rule.
NOFILE = 2


class Handle(NamedTuple):
    """A received fd and its kind; the receiver owns the fd once it takes it."""

    fd: int
    kind: HandleKind


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _is_memfd(fd: int, info: os.stat_result) -> bool:
    if info.st_nlink != 0 or not _link(fd).startswith("/memfd:"):
        return False
    try:
        fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return False
    return True


def classify(fd: int) -> HandleKind:
    """The kind of the open file behind ``fd``, as the kernel describes it."""
    info = os.fstat(fd)
    mode = stat.S_IFMT(info.st_mode)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & _O_PATH:
        return HandleKind.PATH
    if mode == stat.S_IFREG:
        return HandleKind.MEMFD if _is_memfd(fd, info) else HandleKind.FILE
    if mode == stat.S_IFDIR:
        return HandleKind.DIRECTORY
    if mode == stat.S_IFSOCK:
        return HandleKind.SOCKET
    if mode == stat.S_IFIFO:
        return HandleKind.PIPE
    if mode in (stat.S_IFCHR, stat.S_IFBLK):
        return HandleKind.DEVICE
    return _ANON.get(_link(fd), HandleKind.OTHER)


def close_quietly(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def check_outgoing(fds: Sequence[int], allowed: frozenset[HandleKind], max_per_message: int,
                   classifier: Classifier = classify) -> None:
    """Refuse, before sending, fds the peer would close on arrival (it announced what it takes)."""
    if len(fds) > max_per_message:
        raise HandleNotAllowed(f"{len(fds)} fds in one message; the peer takes at most {max_per_message}")
    for fd in fds:
        try:
            kind = classifier(fd)
        except OSError as exc:
            raise HandleNotAllowed(f"fd {fd} cannot be passed: {exc.strerror}") from None
        if kind not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise HandleNotAllowed(f"fd {fd} is a {kind}; the peer accepts {accepted}")


def sort_received(fds: Sequence[int], allowed: frozenset[HandleKind],
                  classifier: Classifier = classify) -> tuple[list[Handle], list[HandleKind]]:
    """Keep the received fds of an allowed kind; close the rest at once.

    Returns the kept handles and the kinds refused (their fds already closed).
    """
    kept: list[Handle] = []
    refused: list[HandleKind] = []
    for fd in fds:
        try:
            kind = classifier(fd)
        except OSError:
            kind = HandleKind.OTHER
        if kind in allowed:
            kept.append(Handle(fd, kind))
        else:
            refused.append(kind)
            close_quietly([fd])
    return kept, refused


class ReceivedHandles:
    """The fds a message brought, owned until the application takes them.

    Untaken fds are closed when the message is dropped (or ``close`` is
    called), so a receiver that ignores them never leaks them.
    """

    __slots__ = ("_handles", "received", "refused")

    def __init__(self, handles: Sequence[Handle], refused: Sequence[HandleKind] = (), received: int = -1) -> None:
        self._handles: tuple[Handle, ...] | None = tuple(handles)
        # The kinds closed on arrival, and how many fds came in all (what the peer counts).
        self.refused = tuple(refused)
        self.received = len(self._handles) + len(self.refused) if received < 0 else received

    @property
    def handles(self) -> tuple[Handle, ...]:
        return self._handles or ()

    def take(self) -> tuple[Handle, ...]:
        """Hand the fds over: from now on the caller closes them."""
        handles, self._handles = self._handles or (), None
        return handles

    def close(self) -> None:
        handles, self._handles = self._handles or (), None
        close_quietly(handle.fd for handle in handles)

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._handles or ())
