"""Sans-IO channel security: per-message identity, handles, flow-control windows and credits."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc.errors import HandleNotAllowed, ProtocolError
from alpc.protocol import Channel, ConnectionPolicy
from alpc.quotas import FlowLimits, Limit, WindowClosed, encode_credit
from alpc.security import HandleKind, PeerCred
from alpc.transport import Stream
from alpc.wire import MessageType, encode_frame

CLIENT = PeerCred(100, 1000, 1000)
SERVER = PeerCred(200, 1000, 1000)


def wire(frames: list[bytes]) -> bytes:
    return b"".join(frames)


def pipe_kind(fd: int) -> HandleKind:
    return HandleKind.PIPE if os.path.exists(f"/proc/self/fd/{fd}") and "pipe:" in os.readlink(
        f"/proc/self/fd/{fd}") else HandleKind.OTHER


def pair(client: FlowLimits | None = None, server: FlowLimits | None = None, *,
         kinds: frozenset[HandleKind] = frozenset(), refuse: bool = False) -> tuple[Channel, Channel]:
    """A client channel and a server channel, each told what the other announced."""
    client = client or FlowLimits()
    server = server or FlowLimits()
    client_side = Channel(SERVER, send_limit=4096, recv_limit=4096, local_pid=1,
                          policy=ConnectionPolicy(local=client, peer=server, accept_kinds=kinds, peer_kinds=kinds))
    server_side = Channel(CLIENT, send_limit=4096, recv_limit=4096, local_pid=2, classifier=pipe_kind,
                          policy=ConnectionPolicy(local=server, peer=client, accept_kinds=kinds, peer_kinds=kinds,
                                                  refuse_identity_change=refuse))
    return client_side, server_side


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    made: list[int] = []
    yield made
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- identity per message ------------------------------------------------------------------


def test_every_message_carries_the_credentials_of_its_read() -> None:
    client, server = pair()
    _, frames = client.request(b"a")
    (message,) = server.receive(wire(frames), (), CLIENT)
    assert message.sender == CLIENT and not message.identity_changed
    child = PeerCred(101, 1000, 1000)  # a forked child of the same user: a new pid, not a new identity
    (datagram,) = server.receive(wire(client.datagram(b"b")), (), child)
    assert datagram.sender == child and not datagram.identity_changed


def test_a_sender_whose_uid_changed_is_flagged() -> None:
    client, server = pair()
    dropped = PeerCred(100, 65534, 65534)
    (message,) = server.receive(wire(client.datagram(b"after setuid")), (), dropped)
    assert message.identity_changed and message.sender.uid == 65534


def test_a_port_can_refuse_a_changed_identity() -> None:
    client, server = pair(refuse=True)
    server.receive(wire(client.datagram(b"fine")), (), CLIENT)
    with pytest.raises(ProtocolError, match="identity changed"):
        server.receive(wire(client.datagram(b"after setuid")), (), PeerCred(100, 0, 0))


def test_a_frame_pieced_together_from_two_processes_is_refused() -> None:
    client, server = pair()
    raw = wire(client.datagram(b"x" * 100))
    assert server.receive(raw[:50], (), CLIENT) == []
    with pytest.raises(ProtocolError, match="two processes"):
        server.receive(raw[50:], (), PeerCred(999, 1000, 1000))


# -- handles -----------------------------------------------------------------------------


def test_handles_ride_with_their_message_and_are_owned_by_it(pipes: list[int]) -> None:
    limits = FlowLimits(max_handles_per_message=2, max_inflight_handles=4)
    client, server = pair(limits, limits, kinds=frozenset({HandleKind.PIPE}))
    read_end, write_end = os.pipe()
    pipes += [read_end, write_end]
    _, frames = client.request(b"take these", fds=[read_end, write_end])
    received = [os.dup(read_end), os.dup(write_end)]  # what the kernel installs for the receiver
    (message,) = server.receive(wire(frames), received, CLIENT)
    assert [h.kind for h in message.handles] == [HandleKind.PIPE, HandleKind.PIPE]
    assert message.fds == tuple(received)
    taken = message.take_handles()
    assert message.handles == () and all(is_open(h.fd) for h in taken)
    pipes.extend(h.fd for h in taken)


def test_refused_kinds_are_closed_and_listed(pipes: list[int]) -> None:
    limits = FlowLimits(max_handles_per_message=2, max_inflight_handles=4)
    client, server = pair(limits, limits, kinds=frozenset({HandleKind.PIPE}))
    read_end, write_end = os.pipe()
    pipes += [read_end, write_end]
    memfd = os.memfd_create("not-a-pipe")
    frames = client.datagram(b"x", fds=[read_end])  # the frame says one fd; the kernel delivers a memfd
    (message,) = server.receive(wire(frames), [memfd], CLIENT)
    assert message.handles == () and message.refused_handles == (HandleKind.OTHER,)
    assert not is_open(memfd)


def test_the_sender_refuses_fds_the_peer_would_not_take(pipes: list[int]) -> None:
    limits = FlowLimits(max_handles_per_message=1, max_inflight_handles=4)
    client, _ = pair(limits, limits, kinds=frozenset({HandleKind.FILE}))
    read_end, write_end = os.pipe()
    pipes += [read_end, write_end]
    with pytest.raises(HandleNotAllowed, match="is a pipe"):
        client.check_handles([read_end])
    with pytest.raises(HandleNotAllowed, match="at most 1"):
        client.check_handles([read_end, write_end])


def test_fds_past_the_per_message_limit_break_the_protocol_and_are_closed(pipes: list[int]) -> None:
    _client, server = pair(FlowLimits(max_handles_per_message=3), FlowLimits(max_handles_per_message=1),
                          kinds=frozenset({HandleKind.PIPE}))
    read_end, write_end = os.pipe()
    pipes += [read_end, write_end]
    raw = encode_frame(MessageType.DATAGRAM, b"x", message_id=1, n_fds=1)
    extra = [os.dup(read_end), os.dup(write_end)]
    with pytest.raises(ProtocolError, match="fds received that no frame announced"):
        server.receive(raw, extra, CLIENT)
    assert not any(is_open(fd) for fd in extra)
    truncated = [os.dup(read_end)]
    with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
        server.receive(raw, truncated, CLIENT, truncated=True)
    assert not is_open(truncated[0])


def test_a_late_reply_closes_the_fds_nobody_will_take(pipes: list[int]) -> None:
    limits = FlowLimits(max_handles_per_message=1, max_inflight_handles=4)
    client, server = pair(limits, limits, kinds=frozenset({HandleKind.PIPE}))
    read_end, write_end = os.pipe()
    pipes += [read_end, write_end]
    request_id, frames = client.request(b"slow")
    (request,) = server.receive(wire(frames), (), CLIENT)
    client.abandon(request_id)
    late = os.dup(read_end)
    assert client.receive(wire(server.reply(request.id, b"late", fds=[read_end])), [late], SERVER) == []
    assert not is_open(late)
    assert client.flow.requests_out == 0


# -- flow control ----------------------------------------------------------------------------


def test_requests_past_the_servers_window_wait_and_replies_reopen_it() -> None:
    client, server = pair(server=FlowLimits(max_pending_requests=2))
    requests = [server.receive(wire(client.request(b"r")[1]), (), CLIENT)[0] for _ in range(2)]
    with pytest.raises(WindowClosed) as closed:
        client.request(b"third")
    assert closed.value.limit is Limit.MAX_PENDING_REQUESTS
    client.receive(wire(server.reply(requests[0].id, b"ok")), (), SERVER)
    client.request(b"third")


def test_a_client_ignoring_the_window_breaks_the_protocol() -> None:
    _client, server = pair(server=FlowLimits(max_pending_requests=1))
    server.receive(encode_frame(MessageType.REQUEST, b"1", message_id=1), (), CLIENT)
    with pytest.raises(ProtocolError, match="max_pending_requests"):
        server.receive(encode_frame(MessageType.REQUEST, b"2", message_id=2), (), CLIENT)


def test_a_request_that_never_left_frees_its_slot() -> None:
    client, _ = pair(server=FlowLimits(max_pending_requests=1))
    request_id, _ = client.request(b"lost")
    client.unsent(request_id)
    assert client.pending_requests == frozenset() and client.flow.requests_out == 0
    client.request(b"next")


def test_datagram_credits_travel_in_credit_frames() -> None:
    client, server = pair(server=FlowLimits(max_queued_datagrams=4))
    delivered = []
    for _ in range(4):
        delivered += server.receive(wire(client.datagram(b"d")), (), CLIENT)
    with pytest.raises(WindowClosed):
        client.datagram(b"fifth")
    with pytest.raises(ProtocolError, match="max_queued_datagrams"):
        server.receive(encode_frame(MessageType.DATAGRAM, b"5", message_id=99), (), CLIENT)
    server.consumed(delivered[0])
    credit, frames = server.take_credit()
    assert credit == (1, 0)
    assert client.receive(wire(frames), (), SERVER) == []
    client.datagram(b"fifth")


def test_a_forged_credit_breaks_the_protocol() -> None:
    client, _ = pair()

    with pytest.raises(ProtocolError, match="more than were sent"):
        client.receive(encode_frame(MessageType.CREDIT, encode_credit(5, 0)), (), SERVER)


# -- property tests: the whole dispatcher, and fds through a real socket -------------------------


_FRAMES = st.lists(st.one_of(
    st.builds(lambda kind, data, mid, cid: encode_frame(kind, data, message_id=mid, callback_id=cid),
              st.sampled_from(list(MessageType)), st.binary(max_size=24), st.integers(0, 6), st.integers(0, 6)),
    st.binary(max_size=48),
), max_size=8)


@settings(max_examples=300, deadline=None)
@given(_FRAMES, st.integers(1, 64), st.lists(st.integers(0, 1), max_size=4))
def test_any_bytes_give_messages_or_a_protocol_error_and_never_leak(frames: list[bytes], cut: int,
                                                                    changes: list[int]) -> None:
    limits = FlowLimits(4, 4, 2, 4)
    _, server = pair(limits, limits, kinds=frozenset({HandleKind.PIPE}))
    raw = b"".join(frames)
    before = _pipes()
    opened: list[int] = []
    try:
        for number, start in enumerate(range(0, len(raw), cut)):
            read_end, write_end = os.pipe()
            opened.append(write_end)
            sender = PeerCred(100, 1000 + (changes[number % len(changes)] if changes else 0), 1000)
            for message in server.receive(raw[start:start + cut], [read_end], sender):
                message.close_handles()
    except ProtocolError:
        pass
    finally:
        server.release_resources()
        for fd in opened:
            os.close(fd)
    # Every read end handed in is closed: kept by a message (then closed), refused, or dropped.
    assert _pipes() == before


def _pipes() -> set[str]:
    return {fd for fd in os.listdir("/proc/self/fd") if "pipe:" in _link(fd)}


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.integers(0, 6))
def test_the_transport_keeps_at_most_max_fds_and_closes_the_rest(sent: int, max_fds: int) -> None:
    left, right = Stream.pair()
    read_end, write_end = os.pipe()
    try:
        right.set_passcred(True)
        left.send([b"x"], [read_end] * sent)
        got = None
        while got is None:
            got = right.recv_fds(max_fds)
        _, fds, cred, truncated = got
        if sent <= max_fds:
            assert len(fds) == sent and not truncated
        else:
            assert fds == [] and truncated  # none kept: the read broke the sender's limit
        assert cred == PeerCred(os.getpid(), os.getuid(), os.getgid())
        for fd in fds:
            os.close(fd)
    finally:
        left.close()
        right.close()
        os.close(read_end)
        os.close(write_end)


def _fields(messages: list) -> list[tuple]:  # type: ignore[type-arg]
    return [(m.type, m.id, m.callback_id, m.data, m.sender_pid, m.sender_tid) for m in messages]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.none()), min_size=1, max_size=30))
def test_a_run_of_datagrams_decodes_in_one_read_as_it_does_byte_by_byte(items: list[bytes | None]) -> None:
    # None stands for a request in the middle of the run (which ends the datagram fast path).
    client, whole = pair()
    _, pieces = pair()
    stream = b""
    for item in items:
        stream += wire(client.request(b"req")[1]) if item is None else wire(client.datagram(item))
    at_once = whole.receive(stream, (), CLIENT)
    one_by_one = []
    for index in range(len(stream)):
        one_by_one += pieces.receive(stream[index:index + 1], (), CLIENT)
    assert _fields(at_once) == _fields(one_by_one)
    assert [m.data for m in at_once] == [b"req" if item is None else item for item in items]


def test_a_run_of_datagrams_past_the_window_in_one_read_breaks_the_protocol() -> None:
    client, server = pair(server=FlowLimits(max_queued_datagrams=3))
    frames = [wire(client.datagram(b"d")) for _ in range(3)]
    frames.append(encode_frame(MessageType.DATAGRAM, b"4th", message_id=99))
    with pytest.raises(ProtocolError, match="max_queued_datagrams"):
        server.receive(b"".join(frames), (), CLIENT)


def test_the_window_counts_datagrams_of_a_run_and_single_ones_alike() -> None:
    client, server = pair(server=FlowLimits(max_queued_datagrams=4))
    delivered = server.receive(wire(client.datagram(b"a")) + wire(client.datagram(b"b")), (), CLIENT)
    delivered += server.receive(wire(client.datagram(b"c")), (), CLIENT)
    delivered += server.receive(wire(client.datagram(b"d")), (), CLIENT)
    assert [m.data for m in delivered] == [b"a", b"b", b"c", b"d"]
    with pytest.raises(ProtocolError, match="max_queued_datagrams"):
        server.receive(encode_frame(MessageType.DATAGRAM, b"e", message_id=99), (), CLIENT)


def test_a_batch_of_datagrams_stops_at_the_peers_window_while_this_side_receives_runs() -> None:
    client, server = pair(server=FlowLimits(max_queued_datagrams=4), client=FlowLimits(max_queued_datagrams=64))
    batch, count = client.datagrams([b"x"] * 10)
    assert count == 4
    assert len(server.receive(batch, (), CLIENT)) == 4
    with pytest.raises(WindowClosed):
        client.datagrams([b"x"])
