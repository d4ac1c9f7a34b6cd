"""Requests the rings do not carry, on a connection that has them (the default): they take
the socket and a section, and should cost what they cost on a connection without rings.
Each docstring says what used to go wrong.

The rings carry bodies up to 1 MiB (a slot, or the sender's bulk area); a 64 KiB request
still takes the socket whenever the ring cannot take it (its bulk area busy, socket bytes
unread, another thread's call in flight). These tests pin the client to that path
(``socket_bodies``) rather than send 1 MiB: above 64 KiB a body is copied out lazily, and
its range goes back on its own, which is not what they are about."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import _native
from tests.test_qlpc_server_read_races import multiplexed
from tests.test_qlpc_socket_interplay import ring_pair

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]

LARGE = b"L" * 65536
ROUND_TRIPS = 20


def counting(calls: list[int], function: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return function(*args, **kwargs)

    return counted


def socket_bodies(client: alpc.CommunicationPort) -> None:
    """Make the client's rings carry only bodies that fit a slot: larger ones take the socket."""
    quick = client._quick
    assert quick is not None
    quick.carry_max = quick.payload_max


def large_round_trips(server: alpc.CommunicationPort, client: alpc.CommunicationPort) -> None:
    """ROUND_TRIPS large requests, each answered by a server thread on its connection."""
    seen: list[bytes] = []

    def serve() -> None:
        for _ in range(ROUND_TRIPS):
            message = server.receive(timeout=10)
            message.reply(b"ok")  # before reading the body: its range is the runtime's to give back
            seen.append(bytes(message.data))

    serving = threading.Thread(target=serve)
    serving.start()
    for _ in range(ROUND_TRIPS):
        assert client.request(LARGE, timeout=10).data == b"ok"
    serving.join(10)
    assert seen == [LARGE] * ROUND_TRIPS


def test_a_large_requests_section_range_goes_back_with_its_reply(broker, config) -> None:  # type: ignore[no-untyped-def]
    """On a connection with rings every socket read took the general path, where a section
    body stays a view until the application drops it: the server then told the client its
    range was free in a write of its own, two writes per round trip instead of one."""
    with ring_pair(config, "ql.release", alpc.PortAttributes()) as (_, server, client):
        socket_bodies(client)
        writes = [0]
        server._stream.send = counting(writes, server._stream.send)  # type: ignore[method-assign]
        large_round_trips(server, client)
        # (The first request brings the section's fd along: it takes the general path.)
        assert writes[0] <= ROUND_TRIPS + 1


def test_a_server_whose_client_sends_by_the_socket_waits_on_the_socket(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A server's receive() waiting on the rings, woken by socket bytes, went back to wait on
    the rings and the socket again before it read them; and it kept waiting in the futex, so
    the client woke it (a system call, and on one CPU a switch to the server) for every socket
    send: one-way datagrams on one CPU went at 77k/s against 125k/s without rings. Now it waits
    on the socket after a message that came by it, and a ring request still gets through."""
    with ring_pair(config, "ql.wake", alpc.PortAttributes()) as (_, server, client):
        socket_bodies(client)
        quick, client_quick = server._quick, client._quick
        assert quick is not None and client_quick is not None
        large_round_trips(server, client)
        assert quick.by_socket
        # (The first request may find the server asleep on the ring.)
        assert client_quick.ring.counts()["wakes"] <= 1
        assert quick.ring.counts()["sleeps"] <= 1
        replies: list[bytes] = []
        for count in (1, 2):
            caller = threading.Thread(target=lambda: replies.append(client.call(b"ring", timeout=10)))
            caller.start()
            message = server.receive(timeout=10)
            assert message.data == b"ring"
            message.reply(b"done")
            caller.join(10)
            assert replies == [b"done"] * count
            assert not quick.by_socket, (count, hex(message.id), client_quick.ring.counts())


def test_a_socket_read_waits_for_older_ring_requests(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The one-frame read skips the ring only while nothing waits in it: a ring request posted
    before the socket bytes must be delivered first."""
    with ring_pair(config, "ql.order", alpc.PortAttributes()) as (_, server, client):
        quick = server._quick
        assert quick is not None and client._quick is not None
        assert quick.settled() and client._quick.settled()
        replies: list[bytes] = []
        caller = threading.Thread(target=lambda: replies.append(client.call(b"ring", timeout=10)))
        caller.start()
        # The ring request is there before anything reads it: the server has not received yet.
        give_up = time.monotonic() + 10
        while quick.settled() and time.monotonic() < give_up:
            time.sleep(0.001)  # handshake-free: a ring post signals nothing this thread can wait on
        assert not quick.settled()
        client.send(LARGE, timeout=10)
        first = server.receive(timeout=10)
        assert first.data == b"ring"
        first.reply(b"done")
        second = server.receive(timeout=10)
        assert second.type is alpc.MessageType.DATAGRAM and second.data == LARGE
        caller.join(10)
        assert replies == [b"done"]
        assert quick.settled()


def test_a_receive_on_the_socket_leaves_a_port_wait_armed_for_the_ring(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A connection of a port whose wait() multiplexes it (quick_lpc=True), read once with
    receive() after socket messages: that receive waits on the socket with the ring's doorbell
    armed and ends the arm as it returns; the port's next wait() must still see the client's
    ring request (it re-arms every ring its reads or a take told it about)."""
    with multiplexed(config, "ql.mixed") as (port, server, client):
        socket_bodies(client)
        client.send(LARGE, timeout=10)
        assert port.wait(timeout=10).data == LARGE  # (its section's fd: the general path)
        client.send(b"small", timeout=10)
        assert port.wait(timeout=10).data == b"small"  # this wait armed the ring
        replies: list[bytes] = []
        asking = threading.Thread(target=lambda: replies.append(client.request(LARGE, timeout=10).data))
        asking.start()
        large = server.receive(timeout=10)  # waited for on the socket, the ring armed meanwhile
        assert large.data == LARGE
        large.reply(b"large")
        asking.join(10)
        assert replies == [b"large"]
        caller = threading.Thread(target=lambda: replies.append(client.call(b"ring", timeout=10)))
        caller.start()
        message = port.wait(timeout=5)
        assert isinstance(message, alpc.Message) and message.data == b"ring"
        message.reply(b"done")
        caller.join(10)
        assert replies == [b"large", b"done"]
