"""multiprocessing.managers: a BaseManager serving an echo object over a unix-socket address.

The RPC that ships with Python: the server process registers a typeid whose
object calls the case's handler, each client connects to the manager (HMAC
authentication with an authkey), gets a proxy to its own object and calls
``proxy.call(data)``; arguments and results are pickled. A proxy call takes
no timeout, so a lost server is bounded only by the harness's per-repetition
timeout (it kills the process group).
"""

from __future__ import annotations

import os
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

from .base import Buffer, Client, Handler, Server, ServerMode, Transport

__all__ = ["ManagersTransport"]

_TYPEID = "echo"


class _Echo:
    """The served object; its public methods are what a proxy exposes."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def call(self, data: bytes) -> Buffer:
        reply = self._handler(data)
        if reply is None:
            raise ValueError("the handler gave no reply to a request")
        return reply


class _ServerManager(BaseManager):
    pass


class _ClientManager(BaseManager):
    pass


_ClientManager.register(_TYPEID)


class _ManagersServer(Server):
    def __init__(self, server: Any, handler: Handler) -> None:
        super().__init__(handler)
        self._server = server

    def serve(self) -> None:
        self._server.serve_forever()


class _ManagersClient(Client):
    def __init__(self, manager: _ClientManager) -> None:
        self._manager = manager
        self._proxy: Any = getattr(manager, _TYPEID)()

    def request(self, data: Buffer) -> Buffer:
        reply: Buffer = self._proxy.call(data)
        return reply

    def send_batch(self, data: Buffer, count: int) -> Buffer:
        raise NotImplementedError("multiprocessing.managers has no one-way call")

    def close(self) -> None:
        # Dropping the last reference to a proxy tells the server to drop its object.
        self._proxy = None


class ManagersTransport(Transport):
    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._address = str(Path(self.job.workdir) / "mgr.sock")
        self._authkey = os.urandom(16)

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        _ServerManager.register(_TYPEID, callable=lambda: _Echo(handler))
        manager = _ServerManager(address=self._address, authkey=self._authkey)
        # get_server() binds and listens: clients can connect once it returns.
        return _ManagersServer(manager.get_server(), handler)

    def client(self, index: int) -> _ManagersClient:
        manager = _ClientManager(address=self._address, authkey=self._authkey)
        manager.connect()
        return _ManagersClient(manager)
