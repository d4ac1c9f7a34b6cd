"""rpc.aio.Server.stop() while its accept task is inside ``request.accept()``.

stop() cancels the accept task. The accept reply was written already (by the executor job
accept() awaits, shielded), so the client holds a connection; the cancelled accept() then
dropped that channel with a bare shutdown: the client heard a hang-up ("died", mid-stop) where
every other connection of the stopping server hears PORT_CLOSED (an orderly close).

The window is made deterministic by pausing a real code path: the blocking request's
accept_channel(), after its reply went out, until the test has stopped the server.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from async_steps import in_thread
from rpc_peers import Store, StoreImpl

import alpc
from alpc import rpc, server
from alpc.rpc.client import client_hello

pytestmark = pytest.mark.timeout(60)

NAME = "stop.while.accepting"


def test_a_client_accepted_while_the_server_stops_hears_port_closed(broker: alpc.Broker, config: alpc.Config,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    replied, go_on = threading.Event(), threading.Event()
    accept_channel = server.ConnectionRequest.accept_channel

    def paused_accept(self: server.ConnectionRequest, *args: Any, **kwargs: Any) -> Any:
        opened = accept_channel(self, *args, **kwargs)  # the client's connect() returns now
        replied.set()
        go_on.wait(20)
        return opened

    monkeypatch.setattr(server.ConnectionRequest, "accept_channel", paused_accept)

    def client() -> BaseException | alpc.Message:
        try:
            comm = alpc.connect(NAME, client_hello(Store), config=config, timeout=10)
        except BaseException as exc:  # handed to the test
            return exc
        try:
            return comm.receive(timeout=10)
        except BaseException as exc:
            return exc
        finally:
            comm.close()

    async def main() -> object:
        service = await rpc.aio.Server(NAME, StoreImpl(), config=config).start()
        connecting = asyncio.ensure_future(in_thread(client))
        try:
            assert await in_thread(replied.wait, 10)
            await service.stop()  # cancels the accept task mid-accept
            go_on.set()  # the accept job ends now: what it made is the cancelled accept()'s to undo
            return await connecting
        finally:
            go_on.set()
            await service.stop()
            await asyncio.gather(connecting, return_exceptions=True)

    heard = asyncio.run(main())
    # An orderly close (PORT_CLOSED), as every other client of the stopped server hears: not a hang-up.
    assert isinstance(heard, alpc.PeerGone) and "closed its port" in str(heard), heard
