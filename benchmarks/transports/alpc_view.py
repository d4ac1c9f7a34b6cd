"""alpc's zero-copy path: the sender fills a section view in place, the receiver reads it there.

The client asks for ``comm.create_view(n)``, fills ``view.memory`` with the
payload (the same bytes the automatic path copies into a section) and sends
the view itself. The server gets ``message.view``, a read-only memoryview
into the client's section, hands it to the case's handler (which checks the
payload in place, as every receiver does) inside ``with message.view as
memory:``, and so releases the range before it replies: the release then
travels with the reply. Replies are small and go inline. On a connection with
Quick-LPC rings a request view of up to 1 MiB is the client's bulk area
instead (``alpc.RingView``): the ring carries it in place, and the release is
a word in the shared region.
"""

from __future__ import annotations

import alpc

from .alpc_impl import AlpcServer, AlpcTransport, answer, as_bytes
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode

__all__ = ["AlpcViewClient", "AlpcViewServer", "AlpcViewTransport"]


class AlpcViewClient(OneWayClient):
    def __init__(self, comm: alpc.CommunicationPort) -> None:
        self._comm = comm

    def _filled(self, data: Buffer) -> alpc.SectionView:
        view = self._comm.create_view(len(data), timeout=WAIT_TIMEOUT)
        view.memory[:] = data
        return view

    def request(self, data: Buffer) -> Buffer:
        return self._comm.request(self._filled(data), timeout=WAIT_TIMEOUT).data

    def send(self, data: Buffer) -> None:
        self._comm.send(self._filled(data), timeout=WAIT_TIMEOUT)

    def close(self) -> None:
        self._comm.close()


def _answer_view(message: alpc.Message, handler: Handler) -> bool:
    """Handle one message, in place when it came as a view; False when the client is gone."""
    view = message.view
    if view is None:  # the SYNC request of a one-way batch is inline
        return answer(message, handler)
    with view as memory:
        reply = handler(memory)
        # An echo would hand back the view itself, which is gone after the block.
        reply = None if reply is None else as_bytes(reply)
    if message.type is alpc.MessageType.REQUEST:
        if reply is None:
            raise ValueError("the handler gave no reply to a request")
        message.reply(reply, timeout=WAIT_TIMEOUT)
    elif reply is not None:
        raise ValueError("the handler replied to a datagram")
    return True


class AlpcViewServer(AlpcServer):
    def serve(self) -> None:
        self.serve_with(_answer_view)


class AlpcViewTransport(AlpcTransport):
    """Views in both directions of the message path: ``create_view`` out, ``message.view`` in."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        port = alpc.create_port(self.name, self.attributes, config=self.config, timeout=WAIT_TIMEOUT)
        return AlpcViewServer(port, mode, handler)

    def client(self, index: int) -> AlpcViewClient:
        return AlpcViewClient(alpc.connect(self.name, config=self.config, timeout=WAIT_TIMEOUT))
