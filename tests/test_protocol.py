"""Sans-IO channel state: ids, matching, notices, limits — no sockets involved."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc.errors import ConnectionClosed, MessageTooLarge, ProtocolError
from alpc.protocol import Channel
from alpc.security import PeerCred
from alpc.wire import MessageType, encode_frame

PEER = PeerCred(100, 1000, 1000)


def pair(limit: int = 1024) -> tuple[Channel, Channel]:
    client = Channel(PEER, send_limit=limit, recv_limit=limit, local_pid=1)
    server = Channel(PEER, send_limit=limit, recv_limit=limit, local_pid=2)
    return client, server


def wire(frames: list[bytes]) -> bytes:
    return b"".join(frames)


def test_request_reply_matched_by_id() -> None:
    client, server = pair()
    first_id, first = client.request(b"one")
    second_id, second = client.request(b"two")
    assert first_id != second_id
    received = server.receive(wire(first) + wire(second))
    assert [m.data for m in received] == [b"one", b"two"]
    assert all(m.type is MessageType.REQUEST for m in received)
    # Replies may come back in any order.
    replies = client.receive(wire(server.reply(received[1].id, b"2")) + wire(server.reply(received[0].id, b"1")))
    assert [(r.callback_id, r.data) for r in replies] == [(second_id, b"2"), (first_id, b"1")]
    assert client.pending_requests == frozenset()


def test_reply_to_an_id_never_sent_is_a_protocol_error() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError, match="never sent"):
        client.receive(encode_frame(MessageType.REPLY, b"x", callback_id=99))


def test_late_reply_to_an_abandoned_request_is_dropped() -> None:
    client, server = pair()
    request_id, frames = client.request(b"slow")
    (request,) = server.receive(wire(frames))
    client.abandon(request_id)
    assert client.receive(wire(server.reply(request.id, b"late"))) == []
    # Only once: a second copy would be a reply to nothing.
    with pytest.raises(ProtocolError):
        client.receive(encode_frame(MessageType.REPLY, b"x", callback_id=request_id))


def test_cannot_reply_twice_or_to_a_datagram() -> None:
    client, server = pair()
    _, frames = client.request(b"q")
    (request,) = server.receive(wire(frames))
    server.reply(request.id, b"a")
    with pytest.raises(ValueError, match="not a request awaiting a reply"):
        server.reply(request.id, b"b")
    (datagram,) = server.receive(wire(client.datagram(b"d")))
    with pytest.raises(ValueError):
        server.reply(datagram.id, b"x")


def test_reused_request_id_while_pending_is_refused() -> None:
    _, server = pair()
    frame = encode_frame(MessageType.REQUEST, b"x", message_id=5)
    server.receive(frame)
    with pytest.raises(ProtocolError, match="reused"):
        server.receive(frame)


def test_ping_is_answered_by_the_protocol_itself() -> None:
    client, server = pair()
    ping_id, frames = client.ping()
    assert server.receive(wire(frames)) == []
    (pong,) = client.receive(wire(server.take_automatic()))
    assert pong.type is MessageType.PONG and pong.callback_id == ping_id
    assert server.take_automatic() == []


def test_send_limit_is_enforced_on_the_sender() -> None:
    client, _ = pair(limit=10)
    with pytest.raises(MessageTooLarge, match="max_message_length"):
        client.request(b"x" * 11)
    with pytest.raises(MessageTooLarge):
        client.datagram(b"x" * 11)
    client.datagram(b"x" * 10)


def test_receiver_refuses_a_frame_over_its_limit() -> None:
    _, server = pair(limit=10)
    with pytest.raises(ProtocolError, match="data length"):
        server.receive(encode_frame(MessageType.DATAGRAM, b"x" * 11))


def test_port_closed_notice_then_nothing_more() -> None:
    client, server = pair()
    (notice,) = server.receive(wire(client.close_notice()))
    assert notice.type is MessageType.PORT_CLOSED
    assert server.connection_lost("eof") is None
    with pytest.raises(ConnectionClosed):
        client.datagram(b"after close")
    with pytest.raises(ProtocolError, match="after the peer closed"):
        server.receive(encode_frame(MessageType.DATAGRAM, b"x"))


def test_connection_lost_without_notice_is_client_died() -> None:
    client, server = pair()
    _, frames = client.request(b"abc")
    server.receive(wire(frames)[:-1])
    notice = server.connection_lost("eof")
    assert notice is not None and notice.type is MessageType.CLIENT_DIED
    assert "mid-frame" in notice.reason
    assert server.connection_lost("again") is None


def test_ids_skip_zero_and_pending_ids_on_wrap() -> None:
    client, _ = pair()
    client._next_id = 0xFFFFFFFF
    wrap_id, _ = client.request(b"")
    assert wrap_id == 0xFFFFFFFF
    next_id, _ = client.request(b"")
    assert next_id == 1
    client._next_id = 0xFFFFFFFF
    third, _ = client.request(b"")
    assert third not in (0, 0xFFFFFFFF, 1)


def test_messages_carry_the_kernel_identity_not_the_header() -> None:
    _, server = pair()
    (message,) = server.receive(encode_frame(MessageType.DATAGRAM, b"x", sender_pid=666))
    assert message.sender == PEER
    assert message.sender_pid == 666


# -- the plain-frame fast path agrees with the general decoder ------------------------


@settings(max_examples=60, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=40),
       kinds=st.lists(st.sampled_from(["request", "datagram", "ping"]), min_size=40, max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=6))
def test_plain_frames_decode_the_same_however_the_reads_fall(bodies: list[bytes], kinds: list[str],
                                                              cuts: list[int]) -> None:
    client, _ = pair(limit=1 << 20)
    stream = b""
    expected: list[tuple[MessageType, bytes]] = []
    for body, kind in zip(bodies, kinds, strict=False):
        if kind == "request":
            stream += wire(client.request(body)[1])
            expected.append((MessageType.REQUEST, body))
        elif kind == "datagram":
            stream += wire(client.datagram(body))
            expected.append((MessageType.DATAGRAM, body))
        else:
            stream += wire(client.ping()[1])  # a runtime frame in the middle of plain ones
    _, whole = pair(limit=1 << 20)
    _, pieces = pair(limit=1 << 20)
    at_once = [(m.type, m.data) for m in whole.receive(stream)]
    piecewise: list[tuple[MessageType, bytes]] = []
    start = 0
    for cut in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        piecewise += [(m.type, m.data) for m in pieces.receive(stream[start:cut])]
        start = cut
    assert at_once == piecewise == expected
    assert len(whole.take_automatic()) == len(pieces.take_automatic()) == kinds[:len(bodies)].count("ping")
