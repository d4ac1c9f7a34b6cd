"""pyzmq over ``ipc://``: a ROUTER server and DEALER clients (optional extra ``bench``).

pyzmq is imported only inside the process that uses it, after the fork, and
each process makes its own Context: a zmq context must not cross a fork.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import KIB
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode, Transport, TransportTimeout

__all__ = ["ZmqTransport"]

# pyzmq's advice: copying is cheaper than tracking a zero-copy frame below ~64 KiB.
_COPY_BELOW = 64 * KIB
_TIMEOUT_MS = int(WAIT_TIMEOUT * 1000)


class _ZmqClient(OneWayClient):
    def __init__(self, sock: Any, again: type[Exception]) -> None:
        self._sock = sock
        self._again = again

    def request(self, data: Buffer) -> Buffer:
        self._sock.send(data, copy=len(data) < _COPY_BELOW)
        try:
            frame = self._sock.recv(copy=False)
        except self._again:
            raise TransportTimeout("no zmq reply within the wait timeout") from None
        view: memoryview = frame.buffer
        return view

    def send(self, data: Buffer) -> None:
        self._sock.send(data, copy=len(data) < _COPY_BELOW)

    def close(self) -> None:
        self._sock.close(linger=0)


class _ZmqServer(Server):
    def __init__(self, sock: Any, again: type[Exception], handler: Handler) -> None:
        super().__init__(handler)
        self._sock = sock
        self._again = again

    def serve(self) -> None:
        handler = self.handler
        while True:
            try:
                identity, frame = self._sock.recv_multipart(copy=False)
            except self._again:
                raise TransportTimeout("no client spoke within the wait timeout") from None
            reply = handler(frame.buffer)
            if reply is not None:
                self._sock.send_multipart([identity, reply], copy=len(reply) < _COPY_BELOW)


class ZmqTransport(Transport):
    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._endpoint = f"ipc://{Path(self.job.workdir) / 'zmq.ipc'}"
        self._context: Any = None

    def _socket(self, kind: str) -> tuple[Any, type[Exception]]:
        import zmq

        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(getattr(zmq, kind))
        sock.setsockopt(zmq.RCVTIMEO, _TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, _TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        return sock, zmq.Again

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        sock, again = self._socket("ROUTER")
        sock.bind(self._endpoint)
        return _ZmqServer(sock, again, handler)

    def client(self, index: int) -> _ZmqClient:
        sock, again = self._socket("DEALER")
        sock.connect(self._endpoint)
        return _ZmqClient(sock, again)

    def cleanup(self) -> None:
        if self._context is not None:
            self._context.destroy(linger=0)
