"""alpc itself, through its public API only, against the harness's broker.

A variant (zero-copy views, asyncio, Quick-LPC) subclasses ``AlpcTransport``
and overrides ``server``/``client``; ``benchmarks/registry.py`` then lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import alpc

from ..core import KIB, MIB
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode, Transport

__all__ = ["AlpcClient", "AlpcServer", "AlpcTransport", "answer", "as_bytes"]

# alpc's own default; raised for the 256 MiB case on both sides (a client
# refuses replies above its Config.max_message_length).
_DEFAULT_LIMIT = 64 * MIB
_WIRE_LIMIT = 0xFFFFFFFF


def as_bytes(data: Buffer) -> bytes:
    # The harness passes bytes; converting anything else keeps alpc's API typed.
    return data if isinstance(data, bytes) else bytes(data)


class AlpcClient(OneWayClient):
    def __init__(self, comm: alpc.CommunicationPort) -> None:
        self._comm = comm

    def request(self, data: Buffer) -> Buffer:
        return self._comm.request(as_bytes(data), timeout=WAIT_TIMEOUT).data

    def send(self, data: Buffer) -> None:
        self._comm.send(as_bytes(data), timeout=WAIT_TIMEOUT)

    def close(self) -> None:
        self._comm.close()


class AlpcServer(Server):
    """``single``: listen, accept, then receive on that port; ``many``: ``port.wait()`` on everything."""

    def __init__(self, port: alpc.ConnectionPort, mode: ServerMode, handler: Handler) -> None:
        super().__init__(handler)
        self._port = port
        self._mode = mode

    def serve(self) -> None:
        self.serve_with(answer)

    def serve_with(self, answer_one: Callable[[alpc.Message, Handler], bool]) -> None:
        """The serving loop, with ``answer_one`` handling each message (variants change only that)."""
        handler = self.handler
        if self._mode == "single":
            comm = self._port.listen(timeout=WAIT_TIMEOUT).accept()
            while True:
                if not answer_one(comm.receive(timeout=WAIT_TIMEOUT), handler):
                    return
        while True:
            event = self._port.wait(timeout=WAIT_TIMEOUT)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
            else:
                answer_one(event, handler)


def answer(message: alpc.Message, handler: Handler) -> bool:
    """Handle one message; False when it says the client is gone."""
    if message.type is alpc.MessageType.REQUEST:
        reply = handler(message.data)
        if reply is None:
            raise ValueError("the handler gave no reply to a request")
        message.reply(as_bytes(reply))
        return True
    if message.type is alpc.MessageType.DATAGRAM:
        if handler(message.data) is not None:
            raise ValueError("the handler replied to a datagram")
        return True
    return False


class AlpcTransport(Transport):
    """The default path: blocking API, inline messages."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        if self.job.alpc_runtime_dir is None:
            raise ValueError("alpc jobs need the harness's broker runtime dir")
        limit = min(_WIRE_LIMIT, max(_DEFAULT_LIMIT, max_message + 64 * KIB))
        self.name = f"bench.{self.job.tag}"
        self.config = alpc.Config(runtime_dir=Path(self.job.alpc_runtime_dir), max_message_length=limit)
        self.attributes = alpc.PortAttributes(max_message_length=limit)

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        port = alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)
        return AlpcServer(port, mode, handler)

    def client(self, index: int) -> OneWayClient:
        return AlpcClient(alpc.connect(self.name, config=self.config, timeout=WAIT_TIMEOUT))
