"""The asyncio server side (alpc/aio.py) at its edges: serve, listen, accept and close."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

CLIENT = "import sys, alpc; alpc.connect(sys.argv[1], config=alpc.Config.from_env(sys.argv[2]), timeout=30)"


def echo(message: alpc.Message) -> bytes:
    return bytes(message.data)


def test_port_serve_survives_a_client_that_died_before_its_accept(broker, config, runtime_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A client that dies between its connect and the server's accept: aio serve() lets the
    accept's PeerGone escape and the whole server ends (every other client dropped); the
    completion port (blocking driver) skips such a client and goes on serving."""
    name = "edge.gone"

    async def main() -> bytes:
        port = await aio.create_port(name, config=config, timeout=10)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, name, str(runtime_dir)])
        called = asyncio.Event()

        def accept(request: aio.AsyncConnectionRequest) -> bool:
            if request.client.pid == proc.pid:
                proc.kill()
                proc.wait(10)
                called.set()
            return True

        serve_task = asyncio.create_task(port.serve(echo, accept=accept))
        try:
            await asyncio.wait_for(called.wait(), 20)
            await asyncio.sleep(0)  # handshake-free: one loop turn, not a wait
            if serve_task.done():
                serve_task.result()  # today: PeerGone, the server is gone
            comm = await aio.connect(name, config=config, timeout=10)
            try:
                return (await comm.request(b"still serving", timeout=10)).data
            finally:
                await comm.close()
        finally:
            serve_task.cancel()
            await asyncio.gather(serve_task, return_exceptions=True)
            await port.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    assert asyncio.run(main()) == b"still serving"


def test_port_close_closes_connections_accepted_with_listen(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The blocking ConnectionPort.close() closes every connection it accepted (the client
    sees PORT_CLOSED); AsyncConnectionPort.close() closes only those its own serve()
    accepted: one accepted with listen()/accept() stays open, socket, mapping and
    loop readers included, and its client never hears that the port closed."""
    name = "edge.listen"

    async def main() -> tuple[bool, bool]:
        port = await aio.create_port(name, config=config, timeout=10)
        connecting = asyncio.create_task(aio.connect(name, config=config, timeout=10))
        request = await port.listen(timeout=10)
        server_comm = await request.accept()
        client = await connecting
        try:
            await port.close()
            server_closed = server_comm.closed
            try:
                await client.receive(timeout=5)
                client_told = False
            except alpc.ConnectionClosed:
                client_told = True
            except alpc.Timeout:
                client_told = False
            return server_closed, client_told
        finally:
            await server_comm.close()
            await client.close()

    assert asyncio.run(main()) == (True, True)


async def _serve_until_the_server_closes(name: str, config: alpc.Config, serving_side: str) -> None:
    """One connection: ``serving_side`` ("server" or "client") runs comm.serve(echo), the other
    side asks once, then the server side closes its end; serve() must return."""
    port = await aio.create_port(name, config=config, timeout=10)
    connecting = asyncio.create_task(aio.connect(name, config=config, timeout=10))
    server_comm = await (await port.listen(timeout=10)).accept()
    client = await connecting
    server_serves = serving_side == "server"
    serving = asyncio.create_task((server_comm if server_serves else client).serve(echo))
    try:
        asker = client if server_serves else server_comm
        assert (await asker.request(b"x", timeout=10)).data == b"x"
        await server_comm.close()
        await asyncio.wait_for(serving, 5)  # before the fix: TimeoutError, serve() never returned
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await client.close()
        await server_comm.close()
        await port.close()


def test_comm_serve_returns_when_the_port_is_closed_locally(broker, config) -> None:  # type: ignore[no-untyped-def]
    """comm.serve() on a server connection, and another task closes that connection:
    serve() waited for a notice that close() just discarded, for ever."""
    asyncio.run(_serve_until_the_server_closes("edge.localclose", config, "server"))


def test_client_comm_serve_returns_when_the_server_goes(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A client serving its peer's calls (comm.serve on the client side): when the server
    closes, the client's core gets no notice in its inbox (only a server does), so
    serve() waited for ever; receive()/async for end with ConnectionClosed instead."""
    asyncio.run(_serve_until_the_server_closes("edge.clientserve", config, "client"))


def test_port_serve_ends_when_the_port_is_closed(broker, config) -> None:  # type: ignore[no-untyped-def]
    """port.serve() running with a client connected, and the application closes the port:
    serve() must end (and its per-client tasks with it), not wait on the closed link."""
    name = "edge.portclose"

    async def main() -> None:
        port = await aio.create_port(name, config=config, timeout=10)
        serving = asyncio.create_task(port.serve(echo))
        client = await aio.connect(name, config=config, timeout=10)
        try:
            assert (await client.request(b"z", timeout=10)).data == b"z"
            await port.close()
            try:
                await asyncio.wait_for(serving, 5)
            except (alpc.AlpcError, OSError):
                pass  # ending with an error is fine; hanging is not
            with pytest.raises(alpc.ConnectionClosed):
                await client.request(b"after", timeout=5)
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await client.close()

    asyncio.run(main())
