"""`alpc peers` after an asyncio connection's serve() returned because its client left."""

from __future__ import annotations

import asyncio

import pytest
from test_introspection import eventually  # tests/ is on sys.path, as for other shared helpers

import alpc
import alpc.aio
from alpc import control

pytestmark = pytest.mark.timeout(60)


def test_a_client_that_left_is_no_longer_listed_once_comm_serve_returned(broker: alpc.Broker, config: alpc.Config,
                                                                         spawn) -> None:
    """comm.serve() took the client's PORT_CLOSED but, unlike receive(), never released the
    connection: the departed client stayed in `alpc peers` (and in the port's
    max_connections, with its socket and pidfd open) until the application closed it."""
    handled: list[bytes] = []

    async def handler(message: alpc.Message) -> None:
        handled.append(message.data)

    async def main() -> None:
        port = await alpc.aio.create_port("svc.aserve6", config=config, timeout=10)
        loop = asyncio.get_running_loop()
        try:
            client = spawn("client", "svc.aserve6")
            comm = await (await port.listen(timeout=10)).accept()
            client.expect("READY")
            client.send("send hello")
            client.expect("SENT")
            client.send("close")
            client.expect("CLOSED")
            await asyncio.wait_for(comm.serve(handler), 10)  # returns: the client left
            assert handled == [b"hello"]
            listing = await loop.run_in_executor(None, lambda: eventually(
                lambda: alpc.list_peers("svc.aserve6", config), lambda found: found.peers_total == 0))
            assert listing.peers_total == 0 and listing.peers == (), listing
            await comm.close()  # still allowed, and the connection is retired once only
            totals: control.PortCounters = await loop.run_in_executor(None, lambda: eventually(
                lambda: alpc.port_stats("svc.aserve6", config).ports[0].counters,
                lambda counters: counters.disconnects >= 1))
            assert (totals.disconnects, totals.messages_in, totals.bytes_in) == (1, 1, 5)
        finally:
            await port.close()

    asyncio.run(main())
