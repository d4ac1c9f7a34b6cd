"""multiprocessing.Pipe and multiprocessing.connection Listener/Client.

Both speak through ``Connection.send_bytes``/``recv_bytes``, which frame
messages themselves; ``poll`` gives every receive its timeout.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection as mpc
import socket
from pathlib import Path
from typing import Any, cast

from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode, Transport, TransportTimeout

__all__ = ["ListenerTransport", "PipeTransport"]


def _recv(conn: mpc.Connection) -> bytes | None:
    """The next message, or None when the peer closed."""
    try:
        if not conn.poll(WAIT_TIMEOUT):
            raise TransportTimeout("no message within the wait timeout")
        return conn.recv_bytes()
    except EOFError:
        return None


class _ConnClient(OneWayClient):
    def __init__(self, conn: mpc.Connection) -> None:
        self._conn = conn

    def request(self, data: Buffer) -> Buffer:
        self._conn.send_bytes(data)
        reply = _recv(self._conn)
        if reply is None:
            raise ConnectionError("the server closed the connection")
        return reply

    def send(self, data: Buffer) -> None:
        self._conn.send_bytes(data)

    def close(self) -> None:
        self._conn.close()


def _answer(conn: mpc.Connection, handler: Handler) -> bool:
    message = _recv(conn)
    if message is None:
        return False
    reply = handler(message)
    if reply is not None:
        conn.send_bytes(reply)
    return True


class _ConnServer(Server):
    def __init__(self, conns: list[mpc.Connection], listener: mpc.Listener | None, mode: ServerMode,
                 handler: Handler) -> None:
        super().__init__(handler)
        self._conns = conns
        self._listener = listener
        self._mode = mode

    def serve(self) -> None:
        handler = self.handler
        if self._mode == "single":
            conn = self._conns[0] if self._conns else self._accept()
            while _answer(conn, handler):
                pass
            return
        self._serve_many(handler)

    def _accept(self) -> mpc.Connection:
        assert self._listener is not None
        return self._listener.accept()

    def _serve_many(self, handler: Handler) -> None:
        listening = None if self._listener is None else _listening_socket(self._listener)
        conns = list(self._conns)
        while True:
            waitables: list[Any] = [*conns, *([listening] if listening is not None else [])]
            ready = mpc.wait(waitables, WAIT_TIMEOUT)
            if not ready:
                raise TransportTimeout("no client spoke within the wait timeout")
            for item in ready:
                if item is listening:
                    conns.append(self._accept())
                    continue
                conn = cast(mpc.Connection, item)
                if not _answer(conn, handler):
                    conns.remove(conn)
                    conn.close()


def _listening_socket(listener: mpc.Listener) -> socket.socket:
    # Listener exposes no fileno() and accept() takes no timeout; its socket is
    # the only handle for both (waiting on it multiplexes accepting with serving).
    sock: socket.socket = listener._listener._socket  # type: ignore[attr-defined]
    return sock


class PipeTransport(Transport):
    """``multiprocessing.Pipe()`` made before the fork."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._pairs = [multiprocessing.Pipe(duplex=True) for _ in range(channels)]

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        for client_end, _ in self._pairs:
            client_end.close()
        return _ConnServer([server_end for _, server_end in self._pairs], None, mode, handler)

    def client(self, index: int) -> _ConnClient:
        return _ConnClient(self._pairs[index][0])

    def cleanup(self) -> None:
        for pair in self._pairs:
            for conn in pair:
                conn.close()


class ListenerTransport(Transport):
    """``multiprocessing.connection.Listener``/``Client`` on an AF_UNIX path, no authkey."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._path = str(Path(self.job.workdir) / "mp.sock")

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        listener = mpc.Listener(self._path, family="AF_UNIX", backlog=128)
        _listening_socket(listener).settimeout(WAIT_TIMEOUT)
        return _ConnServer([], listener, mode, handler)

    def client(self, index: int) -> _ConnClient:
        return _ConnClient(mpc.Client(self._path, family="AF_UNIX"))
