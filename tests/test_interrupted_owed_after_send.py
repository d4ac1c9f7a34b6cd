"""A section body whose frame went out, then a signal handler raised (Ctrl-C) while the write
that follows it waited for room to send what another thread left owed meanwhile.

The frame is the peer's: its range, window slot or request must stay counted as sent. The
sender took them back as unsent (it asked only whether the stream was cut mid-frame), so its
next body went into the range the peer still held (the peer read the wrong bytes), and the
peer's release of it later was "a range never lent": the connection was dropped.
"""

from __future__ import annotations

import os

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)


def _interrupt_after_the_frame(port: alpc.CommunicationPort, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next write goes out whole; meanwhile a reader (another thread) leaves what the
    runtime owes for after it (_leave_owed), and the wait for room to send that is interrupted
    before a byte of it left, as a signal handler raising in the poll does."""
    stream = port._stream
    send = stream.send
    calls: list[int] = []

    def interrupted(*args: object, **kwargs: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            written = send(*args, **kwargs)  # type: ignore[arg-type]
            port._leave_owed()
            return written
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "send", interrupted)


def _releases_reach(server: alpc.CommunicationPort, client: alpc.CommunicationPort) -> None:
    """The server's releases ride with its next write: the client takes them back (a release
    of a range the client took back already was a protocol error, and the connection dropped)."""
    server.send(b"ack", timeout=5)
    assert client.receive(timeout=5).data == b"ack"
    client.send(b"y" * 4096, timeout=5)
    assert server.receive(timeout=5).data == b"y" * 4096
    assert not client.closed and not server.closed


def test_a_datagram_whose_frame_left_keeps_its_range_after_ctrl_c(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = local_pair
    first, second = os.urandom(4096), os.urandom(4096)
    client.send(b"w" * 4096, timeout=5)  # the section is announced: small bodies go straight in
    assert server.receive(timeout=5).data == b"w" * 4096
    server.pump()
    _interrupt_after_the_frame(client, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        client.send(first, timeout=5)
    monkeypatch.undo()
    message = server.receive(timeout=5)  # it went out: the peer holds its range until read
    client.send(second, timeout=5)
    assert message.data == first
    assert server.receive(timeout=5).data == second
    _releases_reach(server, client)


def test_a_request_whose_frame_left_is_still_pending_after_ctrl_c(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = local_pair
    body = os.urandom(4096)
    client.send(b"w" * 4096, timeout=5)
    assert server.receive(timeout=5).data == b"w" * 4096
    server.pump()
    _interrupt_after_the_frame(client, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        client.start_request(body, timeout=5)
    monkeypatch.undo()
    request = server.receive(timeout=5)
    assert request.data == body
    server.reply(request, b"late", timeout=5)  # its body's release rides with it
    _releases_reach(server, client)  # the late reply is read (and dropped: nobody waits for it) on the way
