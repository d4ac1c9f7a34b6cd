"""The sans-IO side of Quick-LPC in protocol.Channel: ring request ids, socket
replies to them, replies owed to ring requests, the doorbell frame. Bytes in,
events out; runs with and without the C extension."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alpc.errors import ProtocolError
from alpc.protocol import QUICK_ID_BIT, Channel
from alpc.security import PeerCred
from alpc.wire import MessageType, encode_frame

PEER = PeerCred(100, 1000, 1000)
RING_ID = QUICK_ID_BIT | 5


def channel() -> Channel:
    return Channel(PEER, send_limit=1024, recv_limit=1024, local_pid=1)


def test_a_doorbell_is_taken_silently() -> None:
    assert channel().receive(encode_frame(MessageType.QUICK_DOORBELL)) == []


def test_a_doorbell_with_a_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="QUICK_DOORBELL"):
        channel().receive(encode_frame(MessageType.QUICK_DOORBELL, b"x"))


def test_the_doorbell_frame_round_trips() -> None:
    sender, receiver = channel(), channel()
    assert receiver.receive(b"".join(sender.doorbell())) == []


@given(start=st.integers(min_value=QUICK_ID_BIT - 50, max_value=QUICK_ID_BIT - 1))
def test_socket_request_ids_never_carry_the_ring_bit(start: int) -> None:
    sender = channel()
    sender._next_id = start
    for _ in range(100):
        message_id, _ = sender.request(b"q")
        assert 0 < message_id < QUICK_ID_BIT


def test_a_socket_reply_to_a_ring_request_is_claimed() -> None:
    client = channel()
    claimed: list[int] = []

    def claims(request_id: int) -> bool:
        claimed.append(request_id)
        return True

    client.quick_claims = claims
    (reply,) = client.receive(encode_frame(MessageType.REPLY, b"big reply", callback_id=RING_ID))
    assert (reply.type, reply.callback_id, reply.data, claimed) == (MessageType.REPLY, RING_ID, b"big reply", [RING_ID])


def test_a_late_socket_reply_to_a_ring_request_is_dropped() -> None:
    client = channel()
    client.quick_claims = lambda request_id: False
    assert client.receive(encode_frame(MessageType.REPLY, b"late", callback_id=RING_ID)) == []


def test_a_reply_to_a_ring_request_never_sent_is_a_protocol_error() -> None:
    client = channel()

    def claims(request_id: int) -> bool:
        raise ProtocolError(f"reply to ring request {request_id}, which was never sent")

    client.quick_claims = claims
    with pytest.raises(ProtocolError, match="never sent"):
        client.receive(encode_frame(MessageType.REPLY, b"x", callback_id=RING_ID))


def test_without_rings_a_ring_id_is_a_reply_to_nothing() -> None:
    with pytest.raises(ProtocolError, match="never sent"):
        channel().receive(encode_frame(MessageType.REPLY, b"x", callback_id=RING_ID))


def test_a_pong_never_claims_a_ring_id() -> None:
    client = channel()
    client.quick_claims = lambda request_id: True
    with pytest.raises(ProtocolError):
        client.receive(encode_frame(MessageType.PONG, callback_id=RING_ID))


def test_replies_owed_to_ring_requests() -> None:
    server = channel()
    server.quick_request_received(RING_ID)
    assert server.owes_replies
    with pytest.raises(ProtocolError, match="reused"):
        server.quick_request_received(RING_ID)
    # The same id over the socket: refused too (a socket request never carries a ring id).
    with pytest.raises(ProtocolError, match="ring id"):
        server.receive(encode_frame(MessageType.REQUEST, b"q", message_id=RING_ID))
    assert server.quick_replying(RING_ID) == (True, None)  # owed, and not handed out as a Message
    assert not server.owes_replies
    assert server.quick_replying(RING_ID) == (False, None)  # answered: the socket path says why
    assert server.quick_replying(1) == (False, None)  # not a ring id
    # The ring refused the reply after all: owed again, and the socket may carry it.
    server.quick_reply_failed(RING_ID)
    frames = server.reply(RING_ID, b"over the socket")
    client = channel()
    client.quick_claims = lambda request_id: request_id == RING_ID
    (reply,) = client.receive(b"".join(frames))
    assert (reply.callback_id, reply.data) == (RING_ID, b"over the socket")
