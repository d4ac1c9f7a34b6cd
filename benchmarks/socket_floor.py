"""How fast could the default (socket) path be? The floor under its 64 B round trip.

Two ping-pongs between two processes over a Unix socketpair, in alternating
repetitions, pinned to one CPU (``same``) and to two (``split``), never mixed:

- ``bare``: Python ``send`` / ``recv``, what the harness's socketpair peer does;
- ``credentials``: ``bare`` with SO_PASSCRED on and each read a ``recvmsg`` taking
  the SCM_CREDENTIALS the kernel attaches to every message (what gives each alpc
  message its sender's kernel-verified identity);
- ``poll``: ``bare`` with a ``poll`` before each read (what lets every alpc wait
  take a timeout);
- ``floor``: what every alpc message needs at the least: its 40-byte header packed
  and unpacked, sent by alpc's C send and read by its C poll + recvmsg with
  SO_PASSCRED on (the channel's read path, credentials included), and nothing
  else: no protocol state, no Message object, no flow control, no locks.

The gap between ``bare`` and ``floor`` is what the design costs before any
bookkeeping (``credentials`` and ``poll`` show the kernel's share of it); the
full path (``make bench``, row ``alpc``) adds the bookkeeping.

    python -m benchmarks.socket_floor [--rounds N] [--reps R]

Needs the C extension (alpc's C calls are what is measured).
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import statistics
import sys
from collections.abc import Callable
from typing import NamedTuple

from alpc import _native
from alpc.wire import HEADER, HEADER_SIZE, MessageType, encode_header

from .pingpong import arguments, pinnings, time_round_trips

__all__ = ["main", "measure"]

MESSAGE = b"x" * 64
WARM_UP = 200
_TIMEOUT_MS = 10_000
_UCRED_SIZE = 12  # struct ucred: pid, uid, gid
# Fields of wire.HEADER: magic, version, type, flags, data and attribute lengths, message id, ...
_TYPE, _MESSAGE_ID = 2, 6


class _Pair(NamedTuple):
    client: socket.socket
    server: socket.socket
    ask: Callable[[], None]  # one round trip, on the client
    answer: Callable[[], bool]  # one turn of the server; False once the client is gone


def _bare() -> _Pair:
    """Plain Python send / recv."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def ask() -> None:
        client.send(MESSAGE)
        client.recv(65536)

    def answer() -> bool:
        data = server.recv(65536)
        if data:
            server.send(data)
        return bool(data)

    return _Pair(client, server, ask, answer)


def _credentials() -> _Pair:
    """Plain Python send, and recvmsg taking each read's SCM_CREDENTIALS."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (client, server):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    room = socket.CMSG_SPACE(_UCRED_SIZE)

    def ask() -> None:
        client.send(MESSAGE)
        client.recvmsg(65536, room)

    def answer() -> bool:
        data = server.recvmsg(65536, room)[0]
        if data:
            server.send(data)
        return bool(data)

    return _Pair(client, server, ask, answer)


def _poll() -> _Pair:
    """Plain Python send, and poll before each recv."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client_poll, server_poll = select.poll(), select.poll()
    client_poll.register(client, select.POLLIN)
    server_poll.register(server, select.POLLIN)

    def ask() -> None:
        client.send(MESSAGE)
        client_poll.poll(_TIMEOUT_MS)
        client.recv(65536)

    def answer() -> bool:
        server_poll.poll(_TIMEOUT_MS)
        data = server.recv(65536)
        if data:
            server.send(data)
        return bool(data)

    return _Pair(client, server, ask, answer)


def _floor() -> _Pair:
    """alpc's C send and wait-and-read (SO_PASSCRED on), each message framed by its header."""
    send, wait_recv, recv_state = _native.sock_send, _native.sock_wait_recv, _native.recv_state
    if send is None or wait_recv is None or recv_state is None:
        raise RuntimeError("the floor needs the C extension")
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (client, server):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    client_fd, server_fd = client.fileno(), server.fileno()
    client_state, server_state = recv_state(), recv_state()
    pid = os.getpid()
    ids = itertools.count(1)

    def ask() -> None:
        send(client_fd, encode_header(MessageType.REQUEST, len(MESSAGE), message_id=next(ids),
                                      sender_pid=pid) + MESSAGE)
        got, data, _, _ = wait_recv(client_fd, -1, _TIMEOUT_MS, 0, client_state)
        if got <= 0 or HEADER.unpack_from(data)[_TYPE] != MessageType.REPLY:
            raise RuntimeError(f"no reply (read returned {got})")

    def answer() -> bool:
        got, data, _, _ = wait_recv(server_fd, -1, _TIMEOUT_MS, 0, server_state)
        if got <= 0:
            return False
        request_id = HEADER.unpack_from(data)[_MESSAGE_ID]
        body = bytes(data[HEADER_SIZE:])
        send(server_fd, encode_header(MessageType.REPLY, len(body), callback_id=request_id, sender_pid=pid) + body)
        return True

    return _Pair(client, server, ask, answer)


WAYS: dict[str, Callable[[], _Pair]] = {"bare": _bare, "credentials": _credentials, "poll": _poll,
                                        "floor": _floor}


def measure(way: str, rounds: int, cpus: tuple[int, int]) -> float:
    """Median microseconds per round trip over ``rounds``, client on cpus[0], server on cpus[1]."""
    client, server, ask, answer = WAYS[way]()
    pid = os.fork()
    if pid == 0:
        client.close()
        os.sched_setaffinity(0, {cpus[1]})
        while answer():
            pass
        os._exit(0)
    server.close()
    try:
        return time_round_trips(ask, rounds, WARM_UP, cpus[0])
    finally:
        client.close()  # the server's read then ends
        os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, argv)
    if _native.sock_send is None:
        print("socket_floor needs alpc's C extension (it measures alpc's C calls)", file=sys.stderr)
        return 2
    print(f"64 B round trips, {args.rounds} per repetition, {args.reps} repetitions; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, cpus in pinnings().items():
        results: dict[str, list[float]] = {way: [] for way in WAYS}
        for _ in range(args.reps):
            for way in WAYS:  # interleaved, so noise falls on both
                results[way].append(measure(way, args.rounds, cpus))
        medians = {way: statistics.median(times) for way, times in results.items()}
        print(f"{name:5} (cpus {cpus[0]}/{cpus[1]}): " + ", ".join(
            f"{way} {medians[way]:.2f} us ({medians[way] / medians['bare']:.2f}x; reps "
            f"{min(results[way]):.2f}..{max(results[way]):.2f})" for way in WAYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
