"""A request the server's application drops unanswered (its last reference goes) is answered
by the server's runtime at once: an empty REPLY flagged UNANSWERED, and the client's wait
raises ``alpc.Unanswered`` instead of lasting its whole timeout.

Before, the channel held a handed-out request only weakly (so its fds closed and its body went
back as it was dropped) but the reply stayed owed: the client waited out its timeout, and its
CANCEL was then answered by the runtime. Every client here waits up to 30 s while each test
may take far less, so a request left unanswered fails the test by its own timeout.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from background import Background
from local_pairs import aio_connection, fill_socket, local_connection

import alpc
from alpc import _native, rpc
from alpc.connection import NOTICES, Connection
from alpc.errors import ProtocolError
from alpc.protocol import QUICK_ID_BIT, UNANSWERED_REASON, Channel
from alpc.rpc.hello import encode_hello
from alpc.security import PeerCred
from alpc.wire import Flag, MessageType, encode_frame

PEERS = str(Path(__file__).resolve().parent / "dropped_peers.py")
PEER = PeerCred(100, 1000, 1000)
# What a client waits for at most; a test fails long before (its own timeout).
CLIENT_WAIT = 30.0
# How long an answer may take to reach a client that waits: it is written as the request goes.
PROMPT = 5.0
quick_only = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))

pytestmark = pytest.mark.timeout(15)


# -- the protocol: bytes in, frames out ----------------------------------------------------------


def channels() -> tuple[Channel, Channel]:
    client = Channel(PEER, send_limit=1024, recv_limit=1024, local_pid=1)
    server = Channel(PEER, send_limit=1024, recv_limit=1024, local_pid=2)
    return client, server


def test_a_dropped_request_is_answered_once_with_an_empty_unanswered_reply() -> None:
    client, server = channels()
    request_id, frames = client.request(b"work")
    (request,) = server.receive(b"".join(frames))
    assert server.answer_dropped() == [] and server.take_automatic() == []
    del request
    assert server.answer_dropped() == [request_id]
    (answer,) = server.take_automatic()
    assert server.answer_dropped() == [] and not server.owes_replies
    (reply,) = client.receive(answer)
    assert (reply.type, reply.callback_id, reply.data) == (MessageType.REPLY, request_id, b"")
    assert reply.cancelled and reply.reason == UNANSWERED_REASON
    assert client.pending_requests == frozenset()


def test_the_requester_hears_unanswered_naming_the_request() -> None:
    client, server = Connection(channels()[0], is_server=False), Connection(channels()[1], is_server=True)
    request_id, frames = client.request(b"work")
    server.route(server.receive(b"".join(frames)))
    request = server.take_message()
    assert request is not None
    del request
    answer = server.answer_dropped()
    client.route(client.receive(b"".join(answer)))
    with pytest.raises(alpc.Unanswered, match=f"request {request_id} without replying") as raised:
        client.take_reply(request_id)
    assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, alpc.AlpcError)


def test_a_request_answered_then_dropped_is_not_answered_again_even_when_its_id_comes_back() -> None:
    """The peer may reuse an id once it was answered: only the very reference that died counts."""
    client, server = channels()
    request_id, frames = client.request(b"first")
    (first,) = server.receive(b"".join(frames))
    client.receive(b"".join(server.reply(first.id, b"done")))
    client._next_id = request_id  # the id comes round again
    again_id, frames = client.request(b"second")
    assert again_id == request_id
    (second,) = server.receive(b"".join(frames))
    del first
    assert server.answer_dropped() == [] and server.take_automatic() == []
    del second
    assert server.answer_dropped() == [request_id]


def test_a_reply_that_was_never_sent_leaves_the_request_owed_through_one_reference() -> None:
    client, server = channels()
    request_id, frames = client.request(b"work")
    (request,) = server.receive(b"".join(frames))
    server.reply(request.id, b"lost")  # framed, then its write sent nothing
    server.reply_unsent(request)
    del request
    assert server.answer_dropped() == [request_id]
    assert len(server.take_automatic()) == 1


def test_a_request_cancelled_then_dropped_is_answered_once_as_cancelled() -> None:
    client, server = channels()
    request_id, frames = client.request(b"work")
    (request,) = server.receive(b"".join(frames))
    server.receive(b"".join(client.cancel(request_id)))
    assert request.cancelled
    (cancelled,) = server.take_automatic()
    del request
    server.cancelled.clear()
    assert server.answer_dropped() == [] and server.take_automatic() == []
    assert client.receive(cancelled) == []  # the late answer to an abandoned request


def test_a_closed_or_closing_channel_answers_nothing() -> None:
    for close in ("closed", "peer_closed"):
        client, server = channels()
        _, frames = client.request(b"work")
        (request,) = server.receive(b"".join(frames))
        if close == "closed":
            server.close_notice()
        else:
            server.receive(b"".join(client.close_notice()))
        del request
        assert server.answer_dropped() == [], close
        assert server.take_automatic() == [], close


def test_ring_requests_never_handed_out_are_not_answered() -> None:
    _, server = channels()
    server.quick_request_received(QUICK_ID_BIT | 7)  # served in C, held as None
    gc.collect()
    assert server.answer_dropped() == [] and server.quick_replying(QUICK_ID_BIT | 7) == (True, None)


def test_a_forked_childs_copy_answers_nothing() -> None:
    client, server = Connection(channels()[0], is_server=False), Connection(channels()[1], is_server=True)
    _, frames = client.request(b"work")
    server.route(server.receive(b"".join(frames)))
    request = server.take_message()
    server.forked()
    del request
    assert server.answer_dropped() == []


@pytest.mark.parametrize(("kind", "flags", "body"), [
    (MessageType.REPLY, int(Flag.UNANSWERED), b"x"),  # an answer for nobody's application carries nothing
    (MessageType.REPLY, int(Flag.UNANSWERED | Flag.CANCELLED), b""),  # one reason, not both
    (MessageType.REQUEST, int(Flag.UNANSWERED), b""),
    (MessageType.DATAGRAM, int(Flag.UNANSWERED), b""),
    (MessageType.REPLY, 4, b""),  # an unknown bit
])
def test_the_unanswered_flag_only_on_an_empty_reply(kind: MessageType, flags: int, body: bytes) -> None:
    client, _ = channels()
    request_id, _ = client.request(b"work")
    with pytest.raises(ProtocolError, match="flag"):
        client.receive(encode_frame(kind, body, message_id=9, callback_id=request_id, flags=flags))


# -- the blocking driver ----------------------------------------------------------------------------


def test_a_request_dropped_after_receive_is_answered_at_once(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                             config: alpc.Config) -> None:
    """A client in another process: its request() raises Unanswered, and the connection serves on."""
    with alpc.create_port("svc.unanswered.receive", config=config) as port:
        client = spawn.argv([sys.executable, PEERS, "connect", "svc.unanswered.receive", "--runtime-dir",
                             str(runtime_dir), "--timeout", str(CLIENT_WAIT)])
        with port.listen(timeout=10).accept() as comm:
            client.expect("CONNECTED")
            client.send("dropped")
            message = comm.receive(timeout=10)
            assert message.data == b"dropped"
            del message
            error, took = client.expect("OUTCOME")
            assert error == "Unanswered" and float(took) < PROMPT
            client.send("again")
            comm.receive(timeout=10).reply(b"answered")
            assert client.expect("REPLY") == ["answered"]


@pytest.fixture
def pair(broker: alpc.Broker, config: alpc.Config) -> Iterator[tuple[alpc.ConnectionPort, alpc.CommunicationPort,
                                                                     alpc.CommunicationPort]]:
    with local_connection(config, "svc.unanswered.local") as ports:
        yield ports


def _serve_into(source: Any, handed: queue.Queue[alpc.Message]) -> threading.Thread:
    """A thread that waits on ``source`` (``receive`` or ``wait``) and hands every message to
    ``handed`` (holding none itself while it waits again), until a notice."""
    def run() -> None:
        while True:
            message = source(timeout=10)
            last = message.type in NOTICES
            handed.put(message)
            del message
            if last:
                return

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("driver", ["receive", "wait"])
def test_a_drop_on_another_thread_while_the_server_waits_is_answered(pair: Any, driver: str) -> None:
    """The server's thread waits in comm.receive() or ConnectionPort.wait() again while a
    handler thread drops the request it was handed: the answer goes out from the handler's drop."""
    port, server, client = pair
    handed: queue.Queue[alpc.Message] = queue.Queue()
    waiter = _serve_into(server.receive if driver == "receive" else port.wait, handed)
    try:
        pending = client.start_request(b"work", timeout=10)
        dropper = threading.Thread(target=lambda: handed.get(timeout=10))  # taken, and dropped with the thread
        dropper.start()
        dropper.join(10)
        with pytest.raises(alpc.Unanswered):
            pending.result(CLIENT_WAIT)
    finally:
        client.close()
        waiter.join(10)
    assert handed.get(timeout=1).type is MessageType.PORT_CLOSED


@pytest.mark.parametrize("lock", ["_send_lock", "_state"])
@pytest.mark.parametrize("then", ["read", "write"])
def test_a_drop_while_a_lock_is_held_is_answered_with_the_next_read_or_write(pair: Any, lock: str,
                                                                              then: str) -> None:
    """The callback never waits for the port's locks: with one held (by a write under way, say),
    the answer goes with the next read or write, and the client still gets it."""
    _, server, client = pair
    pending = client.start_request(b"work", timeout=10)
    request = server.receive(timeout=10)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with getattr(server, lock):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        del request  # the callback finds the lock taken: nothing is written yet
        assert server._answers_owed or server._channel.dropped_requests
    finally:
        release.set()
        holder.join(10)
    if then == "read":
        client.send(b"poke")
        assert server.receive(timeout=10).data == b"poke"
    else:
        server.send(b"news", timeout=10)
    with pytest.raises(alpc.Unanswered):
        pending.result(CLIENT_WAIT)
    if then == "write":
        assert client.receive(timeout=10).data == b"news"


@pytest.mark.parametrize("poll", ["receive", "pump"])
def test_a_poll_does_not_wait_for_room_to_answer_a_drop(broker: alpc.Broker, config: alpc.Config, poll: str) -> None:
    """A client behind on its reads (the socket to it full): a request dropped meanwhile is answered
    once there is room, and a read that must not block (receive(timeout=0), pump()) does not wait
    for that room. Each read tried the write first, for up to the runtime's own send timeout (1 s)."""
    attributes = alpc.PortAttributes(max_queued_datagrams=4096)
    with local_connection(config, f"svc.unanswered.poll.{poll}", attributes) as (_, server, client):
        pending = client.start_request(b"work", timeout=CLIENT_WAIT)
        request = server.receive(timeout=10)
        sent = fill_socket(server, 200, 0)
        del request  # no room for its answer: owed
        started = time.monotonic()
        if poll == "receive":
            with pytest.raises(alpc.Timeout):
                server.receive(timeout=0)
        else:
            server.pump()  # "without blocking"
        took = time.monotonic() - started
        assert took < 0.5, f"a poll took {took:.2f} s"
        assert not server.closed
        # The client catches up: the answer goes with the server's next write, before it.
        news = Background(lambda: server.send(b"news", timeout=10))
        for _ in range(sent):
            assert client.receive(timeout=10).data == b"d" * 200
        assert client.receive(timeout=10).data == b"news"
        news.join(10)
        assert news.outcomes == [None]
        with pytest.raises(alpc.Unanswered):
            pending.result(CLIENT_WAIT)


def test_a_request_replied_to_then_dropped_is_not_answered_again(pair: Any) -> None:
    """A second answer would be a reply to a request the client no longer has: a protocol error."""
    _, server, client = pair
    pending = client.start_request(b"work", timeout=10)
    request = server.receive(timeout=10)
    request.reply(b"done")
    del request
    assert pending.result(CLIENT_WAIT).data == b"done"
    _round_trip(server, client)


def _round_trip(server: alpc.CommunicationPort, client: alpc.CommunicationPort) -> None:
    """One more request and reply: a stray answer before it would have failed the client's read."""
    pending = client.start_request(b"again", timeout=10)
    server.receive(timeout=10).reply(b"answered")
    assert pending.result(CLIENT_WAIT).data == b"answered"
    assert not client.closed and not server.closed


def test_a_request_cancelled_then_dropped_is_not_answered_again(pair: Any) -> None:
    _, server, client = pair
    pending = client.start_request(b"work", timeout=10)
    request = server.receive(timeout=10)
    assert pending.cancel()
    client.send(b"after the cancel")
    assert server.receive(timeout=10).data == b"after the cancel"  # the CANCEL was read before it
    assert request.cancelled
    del request
    _round_trip(server, client)


def test_a_dropped_request_frees_its_slot_of_the_window(broker: alpc.Broker, config: alpc.Config) -> None:
    """A client at the server's max_pending_requests may send again once the request is answered."""
    with local_connection(config, "svc.unanswered.window",
                          alpc.PortAttributes(max_pending_requests=1)) as (_, server, client):
        first = client.start_request(b"first", timeout=10)
        request = server.receive(timeout=10)
        del request
        second = client.start_request(b"second", timeout=10)  # waits for the window: Throttled if never freed
        assert server.receive(timeout=10).data == b"second"  # and dropped too
        for pending in (first, second):
            with pytest.raises(alpc.Unanswered):
                pending.result(CLIENT_WAIT)


# -- Quick-LPC rings ---------------------------------------------------------------------------------


@contextmanager
def ring_pair(config: alpc.Config, name: str) -> Iterator[tuple[alpc.CommunicationPort, alpc.CommunicationPort]]:
    with local_connection(config, name, alpc.PortAttributes(quick_lpc=True)) as (_, server, client):
        assert client.quick and server.quick
        yield server, client


@quick_only
@pytest.mark.parametrize("how", ["request", "call"])
def test_a_ring_request_dropped_is_answered_through_the_socket(broker: alpc.Broker, config: alpc.Config,
                                                               how: str) -> None:
    with ring_pair(config, f"svc.unanswered.ring.{how}") as (server, client):
        outcome: list[object] = []

        def ask(data: bytes) -> None:
            try:
                reply = client.request(data, timeout=CLIENT_WAIT).data if how == "request" else client.call(data,
                                                                                                          CLIENT_WAIT)
                outcome.append(reply)
            except BaseException as exc:
                outcome.append(exc)

        asker = threading.Thread(target=ask, args=(b"work",))
        asker.start()
        request = server.receive(timeout=10)
        assert request.id & QUICK_ID_BIT
        del request
        asker.join(PROMPT)
        assert not asker.is_alive(), "the client still waits for its ring request"
        assert [type(got) for got in outcome] == [alpc.Unanswered]
        # The connection serves on (this request may take the ring or the socket).
        asker = threading.Thread(target=ask, args=(b"again",))
        asker.start()
        server.receive(timeout=10).reply(b"answered")
        asker.join(10)
        assert outcome[-1] == b"answered"


# -- the asyncio driver ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["loop", "thread"])
def test_an_asyncio_server_answers_a_request_it_drops(broker: alpc.Broker, config: alpc.Config, where: str) -> None:
    """Dropped on the loop's thread or on another: the answer is written on the loop."""

    async def main() -> None:
        port, server, client = await aio_connection(f"svc.unanswered.aio.{where}", config)
        try:
            asking = asyncio.create_task(client.request(b"work", timeout=CLIENT_WAIT))
            message = await server.receive(timeout=10)
            if where == "thread":
                handed = [message]
                del message
                dropper = threading.Thread(target=handed.clear)
                dropper.start()
                await asyncio.to_thread(dropper.join, 10)
            else:
                del message
            with pytest.raises(alpc.Unanswered):
                await asyncio.wait_for(asking, PROMPT)
            # The connection serves on.
            asking = asyncio.create_task(client.request(b"again", timeout=10))
            again = await server.receive(timeout=10)
            await again.reply(b"answered")
            assert (await asking).data == b"answered"
        finally:
            await client.close()
            await server.close()
            await port.close()

    asyncio.run(main())


# -- the RPC client ----------------------------------------------------------------------------------


class Echo(rpc.Interface, name="test.unanswered.echo", version=(1, 0)):
    @rpc.method
    def echo(self, text: str) -> Any: ...


def test_an_rpc_call_the_server_drops_raises_unanswered(broker: alpc.Broker, config: alpc.Config) -> None:
    """A server speaking the RPC hello that drops the call: the caller hears Unanswered, not a hang."""
    name = "svc.unanswered.rpc"
    with alpc.create_port(name, config=config) as port:
        accepted: list[alpc.CommunicationPort] = []

        def accept() -> None:
            accepted.append(port.listen(timeout=10).accept(encode_hello(Echo.__alpc_name__, (1, 0))))

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        with rpc.connect(Echo, name, config=config, timeout=10, call_timeout=CLIENT_WAIT) as client:
            acceptor.join(10)
            (comm,) = accepted
            with comm:
                outcome: list[object] = []

                def call() -> None:
                    try:
                        outcome.append(client.proxy.echo("hello"))
                    except BaseException as exc:
                        outcome.append(exc)

                caller = threading.Thread(target=call)
                caller.start()
                comm.receive(timeout=10)  # taken, and dropped at once
                caller.join(PROMPT)
                assert not caller.is_alive(), "the RPC caller still waits"
                assert [type(got) for got in outcome] == [alpc.Unanswered]
