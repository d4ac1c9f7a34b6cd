"""Both ends of one connection in this process: for tests that drive threads against one port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import alpc
from alpc import aio

__all__ = ["aio_connection", "fill_socket", "local_connection"]


@contextmanager
def local_connection(config: alpc.Config, name: str, attributes: alpc.PortAttributes | None = None,
                     ) -> Iterator[tuple[alpc.ConnectionPort, alpc.CommunicationPort, alpc.CommunicationPort]]:
    """(port, server side, client side) of one connection to ``name``; all closed afterwards."""
    with alpc.create_port(name, attributes, config=config) as port:
        got: list[alpc.CommunicationPort] = []
        connecting = threading.Thread(target=lambda: got.append(alpc.connect(name, config=config, timeout=10)))
        connecting.start()
        server = port.listen(timeout=10).accept()
        connecting.join(10)
        (client,) = got
        try:
            yield port, server, client
        finally:
            client.close()
            server.close()


async def aio_connection(name: str, config: alpc.Config, client_config: alpc.Config | None = None,
                         ) -> tuple[aio.AsyncConnectionPort, aio.AsyncCommunicationPort, aio.AsyncCommunicationPort]:
    """(port, server side, client side) of one asyncio connection to ``name`` on the running loop;
    the client connects with ``client_config`` (``config`` by default). The caller closes them."""
    port = await aio.create_port(name, config=config, timeout=10)
    connecting = asyncio.create_task(aio.connect(name, config=client_config or config, timeout=10))
    request = await port.listen(timeout=10)
    server = await request.accept()
    return port, server, await connecting


def fill_socket(comm: alpc.CommunicationPort, size: int, timeout: float) -> int:
    """Datagrams of ``size`` bytes to a peer that reads nothing, until one times out after
    ``timeout``: how many went."""
    sent = 0
    while True:
        try:
            comm.send(b"d" * size, timeout=timeout)
        except alpc.Timeout:
            return sent
        sent += 1
