"""The sans-IO connection core, driven by hand: bytes and fds in, frames and wake-ups out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from alpc.connection import BACKLOG_LIMIT, FILED_INBOX, Connection
from alpc.errors import Cancelled, ConnectionClosed, DeadlineExceeded, PeerGone
from alpc.protocol import EAGER_COPY_MAX, Channel
from alpc.section import ConnectionSections
from alpc.security import PeerCred
from alpc.wire import MessageType, encode_header

PEER = PeerCred(100, 1000, 1000)
MIB = 1 << 20


def core(is_server: bool) -> Connection:
    sections = ConnectionSections.build(inline_threshold=256, send_quota=64 * MIB, recv_quota=64 * MIB,
                                        max_length=64 * MIB, section_size=MIB, backend="memfd",
                                        allow_unsealed=False, secure=False)
    channel = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=1, sections=sections)
    return Connection(channel, is_server=is_server)


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    client, server = core(False), core(True)
    yield client, server
    client.release_resources()
    server.release_resources()


def deliver(frames: list[bytes], to: Connection, fds: list[int] | None = None):  # type: ignore[no-untyped-def]
    batch = to.receive(b"".join(frames), [os.dup(fd) for fd in fds or []])
    out = to.outgoing(batch)
    return to.route(batch), out


def test_a_request_is_filed_in_the_inbox_and_its_reply_by_id(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    server.owner = "the server's port"
    request_id, frames = client.request(b"ping")
    wake, _ = deliver(frames, server)
    assert wake.inbox and not wake.ids
    message = server.take_message()
    assert message is not None and message.data == b"ping" and message.port == "the server's port"
    assert server.take_message() is None
    wake, _ = deliver(server.reply(message, b"pong"), client)
    assert wake.ids == [request_id] and not wake.inbox
    reply = client.take_reply(request_id)
    assert reply is not None and reply.data == b"pong"
    assert client.take_reply(request_id) is None


def test_routing_counts_the_traffic_of_requests_datagrams_and_replies_only(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, request = client.request(b"abc")
    deliver(request + client.datagram(b"de") + client.ping()[1], server)
    stats = server.stats
    assert (stats.messages_in, stats.bytes_in, list(stats.in_flight)) == (2, 5, [request_id])
    message = server.take_message()
    assert message is not None
    deliver(server.reply(message, b"four") + server.take_automatic(), client)
    assert (client.stats.messages_in, client.stats.bytes_in) == (1, 4)  # the PONG carries no traffic
    deliver(client.close(), server)
    assert (stats.messages_in, stats.bytes_in) == (2, 5)  # nor does a notice


def test_an_abandoned_request_never_gets_its_late_reply(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, frames = client.request(b"slow")
    deliver(frames, server)
    message = server.take_message()
    assert message is not None
    client.abandon(request_id)
    wake, _ = deliver(server.reply(message, b"late"), client)
    assert wake.ids == [] and client.take_reply(request_id) is None


def test_ping_is_answered_by_the_core(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, frames = client.ping()
    wake, (out, _) = deliver(frames, server)
    assert not wake.inbox and out
    deliver(out, client)
    pong = client.take_reply(request_id)
    assert pong is not None and pong.type is MessageType.PONG


def send_through_section(client: Connection, server: Connection, kind: MessageType, body: bytes):  # type: ignore[no-untyped-def]
    """Send ``body`` from client to server through a section; (message id, what the server owes now)."""
    view = client.reserve(len(body), False)
    assert view is not None
    view.memory[:] = body
    message_id, frames, fds = client.section_message(kind, view, as_view=False)
    _, (out, _) = deliver(frames, server, fds)
    client.section_sent(view, True)
    return message_id, out


def test_releases_ride_with_the_reply_while_one_is_owed(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    body = os.urandom(EAGER_COPY_MAX + 1)
    request_id, out = send_through_section(client, server, MessageType.REQUEST, body)
    assert out == [] and not server.owed  # a large body stays in the section until read
    message = server.take_message()
    assert message is not None and message.data == body
    assert server.owed  # released by the copy; the reply will carry the release
    owed, _ = server.take_owed()
    assert MessageType(owed[0][3]) is MessageType.RELEASE
    deliver(owed + server.reply(message, b"ok"), client)
    assert client.channel.sections is not None and client.channel.sections.pool.ledger.lent_bytes() == 0
    assert client.take_reply(request_id) is not None


def test_a_small_body_alone_in_a_read_is_copied_on_arrival_and_its_release_rides_with_the_reply(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    send_through_section(client, server, MessageType.DATAGRAM, b"announces the section")
    assert server.take_message().data == b"announces the section"  # type: ignore[union-attr]
    deliver(server.release_frames()[0], client)  # nothing left to tell: the next read is one step
    body = os.urandom(4096)
    view = client.reserve(len(body), False)
    assert view is not None
    view.memory[:] = body
    request_id, frames, fds = client.section_message(MessageType.REQUEST, view, as_view=False)
    client.section_sent(view, True)
    assert fds == []
    assert server.receive_one(b"".join(frames)) == FILED_INBOX  # the one-step path
    # Copied out already: the range is free to give back, and the reply will say so.
    assert server.owed
    message = server.take_message()
    assert message is not None and message._copy is None and message.data == body
    owed, _ = server.take_owed()
    assert [MessageType(frame[3]) for frame in owed] == [MessageType.RELEASE]
    deliver(owed + server.reply(message, b"ok"), client)
    assert client.channel.sections is not None and client.channel.sections.pool.ledger.lent_bytes() == 0
    assert client.take_reply(request_id) is not None


def test_small_bodies_several_to_a_read_wait_in_the_section_until_read(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    bodies = [os.urandom(EAGER_COPY_MAX), os.urandom(300)]
    frames: list[bytes] = []
    passed: list[int] = []
    for body in bodies:
        view = client.reserve(len(body), False)
        assert view is not None
        view.memory[:] = body
        _, more, fds = client.section_message(MessageType.DATAGRAM, view, as_view=False)
        client.section_sent(view, True)
        frames += more
        passed += fds
    deliver(frames, server, passed)
    # A stream's bodies are copied as the application reads them: all at once on arrival would
    # allocate a whole read's worth of fresh copies (heap growth and page faults each time).
    assert server.channel.sections is not None and server.channel.sections.peer.copies_held == 2
    first, second = server.take_message(), server.take_message()
    assert first is not None and second is not None and first._copy is not None
    assert (first.data, second.data) == tuple(bodies)
    assert server.channel.sections.peer.copies_held == 0


def test_bodies_not_yet_taken_are_copied_out_when_the_connection_ends(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    body = os.urandom(EAGER_COPY_MAX + 1)
    send_through_section(client, server, MessageType.DATAGRAM, body)
    waiting = server.inbox[0]
    assert waiting._copy is not None
    server.release_resources()  # the sections are gone; the message keeps its bytes
    assert waiting._copy is None and server.take_message() is waiting and waiting.data == body


def test_a_failed_write_keeps_what_was_owed(pair) -> None:  # type: ignore[no-untyped-def]
    client, _ = pair
    assert not client.queue(client.datagram(b"a")) and client.owed
    owed, token = client.take_owed()
    assert len(owed) == 1 and not client.owed
    client.restore_owed(token)
    again, _ = client.take_owed()
    assert again == owed
    client.queue(client.datagram(b"b"))
    client.queue(client.datagram(b"c"))
    (joined,), _ = client.take_owed()
    assert joined.endswith(b"c") and b"b" in joined


def test_the_backlog_asks_for_a_flush_when_full(pair) -> None:  # type: ignore[no-untyped-def]
    client, _ = pair
    flush = False
    for _ in range(BACKLOG_LIMIT // 200 + 1):
        flush = client.queue(client.datagram(b"x" * 200)) or flush
    assert flush


def test_a_lost_connection_is_a_notice_for_a_server_and_an_error_for_a_client(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    assert server.connection_lost("gone")
    notice = server.take_message()
    assert notice is not None and notice.type is MessageType.CLIENT_DIED and server.finalize_wanted
    assert client.connection_lost("gone") and client.finalize_wanted and client.take_message() is None
    with pytest.raises(PeerGone):
        client.check_open()
    assert not client.connection_lost("again")


def test_a_protocol_violation_ends_the_connection(pair) -> None:  # type: ignore[no-untyped-def]
    _, server = pair
    batch = server.receive(encode_header(99, 0))
    assert batch.error is not None and server.failure is not None
    wake = server.route(batch)
    assert wake.failed
    notice = server.take_message()
    assert notice is not None and notice.type is MessageType.CLIENT_DIED


def test_close_sends_port_closed_once(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    frames = client.close()
    assert frames and client.close() == []
    with pytest.raises(ConnectionClosed):
        client.request(b"x")
    wake, _ = deliver(frames, server)
    assert wake.failed and server.take_message() is not None


def test_cancel_reaches_the_peer_which_answers_for_its_application(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, frames = client.request(b"work")
    deliver(frames, server)
    cancel = client.cancel(request_id)
    wake, (out, _) = deliver(cancel, server)
    assert wake.cancelled and server.take_message() is None  # never dispatched
    assert server.take_cancelled()[0].cancelled
    with pytest.raises(Cancelled):
        client.take_reply(request_id)
    wake, _ = deliver(out, client)  # the runtime's CANCELLED reply is dropped: nobody waits
    assert client.take_reply(request_id) is None
    assert client.cancel(request_id) == []


def test_a_request_past_its_deadline_is_answered_as_cancelled(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, frames = client.request(b"late", None, time.monotonic() - 1)
    deliver(frames, server)
    assert server.take_message() is None
    (answer,) = server.take_automatic()
    deliver([answer], client)
    with pytest.raises(DeadlineExceeded):
        client.take_reply(request_id)
    _, frames = client.request(b"fresh", None, time.monotonic() + 60)
    deliver(frames, server)
    message = server.take_message()
    assert message is not None and message.deadline is not None and message.deadline > time.monotonic()


def test_taking_a_run_of_datagrams_frees_their_window_slots_for_the_credit(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    frames, count = client.datagrams([b"d%d" % index for index in range(300)])
    assert count == 300
    request_id, request = client.request(b"after")
    deliver(frames + request, server)
    taken: list = []  # type: ignore[type-arg]
    server.take_messages(taken, 1000)
    assert [m.data for m in taken] == [b"d%d" % index for index in range(300)] + [b"after"]
    assert server.channel.flow.credit_due
    credit, _ = server.channel.take_credit()
    assert credit == (300, 0)
    assert request_id
