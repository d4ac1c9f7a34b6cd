"""The successor's side of a handover refuses inconsistent state and never leaks an fd it received."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc
from alpc import control, handover
from alpc.exchange import control_frame
from alpc.transport import Stream


@pytest.fixture
def pair() -> Iterator[tuple[Stream, Stream]]:
    old, new = Stream.pair()
    yield old, new
    old.close()
    new.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "l.sock"))
    sock.listen(1)
    yield sock
    sock.close()


def _send(stream: Stream, body: control.HandoverState, fds: list[int]) -> None:
    stream.send(control_frame(body, n_fds=len(fds)), fds=fds)


def _peer(peer_id: int, role: str = "server") -> control.HandoverPeer:
    return control.HandoverPeer(id=peer_id, role=role, inbound=b"", close_when_flushed=False)


def _port(owner: int, name: str = "svc.a") -> control.HandoverPort:
    return control.HandoverPort(name=name, owner=owner, max_message_length=1, max_connect_data=1,
                                max_pending_connects=1, connects_forwarded=0, quota_refusals=0,
                                connects_refused=0, status=b"")


def test_a_consistent_state_is_rebuilt(pair: tuple[Stream, Stream], listener: socket.socket) -> None:
    old, new = pair
    server_a, server_b = socket.socketpair()
    client_a, client_b = socket.socketpair()
    try:
        _send(old, control.HandoverState(listener=True, owns_socket_file=True, last=False,
                                         peers=(_peer(7),)), [listener.fileno(), server_a.fileno()])
        _send(old, control.HandoverState(
            listener=False, owns_socket_file=True, last=True,
            items=(control.HandoverItem(peer=7, data=b"queued", with_fd=True),), ports=(_port(7),)),
            [client_a.fileno()])
        state = handover.receive_state(new, time.monotonic() + 5)
        assert state.listener.owns_file and state.listener.path == Path(listener.getsockname())
        assert [(p.role, len(p.outbox)) for p in state.peers] == [("server", 1)]
        assert state.peers[0].outbox[0].data == b"queued" and state.peers[0].outbox[0].handoff is not None
        assert [(p.name, p.owner) for p in state.ports] == [("svc.a", 0)]
        assert state.peers[0].stream.peer_cred().pid == os.getpid()  # read from the socket, not the state
        state.close()
    finally:
        for sock in (server_a, server_b, client_a, client_b):
            sock.close()


@pytest.mark.parametrize(("chunk", "extra_fds", "why"), [
    (control.HandoverState(listener=True, owns_socket_file=False, last=True, peers=(_peer(1),)), 0,
     "announced 2 fds but carried 1"),
    (control.HandoverState(listener=False, owns_socket_file=False, last=True), 0, "no listening socket"),
    (control.HandoverState(listener=True, owns_socket_file=False, last=True,
                           items=(control.HandoverItem(peer=5, data=b"", with_fd=False),)), 0, "unknown peer 5"),
    (control.HandoverState(listener=True, owns_socket_file=False, last=True, peers=(_peer(1, "query"),),
                           ports=(_port(1),)), 1, "names a bad owner"),
    (control.HandoverState(listener=True, owns_socket_file=False, last=True, peers=(_peer(1), _peer(2)),
                           ports=(_port(1), _port(2))), 2, "twice"),
    (control.HandoverState(listener=True, owns_socket_file=False, last=True, peers=(_peer(1, "boss"),)), 1,
     "bad handover peer"),
])
def test_inconsistent_state_is_refused_without_leaks(pair: tuple[Stream, Stream], listener: socket.socket,
                                                     chunk: control.HandoverState, extra_fds: int, why: str) -> None:
    old, new = pair
    spares = [socket.socketpair() for _ in range(extra_fds)]
    try:
        fds = ([listener.fileno()] if chunk.listener else []) + [a.fileno() for a, _ in spares]
        _send(old, chunk, fds)
        with pytest.raises(alpc.ProtocolError, match=why):
            handover.receive_state(new, time.monotonic() + 5)
    finally:
        for a, b in spares:
            a.close()
            b.close()


def test_a_listener_that_is_no_socket_is_refused(pair: tuple[Stream, Stream]) -> None:
    old, new = pair
    read_end, write_end = os.pipe()
    try:
        _send(old, control.HandoverState(listener=True, owns_socket_file=False, last=True), [read_end])
        with pytest.raises(alpc.ActivationError, match="not a socket"):
            handover.receive_state(new, time.monotonic() + 5)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_old_broker_that_dies_mid_handover(pair: tuple[Stream, Stream], listener: socket.socket) -> None:
    old, new = pair
    _send(old, control.HandoverState(listener=True, owns_socket_file=False, last=False), [listener.fileno()])
    old.close()
    with pytest.raises(alpc.BrokerUnavailable, match="went away during the handover"):
        handover.receive_state(new, time.monotonic() + 5)
