"""The client side of Quick-LPC under signals and races: request()/call() over the rings, and
replies that take the socket as their callers give up. Each docstring says what went wrong
before (each test failed then)."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import pytest

import alpc
from alpc import _native
from alpc.protocol import QUICK_ID_BIT
from tests.test_qlpc_socket_interplay import ring_pair

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]


def answer(server: alpc.CommunicationPort, count: int) -> threading.Thread:
    """A thread answering ``count`` requests on ``server`` with their bodies upper-cased."""
    def run() -> None:
        for _ in range(count):
            message = server.receive(timeout=10)
            message.reply(message.data.upper())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def in_thread(call: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call(*args, **kwargs))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


class InterruptedTurn:
    """The ring's turn lock (QuickLink._calling), whose acquire raises KeyboardInterrupt as it
    returns when armed: what a Ctrl-C does whose handler CPython runs as that C call returns."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.armed = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got: bool = self.lock.acquire(blocking, timeout)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return got

    def release(self) -> None:
        self.lock.release()

    def _is_owned(self) -> bool:
        return bool(self.lock._is_owned())

    def locked(self) -> bool:
        # (An RLock tells its owner only: held by nobody when this thread does not own it and
        # another thread cannot take it either.)
        if self.lock._is_owned():
            return True
        if self.lock.acquire(False):
            self.lock.release()
            return False
        return True


@pytest.mark.parametrize("how", ["call", "request"])
def test_an_interrupt_as_the_ring_turn_is_taken_does_not_keep_the_connection_off_the_ring(
        broker, config, how: str) -> None:  # type: ignore[no-untyped-def]
    """QuickLink.bind_call's ``take_turn(False)`` and QuickLink.request's
    ``self._calling.acquire(False)`` take the ring's turn lock before the ``try`` whose
    ``finally`` gives it back. A signal handler that raises (Ctrl-C) as that acquire returns
    leaves the lock held for good: every later call and request of this connection finds the
    turn taken and goes by the socket, for the life of the connection."""
    with ring_pair(config, "rc.turn") as (_port, server, client):
        quick = client._quick
        assert quick is not None
        turn = InterruptedTurn(quick._calling)
        quick._calling = turn  # type: ignore[assignment]
        client.call = quick.bind_call(client)  # type: ignore[method-assign]  # (bound with the wrapped lock)
        serving = answer(server, 2)
        assert client.request(b"one", timeout=10).callback_id & QUICK_ID_BIT
        turn.armed = True
        with pytest.raises(KeyboardInterrupt):
            if how == "call":
                client.call(b"two", timeout=10)
            else:
                client.request(b"two", timeout=10)
        # Nothing was posted for "two": the server sees only "one" and "three".
        reply = client.request(b"three", timeout=10)
        serving.join(10)
        assert reply.data == b"THREE"
        assert not turn.locked(), "the ring's turn lock is still held after the interrupt"
        assert reply.callback_id & QUICK_ID_BIT, "the request after the interrupt did not take the ring"


def test_a_socket_reply_claimed_as_its_ring_caller_times_out_is_not_kept_for_ever(
        broker, config) -> None:  # type: ignore[no-untyped-def]
    """A reply to a ring request that takes the socket (here: it carries an fd) is claimed in
    the reader's decode (QuickLink.claims: the request is still in flight) and filed in
    ``replies`` only later, in Connection.route after _write_runtime and drain. If the ring
    caller's deadline passes in between, QuickLink._abandon pops ``replies`` before the reply
    is filed there, and then it is filed for nobody: the Message (its fds, a section range of
    the server's if its body took one) stays in ``replies`` for the life of the connection."""
    attributes = alpc.PortAttributes(quick_lpc=True, handle_kinds={"pipe"})
    client_config = dataclasses.replace(config, handle_kinds={"pipe"})
    with ring_pair(config, "rc.leak", attributes, client_config) as (_port, server, client):
        quick = client._quick
        assert quick is not None
        reading = threading.Event()
        abandoned = threading.Event()
        real_read = client._read
        real_abandon = quick._abandon
        real_drain = quick.drain

        def read(*args: Any, **kwargs: Any) -> bool:
            reading.set()
            return real_read(*args, **kwargs)

        def abandon(*args: Any) -> None:
            real_abandon(*args)
            abandoned.set()

        def drain(port: alpc.CommunicationPort) -> list[alpc.Message]:
            # Between the decode (which claimed the reply) and route (which files it): the
            # window that _write_runtime can hold open for as long as the socket is full.
            abandoned.wait(10)
            return real_drain(port)

        client._read = read  # type: ignore[method-assign]
        quick._abandon = abandon  # type: ignore[method-assign]
        quick.drain = drain  # type: ignore[method-assign]
        reader, got = in_thread(client.receive, timeout=20)  # this thread reads the socket
        assert reading.wait(10)
        caller, result = in_thread(client.request, b"give", timeout=1.0)
        message = server.receive(timeout=10)
        assert message.id & QUICK_ID_BIT
        read_end, write_end = os.pipe()
        try:
            message.reply(b"here", fds=[write_end])
        finally:
            os.close(write_end)
            os.close(read_end)
        caller.join(20)
        assert isinstance(result[0], alpc.Timeout), result
        server.send(b"bye", timeout=10)
        reader.join(20)
        assert isinstance(got[0], alpc.Message) and got[0].data == b"bye", got
        kept = dict(client._core.replies)
        assert not kept, f"replies nobody will take, kept for the life of the connection: {kept}"
