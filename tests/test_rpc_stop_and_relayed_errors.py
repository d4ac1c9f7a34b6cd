"""rpc.aio.Server.stop() returns once the calls it cancelled have ended, and a RemoteError a
handler lets through (a nested call's) is relayed with its own message and no traceback the
server did not choose to send. Both tests failed before."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

import alpc
from alpc import rpc
from alpc.errors import RemoteError, remote_error_class
from alpc.rpc.codec import Codec
from alpc.rpc.dispatch import Dispatcher, ObjectTable
from alpc.security import PeerCred

pytestmark = pytest.mark.timeout(60)

NAME = "svc.review-rpc"


class Slow(rpc.Interface, name="test.review.slow", version=(1, 0)):
    @rpc.method
    async def hang(self) -> None: ...


class SlowImpl(Slow):
    """hang() waits until cancelled, then does some cleanup of its own (which awaits)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cleaned = False

    async def hang(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # handshake-free: the handler's own cleanup work, not a synchronisation
            self.cleaned = True


def test_async_server_stop_returns_once_its_cancelled_handlers_ended(broker: alpc.Broker, config: alpc.Config) -> None:
    """rpc.aio.Server.stop() "cancels the calls running" but does not wait for them: the cancelled
    handler tasks are still running (their cleanup not done) when stop() has returned."""

    async def main() -> None:
        impl = SlowImpl()
        server = rpc.aio.Server(NAME, impl, config=config)
        await server.start()
        client = await rpc.aio.connect(Slow, NAME, config=config, timeout=10)
        call = asyncio.ensure_future(client.proxy.hang())
        left: list[asyncio.Task[Any]] = []
        try:
            await asyncio.wait_for(impl.started.wait(), 10)
            await server.stop()
            left = [task for task in asyncio.all_tasks()
                     if task is not asyncio.current_task() and not task.done() and "_handle" in repr(task.get_coro())]
            assert impl.cleaned and not left, (
                f"stop() returned with the cancelled handler still running: cleaned={impl.cleaned}, {left}")
        finally:
            with pytest.raises(alpc.ConnectionClosed):
                await asyncio.wait_for(call, 10)
            await client.close()
            await asyncio.wait_for(asyncio.gather(*left, return_exceptions=True), 10)  # before the loop closes

    asyncio.run(main())


# -- a remote error a handler lets through ---------------------------------------------------------


class Relay(rpc.Interface, name="test.review.relay", version=(1, 0)):
    @rpc.method
    def relay(self) -> None: ...


class RelayImpl(Relay):
    def relay(self) -> None:
        # What a nested call to another server raises when that server's handler raised KeyError
        # (and that server sends its tracebacks); this handler lets it through.
        raise remote_error_class("KeyError")("KeyError", "'missing'", "Traceback (most recent call last):\n  ...")


def test_a_relayed_remote_error_keeps_its_message_and_sends_no_traceback() -> None:
    """Dispatcher.fail sends str(exc) as the message: for a RemoteError that is "KeyError: 'missing'"
    plus the remote traceback, so the caller's remote_message is mangled ("KeyError: KeyError: ...")
    and carries a traceback although this server does not send tracebacks (the codec's own
    exception ext sends ``remote_message`` instead)."""
    codec = Codec()
    dispatcher = Dispatcher(codec, ObjectTable(RelayImpl()), caller=PeerCred(1234, os.getuid(), os.getgid()))
    payload, _ = codec.encode_call(0, "relay", [], None, None)
    reply = dispatcher.handle(payload if isinstance(payload, bytes) else b"".join(bytes(p) for p in payload))
    assert isinstance(reply, bytes)
    with pytest.raises(KeyError) as caught:
        codec.result(reply)
    error = caught.value
    assert isinstance(error, RemoteError)
    assert error.remote_traceback is None
    assert (error.type_name, error.remote_message) == ("KeyError", "'missing'"), error.remote_message


