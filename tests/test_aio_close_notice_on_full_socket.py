"""asyncio close() right after sends that filled the socket: the peer hears PORT_CLOSED.

As the blocking close() (tests/test_close_notice_on_full_socket.py): _end() wrote PORT_CLOSED in
one non-blocking write, and a socket the sends just before had filled took none of it: the
client, a little behind, read the end of the stream with no notice ("died").

Deterministic: the client starts reading only once close() has either given up on its notice
(shut the socket down) or waits for room (both real code paths, observed).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from async_steps import in_thread

import alpc
from alpc import aio
from alpc.transport import Stream

pytestmark = pytest.mark.timeout(60)


def test_aio_close_after_a_burst_that_filled_the_socket_tells_port_closed(
        broker: alpc.Broker, config: alpc.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "aio.close.full.socket"
    stuck = threading.Event()
    shutdown = Stream.shutdown
    closing: list[Stream] = []

    def observed_shutdown(self: Stream) -> None:
        if self in closing:
            stuck.set()
        shutdown(self)

    monkeypatch.setattr(Stream, "shutdown", observed_shutdown)

    async def main() -> object:
        port = await aio.create_port(name, config=config, timeout=10)
        client: alpc.CommunicationPort | None = None
        try:
            connecting = asyncio.ensure_future(in_thread(lambda: alpc.connect(name, config=config, timeout=10)))
            comm = await (await port.listen(timeout=10)).accept()
            client = await connecting
            sent = 0
            while comm._stream.send_room() > 0:
                await comm.send(b"d" * 200, timeout=5)
                sent += 1
            assert not comm._unsent
            closing.append(comm._stream)
            want_writable = comm._want_writable

            def observed_want_writable() -> None:
                want_writable()
                stuck.set()  # close() waits for room (a real code path, observed)

            monkeypatch.setattr(comm, "_want_writable", observed_want_writable)

            def drain() -> tuple[int, object]:
                """The client, a little behind: reads everything once the close is under way."""
                assert client is not None
                assert stuck.wait(10)
                got = 0
                try:
                    while (message := client.receive(timeout=10)).type is alpc.MessageType.DATAGRAM:
                        got += 1
                except alpc.PeerGone as gone:  # how a client hears the end: closed, or died
                    return got, gone
                return got, message

            reading = asyncio.ensure_future(in_thread(drain))
            await comm.close()
            stuck.set()
            got, heard = await reading
            assert got == sent
            return heard
        finally:
            stuck.set()
            if client is not None:
                client.close()
            await port.close()

    heard = asyncio.run(main())
    # An orderly close (PORT_CLOSED), not a hang-up read as a death.
    assert isinstance(heard, alpc.PeerGone) and "closed its port" in str(heard), heard
