"""grpcio over a unix socket, with generic handlers on raw bytes (optional extra ``bench``).

No generated code: a generic handler with no (de)serializers passes bytes
through untouched. One-way messages are a client-streaming call, the gRPC
way to send many messages with one answer. grpc is imported only after the
fork, in the process that uses it; gRPC's core does not survive a fork.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

from ..core import SYNC
from .base import WAIT_TIMEOUT, Buffer, Client, Handler, Server, ServerMode, Transport

__all__ = ["GrpcTransport"]

_SERVICE = "alpcbench.Bench"
_UNARY = f"/{_SERVICE}/Call"
_STREAM = f"/{_SERVICE}/Batch"


def _options(max_message: int) -> list[tuple[str, int]]:
    limit = max(4 * 1024 * 1024, max_message + 1024)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # A private subchannel per channel: every client() is a new connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _as_bytes(data: Buffer) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


class _GrpcClient(Client):
    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self._call = channel.unary_unary(_UNARY)
        self._stream = channel.stream_unary(_STREAM)

    def request(self, data: Buffer) -> Buffer:
        reply: bytes = self._call(_as_bytes(data), timeout=WAIT_TIMEOUT)
        return reply

    def send_batch(self, data: Buffer, count: int) -> Buffer:
        payload = _as_bytes(data)
        reply: bytes = self._stream(iter([payload] * count), timeout=WAIT_TIMEOUT)
        return reply

    def close(self) -> None:
        self._channel.close()


class _GrpcServer(Server):
    def __init__(self, server: Any, handler: Handler) -> None:
        super().__init__(handler)
        self._server = server

    def call(self, request: bytes, context: Any) -> bytes:
        reply = self.handler(request)
        if reply is None:
            raise ValueError("the handler gave no reply to a request")
        return _as_bytes(reply)

    def batch(self, requests: Iterator[bytes], context: Any) -> bytes:
        for request in requests:
            if self.handler(request) is not None:
                raise ValueError("the handler replied to a one-way message")
        return self.call(SYNC, context)

    def serve(self) -> None:
        while True:
            self._server.wait_for_termination(WAIT_TIMEOUT)


class GrpcTransport(Transport):
    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._target = f"unix://{Path(self.job.workdir) / 'grpc.sock'}"

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        import grpc

        workers = max(4, self.job.connections)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_options(self.max_message))
        served = _GrpcServer(server, handler)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, {
            "Call": grpc.unary_unary_rpc_method_handler(served.call),
            "Batch": grpc.stream_unary_rpc_method_handler(served.batch),
        })])
        if server.add_insecure_port(self._target) == 0:
            raise OSError(f"gRPC could not listen on {self._target}")
        server.start()
        return served

    def client(self, index: int) -> _GrpcClient:
        import grpc

        return _GrpcClient(grpc.insecure_channel(self._target, options=_options(self.max_message)))
