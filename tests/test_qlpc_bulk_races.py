"""The Quick-LPC bulk areas (bodies up to 1 MiB through the rings) against limits and signals:
the client's max_message_length on the lean serving loop, the server's on requests that fit a
slot, and a signal handler raising as a wait describes or takes a bulk entry, or before the
lean loop's next wait. Each docstring says what went wrong before (each test failed then)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import alpc
from alpc import _native
from alpc._native import Q_LARGE
from tests.test_qlpc_faults import in_thread, until
from tests.test_qlpc_socket_interplay import ring_pair

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]

BULK = _native.QUICK_DEFAULTS["bulk_size"]


def bulk_body_of(size: int) -> bytes:
    return bytes(range(97, 123)) * (size // 26) + b"q" * (size % 26)


def test_bulk_serve_requests_keeps_the_clients_max_message_length(broker, config) -> None:  # type: ignore[no-untyped-def]
    """QuickLink._serve (serve_requests' lean loop) hands the handler's answer to reply_wait,
    which posts anything up to 1 MiB into the server's bulk area: it never looks at carry_max,
    the client's max_message_length. The Message path (CommunicationPort.reply) refuses such a
    reply with MessageTooLarge; here the client's ring finds a bulk entry over its limit
    (Q_E_LENGTH), calls it a protocol error of the server, and drops the connection."""
    client_config = dataclasses.replace(config, max_message_length=4096)
    with ring_pair(config, "rvb.servelimit", client_config=client_config) as (_, server, client):
        quick = server._quick
        assert quick is not None and quick.carry_max == 4096
        served = in_thread(server.serve_requests, lambda body: b"r" * 8192, 4)
        try:
            reply: object = client.request(b"hi", timeout=2)
        except BaseException as exc:
            reply = exc
        served.join(10)
        assert not isinstance(reply, alpc.PeerGone), reply  # the client blamed the server
        assert isinstance(served.result[0], alpc.MessageTooLarge), served.result


def test_bulk_a_ring_request_over_the_servers_max_message_length_is_refused_in_a_slot_too(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The server's max_message_length reaches the C side only as bulk_in_max (qlpc_limit_bulk),
    which take() applies to bulk entries alone: a slot entry is checked against the slot's
    payload_max only. A client that ignores the limit (carry_max is its own word) gets a
    400-byte request delivered by a port whose max_message_length is 100 (over the socket the
    frame decoder refuses it; through the bulk area take() does)."""
    attributes = alpc.PortAttributes(max_message_length=100, quick_lpc=True)
    with ring_pair(config, "rvb.slotlimit", attributes) as (_, server, client):
        hostile = client._quick
        assert hostile is not None and hostile.carry_max == 100
        hostile.carry_max = BULK  # a client that does not keep the server's limit
        caller = in_thread(client.request, b"x" * 400, 3)
        got: object
        try:
            got = server.receive(timeout=5)
        except BaseException as exc:
            got = exc
        if isinstance(got, alpc.Message) and got.type is alpc.MessageType.REQUEST:
            got.reply(b"")
        caller.join(10)
        assert not (isinstance(got, alpc.Message) and len(got.data) > 100), \
            f"a {len(got.data)}-byte request delivered past max_message_length=100"  # type: ignore[union-attr]


def test_bulk_a_signal_as_port_wait_sees_a_bulk_entry_leaves_it_found(broker, config) -> None:  # type: ignore[no-untyped-def]
    """ConnectionPort.wait() arms the rings in ``_quick_unarmed`` and pumps those that hold
    requests already (no doorbell comes for them). A signal handler raising as drain()'s wait
    returns Q_LARGE leaves the bulk entry in the ring, untaken (as it should), but drain()'s
    except path neither calls _took() (which queues the ring to be armed again) nor files
    anything: the ring is off the arm queue, unarmed, and no socket byte is coming. No later
    wait() looks at that ring: the request sits in it and its client waits out its timeout."""
    with ring_pair(config, "rvb.portwait") as (port, server, client):
        quick = server._quick
        assert quick is not None
        # One request the usual way: the first post rings the doorbell (the ring starts armed),
        # wait() reads it; the ring is then unarmed and queued to be armed again.
        first = in_thread(client.request, b"first", 10)
        message = port.wait(timeout=10)
        assert isinstance(message, alpc.Message) and message.data == b"first"
        message.reply(b"FIRST")
        first.join(10)
        assert isinstance(first.result[0], alpc.Message) and first.result[0].data == b"FIRST"
        # The doorbell frame of the first may still be unread (wait() can find the request in
        # the ring before it comes): read, or the client's next post waits behind its bytes
        # (they count as socket bytes not read) and takes the socket.
        server.pump()
        # The next comes while the server is busy (not armed): no doorbell, the ring holds it.
        body = bulk_body_of(200_000)
        second = in_thread(client.request, body, 20)
        until(lambda: quick.ring.waiting() == 1)
        real = quick.ring.reply_wait_attested
        raised = [0]

        def interrupted(*args: Any) -> int:
            status = real(*args)
            if status == Q_LARGE and not raised[0]:
                raised[0] = 1
                raise KeyboardInterrupt  # as a signal handler would, as the C call returns
            return status

        quick.ring.reply_wait_attested = interrupted  # type: ignore[misc]
        try:
            with pytest.raises(KeyboardInterrupt):
                port.wait(timeout=10)
        finally:
            quick.ring.reply_wait_attested = real  # type: ignore[misc]
        assert raised[0] == 1 and quick.ring.waiting() == 1  # still in the ring: nothing lost yet
        try:
            got = port.wait(timeout=3)
        except alpc.Timeout:
            pytest.fail("wait() never looked at the ring again: the bulk request is stuck in it")
        assert isinstance(got, alpc.Message) and got.data == body
        got.reply(b"SECOND")
        second.join(10)
        assert isinstance(second.result[0], alpc.Message) and second.result[0].data == b"SECOND"


def test_bulk_a_signal_before_serve_requests_next_wait_raises_keyboardinterrupt(broker, config) -> None:  # type: ignore[no-untyped-def]
    """serve_requests' lean loop (QuickLink._serve) leaves ring.info.taken set after the handler
    took a request, and its ``try`` covers ``len(reply)`` and the call of reply_wait: a signal
    handler raising there (before the C call clears ``taken``) has _rescue file the request
    again. For a bulk request _body() then finds ring.bulk_body gone (the handler's call took
    it) and its assert fails: an AssertionError replaces the KeyboardInterrupt, and the
    request, neither answered nor filed, is lost (its client waits out its timeout)."""
    with ring_pair(config, "rvb.serveintr") as (_, server, client):
        quick = server._quick
        assert quick is not None
        body = bulk_body_of(100_000)
        caller = in_thread(client.request, body, 5)
        real = quick.ring.reply_wait
        calls = [0]

        def interrupted(*args: Any) -> int:
            calls[0] += 1
            if calls[0] > 1 and args[0] != 0:
                raise KeyboardInterrupt  # a signal as len(reply) returns, before the C call
            return real(*args)

        quick.ring.reply_wait = interrupted  # type: ignore[misc]
        handled: list[int] = []

        def handler(request: bytes) -> bytes:
            handled.append(len(request))
            return b"ok"

        try:
            with pytest.raises(KeyboardInterrupt):
                server.serve_requests(handler, timeout=10)
        finally:
            quick.ring.reply_wait = real  # type: ignore[misc]
            caller.join(10)
        assert handled == [len(body)]


def test_bulk_a_signal_after_receive_took_a_bulk_request_loses_nothing(broker, config) -> None:  # type: ignore[no-untyped-def]
    """QuickLink.receive() covers only its ring wait and take with _rescue: once take_bulk has
    taken the entry (info.taken), it tells on_take (the port's arm queue: a deque.append, a C
    call) and builds the Message outside that ``try``. A signal handler raising as such a call
    returns propagates with the request taken from the ring and filed nowhere: the next
    receive() never sees it and its client waits out its timeout."""
    with ring_pair(config, "rvb.aftertake") as (_, server, client):
        quick = server._quick
        assert quick is not None and quick.on_take is not None
        body = bulk_body_of(200_000)
        caller = in_thread(client.request, body, 6)
        real = quick.on_take
        raised = [0]

        def interrupted() -> None:
            real()
            if not raised[0]:
                raised[0] = 1
                raise KeyboardInterrupt  # as a signal handler would, as the C call returns

        quick.on_take = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                server.receive(timeout=10)
        finally:
            quick.on_take = real
        assert raised[0] == 1 and quick.ring.waiting() == 0  # taken from the ring
        try:
            message = server.receive(timeout=3)
        except alpc.Timeout:
            message = None
        if message is not None:
            message.reply(b"got it")
        caller.join(10)
        assert message is not None and message.data == body, "the request taken from the ring is lost"
        assert isinstance(caller.result[0], alpc.Message) and caller.result[0].data == b"got it"
