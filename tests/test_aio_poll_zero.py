"""timeout=0 polls: a call given no time at all still returns what is already there.

The asyncio port's listen(timeout=0) is compared with the blocking port's: a connection
request the broker already wrote into the port's link is returned by both, as the blocking
listen(timeout=0) does (one poll(2) of 0 ms), not refused with Timeout.
"""

from __future__ import annotations

import asyncio
import select

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)


def _until_readable(fds: list[int]) -> None:
    """Handshake: the peer's bytes (a forwarded connection request, a datagram) are there to read."""
    readable, _, _ = select.select(fds, [], [], 10)
    assert readable, "nothing arrived to read"


def test_blocking_listen_with_timeout_zero_returns_a_forwarded_request(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The reference behaviour: a request waiting in the link is returned by a 0 s listen."""
    import concurrent.futures
    with alpc.create_port("blocking.poll.zero", config=config, timeout=10) as port, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = pool.submit(alpc.connect, "blocking.poll.zero", config=config, timeout=10)
        _until_readable(port._link.wait_fds())
        request = port.listen(timeout=0)
        request.accept().close()
        client.result(timeout=10).close()


def test_aio_listen_with_timeout_zero_returns_a_forwarded_request(broker, config) -> None:  # type: ignore[no-untyped-def]
    """aio listen(timeout=0) raised Timeout before reading the link at all: nothing but
    listen reads it on an asyncio port, so a server polling with timeout=0 never saw a
    single client (each one waited out its connect timeout)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        port = await aio.create_port("aio.listen.poll0", config=config, timeout=10)
        try:
            client = loop.run_in_executor(None, lambda: alpc.connect("aio.listen.poll0", config=config, timeout=10))
            await loop.run_in_executor(None, _until_readable, port._port._link.wait_fds())
            try:
                request = await port.listen(timeout=0)
            except alpc.Timeout:
                request = await port.listen(timeout=10)  # answer the client before failing
                await (await request.accept()).close()
                (await client).close()
                pytest.fail("listen(timeout=0) raised Timeout with a connection request in the link")
            comm = await request.accept()
            (await client).close()
            await comm.close()
        finally:
            await port.close()

    asyncio.run(main())


def test_aio_receive_with_timeout_zero_returns_a_message_in_the_socket(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A datagram already in the connection's socket (the loop has not run its reader yet):
    the blocking receive(timeout=0) reads it (recvmsg at once), aio receive(timeout=0) raised
    Timeout without a look at the socket."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        port = await aio.create_port("aio.recv.poll0", config=config, timeout=10)
        try:
            client_job = loop.run_in_executor(None, lambda: alpc.connect("aio.recv.poll0", config=config, timeout=10))
            comm = await (await port.listen(timeout=10)).accept()
            client = await client_job
            try:
                # No await from the send to the receive: the loop's reader cannot run meanwhile.
                client.send(b"hello", timeout=10)
                _until_readable([comm._stream.fileno()])
                try:
                    message = await comm.receive(timeout=0)
                except alpc.Timeout:
                    pytest.fail("receive(timeout=0) raised Timeout with a datagram in the socket")
                assert message.data == b"hello"
            finally:
                client.close()
                await comm.close()
        finally:
            await port.close()

    asyncio.run(main())
