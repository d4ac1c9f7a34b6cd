"""close() right after a burst of datagrams that filled the socket: the peer hears PORT_CLOSED.

close() wrote what it owed and its PORT_CLOSED in one non-blocking write. A socket filled by the
sends just before (the peer a little behind: every send returned once its frame was in, the
last leaving no room) took none of it: the notice was dropped at once, and the peer, reading
on, found the end of the stream with no notice: CLIENT_DIED ("died or dropped the connection")
for a close as orderly as any. README: "the server receives PORT_CLOSED when a client closes
its port", and only "a close() whose PORT_CLOSED finds no room within 1 s" ends as a death.

Deterministic: the server starts reading only once the client's close() has either given up
on its notice (shut its socket down) or waits for room (a real code path, observed).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import alpc
from alpc.transport import Stream

pytestmark = pytest.mark.timeout(60)


def _fill(client: alpc.CommunicationPort) -> int:
    """Datagrams until the client's socket has no room left (the server reads none meanwhile)."""
    sent = 0
    while client._stream.send_room() > 0:
        client.send(b"d" * 200, timeout=5)
        sent += 1
    return sent


def test_close_after_a_burst_that_filled_the_socket_tells_port_closed(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = local_pair
    sent = _fill(client)
    stuck = threading.Event()  # the client's close() found no room for its notice
    shutdown, wait_writable = Stream.shutdown, Stream._wait_writable

    def observed_shutdown(self: Stream) -> None:
        if self is client._stream:
            stuck.set()
        shutdown(self)

    def observed_wait(self: Stream, deadline: Any) -> bool:
        if self is client._stream:
            stuck.set()
        return wait_writable(self, deadline)

    monkeypatch.setattr(Stream, "shutdown", observed_shutdown)
    monkeypatch.setattr(Stream, "_wait_writable", observed_wait)
    heard: list[BaseException | tuple[int, alpc.Message]] = []

    def drain() -> None:
        """The server, a little behind: reads everything once the close is under way."""
        try:
            assert stuck.wait(10)
            got = 0
            while (message := server.receive(timeout=10)).type is alpc.MessageType.DATAGRAM:
                got += 1
            heard.append((got, message))
        except BaseException as exc:  # handed to the test thread
            heard.append(exc)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        client.close()
    finally:
        stuck.set()
        reader.join(30)
    ((got, message),) = heard
    assert got == sent
    assert message.type is alpc.MessageType.PORT_CLOSED, (message.type, message.reason)
