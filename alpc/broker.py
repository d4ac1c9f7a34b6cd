"""The broker daemon: owns the port namespace and brokers connects.

One thread runs a selector loop over non-blocking sockets. A client's own
connected socket is handed to the server with SCM_RIGHTS, so SO_PEERCRED on the
server's end names the client (kernel-verified) and the broker is out of the
data path from then on: an established connection survives a broker crash.
"""

from __future__ import annotations

import fcntl
import logging
import os
import selectors
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import control
from .config import Config, ensure_runtime_dir
from .errors import AlpcError, BrokerRunning, BrokerUnavailable, ProtocolError
from .exchange import control_frame, read_frame
from .security import PeerCred
from .transport import Listener, Stream, advance_buffers, deadline_after
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, encode_header

__all__ = ["MAX_REQUEST", "Broker", "list_ports"]

log = logging.getLogger(__name__)

# No broker request legitimately needs more: connect data is bounded far below.
MAX_REQUEST = 1024 * 1024
LOCK_NAME = "broker.lock"

_NEW_PEER_TYPES = frozenset({MessageType.CREATE_PORT, MessageType.CONNECT, MessageType.LIST_PORTS})
_SERVER_TYPES = frozenset({MessageType.PORT_STATUS})
_QUERY_TYPES = frozenset({MessageType.LIST_PORTS})


def _limits(types: frozenset[MessageType]) -> FrameLimits:
    return FrameLimits(allowed_types=types, max_data=MAX_REQUEST)


@dataclass
class _Outgoing:
    buffers: list[memoryview]
    fds: list[int]
    handoff: Stream | None = None


@dataclass
class _Peer:
    stream: Stream
    cred: PeerCred
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(_limits(_NEW_PEER_TYPES)))
    outbox: deque[_Outgoing] = field(default_factory=deque)
    port: str | None = None
    close_when_flushed: bool = False

    def describe(self) -> str:
        return f"pid {self.cred.pid} uid {self.cred.uid}"


@dataclass
class _Port:
    name: str
    owner: _Peer
    request: control.CreatePort
    clients: tuple[control.ClientInfo, ...] = ()


def _frame(body: control.Body, n_fds: int = 0) -> list[memoryview]:
    payload = control.encode_body(body)
    header = encode_header(body.TYPE, len(payload), n_fds=n_fds, sender_pid=os.getpid())
    return [memoryview(header), memoryview(payload)]


class Broker:
    """The broker, runnable in a thread (``with Broker(dir):``) or as the daemon's main loop."""

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None, *, listen_fd: int | None = None) -> None:
        self.config = Config.from_env(runtime_dir)
        self._listen_fd = listen_fd
        self._listener: Listener | None = None
        self._lock_fd: int | None = None
        self._selector = selectors.DefaultSelector()  # replaced, with the wake pipe, by bind()
        self._selector.close()
        self._wake_r = self._wake_w = -1
        self._peers: dict[int, _Peer] = {}
        self._ports: dict[str, _Port] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()

    @property
    def socket_path(self) -> Path:
        return self.config.broker_socket

    # -- lifecycle -----------------------------------------------------------------

    def bind(self) -> None:
        """Claim the runtime directory and listen; fails if another broker runs there."""
        ensure_runtime_dir(self.config.runtime_dir)
        self._lock_fd = self._take_lock()
        try:
            if self._listen_fd is not None:
                self._listener = Listener.from_fd(self._listen_fd)
            else:
                # We hold the lock, so a socket file left here is a crashed broker's.
                self.socket_path.unlink(missing_ok=True)
                self._listener = Listener.bind(self.socket_path)
        except BaseException:
            self._release_lock()
            raise
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._listener.fileno(), selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        log.info("broker listening on %s", self.socket_path)

    def _take_lock(self) -> int:
        path = self.config.runtime_dir / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BrokerRunning(f"a broker already serves {self.config.runtime_dir}") from None
            # The previous owner may have unlinked the file between our open and lock.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            (self.config.runtime_dir / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self) -> Broker:
        """Bind and serve in a background thread."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="alpc-broker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to shut down (safe from a signal handler); waits if it runs in a thread."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        if self._listener is None:
            self.bind()
        if on_ready is not None:
            on_ready()
        try:
            while not self._stopping:
                for key, events in self._selector.select():
                    self._on_event(key.fd, events)
        finally:
            self._shutdown()
            self._finished.set()

    def _on_event(self, fd: int, events: int) -> None:
        assert self._listener is not None
        if fd == self._wake_r:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        elif fd == self._listener.fileno():
            self._accept()
        elif fd in self._peers:
            peer = self._peers[fd]
            try:
                if events & selectors.EVENT_WRITE:
                    self._flush(peer)
                if events & selectors.EVENT_READ and fd in self._peers:
                    self._read(peer)
            except Exception:  # one bad peer must never take the broker down
                log.exception("unexpected error serving %s", peer.describe())
                self._drop(peer, "internal error")

    def _shutdown(self) -> None:
        notice = control.Shutdown(reason="the broker is shutting down")
        for peer in list(self._peers.values()):
            for item in peer.outbox:
                if item.handoff is not None:
                    self._tell_shutdown(item.handoff, notice)
            peer.outbox.clear()
            self._tell_shutdown(peer.stream, notice)
            self._drop(peer, None)
        if self._listener is not None:
            self._listener.close(unlink=self._listen_fd is None)
            self._listener = None
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        self._release_lock()
        log.info("broker stopped")

    @staticmethod
    def _tell_shutdown(stream: Stream, notice: control.Shutdown) -> None:
        try:
            stream.try_send(_frame(notice))
        except AlpcError:
            pass
        stream.close()

    # -- connections -----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while (stream := self._listener.accept()) is not None:
            try:
                cred = stream.peer_cred()
            except OSError:
                stream.close()
                continue
            peer = _Peer(stream, cred)
            self._peers[stream.fileno()] = peer
            self._selector.register(stream.fileno(), selectors.EVENT_READ, None)

    def _read(self, peer: _Peer) -> None:
        # Read at most one frame's worth: a connecting client's socket is handed
        # to the server, and every byte after its CONNECT frame belongs there.
        data = peer.stream.recv(peer.decoder.wanted())
        if data is None:
            return
        if not data:
            self._drop(peer, None)
            return
        try:
            for frame in peer.decoder.feed(data):
                self._handle(peer, frame)
                if peer.stream.fileno() not in self._peers:
                    return
        except ProtocolError as exc:
            self._drop(peer, f"protocol error: {exc}")

    def _handle(self, peer: _Peer, frame: Frame) -> None:
        if frame.type is MessageType.CREATE_PORT:
            self._create_port(peer, control.decode_body(frame.type, frame.data, control.CreatePort))
        elif frame.type is MessageType.CONNECT:
            self._connect(peer, control.decode_body(frame.type, frame.data, control.Connect))
        elif frame.type is MessageType.LIST_PORTS:
            control.decode_body(frame.type, frame.data, control.ListPorts)
            peer.decoder.set_limits(_limits(_QUERY_TYPES))
            self._send(peer, _frame(self._port_list()))
        elif frame.type is MessageType.PORT_STATUS:
            status = control.decode_body(frame.type, frame.data, control.PortStatus)
            if peer.port is not None:
                self._ports[peer.port].clients = status.clients

    def _refuse(self, peer: _Peer, code: str, message: str) -> None:
        log.warning("refused %s: %s", peer.describe(), message)
        self._send(peer, _frame(control.ErrorReply(code=code, message=message)))
        peer.close_when_flushed = True
        self._flush(peer)

    def _create_port(self, peer: _Peer, request: control.CreatePort) -> None:
        try:
            control.validate_port_name(request.name)
        except AlpcError as exc:
            self._refuse(peer, control.ErrorCode.INVALID_NAME, str(exc))
            return
        if request.name in self._ports:
            owner = self._ports[request.name].owner
            self._refuse(peer, control.ErrorCode.NAME_IN_USE,
                         f"port {request.name!r} is owned by live {owner.describe()}")
            return
        self._ports[request.name] = _Port(request.name, peer, request)
        peer.port = request.name
        peer.decoder.set_limits(_limits(_SERVER_TYPES))
        log.info("port %r created by %s", request.name, peer.describe())
        self._send(peer, _frame(control.PortCreated(name=request.name)))

    def _connect(self, peer: _Peer, request: control.Connect) -> None:
        port = self._ports.get(request.name)
        if port is None:
            self._refuse(peer, control.ErrorCode.NOT_FOUND, f"no port named {request.name!r}")
            return
        if len(request.data) > port.request.max_connect_data:
            self._refuse(peer, control.ErrorCode.TOO_LARGE,
                         f"connect data of {len(request.data)} bytes exceeds the port's "
                         f"max_connect_data of {port.request.max_connect_data}")
            return
        if len(port.owner.outbox) >= port.request.max_pending_connects:
            self._refuse(peer, control.ErrorCode.BUSY,
                         f"port {request.name!r} has {len(port.owner.outbox)} connects waiting; try again")
            return
        # From here on the client's socket belongs to the server.
        self._forget(peer)
        info = control.ConnectionRequestInfo(name=request.name, data=request.data,
                                             max_message_length=request.max_message_length,
                                             max_section_bytes=request.max_section_bytes)
        port.owner.outbox.append(_Outgoing(_frame(info, n_fds=1), [peer.stream.fileno()], peer.stream))
        self._flush(port.owner)

    def _port_list(self) -> control.PortList:
        return control.PortList(ports=tuple(
            control.PortInfo(name=port.name, pid=port.owner.cred.pid, uid=port.owner.cred.uid,
                             gid=port.owner.cred.gid, max_message_length=port.request.max_message_length,
                             clients=port.clients)
            for port in sorted(self._ports.values(), key=lambda p: p.name)
        ))

    # -- output ------------------------------------------------------------------

    def _send(self, peer: _Peer, buffers: list[memoryview]) -> None:
        peer.outbox.append(_Outgoing(buffers, []))
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        fd = peer.stream.fileno()
        try:
            while peer.outbox:
                item = peer.outbox[0]
                written = peer.stream.try_send(item.buffers, item.fds)
                if not written:
                    break
                item.fds = []  # they rode with the first byte
                advance_buffers(item.buffers, written)
                if not item.buffers:
                    peer.outbox.popleft()
                    if item.handoff is not None:
                        item.handoff.close()
        except (AlpcError, OSError) as exc:
            self._drop(peer, f"send failed: {exc}")
            return
        if not peer.outbox and peer.close_when_flushed:
            self._drop(peer, None)
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbox else 0)
        if self._selector.get_key(fd).events != wanted:
            self._selector.modify(fd, wanted, None)

    # -- removal -----------------------------------------------------------------

    def _forget(self, peer: _Peer) -> None:
        """Stop watching a peer without closing its socket."""
        fd = peer.stream.fileno()
        self._peers.pop(fd, None)
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _drop(self, peer: _Peer, problem: str | None) -> None:
        if problem is not None:
            log.warning("dropping %s: %s", peer.describe(), problem)
        self._forget(peer)
        for item in peer.outbox:
            if item.handoff is not None:
                item.handoff.close()
        peer.outbox.clear()
        if peer.port is not None and self._ports.get(peer.port, None) is not None:
            if self._ports[peer.port].owner is peer:
                log.info("port %r released by %s", peer.port, peer.describe())
                del self._ports[peer.port]
        peer.stream.close()


_PORT_LIST_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.PORT_LIST, MessageType.ERROR, MessageType.SHUTDOWN}),
    max_data=control.MAX_CONTROL_BODY,
)


def list_ports(config: Config | None = None, timeout: float | None = 5.0) -> tuple[control.PortInfo, ...]:
    """Ask the broker for its live ports, their owners and connected clients."""
    config = config or Config.from_env()
    deadline = deadline_after(timeout)
    stream = Stream.connect(config.broker_socket, timeout)
    try:
        stream.send(control_frame(control.ListPorts()), deadline=deadline)
        frame, _ = read_frame(stream, FrameDecoder(_PORT_LIST_LIMITS), deadline, "the port list")
    finally:
        stream.close()
    if frame is None or frame.type is MessageType.SHUTDOWN:
        raise BrokerUnavailable("the broker went away before answering")
    if frame.type is MessageType.ERROR:
        raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
    return control.decode_body(frame.type, frame.data, control.PortList).ports
