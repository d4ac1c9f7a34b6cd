"""How a server reads a connection that has Quick-LPC rings beside its socket (receive(),
receive_many(), serve_requests(), the port's wait() and its arm queue) when a signal handler
raises as a C call returns, another thread reads the same connection, or the client keeps its
runtime busy. Each docstring says what went wrong before (each test failed then)."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import alpc
from alpc import _native, qlpc
from alpc._native import Q_ORDER
from tests.test_qlpc_faults import in_thread, until

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]

QLPC_PEERS = Path(__file__).resolve().parent / "qlpc_peers.py"
SERVER_STATE = 128 + 12  # the server side's ``state`` word in the ring region
ST_POLL = 3


@contextmanager
def multiplexed(config: alpc.Config, name: str) -> Iterator[tuple[alpc.ConnectionPort, alpc.CommunicationPort,
                                                                   alpc.CommunicationPort]]:
    """A quick_lpc=True port whose wait() accepted one in-process client (rings in use)."""
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=True), config=config) as port:
        connected: list[alpc.CommunicationPort] = []
        connecting = threading.Thread(target=lambda: connected.append(alpc.connect(name, config=config,
                                                                                   timeout=10)))
        connecting.start()
        request = port.wait(timeout=10)
        assert isinstance(request, alpc.ConnectionRequest)
        server = request.accept()
        connecting.join(10)
        client = connected[0]
        try:
            assert client.quick and server.quick
            yield port, server, client
        finally:
            client.close()
            server.close()


def wait_sees_ring_call(port: alpc.ConnectionPort, server: alpc.CommunicationPort,
                        client: alpc.CommunicationPort, body: bytes) -> None:
    """The client's next ring call must reach the port's wait(), which answers it."""
    caller = in_thread(client.call, body, 4)
    try:
        message = port.wait(timeout=2)
    except alpc.Timeout:
        pytest.fail(f"port.wait() slept through a ring request {body!r}: nothing rang the doorbell "
                    f"(ring state {server._quick.ring.counts()})")  # type: ignore[union-attr]
    assert isinstance(message, alpc.Message) and message.data == body
    message.reply(body.upper())
    caller.join(10)
    assert caller.result == [body.upper()]  # type: ignore[attr-defined]


# -- a signal as a ring wait returns ends the port's arm, and nobody re-arms it -----------------


def test_an_interrupted_receive_leaves_the_ports_wait_able_to_see_the_ring(broker, config) -> None:  # type: ignore[no-untyped-def]
    """QuickLink.receive tells on_take (the port's "arm me again before poll()") only after
    its ring wait returned normally. A signal handler that raises as that C wait returns (a
    Ctrl-C handled, a custom signal exception) leaves the ring out of the ST_POLL state the
    port's wait() armed (the wait moved it to SPIN/FUTEX, end_call to BUSY) and out of the arm
    queue: the client's next ring post rings no doorbell, and every later wait() sleeps in
    poll() while the request waits in the ring."""
    with multiplexed(config, "rv.intr.receive") as (port, server, client):
        quick = server._quick
        assert quick is not None
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0.05)  # arms the ring (takes it off the arm queue)
        real = quick._reply_wait_attested

        def interrupted(*args: object) -> int:
            real(*args)
            raise KeyboardInterrupt  # as a signal handler would, as the C wait returns

        quick._reply_wait_attested = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            server.receive(timeout=0.05)
        quick._reply_wait_attested = real  # type: ignore[method-assign]
        wait_sees_ring_call(port, server, client, b"after")


def test_an_interrupted_receive_many_leaves_the_ports_wait_able_to_see_the_ring(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The same through receive_many() (the general path's before_read ring wait): its except
    path rescues what the wait took but never tells on_take either."""
    with multiplexed(config, "rv.intr.many") as (port, server, client):
        quick = server._quick
        assert quick is not None
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0.05)
        ring = quick.ring
        real = ring.reply_wait_attested

        def interrupted(*args: object) -> int:
            real(*args)
            raise KeyboardInterrupt

        ring.reply_wait_attested = interrupted
        with pytest.raises(KeyboardInterrupt):
            server.receive_many(timeout=0.05)
        ring.reply_wait_attested = real
        wait_sees_ring_call(port, server, client, b"after")


# -- a thread in receive() while another sleeps in the port's wait() -----------------------------


def test_a_receive_thread_does_not_leave_a_sleeping_port_wait_deaf_to_the_ring(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """wait() arms a ring (ST_POLL: the client's next post sends a doorbell frame) and sleeps in
    poll(). A thread's receive() on that connection meanwhile waits on the ring itself, which
    moves the ring out of ST_POLL, takes the request, and only queues the connection to be armed
    again (on_take): nothing wakes the wait() already asleep. Once that thread is done, the
    client's next ring request rings no doorbell and wait() sleeps through it (to its timeout,
    or for ever) although it is the port's only reader. Over the socket alone, its bytes would
    have woken wait()."""
    regions: list[mmap.mmap] = []
    original = qlpc.offer

    def offer(*args: object) -> tuple[qlpc.QuickLink, int]:
        link, fd = original(*args)  # type: ignore[arg-type]
        regions.append(mmap.mmap(fd, 4096))
        return link, fd

    monkeypatch.setattr(qlpc, "offer", offer)
    try:
        with multiplexed(config, "rv.mixed") as (port, server, client):
            region = regions[-1]

            def state() -> int:
                return int(struct.unpack_from("<I", region, SERVER_STATE)[0])

            polling = threading.Event()
            real_poll = port._poll

            def poll(deadline: float | None) -> bool:
                polling.set()  # (after _quick_armed: the ring is armed by now)
                return real_poll(deadline)

            port._poll = poll  # type: ignore[method-assign]
            waiter = in_thread(port.wait, 5)
            assert polling.wait(10)
            assert state() == ST_POLL
            receiver = in_thread(server.receive, 10)
            until(lambda: state() != ST_POLL)  # receive() waits on the ring: no doorbell now
            caller = in_thread(client.call, b"one", 10)
            receiver.join(10)
            [first] = receiver.result  # type: ignore[attr-defined]
            assert isinstance(first, alpc.Message) and first.data == b"one"
            first.reply(b"ONE")
            caller.join(10)
            assert caller.result == [b"ONE"]  # type: ignore[attr-defined]
            # The receive() thread is done; wait() is the reader again.
            caller = in_thread(client.call, b"two", 8)
            waiter.join(10)
            [event] = waiter.result  # type: ignore[attr-defined]
            if isinstance(event, alpc.Message):
                event.reply(b"TWO")
            caller.join(10)
            assert isinstance(event, alpc.Message) and event.data == b"two", event
    finally:
        for region in regions:
            region.close()


# -- a signal as a ring reply's post returns refused ---------------------------------------------


@contextmanager
def process_client(spawn, runtime_dir: Path, name: str):  # type: ignore[no-untyped-def]
    """A quick_lpc=True port here, one client of it in its own process (tests/qlpc_peers.py)."""
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=True),
                          config=alpc.Config.from_env(runtime_dir)) as port:
        peer = spawn.argv([sys.executable, str(QLPC_PEERS), "client", name, "--runtime-dir", str(runtime_dir)])
        server = port.listen(timeout=10).accept()
        try:
            assert peer.expect("READY")[1] == "True"
            assert server.quick
            yield port, server, peer
        finally:
            try:
                os.kill(peer.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            server.close()


def test_an_interrupted_ring_reply_stays_owed(broker, runtime_dir, spawn) -> None:  # type: ignore[no-untyped-def]
    """port.reply() over the socket keeps a reply owed when a signal handler raises before any of
    it was written ("the application may answer it"). The ring path (QuickLink.reply) takes the
    owed record first (quick_replying) and gives it back only after a refused post returns
    normally: a signal as the refused post (Q_ORDER: the client has not read a datagram of
    ours yet) returns leaves the request owed to nobody. The application cannot answer it
    again (ValueError), a drop does not answer it, and the client waits out its timeout."""
    with process_client(spawn, runtime_dir, "rv.reply") as (_port, server, peer):
        peer.send("call hello")
        message = server.receive(timeout=10)
        assert message.id & alpc.protocol.QUICK_ID_BIT and message.data == b"hello"
        os.kill(peer.pid, signal.SIGSTOP)  # it reads nothing from now on: our datagram stays unread
        server.send(b"first", timeout=10)
        quick = server._quick
        assert quick is not None
        real = quick._post_reply
        statuses: list[int] = []

        def interrupted(*args: object) -> int:
            statuses.append(real(*args))  # type: ignore[arg-type]
            raise KeyboardInterrupt  # as a signal handler would, as the C call returns

        quick._post_reply = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            message.reply(b"HELLO")
        quick._post_reply = real  # type: ignore[method-assign]
        assert statuses == [Q_ORDER]  # the ring refused it: nothing of the reply went anywhere
        os.kill(peer.pid, signal.SIGCONT)
        assert message.id in server._channel._unreplied, "the reply is owed to nobody"
        message.reply(b"HELLO")
        assert peer.expect("REPLY", timeout=5) == ["HELLO"]


def test_an_interrupted_lean_reply_the_ring_refused_is_still_answered(broker, runtime_dir, spawn) -> None:  # type: ignore[no-untyped-def]
    """serve_requests()'s lean loop sends a reply the ring refused (Q_ORDER, Q_FULL, ...) over
    the socket only after reply_wait returned normally. A signal handler that raises as that C
    call returns (the reply not posted) loses the handler's answer: _rescue files nothing (no
    request was taken), the lean request was never owed in the channel, so neither the next
    serve_requests() nor a drop answers it, and the client waits out its timeout (for ever
    without one). A handler that raises is answered at once for this very reason."""
    with process_client(spawn, runtime_dir, "rv.lean") as (_port, server, peer):
        quick = server._quick
        assert quick is not None
        ring = quick.ring
        real = ring.reply_wait
        refused: list[int] = []

        def interrupted(callback_id: int, *args: object) -> int:
            status = real(callback_id, *args)  # type: ignore[call-arg]
            if callback_id and not ring.info.posted:
                refused.append(status)
                raise KeyboardInterrupt  # as a signal handler would, as the C call returns
            return status

        ring.reply_wait = interrupted

        def handler(data: bytes) -> bytes:
            os.kill(peer.pid, signal.SIGSTOP)  # our datagram stays unread: the ring refuses the reply
            server.send(b"news", timeout=10)
            return data.upper()

        peer.send("call hello")
        with pytest.raises(KeyboardInterrupt):
            server.serve_requests(handler, timeout=10)
        ring.reply_wait = real
        assert refused == [Q_ORDER]
        os.kill(peer.pid, signal.SIGCONT)
        # The server reads on; the client must hear about its request (the reply, or an answer
        # for it), not wait out its 30 s.
        reading = in_thread(server.receive, 6)
        try:
            heard = peer.expect("", timeout=5)
        finally:
            reading.join(10)
        assert heard and heard[0] in ("REPLY", "ERROR"), heard


# -- serve_requests()' timeout -----------------------------------------------------------------


def test_serve_requests_times_out_though_the_client_pings(broker, config) -> None:  # type: ignore[no-untyped-def]
    """serve_requests(timeout=T): "``timeout`` bounds each wait for the next message". Over the
    rings the lean loop starts a whole new T after every socket stir that brought no message
    (_serve: Q_CHECK, then ``wait_ns = timeout_ns``), so a client whose runtime keeps writing
    (pings answered by our runtime, releases, credits) keeps it from ever timing out, where the
    socket path's receive(T) keeps one deadline (and the loop itself keeps what is left of T
    after a signal, Q_INTR). Here a client pings for 3 s; serve_requests(0.3) must time out
    long before that."""
    from tests.test_qlpc_socket_interplay import ring_pair

    with ring_pair(config, "rv.pings") as (_port, server, client):
        assert server._quick is not None
        stop = threading.Event()

        def ping() -> int:
            count = 0
            end = time.monotonic() + 3.0
            while not stop.is_set() and time.monotonic() < end:
                client.ping(timeout=5)
                count += 1
            return count

        pinger = in_thread(ping)
        began = time.monotonic()
        try:
            with pytest.raises(alpc.Timeout):
                server.serve_requests(lambda data: data, timeout=0.3)
            took = time.monotonic() - began
        finally:
            stop.set()
            while pinger.is_alive():
                # A ping in flight as serve_requests() returned waits for its pong: the runtime
                # answers it as this side reads.
                with contextlib.suppress(alpc.Timeout):
                    server.receive(timeout=0.05)
            pinger.join(10)
        assert isinstance(pinger.result[0], int) and pinger.result[0] > 0  # type: ignore[attr-defined]
        assert took < 1.5, f"serve_requests(timeout=0.3) waited {took:.1f}s: every ping started its timeout again"


def test_a_wait_interrupted_as_it_polls_leaves_the_rings_it_found_busy_for_the_next(broker, config) -> None:  # type: ignore[no-untyped-def]
    """wait() arms the rings on its queue, and those that hold requests already (no doorbell
    will come for them) it pumps after its poll. A signal handler raising in that poll left
    them armed, off the queue and unpumped: the next wait() never looked at them, and the
    client, with its call in flight, never posted again."""
    with multiplexed(config, "rv.hot") as (port, server, client):
        quick = server._quick
        assert quick is not None
        first = in_thread(client.call, b"one", 10)
        message = port.wait(timeout=10)
        assert isinstance(message, alpc.Message) and message.data == b"one"
        message.reply(b"ONE")
        first.join(10)
        assert first.result == [b"ONE"]  # type: ignore[attr-defined]
        server.pump()  # (its doorbell, if it came by the socket after the ring was read)
        # Posted while nobody waits: the ring is not armed, no doorbell comes.
        caller = in_thread(client.call, b"two", 10)
        until(lambda: quick.ring.waiting() == 1)
        real_poll = port._poll
        raised: list[bool] = []

        def interrupted(deadline: float | None) -> bool:
            if not raised:
                raised.append(True)
                raise KeyboardInterrupt  # as a signal handler would, in the poll
            return real_poll(deadline)

        port._poll = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            port.wait(timeout=5)
        port._poll = real_poll  # type: ignore[method-assign]
        try:
            message = port.wait(timeout=3)
        except alpc.Timeout:
            pytest.fail("the ring holding a request was never looked at again")
        assert isinstance(message, alpc.Message) and message.data == b"two"
        message.reply(b"TWO")
        caller.join(10)
        assert caller.result == [b"TWO"]  # type: ignore[attr-defined]
