"""AsyncConnectionPort.close() with many clients that stopped reading: each connection gets up
to a second to flush what it queued, all at once, not one after the other (N clients, N seconds)."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from async_steps import in_thread, until

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
CLIENTS = 4
# One connection's flush may take its whole second; CLIENTS seconds means one after the other.
CLOSE_WITHIN = 2.5


def _stalled(comm: aio.AsyncCommunicationPort) -> bool:
    return bool(comm._unsent)


def test_port_close_flushes_its_stalled_connections_concurrently(broker: alpc.Broker, config: alpc.Config) -> None:
    name = "svc.stalled"
    # Inline bodies of 1 MiB: more than the socket's buffer, so each send waits for room.
    attributes = alpc.PortAttributes(inline_threshold=4 * MIB)

    async def main() -> float:
        port = await aio.create_port(name, attributes, config=config, timeout=10)
        clients: list[alpc.CommunicationPort] = []
        sends: list[asyncio.Task[None]] = []
        try:
            for _ in range(CLIENTS):
                connecting = asyncio.ensure_future(in_thread(lambda: alpc.connect(name, config=config, timeout=10)))
                comm = await (await port.listen(timeout=10)).accept()
                clients.append(await connecting)  # a blocking client reads only when asked: never here
                sends.append(asyncio.create_task(comm.send(bytes(MIB), timeout=30)))
                await until(functools.partial(_stalled, comm), "the send waits for room in the socket")
            started = time.monotonic()
            await port.close()
            return time.monotonic() - started
        finally:
            await asyncio.gather(*sends, return_exceptions=True)
            for client in clients:
                client.close()

    assert asyncio.run(main()) < CLOSE_WITHIN


def test_a_send_waiting_for_room_ends_when_its_connection_closes(broker: alpc.Broker, config: alpc.Config) -> None:
    """close() (its flush timed out: the client does not read) fails the connection; the send
    still waiting for room in the socket must hear so at once, not wait out its own 30 s."""
    name = "svc.stalled.one"
    attributes = alpc.PortAttributes(inline_threshold=4 * MIB)

    async def main() -> None:
        port = await aio.create_port(name, attributes, config=config, timeout=10)
        connecting = asyncio.ensure_future(in_thread(lambda: alpc.connect(name, config=config, timeout=10)))
        comm = await (await port.listen(timeout=10)).accept()
        client = await connecting
        send = asyncio.create_task(comm.send(bytes(MIB), timeout=30))
        try:
            await until(lambda: bool(comm._unsent), "the send waits for room in the socket")
            await comm.close()
            with pytest.raises(alpc.ConnectionClosed):
                await asyncio.wait_for(send, 5)
        finally:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
            client.close()
            await port.close()

    asyncio.run(main())
