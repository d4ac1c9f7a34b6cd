"""alpc's Quick-LPC fast path (``alpc.qlpc``): a port that offers the rings, a
client calling ``CommunicationPort.call`` and a server answering with
``serve_requests``, the lean calls that stay in C for the whole wait."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import alpc
from alpc import qlpc

from .alpc_impl import AlpcClient, AlpcServer, AlpcTransport, _answer
from .base import WAIT_TIMEOUT, Buffer, Handler, Server, ServerMode

__all__ = ["AlpcQuickTransport"]


class AlpcQuickClient(AlpcClient):
    def request(self, data: Buffer) -> Buffer:
        return self._comm.call(data if isinstance(data, bytes) else bytes(data), timeout=WAIT_TIMEOUT)


class AlpcQuickServer(AlpcServer):
    """``single``: one connection answered with serve_requests; ``many``: as the default path."""

    def serve(self) -> None:
        if self._mode != "single":
            super().serve()
            return
        handler = self.handler
        # The harness's handlers return the reply for every request (None only
        # for one-way messages, which end serve_requests and are answered below).
        replies = cast(Callable[[bytes], Buffer], handler)
        comm = self._port.listen(timeout=WAIT_TIMEOUT).accept()
        while True:
            other = comm.serve_requests(replies, timeout=WAIT_TIMEOUT)
            if not _answer(other, handler):
                return


class AlpcQuickTransport(AlpcTransport):
    """Quick-LPC: small requests and replies through shared-memory rings with futex wake-ups."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        limit = self.attributes.max_message_length
        self.attributes = alpc.PortAttributes(max_message_length=limit, quick_lpc=True)
        reason = qlpc.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Quick-LPC is unavailable here: {reason}")

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        port = alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)
        return AlpcQuickServer(port, mode, handler)

    def client(self, index: int) -> AlpcQuickClient:
        comm = alpc.connect(self.name, config=self.config, timeout=WAIT_TIMEOUT)
        if not comm.quick:
            raise RuntimeError("the connection did not take up Quick-LPC")
        return AlpcQuickClient(comm)
