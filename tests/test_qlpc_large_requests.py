"""Requests too large for the rings, on a connection that has them (the default): they take
the socket and a section, and should cost what they cost on a connection without rings.
Each docstring says what used to go wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import _native
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
        writes = [0]
        server._stream.send = counting(writes, server._stream.send)  # type: ignore[method-assign]
        large_round_trips(server, client)
        # (The first request brings the section's fd along: it takes the general path.)
        assert writes[0] <= ROUND_TRIPS + 1


def test_a_large_request_wakes_the_server_once(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A server's receive() waiting on the rings, woken by socket bytes, went back to wait on
    the rings and the socket again before it read them: two waits (and their polls) per
    message where one finds it."""
    with ring_pair(config, "ql.wake", alpc.PortAttributes()) as (_, server, client):
        quick = server._quick
        assert quick is not None
        second_waits = [0]
        quick.before_read = counting(second_waits, quick.before_read)  # type: ignore[method-assign]
        large_round_trips(server, client)
        assert second_waits[0] == 0


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
            time.sleep(0.001)
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
