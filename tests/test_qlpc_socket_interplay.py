"""Quick-LPC second audit: how ring requests meet the socket path (replies that take the
socket, timeouts) and what a long-lived server connection accumulates. Each docstring says
what used to go wrong."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import alpc
from alpc import _native

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]


@contextmanager
def ring_pair(config: alpc.Config, name: str, attributes: alpc.PortAttributes | None = None,
              client_config: alpc.Config | None = None
              ) -> Iterator[tuple[alpc.ConnectionPort, alpc.CommunicationPort, alpc.CommunicationPort]]:
    """A Quick-LPC port in this process, one client of it, and the server's side of that client."""
    attributes = attributes or alpc.PortAttributes(quick_lpc=True)
    with alpc.create_port(name, attributes, config=config) as port:
        accepted: list[alpc.CommunicationPort] = []
        listener = threading.Thread(target=lambda: accepted.append(port.listen(timeout=10).accept()))
        listener.start()
        client = alpc.connect(name, config=client_config or config, timeout=10)
        listener.join(10)
        server = accepted[0]
        try:
            assert client.quick and server.quick
            yield port, server, client
        finally:
            client.close()
            server.close()


def owed_ring_ids(server: alpc.CommunicationPort) -> set[int]:
    """Ring request ids the server still thinks it owes an answer (the channel's view, and the
    set of them the rings kept beside it before)."""
    quick = server._quick
    assert quick is not None
    owed = {i for i in server._channel._unreplied if i & alpc.protocol.QUICK_ID_BIT}
    return owed | set(getattr(quick, "ring_requests", ()))


def call_in_thread(comm: alpc.CommunicationPort, data: bytes, timeout: float) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(comm.request(data, timeout=timeout))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_receive_without_port_wait_does_not_grow_the_ports_arm_queue(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A thread-per-client server (receive()/reply() on its connection, never the port's
    wait()) queued the connection in the port's "arm before poll()" queue on every take from
    the ring, and only wait() drains that queue: one entry per request, forever."""
    with ring_pair(config, "q4.armq") as (port, server, client):
        def serve(count: int) -> None:
            for _ in range(count):
                message = server.receive(timeout=10)
                message.reply(message.data.upper())

        serving = threading.Thread(target=serve, args=(300,))
        serving.start()
        for i in range(300):
            assert client.call(b"r%d" % i, timeout=10) == b"R%d" % i
        serving.join(10)
        assert server.stats.messages_in == 300
        # One entry per connection waiting to be armed is all wait() ever needs.
        assert len(port._quick_unarmed) <= 2


def test_a_large_reply_to_a_ring_request_is_forgotten_once_sent(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A reply too large for a slot goes over the socket; the server's set of ring requests
    owed a ring reply kept that request's id forever: one entry per such reply, for the life of
    the connection."""
    with ring_pair(config, "q4.big") as (_port, server, client):
        ring = 0
        for i in range(20):
            caller, result = call_in_thread(client, b"big%d" % i, 10)
            message = server.receive(timeout=10)
            # (A request right after a socket reply may take the socket: ordering.)
            ring += bool(message.id & alpc.protocol.QUICK_ID_BIT)
            message.reply(b"x" * 4000)
            caller.join(10)
            assert isinstance(result[0], alpc.Message) and result[0].data == b"x" * 4000
        assert ring >= 1
        assert not owed_ring_ids(server)


def test_a_timed_out_ring_request_is_cancelled_at_the_server(broker, config) -> None:  # type: ignore[no-untyped-def]
    """README: a request() timeout cancels the request at the server (CANCEL), so the server
    sees ``message.cancelled`` and its late reply goes nowhere. A request that took the ring
    was only abandoned on the client: the server never learned."""
    with ring_pair(config, "q4.cancel") as (_port, server, client):
        caller, result = call_in_thread(client, b"slow", 0.5)
        message = server.receive(timeout=10)
        assert message.id & alpc.protocol.QUICK_ID_BIT
        caller.join(10)
        assert isinstance(result[0], alpc.Timeout)
        client.send(b"after", timeout=10)  # anything the client sent after giving up
        assert server.receive(timeout=10).data == b"after"
        assert message.cancelled
        message.reply(b"late")  # goes nowhere, breaks nothing
        assert not owed_ring_ids(server)
        caller, result = call_in_thread(client, b"next", 10)
        nxt = server.receive(timeout=10)
        nxt.reply(b"NEXT")
        caller.join(10)
        assert isinstance(result[0], alpc.Message) and result[0].data == b"NEXT"


def test_fds_of_a_reply_to_a_ring_request_reach_the_caller(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A reply that carries fds takes the socket; request() over the rings rebuilt the reply
    as a new Message from its body alone, so the caller never got the fds (the socket path's
    request() returns them in ``reply.fds``)."""
    attributes = alpc.PortAttributes(quick_lpc=True, handle_kinds={"pipe"})
    client_config = dataclasses.replace(config, handle_kinds={"pipe"})
    with ring_pair(config, "q4.fds", attributes, client_config) as (_port, server, client):
        caller, result = call_in_thread(client, b"give", 10)
        message = server.receive(timeout=10)
        assert message.id & alpc.protocol.QUICK_ID_BIT
        read_end, write_end = os.pipe()
        try:
            message.reply(b"here", fds=[write_end])
        finally:
            os.close(write_end)
        caller.join(10)
        try:
            reply = result[0]
            assert isinstance(reply, alpc.Message), reply
            assert reply.data == b"here"
            assert len(reply.fds) == 1
            os.write(reply.fds[0], b"!")
            assert os.read(read_end, 1) == b"!"
        finally:
            if isinstance(result[0], alpc.Message):
                result[0].close_handles()
            os.close(read_end)



def test_a_ring_request_that_timed_out_before_it_was_taken_is_never_delivered(broker, config) -> None:  # type: ignore[no-untyped-def]
    """On the socket path a request cancelled while it still waits at the server is answered by
    the runtime and never handed to the application; a ring request whose caller gave up was
    handed out anyway, for a reply that goes nowhere."""
    with ring_pair(config, "q4.mxcancel") as (port, server, client):
        caller, result = call_in_thread(client, b"slow", 0.3)
        caller.join(10)  # nobody takes it: the caller times out
        assert isinstance(result[0], alpc.Timeout)
        client.send(b"after", timeout=10)
        first = port.wait(timeout=10)
        assert isinstance(first, alpc.Message) and first.data == b"after"
        assert not owed_ring_ids(server)


def test_an_interrupt_before_a_ring_wait_files_no_request_twice(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A signal handler that raises after receive() began and before its ring wait's C call
    (which clears what the last wait took) had _rescue file the request received before,
    already answered, into the inbox again: the application got it a second time."""
    with ring_pair(config, "ql.rescue") as (_, server, client):
        quick = server._quick
        assert quick is not None
        caller, first = call_in_thread(client, b"once", 10)
        message = server.receive(timeout=10)
        message.reply(b"ONCE")
        caller.join(10)
        assert [reply.data for reply in first] == [b"ONCE"]  # type: ignore[attr-defined]
        waited = quick._reply_wait_attested

        def interrupted(*args: object) -> int:
            raise KeyboardInterrupt  # as a signal handler would, before the C call

        quick._reply_wait_attested = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            server.receive(timeout=10)
        quick._reply_wait_attested = waited  # type: ignore[method-assign]
        assert server.queue_depth == 0 and server._core.failure is None
        with pytest.raises(alpc.Timeout):
            server.receive(timeout=0.05)
        caller, second = call_in_thread(client, b"twice", 10)
        message = server.receive(timeout=10)
        assert message.data == b"twice"
        message.reply(b"TWICE")
        caller.join(10)
        assert [reply.data for reply in second] == [b"TWICE"]  # type: ignore[attr-defined]


def test_an_unread_doorbell_does_not_send_the_next_ring_request_by_the_socket(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A ring post to a server waiting in poll() sends a doorbell frame by the socket. A server
    can take that request from the ring before it reads the frame (receive(), a wait() that
    finds the ring full): the frame carries no message, and the client's next ring post does
    not wait for it to be read. (It counted as a message's bytes: the next request took the
    socket, and a wait() server's requests went every other one by the socket.)"""
    with ring_pair(config, "bell.unread", alpc.PortAttributes(quick_lpc=True)) as (port, server, client):
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0.01)  # arms the ring: the client's next post rings the doorbell
        for body in (b"one", b"two", b"three"):
            caller, result = call_in_thread(client, body, 10)
            message = server.receive(timeout=10)  # from the ring, the doorbell left unread
            assert message.id & alpc.protocol.QUICK_ID_BIT, f"{body!r} took the socket"
            message.reply(body.upper())
            caller.join(10)
            assert isinstance(result[0], alpc.Message) and result[0].data == body.upper()
