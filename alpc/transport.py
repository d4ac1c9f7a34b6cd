"""The only module that touches sockets: Unix stream sockets, fds, and credentials.

Every socket is non-blocking; waits go through ``poll`` with a deadline, so
every blocking call in alpc has a timeout and can also watch a pidfd.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from ._native import E_TIMEOUT as _E_TIMEOUT
from ._native import E_WATCH as _E_WATCH
from ._native import MAX_READY as _MAX_READY
from ._native import RECV_CRED as _RECV_CRED
from ._native import RECV_CRED_CHANGED as _RECV_CRED_CHANGED
from ._native import RECV_NOFILE as _RECV_NOFILE
from ._native import RECV_TRUNCATED as _RECV_TRUNCATED
from ._native import RECV_WATCHED as _RECV_WATCHED
from ._native import epoll_wait as _epoll_wait
from ._native import getsockopt_bytes as _getsockopt_bytes
from ._native import recv_cred as _recv_cred
from ._native import recv_state as _recv_state
from ._native import send_room as _send_room
from ._native import sock_send as _sock_send
from ._native import sock_wait_recv as _sock_wait_recv
from ._native import take_lost_read as _take_lost_read
from .errors import AccessDenied, ActivationError, BrokerUnavailable, ConnectionClosed, Timeout
from .handles import NOFILE
from .security import PeerCred

__all__ = [
    "RECV_CHUNK",
    "SCM_PIDFD",
    "SO_PASSPIDFD",
    "SO_PEERGROUPS",
    "Buffer",
    "ChannelRead",
    "SO_PEERPIDFD",
    "Listener",
    "Poller",
    "Received",
    "SpinBudget",
    "Stream",
    "advance_buffers",
    "close_fds",
    "deadline_after",
    "finalize_unclosed",
    "is_live_socket",
    "notify_service_manager",
    "pidfd_open",
    "process_id",
    "remaining",
    "spin_readable",
    "wait_readable",
    "wait_readable_or_hangup",
]

# Python 3.11 lacks these constants (Linux 6.5+, SO_PEERGROUPS since 4.13).
SO_PEERPIDFD = 77
SO_PASSPIDFD = 76
SCM_PIDFD = 0x04
SO_PEERGROUPS = 59
# NGROUPS_MAX: the most supplementary groups a process can have.
_MAX_GROUPS = 65536
# The largest buffer CPython's socket.getsockopt takes; larger ones go through libc.
_GETSOCKOPT_MAX = 1024
# Reads up to this size go through one preallocated buffer per stream: asking
# recv() for more makes CPython allocate (and, past malloc's mmap threshold,
# mmap and unmap) that much for every call, which cost ~20 us per small message.
RECV_CHUNK = 64 * 1024
_UCRED = struct.Struct("3i")
_INT = struct.Struct("i")
_TIMEVAL = struct.Struct("@ll")
# What sendmsg takes; collections.abc.Buffer only arrived in 3.12.
Buffer = bytes | bytearray | memoryview
_FD_SIZE = array.array("i").itemsize
_scratch = threading.local()
_monotonic = time.monotonic
_monotonic_ns = time.monotonic_ns
# sendmsg refuses more buffers than this (EMSGSIZE).
_IOV_MAX = 1024
# Frames written together (a reply and the releases riding with it, a section's
# notice) up to this many bytes are joined and sent by the one-buffer path.
_JOIN_UP_TO = 16 * 1024
_FD_SPACE: dict[int, int] = {}
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """os.getpid() without a system call: checked on hot paths to tell a forked child."""
    return _pid
# The most fds the C read takes at once (csrc/alpc_native.c); more go through recv_fds.
_MAX_C_FDS = 256
_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_EPOLL_IN = select.EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now; a timeout beyond what poll(2) takes
    (inf included) waits that long at most, where it raised OverflowError deep in a wait."""
    if timeout is None:
        return None
    if 0 <= timeout <= _MAX_WAIT_S:  # the per-request case, in one chained comparison
        return _monotonic() + timeout
    if not timeout >= 0:  # NaN too: it compares false everywhere, so every wait ended at once
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    return _monotonic() + _MAX_WAIT_S


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


# poll(2) and epoll_wait(2) take an int of milliseconds: a deadline further away than that
# (~24.8 days) waits that long at most, where it raised OverflowError before any wait.
_MAX_WAIT_MS = 2**31 - 1
_MAX_WAIT_S = _MAX_WAIT_MS / 1000


def _poll_ms(deadline: float | None) -> int | None:
    left = remaining(deadline)
    if left is None:
        return None
    # Compared first: an infinite deadline (report_interval=inf, say) made int() raise.
    return _MAX_WAIT_MS if left >= _MAX_WAIT_S else min(int(left * 1000) + (1 if left > 0 else 0), _MAX_WAIT_MS)


def _c_timeout_ms(deadline: float | None) -> int:
    """A C wait's timeout: -1 for none, else milliseconds rounded up (0 once the deadline passed)."""
    if deadline is None:
        return -1
    left = deadline - _monotonic()
    if left >= _MAX_WAIT_S:  # before int(), which raises on an infinite deadline
        return _MAX_WAIT_MS
    return min(int(left * 1000) + 1, _MAX_WAIT_MS) if left > 0 else 0


def wait_readable(fds: Sequence[int], deadline: float | None) -> list[int]:
    """Block until one of ``fds`` is readable (or hung up); [] when the deadline passes."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, _POLL_IN)
    while True:
        try:
            return [fd for fd, _ in poller.poll(_poll_ms(deadline))]
        except InterruptedError:
            continue


def spin_readable(fds: Sequence[int], spin_us: int) -> list[int]:
    """``wait_readable`` without sleeping: poll for up to ``spin_us``, yielding the CPU
    between polls; [] if nothing came by then (see SpinBudget)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, _POLL_IN)
    end = _monotonic_ns() + spin_us * 1000
    while True:
        try:
            fired = poller.poll(0)
        except InterruptedError:
            continue
        if fired or _monotonic_ns() >= end:
            return [fd for fd, _ in fired]
        os.sched_yield()


def _spin_then_wait(fds: Sequence[int], deadline: float | None, spin_us: int) -> list[int]:
    """The pure-Python twin of a C wait: spin up to ``spin_us`` (unless no waiting is asked), then sleep.

    The spin is part of the wait: it never runs past ``deadline``.
    """
    if spin_us and deadline is not None:
        spin_us = min(spin_us, int((deadline - _monotonic()) * 1e6))
    fired = spin_readable(fds, spin_us) if spin_us > 0 and deadline != 0 else []
    return fired or wait_readable(fds, deadline)


def wait_readable_or_hangup(readable: Sequence[int], hangup: Sequence[int], deadline: float | None) -> list[int]:
    """Like wait_readable, but ``hangup`` fds only count once their peer hung up.

    Lets a watcher notice a dead peer on a socket whose data belongs to another thread.
    """
    poller = select.poll()
    for fd in readable:
        poller.register(fd, _POLL_IN)
    for fd in hangup:
        poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    while True:
        try:
            return [fd for fd, _ in poller.poll(_poll_ms(deadline))]
        except InterruptedError:
            continue


class Poller:
    """An epoll set kept for a multiplexer's lifetime: register once, wait many times.

    Level-triggered, readable-or-hung-up interest only. Its own fd can be
    polled beside other fds (it is readable when an event is waiting).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fd = self._epoll.fileno()

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def register(self, fd: int) -> None:
        self._epoll.register(fd, _EPOLL_IN)

    def unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already gone (closed fds leave the set by themselves), or the poller is closed

    def poll(self, deadline: float | None, max_events: int = 1024) -> list[int]:
        """The fds that are ready, waiting until ``deadline``; [] when it passes."""
        while True:
            left = remaining(deadline)
            try:
                return [fd for fd, _ in self._epoll.poll(-1 if left is None else left, max_events)]
            except InterruptedError:
                continue

    def wait(self, watch: int, deadline: float | None, spin_us: int = 0) -> tuple[list[int], bool] | None:
        """Wait for the set, or ``watch`` (a fd outside it; -1 for none), after spinning up to
        ``spin_us`` (see SpinBudget): (the set's ready fds, whether ``watch`` fired), or None
        when the deadline passes. With the C extension this is one call and no Python loop."""
        if _epoll_wait is None:
            return self._wait_py(watch, deadline, spin_us)
        while True:
            n, ready, watched = _epoll_wait(self._fd, watch, _c_timeout_ms(deadline), spin_us)
            if n >= 0:
                return ready, watched
            if n == _E_TIMEOUT:
                return None
            if n != -errno.EINTR:  # the signal's handler has run by now; wait again
                raise OSError(-n, os.strerror(-n))
            spin_us = 0

    def _wait_py(self, watch: int, deadline: float | None, spin_us: int) -> tuple[list[int], bool] | None:
        fds = [self._fd] if watch < 0 else [self._fd, watch]
        fired = _spin_then_wait(fds, deadline, spin_us)
        if not fired:
            return None
        return (self.poll(0.0, _MAX_READY) if self._fd in fired else []), watch in fired

    def close(self) -> None:
        self._epoll.close()


def pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None if the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


class Received(NamedTuple):
    """One read: its bytes, the fds that came with them, the sender's SCM_CREDENTIALS.

    ``truncated``: the sender attached more fds than the read had room for
    (MSG_CTRUNC); every fd that arrived was closed, and the peer broke its limit.
    """

    data: bytes
    fds: list[int]
    cred: PeerCred | None
    truncated: bool = False
    pidfd: int | None = None


# What Stream.recv_fds returns: data, fds, the sender's credentials, and whether fds were truncated
# (true; handles.NOFILE when this process could not take them).
ChannelRead = tuple[bytes, list[int], PeerCred | None, int]

_CRED_SPACE = socket.CMSG_SPACE(_UCRED.size)
_PIDFD_SPACE = socket.CMSG_SPACE(_FD_SIZE)
# Plain ints: socket.MSG_CTRUNC is an IntFlag, and enum arithmetic costs a
# microsecond or more per message on the read path.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Received fds close on exec, as the C read (csrc/alpc_native.c) asks too: a peer's fds
# must not leak into whatever the receiver runs next.
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000))
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_CREDENTIALS = int(socket.SCM_CREDENTIALS)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class SpinBudget:
    """How long the next wait for a socket's data may spin before it sleeps, learnt from the last waits.

    A peer that answered within ``MAX_US`` sets the next budget to about twice
    that: spinning then saves the wake-up of a sleeping CPU (tens of microseconds
    on a VM) when the peer runs on another CPU, and yields the CPU to it when it
    runs on the same one. A longer wait (a slow or idle peer) stops the spinning;
    every ``PROBE_EVERY``-th wait after that spins once, to notice a peer that
    became quick again. A stream's read spins in C (the pure-Python read always
    sleeps); ``ConnectionPort.wait()`` spins in ``Poller.wait``.

    ``MAX_US`` covers a peer that copies a 1 MiB body through a section before it
    answers (100-150 us): with 100, a 1 MiB request/reply across CPUs slept on
    both sides and took ~275 us; with 200, ~170 us. A 64 B round trip waits
    ~20 us and is unchanged.
    """

    MAX_US = 200
    PROBE_EVERY = 32
    __slots__ = ("_skipped", "us")

    def __init__(self) -> None:
        self.us = 0
        # A new stream's first wait is a probe: a connection made for a request or
        # two would otherwise sleep through them all (32 waits before the first probe).
        self._skipped = self.PROBE_EVERY - 1

    def next(self) -> int:
        """Microseconds the next wait may spin."""
        if self.us:
            return self.us
        self._skipped += 1
        if self._skipped < self.PROBE_EVERY:
            return 0
        self._skipped = 0
        return self.MAX_US

    def waited(self, microseconds: int) -> None:
        """A wait ended with data after ``microseconds``."""
        self.us = min(self.MAX_US, 2 * microseconds + 5) if microseconds <= self.MAX_US else 0


class Stream:
    """A connected, non-blocking Unix stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self.broken = False
        # The process this stream belongs to: a child forked since holds a copy of the fd.
        self._pid = _pid
        self._buffer: memoryview | None = None
        self._poller: select.poll | None = None
        self._watch = -1
        # The last SCM_CREDENTIALS seen and its PeerCred: most reads repeat them.
        self._cred_raw = b""
        self._cred: PeerCred | None = None
        # The same for the C read (``read``), which keeps the raw credentials in C memory.
        self._recv_state = _recv_state() if _recv_state is not None else None
        self._ccred: PeerCred | None = None
        self._spin = SpinBudget()
        # What a C read took from the socket as a signal handler raised (see take_interrupted).
        self._interrupted: ChannelRead | None = None

    @classmethod
    def connect(cls, path: Path, timeout: float | None = None) -> Stream:
        _check_planted(path.parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _connect_within(sock, str(path), deadline_after(timeout))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise BrokerUnavailable(f"no broker listening at {path} ({exc.strerror})") from None
        except PermissionError as exc:
            sock.close()
            # A private (0700) runtime dir of another user: its broker is not ours to use.
            raise AccessDenied(f"not allowed to reach the broker at {path} ({exc.strerror})") from None
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise Timeout(f"connecting to the broker at {path} timed out") from None
            raise BrokerUnavailable(f"cannot reach the broker at {path}: {exc}") from None
        return cls(sock)

    @classmethod
    def from_fd(cls, fd: int) -> Stream:
        """Adopt a received socket fd (the broker hands over a client's socket this way)."""
        return cls(socket.socket(fileno=fd))

    @classmethod
    def pair(cls) -> tuple[Stream, Stream]:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(left), cls(right)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    @property
    def inherited(self) -> bool:
        """Is this a forked child's copy? The socket is the parent's too: what the child
        sends, or a shutdown, lands in the parent's connection."""
        return _pid != self._pid

    def close(self) -> None:
        self._sock.close()

    def shutdown(self) -> None:
        """End both directions now, waking any thread blocked on this socket.

        Unlike close, the fd stays valid, so a concurrent reader or writer gets
        EOF/EPIPE instead of touching a closed (or reused) descriptor. A no-op in
        a forked child: shutdown acts on the socket, which the parent still uses.
        """
        if self.inherited:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def replace_with(self, other: Stream) -> None:
        """Make this stream's fd refer to ``other``'s socket (dup2), then close ``other``.

        The fd number stays the same, so a thread still polling it can never
        find it closed or reused by an unrelated file.
        """
        os.dup2(other.fileno(), self._fd, inheritable=False)
        other.close()
        self.broken = False

    def unread(self) -> int:
        """Bytes the peer sent that no read has taken yet (FIONREAD); 0 if the socket cannot say."""
        try:
            return int(_INT.unpack(fcntl.ioctl(self._fd, termios.FIONREAD, _INT.pack(0)))[0])
        except OSError:
            return 0

    def send_room(self) -> int:
        """Bytes the send buffer still takes before a write would wait: SO_SNDBUF less what is
        queued (SIOCOUTQ), both counting the kernel's overhead per buffer; 0 if it cannot say
        (closed too: its fd number may be another file's by now)."""
        if self.closed:
            return 0
        if _send_room is not None:
            return max(0, _send_room(self._fd))  # one C call: ~0.5 us against ~2.7 us
        try:
            queued = int(_INT.unpack(fcntl.ioctl(self._fd, termios.TIOCOUTQ, _INT.pack(0)))[0])
            return max(0, self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - queued)
        except OSError:
            return 0

    def detach(self) -> int:
        """Give up ownership of the fd (after passing it to another process)."""
        return self._sock.detach()

    # -- identity ------------------------------------------------------------

    def peer_cred(self) -> PeerCred:
        """SO_PEERCRED: who was on the other end when the connection was made."""
        pid, uid, gid = _UCRED.unpack(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return PeerCred(pid, uid, gid)

    def peer_groups(self) -> tuple[int, ...]:
        """SO_PEERGROUPS: the peer's supplementary groups when it connected, as the kernel recorded them.

        Never read from /proc by pid: a pid can be reused, the socket's record cannot.
        """
        size = 64 * _FD_SIZE
        while True:
            try:
                if size <= _GETSOCKOPT_MAX:
                    raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
                else:
                    raw = _getsockopt_bytes(self._fd, socket.SOL_SOCKET, SO_PEERGROUPS, size)
            except OSError as exc:
                if exc.errno == errno.ERANGE and size < _MAX_GROUPS * _FD_SIZE:
                    size *= 16
                    continue
                if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                    return ()  # a kernel before 4.13: supplementary groups are unknown
                raise
            usable = len(raw) - len(raw) % _FD_SIZE
            return tuple(array.array("I", raw[:usable]))

    def peer_pidfd(self) -> int | None:
        """SO_PEERPIDFD (Linux 6.5+), else a pidfd opened from SO_PEERCRED's pid; None if the
        kernel has no pidfds. ProcessLookupError: the peer process is gone (and reaped) already."""
        try:
            return self._sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            pid = self.peer_cred().pid
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            raise  # not "no pidfds here": there is no process left to watch
        except (OSError, AttributeError):
            return None

    def set_passcred(self, enabled: bool) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, int(enabled))

    def set_passpidfd(self, enabled: bool) -> bool:
        """Ask for SCM_PIDFD (a pidfd of each sender) on reads; False if the kernel has none."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, int(enabled))
        except OSError:
            return False
        return True

    # -- sending ---------------------------------------------------------------

    def try_send(self, buffers: Sequence[Buffer], fds: Sequence[int] = ()) -> int:
        """One non-blocking sendmsg; returns the bytes written (0 if the socket is full)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            return self._sock.sendmsg(buffers, ancillary)
        except (BlockingIOError, InterruptedError):
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosed(f"the peer is gone ({exc.strerror})") from None

    def send(self, buffers: Sequence[Buffer], fds: Sequence[int] = (), deadline: float | None = None) -> int:
        """Write every byte of ``buffers`` (fds ride with the first byte): how many there were.

        A deadline that passes after part of a frame went out leaves the stream
        unusable, so ``broken`` is set and the caller must drop the channel. So
        does any exception that escapes before the count of what went out is known
        (a signal handler may raise, Ctrl-C, as a system call here returns).
        """
        if not fds and (len(buffers) == 1 or (_sock_send is not None and sum(map(len, buffers)) <= _JOIN_UP_TO)):
            # The per-message path: one small frame (or a few, joined: a copy of a few KiB costs
            # less than sendmsg's Python argument handling), written at once in the common case.
            only = buffers[0] if len(buffers) == 1 else b"".join(buffers)
            self.broken = True  # until this frame is known to be whole, or not started
            if _sock_send is not None and type(only) is bytes:
                written = _sock_send(self._fd, only)
                if written < 0:
                    if written not in (-errno.EAGAIN, -errno.EINTR):
                        self.broken = False  # nothing went out
                        if written in (-errno.EPIPE, -errno.ECONNRESET):
                            raise ConnectionClosed(f"the peer is gone ({os.strerror(-written)})")
                        raise OSError(-written, os.strerror(-written))
                    written = 0
            else:
                try:
                    written = self._sock.send(only)
                except (BlockingIOError, InterruptedError):
                    written = 0
                except OSError as exc:
                    self.broken = False  # nothing went out
                    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                        raise ConnectionClosed(f"the peer is gone ({exc.strerror})") from None
                    raise
            size = len(only)
            if written == size:
                self.broken = False
                return size
            rest = [memoryview(only).cast("B")[written:]]
            self._send_rest(rest, (), written > 0, deadline)
            return size
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        self.broken = True
        return self._send_rest(pending, fds, False, deadline)

    def _send_rest(self, pending: list[memoryview], fds: Sequence[int], sent_any: bool,
                   deadline: float | None) -> int:
        """Write ``pending`` whole, waiting for room until ``deadline``: how many bytes it held."""
        total = size = sum(len(b) for b in pending)
        while pending:
            try:
                written = self.try_send(pending[:_IOV_MAX], fds if not sent_any else ())
            except OSError:
                self.broken = sent_any  # a failed sendmsg wrote nothing
                raise
            if written:
                sent_any = True
                total -= written
                pending = advance_buffers(pending, written)
                continue
            try:
                writable = self._wait_writable(deadline)
            except BaseException:
                # A signal handler's exception (Ctrl-C) cuts the frame short as a timeout does.
                self.broken = sent_any
                raise
            if not writable:
                self.broken = sent_any
                raise Timeout(f"send timed out with {total} bytes unsent")
        self.broken = False
        return size

    def watch(self, extra: Sequence[int] = ()) -> None:
        """Keep a poll set of this socket and ``extra`` (a peer's pidfd) for ``wait_readable``."""
        poller = select.poll()
        for fd in (self._fd, *extra):
            poller.register(fd, _POLL_IN)
        self._poller = poller
        self._watch = extra[0] if extra else -1

    def read(self, deadline: float | None, max_fds: int) -> ChannelRead | bool | None:
        """Wait for data (until ``deadline``), then read once, as ``recv_fds`` does:
        (data, fds, credentials, truncated), b"" at end of stream.

        False when the deadline passed; None when woken with nothing to read
        (the watched pidfd fired, or a spurious wake-up). One C call with the
        extension (the GIL released while it waits), else poll and recvmsg.
        """
        if _sock_wait_recv is not None and max_fds <= _MAX_C_FDS:
            timeout = _c_timeout_ms(deadline)
            spin = self._spin.next() if timeout else 0
            started = _monotonic_ns()
            got, _ = self._read_c(self._watch, -1, timeout, spin, max_fds)
            if timeout:
                if got is False:
                    self._spin.us = 0
                elif got:
                    self._spin.waited((_monotonic_ns() - started) // 1000)
            return got
        if not self.wait_readable(deadline):
            return False
        return self.recv_fds(max_fds)

    def read_watching(self, watch: int, watch2: int, deadline: float | None, spin_us: int,
                      max_fds: int) -> tuple[ChannelRead | bool | None, bool]:
        """``read`` that wakes for ``watch`` and ``watch2`` (a multiplexer's epoll set and
        link) instead of the watched pidfd, after spinning up to ``spin_us``: (what
        ``read`` returns, whether a watched fd was ready too)."""
        if _sock_wait_recv is not None and max_fds <= _MAX_C_FDS:
            return self._read_c(watch, watch2, _c_timeout_ms(deadline), spin_us, max_fds)
        fired = _spin_then_wait([fd for fd in (self._fd, watch, watch2) if fd >= 0], deadline, spin_us)
        if not fired:
            return False, False
        watched = len(fired) > 1 or self._fd not in fired
        return (self.recv_fds(max_fds) if self._fd in fired else None), watched

    def _read_c(self, watch: int, watch2: int, timeout: int, spin: int,
                max_fds: int) -> tuple[ChannelRead | bool | None, bool]:
        assert _sock_wait_recv is not None
        try:
            n, data, fds, flags = _sock_wait_recv(self._fd, watch, timeout, max_fds, self._recv_state, spin, watch2)
        except BaseException:
            lost = _take_lost_read()
            if lost is not None:
                self._interrupted = self._read_flags(lost[1], lost[2], lost[3])
            raise
        if n > 0:
            if flags == _RECV_CRED:  # the usual read: the same sender as last time, nothing truncated
                return (data, fds, self._ccred, False), False
            return self._read_flags(data, fds, flags), bool(flags & _RECV_WATCHED)
        if n == 0 or n == -errno.ECONNRESET:
            return (b"", [], None, False), False
        if n == _E_TIMEOUT:
            return False, False
        if n == -errno.EAGAIN and not timeout:
            return False, False  # nothing there, and no waiting asked for (C skips the poll then)
        if n == _E_WATCH:
            return None, True
        if n in (-errno.EAGAIN, -errno.EINTR):
            return None, False
        raise OSError(-n, os.strerror(-n))

    def take_interrupted(self) -> ChannelRead | None:
        """The bytes (and fds) a read took from the socket as a signal handler raised
        (Ctrl-C): the caller delivers them, or they would be lost from the stream."""
        got, self._interrupted = self._interrupted, None
        return got

    def _read_flags(self, data: bytes, fds: list[int], flags: int) -> ChannelRead:
        """The rest of a C read: new credentials, none at all, or truncated fds."""
        cred = None
        if flags & _RECV_CRED:
            if flags & _RECV_CRED_CHANGED or self._ccred is None:
                self._ccred = PeerCred(*_recv_cred(self._recv_state))
            cred = self._ccred
        if flags & _RECV_NOFILE:
            return data, fds, cred, NOFILE
        return data, fds, cred, bool(flags & _RECV_TRUNCATED)

    def wait_readable(self, deadline: float | None) -> bool:
        """Wait until the socket (or a watched fd) is readable; False when the deadline passes."""
        poller = self._poller
        if poller is None:
            return bool(wait_readable([self._fd], deadline))
        while True:
            try:
                return bool(poller.poll(_poll_ms(deadline)))
            except InterruptedError:
                continue

    def _wait_writable(self, deadline: float | None) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            try:
                return bool(poller.poll(_poll_ms(deadline)))
            except InterruptedError:
                continue

    # -- receiving -------------------------------------------------------------

    def recv(self, size: int = RECV_CHUNK) -> bytes | None:
        """Non-blocking read; b"" at end of stream, None when nothing is there yet.

        Any fds a peer attached are discarded by the kernel, never installed here.
        """
        try:
            if size > RECV_CHUNK:
                return self._sock.recv(size)
            if self._buffer is None:
                self._buffer = memoryview(bytearray(RECV_CHUNK))
            received = self._sock.recv_into(self._buffer, size)
            return bytes(self._buffer[:received])
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            return b""

    def recv_fds(self, max_fds: int, size: int = RECV_CHUNK) -> ChannelRead | None:
        """Non-blocking read keeping up to ``max_fds`` passed fds and the sender's credentials.

        Returns (data, fds, credentials, truncated), or None when nothing is
        there. The channel's hot path: the socket has SO_PASSCRED set, so every
        read brings SCM_CREDENTIALS (the kernel never joins two senders' writes
        in one read), and a plain recv would let the kernel discard fds. fds
        beyond ``max_fds`` (or a truncated set) are closed, never leaked, and
        the read is marked truncated. A plain tuple and int constants: this
        runs once per message.
        """
        try:
            if size == RECV_CHUNK:
                # Into one buffer per thread (not per stream: an idle connection
                # should cost little): asking recvmsg for 64 KiB makes CPython
                # allocate (and shrink) that much on every call.
                buffer = getattr(_scratch, "buffer", None)
                if buffer is None:
                    buffer = _scratch.buffer = memoryview(bytearray(RECV_CHUNK))
                received, ancillary, flags, _ = self._sock.recvmsg_into(
                    [buffer], _FD_SPACE.get(max_fds) or _fd_space(max_fds), _MSG_CMSG_CLOEXEC)
                data = buffer[:received].tobytes()
            else:
                data, ancillary, flags, _ = self._sock.recvmsg(size, _FD_SPACE.get(max_fds) or _fd_space(max_fds),
                                                               _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            return b"", [], None, False
        if len(ancillary) == 1 and not flags & _MSG_CTRUNC and data:
            level, kind, payload = ancillary[0]
            if kind == _SCM_CREDENTIALS and level == _SOL_SOCKET:
                if payload != self._cred_raw:
                    self._cred_raw = payload
                    self._cred = PeerCred(*_UCRED.unpack_from(payload))
                return data, [], self._cred, False
        fds: list[int] = []
        cred = None
        for level, kind, payload in ancillary:
            if level != _SOL_SOCKET:
                continue
            if kind == _SCM_CREDENTIALS:
                if payload != self._cred_raw:
                    self._cred_raw = payload
                    self._cred = PeerCred(*_UCRED.unpack_from(payload))
                cred = self._cred
            elif kind == _SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
            elif kind == SCM_PIDFD:
                # Never asked for on a channel (as the C read does, close it rather than leak it).
                usable = len(payload) - len(payload) % _FD_SIZE
                close_fds(array.array("i", payload[:usable]))
        truncated: int = len(fds) > max_fds or bool(flags & _MSG_CTRUNC)
        if flags & _MSG_CTRUNC and len(fds) < max_fds:
            # The buffer holds max_fds: the kernel stopped early because it could not
            # install them here (EMFILE), as the C read's RECV_NOFILE says.
            truncated = NOFILE
        if truncated or not data:
            close_fds(fds)
            fds = []
        if not data:
            return b"", [], None, False  # the end of the stream (its credentials say nothing)
        return data, fds, cred, truncated

    def recv_with_ancillary(self, size: int = RECV_CHUNK, max_fds: int = 0, want_cred: bool = False,
                            want_pidfd: bool = False) -> Received | None:
        """Non-blocking recvmsg keeping fds, SCM_CREDENTIALS and SCM_PIDFD; None if nothing is there.

        fds beyond ``max_fds`` are closed, never leaked. A pidfd is kept only
        when asked for (``want_pidfd``, after ``set_passpidfd``); the caller owns it.
        """
        space = socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE)
        if want_cred:
            space += _CRED_SPACE
        if want_pidfd:
            space += _PIDFD_SPACE
        try:
            data, ancillary, flags, _ = self._sock.recvmsg(size, space, _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            return Received(b"", [], None)
        fds: list[int] = []
        cred = None
        pidfd = None
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
            elif kind == socket.SCM_CREDENTIALS:
                cred = PeerCred(*_UCRED.unpack_from(payload))
            elif kind == SCM_PIDFD and len(payload) >= _FD_SIZE:
                received = array.array("i", payload[:_FD_SIZE])[0]
                if received < 0:
                    continue  # -errno: the kernel could not install it here (EMFILE): no pidfd
                if want_pidfd and pidfd is None:
                    pidfd = received
                else:
                    close_fds([received])
        truncated = len(fds) > max_fds or bool(flags & socket.MSG_CTRUNC)
        if truncated:
            close_fds(fds)
            fds = []
        return Received(data, fds, cred, truncated, pidfd)


def _check_planted(directory: Path) -> None:
    """Refuse a broker's directory named as our fallback default (alpc-$UID) in a directory
    every user may create entries in (/tmp) when it is neither ours nor root's: whoever made
    it first runs the broker there, and would serve every name we ask for. A directory named
    otherwise was chosen by whoever configured it (another user's broker, on purpose).
    """
    if directory.name != f"alpc-{os.getuid()}":
        return
    try:
        owner = directory.lstat().st_uid
        parent_mode = directory.parent.stat().st_mode
    except OSError:
        return  # nothing there (or out of reach): connect() says so
    if owner not in (os.getuid(), 0) and parent_mode & stat.S_IWOTH:
        raise AccessDenied(f"the broker's directory {directory} belongs to uid {owner}, not to us or root, "
                           f"in {directory.parent}, where anyone may create it")


def _connect_within(sock: socket.socket, address: str, deadline: float | None) -> None:
    """connect(), waiting in the kernel while the listener's backlog is full, until ``deadline``.

    A Unix connect to a full backlog fails at once with EAGAIN on a non-blocking socket (which
    is what socket.settimeout makes), so the socket blocks with SO_SNDTIMEO as its limit: the
    kernel wakes it when the listener accepts. TimeoutError when the backlog stayed full.
    """
    sock.setblocking(True)
    while True:
        left = remaining(deadline)
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "the listener's backlog stayed full")
        seconds = 0.0 if left is None else max(left, 1e-6)  # 0: no limit
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1_000_000)))
        try:
            sock.connect(address)
        except BlockingIOError:
            continue  # SO_SNDTIMEO ran out with the backlog still full
        try:
            sock.getpeername()
        except OSError:
            # A signal cut the wait short and CPython, as for a TCP connect in progress, took
            # a writable socket for a connected one: it is not; ask again.
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
        return


def _fd_space(max_fds: int) -> int:
    space = _FD_SPACE[max_fds] = socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE) + _CRED_SPACE
    return space


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def advance_buffers(buffers: list[memoryview], written: int) -> list[memoryview]:
    """Drop ``written`` bytes from the front of ``buffers`` (after a partial write)."""
    while written:
        head = buffers[0]
        if written >= len(head):
            written -= len(head)
            buffers.pop(0)
        else:
            buffers[0] = head[written:]
            written = 0
    return buffers


class Listener:
    """A listening pathname Unix socket; the file is removed again on close."""

    def __init__(self, sock: socket.socket, path: Path | None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.path = path
        self.owns_file = path is not None
        # The file at ``path`` now: close() removes only that one, never one another broker
        # bound there since (the runtime dir was cleaned up while this broker ran, say).
        self._file_id = _file_id(path) if path is not None else None
        # The last accept() found connections it could not take (out of fds or memory).
        self.starved = False

    @classmethod
    def bind(cls, path: Path, backlog: int = 512, shared: bool = False) -> Listener:
        """Listen at ``path``: mode 0600 (only our uid may connect), or 0666 when ``shared``.

        A shared broker lets every local user reach it; its port ACLs are
        what keep them out of each port.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o111 if shared else 0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return cls(sock, path)

    @classmethod
    def from_fd(cls, fd: int) -> Listener:
        """Adopt an inherited listening socket (socket activation, or a broker's handover).

        Whoever created the socket owns its file, so ``close`` leaves it alone
        unless the caller sets ``owns_file``.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} is not a socket ({exc.strerror})") from None
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ActivationError(f"fd {fd} is a {sock.family.name} {sock.type.name} socket, "
                                      "not a Unix stream socket (ListenStream= with a path)")
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ActivationError(f"fd {fd} is a Unix stream socket that is not listening")
            name = sock.getsockname()
        except BaseException:
            sock.detach()
            raise
        # An abstract address (leading NUL) has no file; an unnamed one has no address.
        path = Path(name) if isinstance(name, str) and name and not name.startswith("\0") else None
        listener = cls(sock, path)
        listener.owns_file = False
        return listener

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> Stream | None:
        """The next connection, or None: none is waiting, or (``starved`` then) none can be
        taken for want of fds or memory, while the listener stays readable."""
        self.starved = False
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.starved = True
                return None
            if exc.errno == errno.ECONNABORTED:
                return None
            raise
        return Stream(sock)

    def close(self, unlink: bool = True) -> None:
        self._sock.close()
        if unlink and self.owns_file and self.path is not None and _file_id(self.path) == self._file_id:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names (device, inode); None if none."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def finalize_unclosed(stream: Stream, farewell: Callable[[], Sequence[Buffer]],
                      releases: Iterable[Callable[[], object]]) -> None:
    """What a connection collected without close() still owes: ``farewell()``'s frames (its
    PORT_CLOSED) in one non-blocking write if the socket is open and ours, then ``releases``.

    A finalizer runs on any thread, at any moment, interpreter shutdown included: nothing here
    waits or takes a lock, and a failure (the peer gone, modules torn down) skips only its step.
    """
    try:
        if not stream.inherited and not stream.closed:
            notice = farewell()
            if notice:
                stream.try_send(notice)
    except Exception:
        pass
    for release in (stream.close, *releases):
        try:
            release()
        except Exception:
            pass


def is_live_socket(path: Path) -> bool:
    """Is something listening at ``path``? (Distinguishes a stale file.) Never waits:
    a full listen backlog (EAGAIN) is a busy listener, not a missing one."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
        return True
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        probe.close()


def notify_service_manager(state: str, environ: dict[str, str] | None = None) -> bool:
    """sd_notify(3): send ``state`` (``READY=1``, ``STATUS=...``) to ``$NOTIFY_SOCKET``.

    Returns False when no service manager asked for notifications, or when
    its queue is full: the send never waits (the broker's loop calls this, and
    a manager that reads nothing must not stall serving). A path starting with
    ``@`` is an abstract socket name.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
        return True
    except OSError:
        return False
    finally:
        sock.close()
