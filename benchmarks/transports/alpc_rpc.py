"""alpc's RPC layer (``alpc.rpc``): an interface served by ``rpc.Server``, called through a proxy.

``BenchEcho.call(data)`` is a two-way call whose result is the handler's
reply; ``BenchEcho.post(data)`` is a one-way call (a datagram). Arguments and
results are msgpack; a bytes argument over 256 B travels as a segment after
the envelope (through a section, like any large alpc message) and reaches
the handler as a read-only memoryview. The server is what an embedding
program runs: ``rpc.Server`` with its default worker threads and takeover
watch, except in the one-way rate case, which needs one worker (see
``RPC_WORKERS``).
"""

from __future__ import annotations

from alpc import rpc

from .alpc_impl import AlpcTransport, as_bytes
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode

__all__ = ["RPC_WORKERS", "AlpcRpcTransport", "BenchEcho"]

# rpc.Server's default. With more than one worker, a call that runs (or is
# preempted) for longer than takeover_after lets the next event start on
# another thread, so one-way calls from one client may complete out of order
# relative to the call that follows them; the rate case's count would be
# wrong, so it runs the server with a single worker.
RPC_WORKERS = 4
_IN_ORDER_CASES = frozenset({"rate", "oneway"})


class BenchEcho(rpc.Interface, name="alpcbench.echo", version=(1, 0)):
    @rpc.method
    def call(self, data: Buffer) -> Buffer:
        """A two-way call: the handler's reply. A bytes argument over 256 B arrives as a memoryview."""
        raise NotImplementedError

    @rpc.method(oneway=True)
    def post(self, data: Buffer) -> None:
        """A one-way call (a datagram)."""


class _Served(BenchEcho):
    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def call(self, data: Buffer) -> Buffer:
        reply = self._handler(data)
        if reply is None:
            raise ValueError("the handler gave no reply to a request")
        return reply

    def post(self, data: Buffer) -> None:
        if self._handler(data) is not None:
            raise ValueError("the handler replied to a one-way message")


class _RpcServer(Server):
    def __init__(self, server: rpc.Server, handler: Handler) -> None:
        super().__init__(handler)
        self._server = server

    def serve(self) -> None:
        while True:  # until the harness kills this process
            self._server.serve_forever(WAIT_TIMEOUT)


class _RpcClient(OneWayClient):
    def __init__(self, client: rpc.Client[BenchEcho]) -> None:
        self._client = client
        self._proxy = client.proxy

    def request(self, data: Buffer) -> Buffer:
        return self._proxy.call(as_bytes(data))

    def send(self, data: Buffer) -> None:
        self._proxy.post(as_bytes(data))

    def close(self) -> None:
        self._client.close()


class AlpcRpcTransport(AlpcTransport):
    """``rpc.Server`` / ``rpc.connect`` on the harness's broker, with the port limits of ``alpc``."""

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        workers = 1 if self.job.case in _IN_ORDER_CASES else RPC_WORKERS
        server = rpc.Server(self.name, _Served(handler), workers=workers, attributes=self.attributes,
                            config=self.config)
        server.start()
        return _RpcServer(server, handler)

    def client(self, index: int) -> _RpcClient:
        return _RpcClient(rpc.connect(BenchEcho, self.name, timeout=WAIT_TIMEOUT, call_timeout=WAIT_TIMEOUT,
                                      config=self.config))
