"""Hostile fds: kinds the port does not take, floods past the per-message limit (MSG_CTRUNC),
lying fd counts, and more fds in flight than the port allows. Refused and excess fds are
closed, the offender is dropped or throttled, and the server's fd count comes back."""

from __future__ import annotations

import os
import socket

import alpc
from alpc.protocol import Channel
from alpc.wire import MessageType, encode_frame, encode_header

KINDS = ("--kinds", "pipe,memfd", "--max-handles", "2", "--max-inflight", "4")


def server_fds(server) -> int:  # type: ignore[no-untyped-def]
    server.send("fds")
    return int(server.expect("FDS")[0])


def datagram_with(comm: alpc.CommunicationPort, fds: list[int], announced: int | None = None) -> None:
    """Send a datagram whose header announces ``announced`` fds and attach ``fds``, skipping the sender's checks."""
    channel: Channel = comm._channel
    message_id = channel._allocate_id()
    count = len(fds) if announced is None else announced
    channel.flow.sent_datagram(count)  # it keeps the window's books; it only skips the kind check
    comm._stream.send([encode_frame(MessageType.DATAGRAM, b"raw", message_id=message_id, n_fds=count)], fds)


def test_a_kind_the_port_does_not_take_is_closed_on_arrival(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.kinds", *KINDS)
    server.expect("READY")
    with alpc.connect("svc.kinds", config=config, timeout=5) as comm:
        server.expect("ACCEPTED")
        baseline = server_fds(server)
        left, right = socket.socketpair()
        with left, right:
            datagram_with(comm, [left.fileno()])  # the sender's own check would have refused it
        line = server.expect("DATAGRAM")
        assert "fds=-" in line and "refused=socket" in line, line
        assert server_fds(server) == baseline
        assert comm.request(b"echo:still", timeout=5).data == b"STILL"


def test_an_fd_flood_in_one_write_drops_the_offender(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.fdflood", *KINDS)
    server.expect("READY")
    with alpc.connect("svc.fdflood", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        baseline = server_fds(server)
        hostile = alpc.connect("svc.fdflood", config=config, timeout=5)
        server.expect("ACCEPTED")
        read_end, write_end = os.pipe()
        try:
            datagram_with(hostile, [read_end] * 200, announced=1)  # 200 fds where the port reads 1 + 2
        finally:
            os.close(read_end)
            os.close(write_end)
        died = server.expect("CLIENT_DIED")
        assert "MSG_CTRUNC" in died[1], died
        assert server_fds(server) == baseline
        assert honest.request(b"echo:served", timeout=5).data == b"SERVED"
        hostile.close()


def test_a_header_announcing_too_many_fds_is_refused_before_they_are_read(broker: alpc.Broker,  # type: ignore[no-untyped-def]
                                                                          config: alpc.Config, role) -> None:
    server = role("server", "svc.fdcount", *KINDS)
    server.expect("READY")
    with alpc.connect("svc.fdcount", config=config, timeout=5) as hostile:
        server.expect("ACCEPTED")
        baseline = server_fds(server)
        hostile._stream.send([encode_header(MessageType.DATAGRAM, 0, message_id=1, n_fds=200)])
        assert "fd_count_exceeds_the_limit" in server.expect("CLIENT_DIED")[1]
        assert server_fds(server) < baseline  # its connection is gone, and nothing else came


def test_fds_in_flight_past_the_limit_throttle_the_sender(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.inflight", *KINDS, "--pause-after", "1")
    server.expect("READY")
    client = role("client", "svc.inflight")
    client.expect("READY")
    server.expect("ACCEPTED")
    server.expect("PAUSED")
    baseline = server_fds(server)
    client.send("sendfds 10 pipe 0.5")
    assert client.expect("THROTTLED") == ["4", "max_inflight_handles"]
    # Four pipes wait for the paused server (in its socket); the fifth never left the client.
    assert server_fds(server) <= baseline + 4
    server.send("go")
    for _ in range(4):
        assert "fds=pipe" in server.expect("DATAGRAM")
    client.send("sendfds 10 pipe 10")
    assert client.expect("SENT") == ["10"]
    for _ in range(10):
        server.expect("DATAGRAM")
    assert server_fds(server) == baseline
