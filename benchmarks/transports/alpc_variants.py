"""alpc variants beside the default path: asyncio on both sides, batched one-way sends, a
completion-port server, and the socket path without Quick-LPC rings."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Any

import alpc
from alpc import aio

from ..core import SYNC, Sampler, Timing
from .alpc_impl import AlpcClient, AlpcTransport, as_bytes
from .base import WAIT_TIMEOUT, Buffer, Client, Handler, Server, ServerMode

__all__ = ["AlpcAioTransport", "AlpcBatchTransport", "AlpcCompletionTransport", "AlpcSocketTransport"]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the optional extra; plain asyncio otherwise
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class _AioServer(Server):
    def __init__(self, transport: AlpcTransport, handler: Handler) -> None:
        super().__init__(handler)
        self._loop = _new_loop()
        # Registered before server() returns: clients may connect at once.
        self._port = self._loop.run_until_complete(aio.create_port(
            transport.name, transport.attributes, config=transport.config, timeout=WAIT_TIMEOUT))

    def serve(self) -> None:
        handler = self.handler

        async def handle(message: alpc.Message) -> Buffer | None:
            return handler(message.data)

        async def main() -> None:
            async with self._port:
                await self._port.serve(handle, timeout=WAIT_TIMEOUT)

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()


class _AioClient(Client):
    """An asyncio client driven from the harness's synchronous calls (one loop, kept)."""

    def __init__(self, transport: AlpcTransport) -> None:
        self._loop = _new_loop()
        self._comm = self._run(aio.connect(transport.name, config=transport.config, timeout=WAIT_TIMEOUT))

    def _run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return self._loop.run_until_complete(work)

    def request(self, data: Buffer) -> Buffer:
        message = self._run(self._comm.request(as_bytes(data), timeout=WAIT_TIMEOUT))
        return message.data  # type: ignore[no-any-return]

    def time_requests(self, data: Buffer, check: Callable[[Buffer], None], timing: Timing) -> list[float]:
        """Each ``await request()`` timed inside the running loop: starting and stopping the
        loop around every call (what ``request`` does for the harness) costs more than the
        round trip itself, and no asyncio application pays it."""
        payload = as_bytes(data)
        request = self._comm.request
        clock = time.perf_counter_ns

        async def run() -> list[float]:
            sampler = Sampler(timing)
            while sampler.warming():
                check((await request(payload, timeout=WAIT_TIMEOUT)).data)
            while sampler.sampling():
                started = clock()
                message = await request(payload, timeout=WAIT_TIMEOUT)
                sampler.add(clock() - started)
                check(message.data)
            return sampler.samples

        return self._run(run())  # type: ignore[no-any-return]

    def send_batch(self, data: Buffer, count: int) -> Buffer:
        async def batch() -> Buffer:
            payload = as_bytes(data)
            await self._comm.send_many([payload] * count, timeout=WAIT_TIMEOUT)
            reply: Buffer = (await self._comm.request(SYNC, timeout=WAIT_TIMEOUT)).data
            return reply

        return self._run(batch())  # type: ignore[no-any-return]

    def close(self) -> None:
        self._run(self._comm.close())
        self._loop.close()


class AlpcAioTransport(AlpcTransport):
    """alpc.aio on both sides (uvloop when installed): requests awaited, handlers as tasks."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        return _AioServer(self, handler)

    def client(self, index: int) -> Client:  # type: ignore[override]
        return _AioClient(self)


class _BatchClient(AlpcClient):
    def send_batch(self, data: Buffer, count: int) -> Buffer:
        self._comm.send_many([as_bytes(data)] * count, timeout=WAIT_TIMEOUT)
        return self.request(SYNC)


class _BatchServer(Server):
    """Takes every waiting message at once (receive_many) and answers them in order."""

    def __init__(self, port: alpc.ConnectionPort, handler: Handler) -> None:
        super().__init__(handler)
        self._port = port

    def serve(self) -> None:
        handler = self.handler
        comm = self._port.listen(timeout=WAIT_TIMEOUT).accept()
        while True:
            for message in comm.receive_many(timeout=WAIT_TIMEOUT):
                if message.type is alpc.MessageType.DATAGRAM:
                    handler(message.data)
                elif message.type is alpc.MessageType.REQUEST:
                    reply = handler(message.data)
                    comm.reply(message, as_bytes(reply if reply is not None else b""))
                else:
                    return


class AlpcBatchTransport(AlpcTransport):
    """The blocking API batched both ways: send_many (many datagrams per system call) and
    receive_many (every decoded message of a read taken at once)."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        port = alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)
        return _BatchServer(port, handler)

    def client(self, index: int) -> _BatchClient:
        return _BatchClient(alpc.connect(self.name, config=self.config, timeout=WAIT_TIMEOUT))


class _CompletionServer(Server):
    def __init__(self, port: alpc.ConnectionPort, handler: Handler) -> None:
        super().__init__(handler)
        self._port = port

    def serve(self) -> None:
        handler = self.handler

        def handle(message: alpc.Message) -> Buffer | None:
            return handler(message.data)

        with alpc.CompletionPort(self._port, handle, max_workers=4) as completion:
            completion.serve(timeout=WAIT_TIMEOUT)


class AlpcCompletionTransport(AlpcTransport):
    """The server is an alpc.CompletionPort: one loop over every client, handlers on a thread pool."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        port = alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)
        return _CompletionServer(port, handler)


class AlpcSocketTransport(AlpcTransport):
    """The socket path alone: a port that offers no Quick-LPC rings (``quick_lpc=False``), as
    every port was before the rings became the default and as a pure-Python build is."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self.attributes = dataclasses.replace(self.attributes, quick_lpc=False)
