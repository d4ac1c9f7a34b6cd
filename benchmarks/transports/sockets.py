"""Raw Python sockets: a socketpair, and a listening AF_UNIX socket.

Messages are framed with an 8-byte length, read through a small buffer so a
burst of small messages costs one recv, and large messages are received
straight into their own buffer: what a careful hand-written peer would do.
"""

from __future__ import annotations

import selectors
import socket
import struct
from pathlib import Path

from ..core import KIB
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode, Transport, TransportTimeout

__all__ = ["FrameStream", "SocketPairTransport", "UnixSocketTransport"]

_HEADER = struct.Struct("<Q")
# Holds hundreds of small messages per recv; larger ones get a buffer of their
# own. Kept small because every connection has one (the memory case sees it).
_CHUNK = 16 * KIB
# Below this, header and body go out in one sendall (the copy is cheaper than a syscall).
_SMALL = 64 * KIB


class FrameStream:
    """Length-prefixed messages over a stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT_TIMEOUT)
        self.sock = sock
        # Never resized, so memoryviews handed out stay valid until the next recv.
        self._buf = bytearray(_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: Buffer) -> None:
        header = _HEADER.pack(len(data))
        try:
            if len(data) <= _SMALL:
                self.sock.sendall(header + data)
            else:
                self.sock.sendall(header)
                self.sock.sendall(data)
        except TimeoutError:
            raise TransportTimeout("socket send timed out") from None

    def has_buffered_frame(self) -> bool:
        available = self._end - self._start
        if available < _HEADER.size:
            return False
        (length,) = _HEADER.unpack_from(self._buf, self._start)
        return bool(available >= _HEADER.size + length)

    def recv(self) -> memoryview | None:
        """The next message (valid until the next recv), or None at a clean EOF."""
        while self._end - self._start < _HEADER.size:
            if not self._fill():
                if self._end != self._start:
                    raise ConnectionError("EOF inside a frame header")
                return None
        (length,) = _HEADER.unpack_from(self._buf, self._start)
        if _HEADER.size + length > _CHUNK:
            return self._recv_large(length, self._start + _HEADER.size)
        while self._end - self._start - _HEADER.size < length:
            if not self._fill():
                raise ConnectionError("EOF inside a frame body")
        body = self._start + _HEADER.size
        self._start = body + length
        return self._view[body:body + length]

    def _recv_large(self, length: int, body: int) -> memoryview:
        message = bytearray(length)
        view = memoryview(message)
        have = min(self._end - body, length)
        view[:have] = self._view[body:body + have]
        self._start = self._end = 0
        while have < length:
            got = self._recv_into(view[have:])
            if not got:
                raise ConnectionError("EOF inside a large frame")
            have += got
        return view

    def _compact(self) -> None:
        available = self._end - self._start
        self._view[:available] = self._view[self._start:self._end]
        self._start, self._end = 0, available

    def _fill(self) -> bool:
        if self._end == _CHUNK:
            self._compact()
        got = self._recv_into(self._view[self._end:])
        self._end += got
        return got > 0

    def _recv_into(self, target: memoryview) -> int:
        try:
            return self.sock.recv_into(target)
        except TimeoutError:
            raise TransportTimeout("socket recv timed out") from None

    def close(self) -> None:
        self.sock.close()


class _SocketClient(OneWayClient):
    def __init__(self, stream: FrameStream) -> None:
        self._stream = stream

    def request(self, data: Buffer) -> Buffer:
        self._stream.send(data)
        reply = self._stream.recv()
        if reply is None:
            raise ConnectionError("the server closed the socket")
        return reply

    def send(self, data: Buffer) -> None:
        self._stream.send(data)

    def close(self) -> None:
        self._stream.close()


def _answer(stream: FrameStream, handler: Handler) -> bool:
    """Handle one message; False at EOF."""
    message = stream.recv()
    if message is None:
        return False
    reply = handler(message)
    if reply is not None:
        stream.send(reply)
    return True


class _SocketServer(Server):
    """Serves pre-made streams and, given a listener, whoever connects to it."""

    def __init__(self, streams: list[FrameStream], listener: socket.socket | None, mode: ServerMode,
                 handler: Handler) -> None:
        super().__init__(handler)
        self._streams = streams
        self._listener = listener
        self._mode = mode

    def serve(self) -> None:
        handler = self.handler
        if self._mode == "single":
            stream = self._streams[0] if self._streams else self._accept()
            while _answer(stream, handler):
                pass
            return
        self._serve_many(handler)

    def _accept(self) -> FrameStream:
        assert self._listener is not None
        sock, _ = self._listener.accept()
        return FrameStream(sock)

    def _serve_many(self, handler: Handler) -> None:
        selector = selectors.DefaultSelector()
        if self._listener is not None:
            selector.register(self._listener, selectors.EVENT_READ, None)
        for stream in self._streams:
            selector.register(stream.sock, selectors.EVENT_READ, stream)
        while True:
            events = selector.select(WAIT_TIMEOUT)
            if not events:
                raise TransportTimeout("no client spoke within the wait timeout")
            for key, _ in events:
                if key.data is None:
                    stream = self._accept()
                    selector.register(stream.sock, selectors.EVENT_READ, stream)
                    continue
                stream = key.data
                alive = _answer(stream, handler)
                while alive and stream.has_buffered_frame():
                    alive = _answer(stream, handler)
                if not alive:
                    selector.unregister(stream.sock)
                    stream.close()


class SocketPairTransport(Transport):
    """``socket.socketpair()`` made before the fork."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(channels)]

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        for client_end, _ in self._pairs:
            client_end.close()
        return _SocketServer([FrameStream(server_end) for _, server_end in self._pairs], None, mode, handler)

    def client(self, index: int) -> _SocketClient:
        return _SocketClient(FrameStream(self._pairs[index][0]))

    def cleanup(self) -> None:
        for pair in self._pairs:
            for sock in pair:
                sock.close()


class UnixSocketTransport(Transport):
    """A listening AF_UNIX stream socket; clients connect by path."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        self._path = Path(self.job.workdir) / "uds.sock"

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self._path))
        listener.listen(128)
        listener.settimeout(WAIT_TIMEOUT)
        return _SocketServer([], listener, mode, handler)

    def client(self, index: int) -> _SocketClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_TIMEOUT)
        sock.connect(str(self._path))
        return _SocketClient(FrameStream(sock))
