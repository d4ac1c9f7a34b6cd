"""Named ports, connect/accept/reject and messages, end to end with real processes."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import qlpc, transport
from alpc import server as server_module
from alpc.section import ConnectionSections
from alpc.wire import MessageType

NOTICE_DEADLINE = 0.1  # the bound for death and close notices


def serve_one(port: alpc.ConnectionPort, data: bytes = b"ok") -> alpc.CommunicationPort:
    return port.listen(timeout=10).accept(data=data)


# -- names -------------------------------------------------------------------------


def test_second_create_of_a_live_name_fails(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.taken")
    server.expect("READY")
    with pytest.raises(alpc.NameInUse, match=f"pid {server.pid}"):
        alpc.create_port("svc.taken", config=config)
    with alpc.create_port("svc.free", config=config), pytest.raises(alpc.NameInUse):
        alpc.create_port("svc.free", config=config)


def test_name_is_freed_on_close(broker: alpc.Broker, config: alpc.Config) -> None:
    alpc.create_port("svc.reuse", config=config).close()
    with alpc.create_port("svc.reuse", config=config) as port:
        assert port.name == "svc.reuse"


def test_name_is_freed_when_the_server_dies(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.dies")
    server.expect("READY")
    server.kill()
    deadline = time.monotonic() + 5
    while True:  # the broker sees the EOF asynchronously; poll the name, bounded
        try:
            port = alpc.create_port("svc.dies", config=config)
            break
        except alpc.NameInUse:
            assert time.monotonic() < deadline, "name not freed after the owner died"
            threading.Event().wait(0.01)
    port.close()


@pytest.mark.parametrize("name", ["", "bad name", "x" * 200, "a..b"])
def test_invalid_names_rejected_before_the_broker(config: alpc.Config, name: str) -> None:
    with pytest.raises(alpc.InvalidName):
        alpc.create_port(name, config=config)
    with pytest.raises(alpc.InvalidName):
        alpc.connect(name, config=config)


def test_missing_name_fails_fast(broker: alpc.Broker, config: alpc.Config) -> None:
    started = time.monotonic()
    with pytest.raises(alpc.PortNotFound, match=r"svc\.missing"):
        alpc.connect("svc.missing", config=config, timeout=10)
    assert time.monotonic() - started < 1.0


# -- connect / accept / reject ---------------------------------------------------------


def test_identity_is_kernel_verified_both_ways(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    with alpc.create_port("svc.who", config=config) as port:
        client = spawn("client", "svc.who", "--data", "hi")
        request = port.listen(timeout=10)
        assert request.client == alpc.PeerCred(client.pid, os.getuid(), os.getgid())
        assert request.data == b"hi"
        comm = request.accept(data=b"hello there")
        words = client.expect("READY")
        assert words == [str(client.pid), str(os.getpid()), "hello", "there"]
        assert comm.client.pid == client.pid
        comm.close()


def test_reject_reason_reaches_the_client(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.picky", "--reject", "not today")
    server.expect("READY")
    with pytest.raises(alpc.ConnectionRejected) as caught:
        alpc.connect("svc.picky", config=config, timeout=10)
    assert caught.value.reason == "not today"
    assert isinstance(caught.value, ConnectionRefusedError)
    server.expect("REJECTED")


def test_connect_timeout_and_the_abandoned_request_is_skipped(broker: alpc.Broker, config: alpc.Config) -> None:
    with alpc.create_port("svc.slow", config=config) as port:
        started = time.monotonic()
        with pytest.raises(alpc.Timeout):
            alpc.connect("svc.slow", config=config, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2.0
        with pytest.raises(alpc.Timeout):
            port.listen(timeout=0.3)


def test_connect_and_accept_data_are_bounded(broker: alpc.Broker, config: alpc.Config) -> None:
    small = alpc.PortAttributes(max_connect_data=16)
    with alpc.create_port("svc.bounded", small, config=config) as port:
        with pytest.raises(alpc.MessageTooLarge, match="max_connect_data"):
            alpc.connect("svc.bounded", data=b"x" * 17, config=config, timeout=5)
        with pytest.raises(alpc.MessageTooLarge):
            alpc.connect("svc.bounded", data=b"x" * (config.max_connect_data + 1), config=config)
        outcome: list[BaseException] = []

        def client() -> None:
            try:
                alpc.connect("svc.bounded", config=config, timeout=10)
            except alpc.AlpcError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=client)
        thread.start()
        request = port.listen(timeout=10)
        with pytest.raises(alpc.MessageTooLarge):
            request.accept(data=b"x" * (config.max_connect_data + 1))
        request.reject("too chatty")  # a refused accept leaves the request answerable
        with pytest.raises(ValueError, match="already answered"):
            request.reject()
        thread.join(10)
        assert [type(e) for e in outcome] == [alpc.ConnectionRejected]


def test_server_that_dies_before_answering(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.unanswered", "--hold")
    server.expect("READY")
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            alpc.connect("svc.unanswered", config=config, timeout=10)
        except alpc.AlpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    server.expect("HOLDING")
    server.kill()
    thread.join(10)
    assert [type(e) for e in outcome] == [alpc.PeerGone]


def test_unanswered_request_is_rejected_when_the_port_closes(broker: alpc.Broker, config: alpc.Config,
                                                              spawn) -> None:
    with alpc.create_port("svc.dropping", config=config) as port:
        client = spawn("client", "svc.dropping")
        # Held: a request dropped unanswered is rejected at once (test_zz_dropped_requests.py).
        request = port.listen(timeout=10)
    assert client.proc.wait(10) == 1
    assert request.client.pid == client.pid
    assert "closed the port" in client.expect_stderr("ConnectionRejected")


# -- messages -------------------------------------------------------------------------


def test_request_reply_datagram_both_ways(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.echo")
    server.expect("READY")
    with alpc.connect("svc.echo", config=config, timeout=5) as comm:
        reply = comm.request(b"abc", timeout=5)
        assert (reply.type, reply.data, reply.sender.pid) == (MessageType.REPLY, b"ABC", server.pid)
        assert reply.sender_pid == server.pid
        assert comm.request(b"push:from server", timeout=5).data == b"pushed"
        pushed = comm.receive(timeout=5)
        assert (pushed.type, pushed.data) == (MessageType.DATAGRAM, b"from server")
        comm.send(b"one way")
        assert server.expect("DATAGRAM") == ["one", "way"]
        comm.ping(timeout=5)
        assert comm.request(b"", timeout=5).data == b""


def test_large_inline_message(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.big")
    server.expect("READY")
    payload = os.urandom(4 * 1024 * 1024)
    with alpc.connect("svc.big", config=config, timeout=5) as comm:
        assert comm.request(payload, timeout=30).data == payload.upper()


def test_oversized_message_refused_on_the_sender(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.small", "--max-message-length", "1000")
    server.expect("READY")
    with alpc.connect("svc.small", config=config, timeout=5) as comm:
        with pytest.raises(alpc.MessageTooLarge, match="1000"):
            comm.request(b"x" * 1001, timeout=5)
        with pytest.raises(alpc.MessageTooLarge):
            comm.send(b"x" * 1001)
        assert comm.request(b"x" * 1000, timeout=5).data == b"X" * 1000


def test_concurrent_requests_from_many_threads(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.threads")
    server.expect("READY")
    errors: list[BaseException] = []
    with alpc.connect("svc.threads", config=config, timeout=5) as comm:
        def worker(index: int) -> None:
            try:
                for i in range(100):
                    text = f"t{index}-{i}".encode()
                    assert comm.request(text, timeout=10).data == text.upper()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []


def test_many_clients_served_by_one_wait_loop(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    count = 8
    with alpc.create_port("svc.many", config=config) as port:
        clients = [spawn("client", "svc.many") for _ in range(count)]
        served = closed = 0
        for client in clients:
            client.send("request hello")
            client.send("close")
        while closed < count:
            event = port.wait(timeout=20)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
            elif event.type is MessageType.REQUEST:
                event.reply(event.data.upper())
                served += 1
            elif event.type is MessageType.PORT_CLOSED:
                closed += 1
        for client in clients:
            assert client.expect("REPLY") == ["HELLO"]
        assert served == count
        assert port.connections == []


def _serve_until(port: alpc.ConnectionPort, kind: MessageType) -> alpc.Message:
    """Run the port's wait loop (accepting, answering requests) until a ``kind`` message."""
    while True:
        event = port.wait(timeout=10)
        if isinstance(event, alpc.ConnectionRequest):
            event.accept()
            continue
        if event.type is MessageType.REQUEST:
            event.reply(event.data.upper())
        if event.type is kind:
            return event


def test_a_wait_loop_betting_on_one_client_still_hears_every_other(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    # After two messages from one client, wait() reads that client's socket
    # directly (it leaves the epoll set meanwhile): the others, its death, a
    # new connection and a close by the server must all still get through.
    # (Socket clients: a Quick-LPC ring request never reaches this path.)
    with alpc.create_port("svc.hint", alpc.PortAttributes(quick_lpc=False), config=config) as port:
        chatty, quiet = spawn("client", "svc.hint"), spawn("client", "svc.hint")
        for _ in range(3):
            chatty.send("request a")
            _serve_until(port, MessageType.REQUEST)
            assert chatty.expect("REPLY") == ["A"]
        assert port._hint is not None and port._hint.peer.pid == chatty.pid  # the path under test
        quiet.send("request b")
        assert _serve_until(port, MessageType.REQUEST).sender.pid == quiet.pid
        assert quiet.expect("REPLY") == ["B"]
        for _ in range(2):
            chatty.send("request a")
            _serve_until(port, MessageType.REQUEST)
            assert chatty.expect("REPLY") == ["A"]
        chatty.kill()
        assert _serve_until(port, MessageType.CLIENT_DIED).sender.pid == chatty.pid
        for _ in range(2):
            quiet.send("request b")
            request = _serve_until(port, MessageType.REQUEST)
            assert quiet.expect("REPLY") == ["B"]
        request.port.close()
        late = spawn("client", "svc.hint")
        late.send("request c")
        assert _serve_until(port, MessageType.REQUEST).sender.pid == late.pid
        assert late.expect("REPLY") == ["C"]
        quiet.send("request b")
        assert quiet.expect("ERROR")[0] in ("PeerGone", "ConnectionClosed")
        assert [comm.peer.pid for comm in port.connections] == [late.pid]


def test_request_timeout_then_late_reply_is_dropped(broker: alpc.Broker, config: alpc.Config) -> None:
    with alpc.create_port("svc.late", config=config) as port:
        thread_result: list[alpc.CommunicationPort] = []
        connector = threading.Thread(target=lambda: thread_result.append(alpc.connect("svc.late", config=config)))
        connector.start()
        server_side = serve_one(port)
        connector.join(10)
        (client_side,) = thread_result
        with client_side:
            timed_out: list[BaseException] = []

            def slow_request() -> None:
                try:
                    client_side.request(b"slow", timeout=0.3)
                except alpc.Timeout as exc:
                    timed_out.append(exc)

            asker = threading.Thread(target=slow_request)
            asker.start()
            slow = server_side.receive(timeout=5)  # taken before the client gives up
            asker.join(10)
            assert timed_out
            slow.reply(b"too late")  # the client cancelled it: dropped on one side or the other
            ask = threading.Thread(target=lambda: thread_result.append(client_side.request(b"next", timeout=5)))
            ask.start()
            nxt = server_side.receive(timeout=5)
            nxt.reply(b"on time")
            ask.join(10)
            assert thread_result[-1].data == b"on time"
            with pytest.raises(alpc.Timeout):
                client_side.receive(timeout=0.05)


def test_closed_port_raises_connection_closed(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.closing")
    server.expect("READY")
    comm = alpc.connect("svc.closing", config=config, timeout=5)
    comm.close()
    comm.close()
    with pytest.raises(alpc.ConnectionClosed):
        comm.request(b"x", timeout=1)
    with pytest.raises(alpc.ConnectionClosed):
        comm.receive(timeout=1)


# -- death and close notices ----------------------------------------------------------


def _accept_client(port: alpc.ConnectionPort, spawn, *args: str):  # type: ignore[no-untyped-def]
    client = spawn("client", port.name, *args)
    comm = serve_one(port)
    client.expect("READY")
    return client, comm


def _notice_after(port: alpc.ConnectionPort, action) -> tuple[alpc.Message, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    action()
    event = port.wait(timeout=5)
    return event, time.monotonic() - started


def test_client_sigkill_gives_client_died(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    with alpc.create_port("svc.deaths", config=config) as port:
        client, comm = _accept_client(port, spawn)
        event, elapsed = _notice_after(port, client.kill)
        assert isinstance(event, alpc.Message) and event.type is MessageType.CLIENT_DIED
        assert event.port is comm and event.sender.pid == client.pid
        assert elapsed < NOTICE_DEADLINE
        assert port.connections == []
        with pytest.raises(alpc.PeerGone):
            comm.receive(timeout=1)


def test_client_close_gives_port_closed(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    with alpc.create_port("svc.closes", config=config) as port:
        client, _ = _accept_client(port, spawn)
        event, elapsed = _notice_after(port, lambda: client.send("close"))
        assert isinstance(event, alpc.Message) and event.type is MessageType.PORT_CLOSED
        assert elapsed < NOTICE_DEADLINE + 0.2  # includes the client reading its stdin
        assert port.connections == []


def _push_until_refused(driver: str, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                        hang_up: Callable[[Any], None]) -> tuple[bool, alpc.Message]:
    """Accept a client, let ``hang_up`` end it, then send it datagrams until a send raises
    PeerGone (the first may still be buffered). Whether the connection counted as closed right
    after that refusal, and the notice a receive() then gives."""
    if driver == "blocking":
        with alpc.create_port("svc.pushes", config=config) as port:
            client, comm = _accept_client(port, spawn)
            hang_up(client)
            with pytest.raises(alpc.PeerGone):
                for _ in range(100):
                    comm.send(b"news", timeout=5)
            return comm.closed, comm.receive(timeout=5)

    from alpc import aio

    async def run() -> tuple[bool, alpc.Message]:
        async with await aio.create_port("svc.pushes", config=config, timeout=10) as port:
            client = spawn("client", port.name)
            comm = await (await port.listen(timeout=10)).accept()
            client.expect("READY")
            hang_up(client)
            with pytest.raises(alpc.PeerGone):
                for _ in range(100):
                    await comm.send(b"news", timeout=5)
            return comm.closed, await comm.receive(timeout=5)

    return asyncio.run(run())


def _close_cleanly(client) -> None:  # type: ignore[no-untyped-def]
    client.send("close")
    client.expect("CLOSED")


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_send_to_a_client_that_closed_leaves_its_port_closed_to_be_read(
        broker: alpc.Broker, config: alpc.Config, spawn, driver: str) -> None:
    """The client closes cleanly (PORT_CLOSED, then its socket) while the server pushes
    datagrams at it: the refused send leaves the connection to the read that finds the
    PORT_CLOSED, so it ends as closed, not as CLIENT_DIED."""
    closed_at_refusal, ended = _push_until_refused(driver, config, spawn, _close_cleanly)
    assert not closed_at_refusal
    assert ended.type is MessageType.PORT_CLOSED, ended


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_send_to_a_client_that_died_ends_the_connection_at_once(
        broker: alpc.Broker, config: alpc.Config, spawn, driver: str) -> None:
    """With nothing of the peer's left to read, the refused send itself ends the connection."""
    closed_at_refusal, ended = _push_until_refused(driver, config, spawn, lambda client: client.kill())
    assert closed_at_refusal
    assert ended.type is MessageType.CLIENT_DIED, ended


def test_death_seen_through_pidfd_when_a_child_holds_the_socket(
    broker: alpc.Broker, config: alpc.Config, spawn
) -> None:
    with alpc.create_port("svc.forked", config=config) as port:
        client, comm = _accept_client(port, spawn, "--fork-child")
        child = int(client.expect("CHILD")[0])
        try:
            event, elapsed = _notice_after(port, client.kill)
            assert isinstance(event, alpc.Message) and event.type is MessageType.CLIENT_DIED
            assert "exited" in event.reason
            assert elapsed < NOTICE_DEADLINE
        finally:
            os.kill(child, 9)
            assert comm.closed


def test_server_sigkill_fails_pending_and_later_calls(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.crash")
    server.expect("READY")
    with alpc.connect("svc.crash", config=config, timeout=5) as comm:
        failures: list[tuple[type[BaseException], float]] = []

        def pending() -> None:
            try:
                comm.request(b"noreply", timeout=10)
            except alpc.AlpcError as exc:
                failures.append((type(exc), time.monotonic()))

        waiter = threading.Thread(target=pending)
        waiter.start()
        server.expect("NOREPLY")
        killed_at = time.monotonic()
        server.kill()
        waiter.join(5)
        assert failures and failures[0][0] is alpc.PeerGone
        assert failures[0][1] - killed_at < NOTICE_DEADLINE
        with pytest.raises(alpc.PeerGone):
            comm.request(b"again", timeout=1)
        with pytest.raises(alpc.PeerGone):
            comm.send(b"again")


def test_server_close_reaches_clients(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    port = alpc.create_port("svc.goodbye", config=config)
    client, comm = _accept_client(port, spawn)
    client.send("pending hello")
    client.expect("WAITING")
    # The request arrived; now close instead of replying. Held meanwhile: one dropped would be
    # answered as unanswered (Unanswered) before the close, which is what the client must hear.
    request = comm.receive(timeout=5)
    port.close()
    assert client.expect("ERROR") == ["PeerGone"]
    del request


# -- an accept that fails after taking the request leaks nothing --------------------------------


def _open_fds() -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            found[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
    return found


def _failed_accept(spawn, config: alpc.Config, name: str, monkeypatch, where: str) -> None:  # type: ignore[no-untyped-def]
    offered: list[object] = []
    closed: list[object] = []
    real_offer = qlpc.offer

    def offer(*args, **kwargs):  # type: ignore[no-untyped-def]
        quick, fd = real_offer(*args, **kwargs)
        real_close = quick.close

        def close() -> None:
            closed.append(quick)
            real_close()

        quick.close = close  # type: ignore[method-assign]
        offered.append(quick)
        return quick, fd

    monkeypatch.setattr(server_module.qlpc, "offer", offer)
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=True), config=config) as port:
        client = spawn("client", name)
        request = port.listen(timeout=10)
        before = _open_fds()
        # What the request holds (the in-process broker holds fds of its own on the same
        # client until the client goes, so the whole table is not compared).
        taken = {request._stream.fileno(): "stream", request._pidfd: "pidfd"}
        if where == "send":
            def send(self, buffers, fds=(), deadline=None):  # type: ignore[no-untyped-def]
                raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
            monkeypatch.setattr(transport.Stream, "send", send)
        else:
            def build(cls, **kwargs):  # type: ignore[no-untyped-def]
                raise MemoryError("no memory for the connection's sections")
            monkeypatch.setattr(ConnectionSections, "build", classmethod(build))
        with pytest.raises((OSError, MemoryError)):
            request.accept(timeout=10)
        monkeypatch.undo()
        now = _open_fds()
        left = {what: now[fd] for fd, what in taken.items() if fd is not None and now.get(fd) == before[fd]}
        assert not left, f"a failed accept left fds open: {left}"
        assert offered == closed, "a failed accept left its Quick-LPC rings mapped"
        client.kill()


@pytest.mark.timeout(60)
def test_an_accept_whose_reply_fails_to_send_closes_its_stream_pidfd_and_rings(  # type: ignore[no-untyped-def]
        broker, config, spawn, monkeypatch) -> None:
    _failed_accept(spawn, config, "svc.badaccept.s", monkeypatch, "send")


@pytest.mark.timeout(60)
def test_an_accept_whose_sections_fail_to_build_closes_its_stream_pidfd_and_rings(  # type: ignore[no-untyped-def]
        broker, config, spawn, monkeypatch) -> None:
    _failed_accept(spawn, config, "svc.badaccept.b", monkeypatch, "build")
