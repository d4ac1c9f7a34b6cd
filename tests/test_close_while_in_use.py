"""close() while another thread of the same process uses the connection.

close() marked the connection finished (core.close, which lets any thread finalize it) and
only then took the send lock to write PORT_CLOSED: a thread whose wait ended in that window
(a reply or datagram read, a ring request taken) closed the socket first, and close() wrote
to the closed socket: a raw ``OSError: [Errno 9] Bad file descriptor`` out of
``Stream.try_send`` (and the peer heard a hang-up, not PORT_CLOSED). With datagrams queued
(send(..., flush=False)), close() wrote them through the saved fd number after the socket was
closed (the C send takes the raw number): into whatever file had reused it, and the peer lost them.
Two threads closing at once: the second (the connection already ended) shut the socket down
while the first still wrote PORT_CLOSED, and the peer saw a crash (CLIENT_DIED).

The windows are made deterministic by pausing real code paths: the closer's first take of
the send lock; the first closer's farewell write.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from local_pairs import local_connection

import alpc
from alpc import _native

pytestmark = pytest.mark.timeout(60)
quick_native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))


@contextmanager
def pair(config: alpc.Config, name: str, quick: bool) -> Iterator[tuple[alpc.CommunicationPort,
                                                                        alpc.CommunicationPort]]:
    """(server side, client side) of one connection in this process, over rings if ``quick``."""
    with local_connection(config, name, alpc.PortAttributes(quick_lpc=quick)) as (_, server, client):
        if quick:
            assert client.quick and server.quick
        yield server, client


class WatchedLock:
    """The port's send lock, unchanged, except that ``before_acquire`` runs first."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def before_acquire(self) -> None:
        pass

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        self.before_acquire()
        return bool(self._lock.acquire(*args, **kwargs))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class PausingLock(WatchedLock):
    """The closing thread's first take of the send lock waits (``paused`` set) until the
    test lets it go on (``resume``)."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.closer: int | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()

    def before_acquire(self) -> None:
        if self.closer == threading.get_ident():
            self.closer = None
            self.paused.set()
            assert self.resume.wait(20)


@pytest.mark.parametrize("queued", [False, True], ids=["notice", "queued"])
@pytest.mark.parametrize("quick", [False, pytest.param(True, marks=quick_native)], ids=["socket", "quick"])
@pytest.mark.parametrize("closer_side", ["client", "server"])
def test_close_while_another_threads_wait_ends(broker, config, quick: bool,  # type: ignore[no-untyped-def]
                                               closer_side: str, queued: bool) -> None:
    """close() raises nothing, writes nothing to a closed (or reused) fd number, and the peer
    gets the datagrams queued before it, then PORT_CLOSED."""
    name = f"close.race.close.{closer_side}.{int(quick)}.{int(queued)}"
    with pair(config, name, quick) as (server, client):
        closing, other = (client, server) if closer_side == "client" else (server, client)
        if queued:
            closing.send(b"queued", flush=False)  # close() writes it before PORT_CLOSED
        lock = PausingLock(closing._send_lock)
        closing._send_lock = lock  # type: ignore[assignment]
        number = closing.fileno()
        # Another thread of the closing side waits for a message (the reader role).
        waited: list[object] = []
        waiting = threading.Event()

        def wait() -> None:
            waiting.set()
            try:
                waited.append(closing.receive(timeout=20))
            except BaseException as exc:  # the test looks at what it was
                waited.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert waiting.wait(10)
        raised: list[BaseException] = []

        def close() -> None:
            lock.closer = threading.get_ident()
            try:
                closing.close()
            except BaseException as exc:
                raised.append(exc)

        closer = threading.Thread(target=close)
        closer.start()
        # An unrelated socket, to take the closing side's fd number if it is closed under close().
        stranger, listening = socket.socketpair()
        listening.setblocking(False)
        taken_over = False
        try:
            assert lock.paused.wait(10)
            # The waiter's wait ends (a datagram comes) while close() is on its way to the send lock.
            other.send(b"wake", timeout=5)
            waiter.join(20)
            assert not waiter.is_alive()
            try:
                os.fstat(number)
            except OSError:
                # The socket was closed under close(): an unrelated socket takes its number, as any open() may.
                os.dup2(stranger.fileno(), number)
                taken_over = True
            lock.resume.set()
            closer.join(20)
            assert not closer.is_alive()
            with pytest.raises(BlockingIOError):
                leaked = listening.recv(4096)
                pytest.fail(f"{len(leaked)} bytes went into the socket that took the fd number: {leaked!r}")
            assert raised == [], raised
        finally:
            lock.resume.set()
            stranger.close()
            listening.close()
            if taken_over:
                os.close(number)
        (got,) = waited
        assert isinstance(got, (alpc.Message, alpc.ConnectionClosed)), got
        # The peer gets what was queued, then hears a clean close (PORT_CLOSED), not a hang-up.
        if queued:
            assert other.receive(timeout=10).data == b"queued"
        if closer_side == "client":
            event = server.receive(timeout=10)
            assert event.type is alpc.MessageType.PORT_CLOSED, event
        else:
            with pytest.raises(alpc.ConnectionClosed) as ended:
                client.receive(timeout=10)
            assert "closed its port" in str(ended.value), ended.value  # not "died or dropped the connection"


class NotingLock(WatchedLock):
    """Notes when the thread ``watched`` asks for the send lock."""

    def __init__(self, lock: Any, asked: threading.Event, watched: threading.local) -> None:
        super().__init__(lock)
        self._asked = asked
        self._watched = watched

    def before_acquire(self) -> None:
        if getattr(self._watched, "on", False):
            self._asked.set()


@pytest.mark.parametrize("quick", [False, pytest.param(True, marks=quick_native)], ids=["socket", "quick"])
def test_two_threads_closing_at_once_still_say_port_closed(broker, config, quick: bool) -> None:  # type: ignore[no-untyped-def]
    """The second close() (the connection already ended here) shut the socket down while the first
    was still writing PORT_CLOSED: the server saw the client die, not close."""
    with pair(config, f"close.race.twice.{int(quick)}", quick) as (server, client):
        stream = client._stream
        real_try_send, real_shutdown = stream.try_send, stream.shutdown
        writing = threading.Event()
        go_on = threading.Event()
        # The second close() went as far as it can while the first one writes: it shut the socket
        # down, or it asked for the send lock the first one holds.
        second_on = threading.local()
        progressed = threading.Event()
        client._send_lock = NotingLock(client._send_lock, progressed, second_on)  # type: ignore[assignment]

        def try_send(*args: Any, **kwargs: Any) -> int:
            # The first close() is about to write its farewell: the other close() runs now.
            writing.set()
            assert go_on.wait(20)
            return real_try_send(*args, **kwargs)

        def shutdown() -> None:
            if getattr(second_on, "on", False):
                progressed.set()
            real_shutdown()

        stream.try_send = try_send  # type: ignore[method-assign]
        stream.shutdown = shutdown  # type: ignore[method-assign]
        raised: list[BaseException] = []

        def close(second: bool) -> None:
            second_on.on = second
            try:
                client.close()
            except BaseException as exc:
                raised.append(exc)

        first = threading.Thread(target=close, args=(False,))
        first.start()
        second = threading.Thread(target=close, args=(True,))
        try:
            assert writing.wait(10)
            second.start()
            assert progressed.wait(10)
        finally:
            go_on.set()
        first.join(20)
        second.join(20)
        assert not first.is_alive() and not second.is_alive()
        assert raised == [], raised
        event = server.receive(timeout=10)
        assert event.type is alpc.MessageType.PORT_CLOSED, event
