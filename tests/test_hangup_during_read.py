"""The peer closes (rpc.Server.stop(), ConnectionPort.close()) while two threads of this side use
the connection: one reading, one writing.

The reader's recv took the peer's PORT_CLOSED; before it handed the bytes on, the writer's send
found the peer's socket closed (EPIPE) and asked the socket whether bytes were left unread
(``_hung_up``): none were (the reader held them), so it ended the connection as lost, a crash
("the peer's socket is closed"). The reader's PORT_CLOSED then came after the end: a protocol
error, logged as the peer's fault, and the orderly close was never seen. Found by a stress loop
of rpc.Server.stop() with calls in flight (the RPC client's callers read and write at once).

The window is made deterministic by pausing a real code path: the reader's read, once it has
taken the bytes and before it returns them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from local_pairs import local_connection

import alpc

pytestmark = pytest.mark.timeout(60)


def test_a_write_hanging_up_while_another_thread_holds_the_peers_close(
        broker: alpc.Broker, config: alpc.Config, caplog: pytest.LogCaptureFixture) -> None:
    with local_connection(config, "close.race.hangup") as (_, server, client):
        took, go_on = threading.Event(), threading.Event()
        stream = client._stream
        read = stream.read

        def paused_read(*args: Any, **kwargs: Any) -> Any:
            got = read(*args, **kwargs)
            if got and not took.is_set():
                took.set()  # the PORT_CLOSED is out of the socket, not yet delivered
                go_on.wait(20)
            return got

        stream.read = paused_read  # type: ignore[method-assign]
        heard: list[BaseException | alpc.Message] = []

        def receive() -> None:
            try:
                heard.append(client.receive(timeout=20))
            except BaseException as exc:  # handed to the test thread
                heard.append(exc)

        reader = threading.Thread(target=receive)
        try:
            with caplog.at_level(logging.WARNING, logger="alpc"):
                reader.start()
                server.close()
                assert took.wait(10)
                with pytest.raises(alpc.PeerGone):
                    client.send(b"late")  # the peer's socket is closed: EPIPE
                go_on.set()
                reader.join(20)
                assert not reader.is_alive()
            (outcome,) = heard
            # The peer's orderly close, as a lone reader hears it; not a crash, not a protocol error.
            assert isinstance(outcome, alpc.PeerGone) and "closed its port" in str(outcome), outcome
            assert not [r for r in caplog.records if "protocol error" in r.getMessage()]
        finally:
            go_on.set()
            reader.join(20)
            stream.read = read  # type: ignore[method-assign]
