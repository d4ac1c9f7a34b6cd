"""The channel core with sections and grants, driven by hand: frames and fds in, events out."""

from __future__ import annotations

import os

import pytest

from alpc.errors import ConnectionClosed, ProtocolError, SectionError
from alpc.grant import MemoryGrant
from alpc.protocol import EAGER_COPY_MAX, Channel, Message
from alpc.section import ConnectionSections, SectionView
from alpc.security import PeerCred
from alpc.wire import (
    LONE_REF_SIZE,
    Attributes,
    MessageType,
    Range,
    SectionRef,
    encode_attributes,
    encode_frame,
    encode_header,
    encode_lone_ref,
)

PEER = PeerCred(100, 1000, 1000)
MIB = 1 << 20


def sections(quota: int = 64 * MIB, secure: bool = False) -> ConnectionSections:
    return ConnectionSections.build(inline_threshold=256, send_quota=quota, recv_quota=quota, max_length=quota,
                                    section_size=MIB, backend="memfd", allow_unsealed=False, secure=secure)


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    client = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=1, sections=sections())
    server = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections())
    yield client, server
    client.release_resources()
    server.release_resources()


def deliver(frames: list[bytes], fds: list[int], to: Channel) -> list[Message]:
    """What the driver does: the kernel dups passed fds, so the receiver gets its own."""
    return to.receive(b"".join(frames), [os.dup(fd) for fd in fds])


def send_body(sender: Channel, kind: MessageType, body: bytes, *, as_view: bool = False,
              callback_id: int = 0) -> tuple[int, list[bytes], list[int], SectionView]:
    view = sender.reserve(len(body))
    assert view is not None
    view.memory[:] = body
    message_id, frames, fds = sender.section_message(kind, view, as_view=as_view, callback_id=callback_id)
    return message_id, frames, fds, view


def test_a_section_body_round_trip_and_its_release(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    body = os.urandom(300_000)
    request_id, frames, fds, view = send_body(client, MessageType.REQUEST, body)
    assert len(fds) == 1 and len(b"".join(frames)) < 200  # a small frame names the body
    (request,) = deliver(frames, fds, server)
    client.section_sent(view, True)
    assert request._copy is not None and not server.releases_urgent
    assert server.sections.peer.copies_held == 1 and not server.take_releases()  # held until read
    assert request.data == body and server.owes_replies and request._copy is None
    assert server.sections.peer.copies_held == 0
    entries = server.take_releases()
    assert len(entries) == 1
    assert client.sections.pool.ledger.lent_bytes() == len(body)
    deliver(server.release_frames(entries) + server.reply(request_id, b"ok"), [], client)
    assert client.sections.pool.ledger.lent_bytes() == 0 and not server.owes_replies


def test_a_view_arrives_as_a_view_and_a_second_message_reuses_the_section(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _, frames, fds, view = send_body(client, MessageType.DATAGRAM, b"v" * 1000, as_view=True)
    (message,) = deliver(frames, fds, server)
    client.section_sent(view, True)
    assert message.view is not None and message.view.readonly and server.releases_urgent
    assert message.data == b"v" * 1000  # a copy on request; the view stays
    message.view.release()
    deliver(server.release_frames(server.take_releases()), [], client)
    _, frames, fds, again = send_body(client, MessageType.DATAGRAM, b"w" * 1000)
    assert fds == [] and again.section_id == view.section_id  # announced once, reused since
    client.section_sent(again, True)
    (second,) = deliver(frames, fds, server)
    assert second.data == b"w" * 1000


def _announce(client: Channel, *servers: Channel) -> SectionView:
    """A first section message (the one that brings the section's fd) to every server."""
    _, frames, fds, view = send_body(client, MessageType.DATAGRAM, b"first" * 100)
    for server in servers:
        (first,) = deliver(frames, fds, server)
        assert first.data == b"first" * 100
    client.section_sent(view, True)
    return view


def _fields(messages: list[Message]) -> list[tuple[object, ...]]:
    return [(m.type, m.id, m.callback_id, m.data, m.view is not None) for m in messages]


def test_section_messages_decode_in_one_read_as_they_do_byte_by_byte() -> None:
    """Once a section is known, its messages are decoded on the short path; bytes fed one at
    a time take the general path. Both must give the same messages and the same ledger."""
    client = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=1, sections=sections())
    whole = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections())
    pieces = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections())
    try:
        _announce(client, whole, pieces)
        stream: list[bytes] = []
        for index in range(12):
            kind = (MessageType.REQUEST, MessageType.DATAGRAM)[index % 2]
            if index % 3 == 2:
                _, frames = client.request(b"inline %d" % index) if kind is MessageType.REQUEST else (
                    0, client.datagram(b"inline %d" % index))
            else:
                _, frames, fds, view = send_body(client, kind, bytes([index]) * (300 + 37 * index),
                                                 as_view=index % 4 == 0)
                assert fds == []
                client.section_sent(view, True)
            stream += frames
        data = b"".join(stream)
        at_once = whole.receive(data)
        one_by_one: list[Message] = []
        for index in range(len(data)):
            one_by_one += pieces.receive(data[index:index + 1])
        # Several bodies to a read wait in the section until read (only a lone one is copied at once).
        assert whole.sections.peer.copies_held == pieces.sections.peer.copies_held == 6
        assert [m.size for m in at_once] == [m.size for m in one_by_one]
        assert _fields(at_once) == _fields(one_by_one) and len(at_once) == 12
        assert whole.sections.peer.copies_held == pieces.sections.peer.copies_held == 0
        for message in at_once + one_by_one:
            if message.view is not None:
                message.view.release()
    finally:
        for channel in (client, whole, pieces):
            channel.release_resources()


def test_releases_riding_before_a_reply_free_the_senders_ranges(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    request_id, frames, fds, view = send_body(client, MessageType.REQUEST, b"r" * 5000)
    client.section_sent(view, True)
    (request,) = deliver(frames, fds, server)
    assert client.sections.pool.ledger.lent_bytes() == 5000
    assert request.data == b"r" * 5000
    (reply,) = deliver(server.release_frames(server.take_releases()) + server.reply(request_id, b"ok"), [], client)
    assert reply.data == b"ok" and client.sections.pool.ledger.lent_bytes() == 0


def _forged(section_id: int, flags: int, offset: int, length: int, message_id: int = 900) -> bytes:
    attrs = encode_lone_ref(section_id, flags, offset, length)
    assert len(attrs) == LONE_REF_SIZE
    return encode_header(MessageType.REQUEST, 0, message_id=message_id, attr_length=len(attrs)) + attrs


@pytest.mark.parametrize(("change", "error"), [
    ("overlap", "overlap"),
    ("past_the_end", "out of range|outside"),
    ("unknown_section", "unknown section|not mapped|no section"),
    ("unknown_flags", "unknown flags|reserved"),
    ("inline_data_too", "inline data"),
])
def test_a_forged_reference_into_a_known_section_breaks_the_protocol(pair, change: str,  # type: ignore[no-untyped-def]
                                                                    error: str) -> None:
    client, server = pair
    view = _announce(client, server)  # its copy is held: its range is still lent
    ref = SectionRef(view.section_id, 0, view.offset, view.length)
    frame = {
        "overlap": _forged(ref.section_id, 0, ref.offset, ref.length),
        "past_the_end": _forged(ref.section_id, 0, MIB - 100, 200),
        "unknown_section": _forged(ref.section_id + 7, 0, 0, 100),
        "unknown_flags": _forged(ref.section_id, 0x80, 4096, 100),
        "inline_data_too": encode_header(MessageType.REQUEST, 3, message_id=900, attr_length=LONE_REF_SIZE)
        + encode_lone_ref(ref.section_id, 0, 4096, 100) + b"abc",
    }[change]
    with pytest.raises(ProtocolError, match=error):
        server.receive(frame)


def test_release_wanted_makes_releases_urgent(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    assert server.receive(b"".join(client.release_wanted())) == []
    assert server.releases_urgent


def test_an_unsent_view_gives_its_space_back(pair) -> None:  # type: ignore[no-untyped-def]
    client, _ = pair
    view = client.reserve(1000)
    assert view is not None and client.sections.pool.ledger.lent_bytes() == 1000
    del view
    assert client.reserve(10) is not None  # draining the returned range first
    assert client.sections.pool.ledger.lent_bytes() == 10


def test_views_of_another_connection_and_sends_after_close_are_refused(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    foreign = server.reserve(100)
    assert foreign is not None
    with pytest.raises(SectionError, match="another connection"):
        client.section_message(MessageType.DATAGRAM, foreign, as_view=True)
    foreign.release()
    client.mark_closed("gone")
    with pytest.raises(ConnectionClosed):
        client.reserve(100)


def test_attributes_on_a_channel_without_sections_are_a_protocol_error() -> None:
    bare = Channel(PEER, send_limit=MIB, recv_limit=MIB, local_pid=1)
    attrs = encode_attributes(Attributes(range=Range(0, 1)))
    frame = encode_header(MessageType.REQUEST, 0, message_id=1, attr_length=len(attrs)) + attrs
    with pytest.raises(ProtocolError):
        bare.receive(frame)


# -- grants ----------------------------------------------------------------------------


def granted_request(client: Channel, server: Channel, buffer: bytearray, write: bool) -> tuple[int, Message]:
    grant = MemoryGrant(buffer, read=True, write=write).pin()
    request_id, frames = client.request(b"go", grant)
    (request,) = server.receive(b"".join(frames))
    assert request.grant is not None and request.grant.length == len(buffer)
    return request_id, request


def test_fallback_reads_and_writes_are_checked_on_both_sides(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    buffer = bytearray(b"0123456789")
    request_id, request = granted_request(client, server, buffer, write=True)
    (ask,) = client.receive(b"".join(server.grant_read(request.grant, 2, 4)))
    assert ask.type is MessageType.GRANT_READ and ask.grant == Range(2, 4)
    (answer,) = server.receive(b"".join(client.grant_payload(MessageType.GRANT_DATA, request_id, Range(2, 4),
                                                               bytes(buffer[2:6]))))
    assert answer.type is MessageType.GRANT_DATA and answer.data == b"2345"
    # A fallback write is applied on arrival (no message to queue).
    assert client.receive(b"".join(server.grant_payload(MessageType.GRANT_WRITE, request_id, Range(8, 2), b"ab"))) == []
    assert buffer == bytearray(b"01234567ab")
    with pytest.raises(ProtocolError, match="outside"):
        client.receive(b"".join(server.grant_payload(MessageType.GRANT_WRITE, request_id, Range(9, 2), b"ab")))


def test_grant_frames_nobody_asked_for_are_protocol_errors(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _, request = granted_request(client, server, bytearray(10), write=False)
    with pytest.raises(ProtocolError, match="asked for none"):
        server.receive(encode_frame(MessageType.GRANT_DATA, b"", callback_id=request.id))
    client2 = Channel(PEER, send_limit=MIB, recv_limit=MIB, local_pid=1, sections=sections())
    server2 = Channel(PEER, send_limit=MIB, recv_limit=MIB, local_pid=2, sections=sections())
    request_id, _ = granted_request(client2, server2, bytearray(10), write=False)
    with pytest.raises(ProtocolError, match="outside what the grant allows"):
        client2.receive(b"".join(server2.grant_payload(MessageType.GRANT_WRITE, request_id, Range(0, 1), b"x")))
    client2.release_resources()
    server2.release_resources()


def test_a_late_answer_to_an_abandoned_read_is_dropped(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, request = granted_request(client, server, bytearray(b"abcdef"), write=False)
    client.receive(b"".join(server.grant_read(request.grant, 0, 3)))
    server.grant_read_abandoned(request.grant)
    late = client.grant_payload(MessageType.GRANT_DATA, request_id, Range(0, 3), b"abc")
    assert server.receive(b"".join(late)) == []


def test_reading_a_grant_after_the_request_was_abandoned_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, request = granted_request(client, server, bytearray(10), write=False)
    client.abandon(request_id)
    assert client.receive(b"".join(server.grant_read(request.grant, 0, 1))) == []
    (refusal,) = server.receive(b"".join(client.take_automatic()))
    assert refusal.type is MessageType.GRANT_DATA and refusal.grant is None


def test_the_grant_ends_with_the_reply(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    request_id, request = granted_request(client, server, bytearray(10), write=True)
    client.receive(b"".join(server.reply(request.id, b"done")))
    assert not server.grant_active(request.grant)
    with pytest.raises(SectionError, match="ended"):
        server.grant_read(request.grant, 0, 1)
    assert request_id not in client._grants


def _section_request(client: Channel, server: Channel, body: bytes) -> tuple[int, Message]:
    """A request whose body came through a section, taken by the server in one step."""
    request_id, frames, fds, view = send_body(client, MessageType.REQUEST, body)
    assert fds == []  # the section is known already: one frame, taken by receive_one
    client.section_sent(view, True)
    request = server.receive_one(b"".join(frames))
    assert isinstance(request, Message) and request.id == request_id
    return request_id, request


def test_a_section_request_and_the_release_riding_with_its_reply_are_each_taken_in_one_step(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    request_id, request = _section_request(client, server, b"q" * 3000)
    assert request.data == b"q" * 3000 and request._copy is None  # copied on arrival
    assert client.sections.pool.ledger.lent_bytes() == 3000
    entries = server.take_releases()
    assert len(entries) == 1
    reply = client.receive_one(b"".join(server.release_frames(entries) + server.reply(request_id, b"ok")))
    assert isinstance(reply, Message) and reply.data == b"ok" and reply.callback_id == request_id
    assert client.sections.pool.ledger.lent_bytes() == 0


def test_a_release_before_a_frame_the_short_path_refuses_is_left_whole(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    request_id, request = _section_request(client, server, b"q" * 3000)
    assert request.data == b"q" * 3000
    release = b"".join(server.release_frames(server.take_releases()))
    stray = encode_frame(MessageType.REPLY, b"??", callback_id=request_id + 7)  # never sent
    assert client.receive_one(release + stray) is False  # nothing consumed: the release still holds
    assert client.sections.pool.ledger.lent_bytes() == 3000
    with pytest.raises(ProtocolError, match="never sent"):
        client.receive(release + stray)


def test_a_leading_release_with_flags_takes_the_general_path_which_names_it(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    request_id, request = _section_request(client, server, b"q" * 3000)
    assert request.data == b"q" * 3000
    (release,) = server.release_frames(server.take_releases())
    flagged = release[:4] + (1).to_bytes(4, "little") + release[8:]
    reply = b"".join(server.reply(request_id, b"ok"))
    assert client.receive_one(flagged + reply) is False
    assert client.sections.pool.ledger.lent_bytes() == 3000
    with pytest.raises(ProtocolError, match="flag"):
        client.receive(flagged + reply)


def _copy_request(client: Channel, body: bytes) -> tuple[int, list[bytes], object] | None:
    def fill(into: memoryview) -> None:
        into[:] = body

    return client.copy_message(MessageType.REQUEST, len(body), fill)


def test_a_small_body_goes_straight_into_a_known_section(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    assert _copy_request(client, b"c" * 3000) is None  # no section the peer maps yet: the general path
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    made = _copy_request(client, b"c" * 3000)
    assert made is not None
    request_id, frames, _ = made
    assert client.sections.pool.ledger.lent_bytes() == 3000
    request = server.receive_one(b"".join(frames))
    assert isinstance(request, Message) and request.id == request_id and request.data == b"c" * 3000
    reply = client.receive_one(b"".join(server.release_frames(server.take_releases())
                                        + server.reply(request_id, b"ok")))
    assert isinstance(reply, Message) and reply.data == b"ok"
    assert client.sections.pool.ledger.lent_bytes() == 0


def test_a_copied_body_whose_frame_never_left_gives_its_range_back(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    _announce(client, server)
    deliver(server.release_frames(server.take_releases()), [], client)
    made = _copy_request(client, b"c" * 3000)
    assert made is not None
    request_id, _, slot = made
    client.copy_sent(slot, False)
    client.unsent(request_id)
    assert client.sections.pool.ledger.lent_bytes() == 0
    again = _copy_request(client, b"d" * 3000)  # the same range, free again
    assert again is not None and again[2] == slot


def test_bodies_that_need_more_than_a_known_section_take_the_general_path() -> None:
    client = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=1, sections=sections(secure=True))
    server = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections(secure=True))
    try:
        assert _copy_request(client, b"s" * 3000) is None  # a secure port: each message its own section
    finally:
        client.release_resources()
        server.release_resources()
    client = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=1, sections=sections())
    server = Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections())
    try:
        _announce(client, server)
        assert _copy_request(client, b"b" * (EAGER_COPY_MAX + 1)) is None  # large: reserved, then filled
        filling = client.reserve(MIB - 4096)  # the known section nearly full: a growth would be needed
        assert filling is not None
        lent = client.sections.pool.ledger.lent_bytes()
        assert _copy_request(client, b"b" * 8192) is None
        assert client.sections.pool.ledger.lent_bytes() == lent  # nothing placed
        filling.release()
        assert client.reserve(8192) is not None
        held = client.reserve(1000)
        assert held is not None
        held.release()  # an unsent view given back: the pool settles that first, on the general path
        assert _copy_request(client, b"x" * 300) is None
        assert client.reserve(300) is not None
    finally:
        client.release_resources()
        server.release_resources()
