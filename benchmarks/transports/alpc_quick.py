"""alpc's Quick-LPC fast path (``alpc.qlpc``): a port that offers the rings.

``alpc-quick`` uses the lean calls that stay in C for the whole wait (the
client's ``CommunicationPort.call``, the server's ``serve_requests``);
``alpc-quick-msg`` the Message API over the same rings (``request``,
``receive`` / ``reply``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import alpc
from alpc import qlpc

from .alpc_impl import AlpcClient, AlpcServer, AlpcTransport, answer, as_bytes
from .base import WAIT_TIMEOUT, Buffer, Handler, Server, ServerMode

__all__ = ["AlpcQuickMessageTransport", "AlpcQuickTransport"]


class AlpcQuickClient(AlpcClient):
    def request(self, data: Buffer) -> Buffer:
        return self._comm.call(as_bytes(data), timeout=WAIT_TIMEOUT)


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
            if not answer(other, handler):
                return


class _QuickPort(AlpcTransport):
    """A port offering Quick-LPC rings, and clients that must take them."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        reason = qlpc.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Quick-LPC is unavailable here: {reason}")
        self.attributes = alpc.PortAttributes(max_message_length=self.attributes.max_message_length,
                                              quick_lpc=True)

    def _port(self) -> alpc.ConnectionPort:
        return alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)

    def _connect(self) -> alpc.CommunicationPort:
        comm = alpc.connect(self.name, config=self.config, timeout=WAIT_TIMEOUT)
        if not comm.quick:
            comm.close()
            raise RuntimeError("the connection did not take up Quick-LPC")
        return comm


class AlpcQuickTransport(_QuickPort):
    """Quick-LPC through the lean calls: call() and serve_requests()."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        return AlpcQuickServer(self._port(), mode, handler)

    def client(self, index: int) -> AlpcQuickClient:
        return AlpcQuickClient(self._connect())


class AlpcQuickMessageTransport(_QuickPort):
    """Quick-LPC through the Message API: request(), receive() and reply()."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        return AlpcServer(self._port(), mode, handler)

    def client(self, index: int) -> AlpcClient:
        return AlpcClient(self._connect())
