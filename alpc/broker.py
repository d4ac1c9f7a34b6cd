"""The broker daemon: owns the port namespace and brokers connects.

One thread runs a selector loop over non-blocking sockets. A client's own
connected socket is handed to the server with SCM_RIGHTS, so SO_PEERCRED on the
server's end names the client (kernel-verified) and the broker is out of the
data path from then on: an established connection survives a broker crash.

The broker also answers introspection queries (ports, peers, stats) from the
figures servers report over their registration streams, and can hand its
sockets to a successor for a restart that loses nothing (see ``handover``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import resource
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import control, handover
from .config import Config, config_or_default, ensure_runtime_dir
from .errors import AlpcError, BrokerRunning, BrokerUnavailable, ProtocolError
from .exchange import control_frame, read_frame
from .logs import LogLimiter, fields
from .quotas import BROKER_DEFAULTS, BrokerLimits, Limit, UidUsage
from .security import ROOT_UID, AclDecision, PeerCred, PortAcl, may_inspect, may_replace_broker, may_see_settings
from .stats import MAX_AGES
from .transport import Listener, Stream, advance_buffers, close_fds, deadline_after, is_live_socket
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, encode_header

__all__ = ["MAX_REQUEST", "TICK", "Broker", "list_ports"]

log = logging.getLogger(__name__)

# No broker request legitimately needs more: connect data is bounded far below (config.MAX_CONNECT_DATA).
MAX_REQUEST = 1024 * 1024
LOCK_NAME = "broker.lock"
# Housekeeping (suppressed-log summaries, service status) runs this often.
TICK = 1.0
# Out of fds, the listener stays readable with the connections it cannot take: it is left
# unwatched this long (those clients wait in the backlog) instead of spinning the loop.
ACCEPT_PAUSE = 0.1
# How long a successor may wait for the lock its predecessor releases.
LOCK_WAIT = 5.0
# msgpack's largest int: a server's report may hold anything up to it, a sum must stay below.
_MAX_COUNT = 2**64 - 1
# PortLimits.handle_kinds names HandleKinds (a few, short); room for kinds a newer server knows.
_MAX_HANDLE_KINDS = 64
_MAX_HANDLE_KIND_LENGTH = 32

_QUERY_TYPES = frozenset({MessageType.LIST_PORTS, MessageType.PEERS, MessageType.STATS})
_NEW_PEER_TYPES = frozenset({MessageType.CREATE_PORT, MessageType.CONNECT, MessageType.HANDOVER}) | _QUERY_TYPES
_SERVER_TYPES = frozenset({MessageType.PORT_STATUS})
_ROLE_TYPES = {"new": _NEW_PEER_TYPES, "server": _SERVER_TYPES, "query": _QUERY_TYPES}


def _limits(types: frozenset[MessageType]) -> FrameLimits:
    return FrameLimits(allowed_types=types, max_data=MAX_REQUEST)


@dataclass
class _Outgoing:
    buffers: list[memoryview]
    fds: list[int]
    handoff: Stream | None = None
    # The uid whose socket ``handoff`` is: it counts against that uid's quota until closed.
    handoff_uid: int = -1


@dataclass
class _Peer:
    stream: Stream
    cred: PeerCred
    role: str = "new"
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(_limits(_NEW_PEER_TYPES)))
    outbox: deque[_Outgoing] = field(default_factory=deque)
    port: str | None = None
    close_when_flushed: bool = False
    counted: bool = False
    # A port owner's pidfd: its process's death ends the port even while a
    # child it forked still holds the socket (and hides the EOF).
    pidfd: int | None = None

    def describe(self) -> str:
        return f"pid {self.cred.pid} uid {self.cred.uid}"

    def become(self, role: str) -> None:
        self.role = role
        self.decoder.set_limits(_limits(_ROLE_TYPES[role]))

    def fields(self, port: str | None = None) -> dict[str, object]:
        return fields(port=port or self.port, pid=self.cred.pid, uid=self.cred.uid)


@dataclass
class _Port:
    name: str
    owner: _Peer
    request: control.CreatePort
    acl: PortAcl
    status: control.PortStatus | None = None
    status_at: float = 0.0
    connects_forwarded: int = 0
    quota_refusals: int = 0
    connects_refused: int = 0

    def clients(self) -> tuple[control.ClientInfo, ...]:
        return tuple(peer.client() for peer in self.status.peers) if self.status is not None else ()

    def report_age_ms(self, now: float) -> int:
        return int((now - self.status_at) * 1000) if self.status is not None else -1


def _frame(body: control.Body, n_fds: int = 0) -> list[memoryview]:
    payload = control.encode_body(body)
    header = encode_header(body.TYPE, len(payload), n_fds=n_fds, sender_pid=os.getpid())
    return [memoryview(header), memoryview(payload)]


class Broker:
    """The broker, runnable in a thread (``with Broker(dir):``) or as the daemon's main loop.

    ``listen_fd`` serves an inherited listening socket (socket activation);
    ``replace`` takes the sockets and state of the broker already running on
    the runtime dir instead of refusing to start. ``shared`` serves every local
    user (a 0755 runtime dir and a 0666 socket; each port's ACL then decides
    who may connect to it) instead of only the broker's own uid; ``limits``
    are the per-uid quotas. ``on_status`` is called with
    a one-line summary whenever it changes, ``on_stopping`` with the reason
    when the loop begins to shut down (both from the loop, for the service manager).
    """

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None, *, listen_fd: int | None = None,
                 replace: bool = False, on_status: Callable[[str], object] | None = None,
                 on_stopping: Callable[[str], object] | None = None, shared: bool = False,
                 limits: BrokerLimits = BROKER_DEFAULTS) -> None:
        # Checked now: any other limits were taken and the broker's thread died of an
        # AttributeError at its first connection; a truthy non-bool (shared="no") made it shared.
        if not isinstance(limits, BrokerLimits):
            raise TypeError(f"limits must be an alpc.BrokerLimits, not {type(limits).__name__}")
        if type(shared) is not bool:
            raise TypeError(f"shared must be a bool, not {type(shared).__name__}")
        self.config = Config.from_env(runtime_dir)
        self.shared = shared
        self.limits = limits
        self._usage = UidUsage(limits)
        self._refused_connections = 0
        self._refused_ports = 0
        self._refused_acl = 0
        self._listen_fd = listen_fd
        self._replace = replace
        self._on_status = on_status
        self._on_stopping = on_stopping
        self._stop_reason = "asked to stop"
        self._listener: Listener | None = None
        self._lock_fd: int | None = None
        self._selector = selectors.DefaultSelector()  # replaced, with the wake pipe, by bind()
        self._selector.close()
        self._wake_r = self._wake_w = -1
        self._peers: dict[int, _Peer] = {}
        # Port owners' pidfds (watched for reading: readable once the process exited).
        self._deaths: dict[int, _Peer] = {}
        self._ports: dict[str, _Port] = {}
        self._stopping = False
        # While out of fds: when to watch the listener again (None: it is watched).
        self._accept_paused_until: float | None = None
        self._handed_over_to: int | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._limited = LogLimiter(log)
        # Port created/released lines: any client can cycle ports; apart so they never starve warnings.
        self._lifecycle = LogLimiter(log)
        self._started = time.monotonic()
        self._next_tick = 0.0
        self._connects_unknown_port = 0
        self._protocol_errors = 0

    @property
    def socket_path(self) -> Path:
        if self._listener is not None and self._listener.path is not None:
            return self._listener.path
        return self.config.broker_socket

    @property
    def handed_over_to(self) -> int | None:
        """The successor's pid once this broker handed everything over."""
        return self._handed_over_to

    # -- lifecycle -----------------------------------------------------------------

    def bind(self) -> None:
        """Claim the runtime directory and listen; fails if another broker runs there."""
        ensure_runtime_dir(self.config.runtime_dir, shared=self.shared)
        _raise_fd_limit()
        taken = handover.request_handover(self.config) if self._replace else None
        if taken is not None:
            try:
                self._lock_fd = self._take_lock(wait=LOCK_WAIT)
                self._adopt(taken)
            except BaseException:
                # Another broker won the runtime dir (or the state could not be
                # served): close every socket we took, so that servers see the EOF
                # and register with whichever broker serves the dir now.
                for owner in list(self._deaths.values()):
                    self._unwatch_death(owner)
                self._peers.clear()
                self._ports.clear()
                self._usage = UidUsage(self.limits)
                self._listener = None
                taken.close()
                self._release_lock()
                raise
        else:
            if self._replace:
                log.info("no broker was running on %s; starting a new one", self.config.runtime_dir)
            self._lock_fd = self._take_lock()
            try:
                self._listener = self._listen()
            except BaseException:
                self._release_lock()
                raise
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self._listener is not None
        self._selector.register(self._listener.fileno(), selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for peer in self._peers.values():
            self._selector.register(peer.stream.fileno(), self._interest(peer), None)
        for pidfd in self._deaths:
            self._selector.register(pidfd, selectors.EVENT_READ, None)
        log.info("broker listening on %s", self.socket_path)

    def _listen(self) -> Listener:
        if self._listen_fd is not None:
            listener = Listener.from_fd(self._listen_fd)
            if listener.path != self.config.broker_socket:
                log.warning("the activated socket is %s, but clients look for %s",
                            listener.path or "unnamed", self.config.broker_socket)
            return listener
        # We hold the lock, so a socket file left here is a crashed broker's, unless someone
        # removed a running broker's lock file (a /tmp cleaner, say): never steal a live socket.
        if is_live_socket(self.config.broker_socket):
            raise BrokerRunning(f"a broker already listens on {self.config.broker_socket} "
                                f"(its {LOCK_NAME} was removed)")
        self.config.broker_socket.unlink(missing_ok=True)
        return Listener.bind(self.config.broker_socket, shared=self.shared)

    def _take_lock(self, wait: float = 0.0) -> int:
        path = self.config.runtime_dir / LOCK_NAME
        give_up = time.monotonic() + wait
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= give_up:
                    raise BrokerRunning(f"a broker already serves {self.config.runtime_dir}") from None
                # handshake-free: flock has no timed wait; the predecessor is exiting.
                time.sleep(0.01)
                continue
            # The previous owner may have unlinked the file between our open and lock.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            path = self.config.runtime_dir / LOCK_NAME
            ours = os.fstat(self._lock_fd)
            try:
                found = os.lstat(path)
                # Only our lock file: a broker that started after ours was removed holds the one there.
                if (found.st_dev, found.st_ino) == (ours.st_dev, ours.st_ino):
                    path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self) -> Broker:
        """Bind and serve in a background thread."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="alpc-broker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0, reason: str = "asked to stop") -> None:
        """Ask the loop to shut down; waits if it runs in a thread.

        Safe from a signal handler: it only sets a flag and writes a byte (no
        logging there, which could re-enter a write the handler interrupted).
        """
        self._stop_reason = reason
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
        try:
            if on_ready is not None:
                on_ready()  # in the try: a callback that fails (a bad --ready-fd) must not leave the socket behind
            while not self._stopping:
                for key, events in self._selector.select(self._select_timeout()):
                    if self._selector.get_map().get(key.fd) is not key:
                        # Closed by an earlier event of this batch (and its number maybe another
                        # file's since, a new server's pidfd say): this event is that old file's.
                        continue
                    self._on_event(key.fd, events)
                    if self._handed_over_to is not None:
                        return
                self._resume_accepting()
                self._tick()
        finally:
            if self._handed_over_to is None:
                self._shutdown()
            self._finished.set()

    def _select_timeout(self) -> float:
        if self._accept_paused_until is None:
            return TICK
        return max(0.0, min(TICK, self._accept_paused_until - time.monotonic()))

    def _pause_accepting(self) -> None:
        """Out of fds: stop watching the listener for ACCEPT_PAUSE (it would wake the loop at once)."""
        assert self._listener is not None
        self._limited.log(logging.WARNING, ("accept", "starved"),
                          "out of file descriptors: new connections wait in the listen backlog")
        self._selector.unregister(self._listener.fileno())
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is None or time.monotonic() < self._accept_paused_until:
            return
        self._accept_paused_until = None
        if self._listener is not None:
            self._selector.register(self._listener.fileno(), selectors.EVENT_READ, None)
            self._accept()  # what waited meanwhile, without another trip through select

    def _tick(self) -> None:
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK
        self._limited.flush()
        self._lifecycle.flush()
        if self._on_status is not None:
            self._on_status(self.status_line())

    def status_line(self) -> str:
        servers = sum(1 for peer in self._peers.values() if peer.role == "server")
        clients = sum(port.status.peers_total for port in self._ports.values() if port.status is not None)
        return f"{len(self._ports)} ports, {servers} servers, {clients} connected clients"

    def _on_event(self, fd: int, events: int) -> None:
        assert self._listener is not None
        if fd == self._wake_r:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        elif fd == self._listener.fileno():
            self._accept()
        elif fd in self._deaths:
            self._drop(self._deaths[fd], None)
        elif fd in self._peers:
            peer = self._peers[fd]
            try:
                if events & selectors.EVENT_WRITE:
                    self._flush(peer)
                if events & selectors.EVENT_READ and fd in self._peers:
                    self._read(peer)
            except Exception:  # one bad peer must never take the broker down
                log.exception("unexpected error serving %s", peer.describe(), extra=peer.fields())
                self._drop(peer, "internal error")

    def _shutdown(self) -> None:
        log.info("stopping: %s", self._stop_reason)
        if self._on_stopping is not None:
            self._on_stopping(self._stop_reason)
        notice = control.Shutdown(reason="the broker is shutting down")
        for peer in list(self._peers.values()):
            for item in peer.outbox:
                if item.handoff is not None:
                    self._tell_shutdown(item.handoff, notice)
                    item.handoff = None
            peer.outbox.clear()
            self._tell_shutdown(peer.stream, notice)
            self._drop(peer, None)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._close_loop()
        log.info("broker stopped")

    def _close_loop(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        self._release_lock()

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
            if not self._usage.may_connect(cred.uid):
                self._refused_connections += 1
                self._turn_away(peer, Limit.MAX_CONNECTIONS_PER_UID,
                                f"uid {cred.uid} holds {self._usage.connections(cred.uid)} connections to the "
                                f"broker, its max_connections_per_uid")
                continue
            self._usage.add_connection(cred.uid)
            peer.counted = True
            self._peers[stream.fileno()] = peer
            self._selector.register(stream.fileno(), selectors.EVENT_READ, None)
        if self._listener.starved:
            self._pause_accepting()

    def _turn_away(self, peer: _Peer, limit: Limit, message: str) -> None:
        """Refuse a socket the broker will not hold: one non-blocking answer, then close."""
        self._limited.log(logging.WARNING, (limit, peer.cred.uid), f"refused {peer.describe()}: {message}",
                          extra=peer.fields())
        try:
            peer.stream.try_send(_frame(control.ErrorReply(code=control.ErrorCode.BUSY, message=message,
                                                           limit=limit)))
        except AlpcError:
            pass
        peer.stream.close()

    def _read(self, peer: _Peer) -> None:
        # Read at most one frame's worth: a connecting client's socket is handed
        # to the server, and every byte after its CONNECT frame belongs there.
        # A header read alone is followed at once by its body (usually there
        # already) rather than by another turn of the event loop.
        while True:
            data = peer.stream.recv(peer.decoder.wanted())
            if data is None:
                return
            if not data:
                self._drop(peer, None)
                return
            try:
                frames = peer.decoder.feed(data)
                for frame in frames:
                    self._handle(peer, frame)
                    if peer.stream.fileno() not in self._peers or self._handed_over_to is not None:
                        return
            except ProtocolError as exc:
                self._protocol_errors += 1
                self._drop(peer, f"protocol error: {exc}")
                return
            if frames:
                return

    def _handle(self, peer: _Peer, frame: Frame) -> None:
        kind = frame.type
        if kind is MessageType.CREATE_PORT:
            self._create_port(peer, control.decode_body(kind, frame.data, control.CreatePort))
        elif kind is MessageType.CONNECT:
            request = control.decode_body(kind, frame.data, control.Connect)
            request.flow.limits()  # what no honest client announces never reaches a server
            control.check_connect_limits(request)
            self._connect(peer, request)
        elif kind is MessageType.PORT_STATUS:
            status = control.decode_body(kind, frame.data, control.PortStatus)
            port = self._ports.get(peer.port) if peer.port is not None else None
            if port is not None and port.owner is peer:
                port.status, port.status_at = _trimmed(status), time.monotonic()
        elif kind is MessageType.HANDOVER:
            self._hand_over(peer, control.decode_body(kind, frame.data, control.Handover))
        else:
            self._query(peer, frame)

    def _query(self, peer: _Peer, frame: Frame) -> None:
        peer.become("query")
        kind = frame.type
        if kind is MessageType.LIST_PORTS:
            control.decode_body(kind, frame.data, control.ListPorts)
            answer = _fitted(self._port_list(peer))
            if answer is None:
                self._refuse(peer, control.ErrorCode.TOO_LARGE,
                             f"the list of the ports uid {peer.cred.uid} may inspect exceeds "
                             f"{control.MAX_CONTROL_BODY} bytes even without their clients")
                return
            self._send(peer, _frame(answer))
        elif kind is MessageType.PEERS:
            name = control.decode_body(kind, frame.data, control.Peers).name
            port = self._inspected_port(peer, name)
            if port is not None:
                status = port.status or control.PortStatus()
                self._send(peer, _frame(control.PeerList(
                    name=port.name, pid=port.owner.cred.pid, report_age_ms=port.report_age_ms(time.monotonic()),
                    peers_total=status.peers_total, peers=status.peers)))
        elif kind is MessageType.STATS:
            name = control.decode_body(kind, frame.data, control.Stats).name
            if name:
                port = self._inspected_port(peer, name)
                ports = [port] if port is not None else None
            else:
                ports = self._visible_ports(peer)
            if ports is not None:
                self._send(peer, _frame(self._stats(sorted(ports, key=lambda p: p.name), peer.cred)))

    def _inspected_port(self, peer: _Peer, name: str) -> _Port | None:
        """The port ``name`` if it exists and ``peer`` may see its details; else refuse and None."""
        port = self._ports.get(name)
        if port is None:
            self._refuse(peer, control.ErrorCode.NOT_FOUND, f"no port named {name!r}", name)
            return None
        decision = self._may_inspect(peer, port, self._peer_groups(peer, name))
        if not decision.allowed:
            self._refuse(peer, control.ErrorCode.ACCESS_DENIED,
                         f"uid {peer.cred.uid} may not inspect port {name!r}: {decision.reason}", name)
            return None
        return port

    def _visible_ports(self, peer: _Peer) -> list[_Port]:
        """The ports ``peer`` may inspect (``alpc ports``, ``alpc stats``), by name."""
        groups = self._peer_groups(peer)
        ports = sorted(self._ports.values(), key=lambda p: p.name)
        return [port for port in ports if self._may_inspect(peer, port, groups).allowed]

    @staticmethod
    def _may_inspect(peer: _Peer, port: _Port, groups: tuple[int, ...] | None) -> AclDecision:
        return may_inspect(peer.cred, groups, port.owner.cred.uid, port.acl)

    def _peer_groups(self, peer: _Peer, port: str | None = None) -> tuple[int, ...] | None:
        """The peer's supplementary groups, from the kernel (SO_PEERGROUPS); None if it will not say
        (not "no groups": the ACL then refuses the peer where a denied group could have)."""
        try:
            return tuple(peer.stream.peer_groups())
        except OSError as exc:
            log.warning("SO_PEERGROUPS failed for %s: %s", peer.describe(), exc, extra=peer.fields(port))
            return None

    def _refuse(self, peer: _Peer, code: str, message: str, port: str | None = None,
                level: int = logging.WARNING, limit: str = "") -> None:
        """Answer with an error and hang up; logged once per peer and reason, never flooding."""
        self._limited.log(level, (code, peer.cred.uid, peer.cred.pid), f"refused {peer.describe()}: {message}",
                          extra=peer.fields(port))
        self._send(peer, _frame(control.ErrorReply(code=code, message=message, limit=limit)))
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
                         f"port {request.name!r} is owned by live {owner.describe()}", request.name)
            return
        if not self._usage.may_create_port(peer.cred.uid):
            self._refused_ports += 1
            self._refuse(peer, control.ErrorCode.BUSY,
                         f"uid {peer.cred.uid} owns {self._usage.ports(peer.cred.uid)} ports, its max_ports_per_uid",
                         request.name, limit=Limit.MAX_PORTS_PER_UID)
            return
        try:
            acl = request.acl.acl()
        except ProtocolError as exc:
            self._refuse(peer, control.ErrorCode.BAD_REQUEST, str(exc), request.name)
            return
        kinds = request.limits.handle_kinds
        if (len(kinds) > _MAX_HANDLE_KINDS or len(set(kinds)) != len(kinds)
                or any(len(kind) > _MAX_HANDLE_KIND_LENGTH for kind in kinds)):
            self._refuse(peer, control.ErrorCode.BAD_REQUEST,
                         f"handle_kinds must be at most {_MAX_HANDLE_KINDS} distinct kind names of at most "
                         f"{_MAX_HANDLE_KIND_LENGTH} characters", request.name)
            return
        # Kept for the port's life and shown to its owner and root: as the ACL is, without duplicates.
        request = dataclasses.replace(request, acl=control.AclSpec.of(acl))
        self._ports[request.name] = _Port(request.name, peer, request, acl)
        self._usage.add_port(peer.cred.uid)
        peer.port = request.name
        peer.become("server")
        if not self._watch_death(peer):
            self._drop(peer, None)  # its owner died before we read the request: nobody to serve it
            return
        self._lifecycle.log(logging.INFO, ("created", peer.cred.uid, request.name),
                            f"port {request.name!r} created by {peer.describe()}", extra=peer.fields())
        self._send(peer, _frame(control.PortCreated(name=request.name)))

    def _connect(self, peer: _Peer, request: control.Connect) -> None:
        port = self._ports.get(request.name)
        if port is None:
            self._connects_unknown_port += 1
            self._refuse(peer, control.ErrorCode.NOT_FOUND, f"no port named {request.name!r}", request.name,
                         level=logging.INFO)
            return
        if not self._admit(peer, port, request):
            return
        if len(request.data) > port.request.max_connect_data:
            port.connects_refused += 1
            self._refuse(peer, control.ErrorCode.TOO_LARGE,
                         f"connect data of {len(request.data)} bytes exceeds the port's "
                         f"max_connect_data of {port.request.max_connect_data}", port.name)
            return
        if len(port.owner.outbox) >= port.request.max_pending_connects:
            port.connects_refused += 1
            port.quota_refusals += 1
            self._refuse(peer, control.ErrorCode.BUSY,
                         f"port {request.name!r} has {len(port.owner.outbox)} connects waiting "
                         f"(max_pending_connects); try again", port.name, limit=Limit.MAX_PENDING_CONNECTS)
            return
        # From here on the client's socket belongs to the server (it still counts for its uid here).
        port.connects_forwarded += 1
        self._forget(peer)
        info = control.ConnectionRequestInfo(name=request.name, data=request.data,
                                             max_message_length=request.max_message_length,
                                             max_section_bytes=request.max_section_bytes, flow=request.flow,
                                             quick=request.quick)
        port.owner.outbox.append(_Outgoing(_frame(info, n_fds=1), [peer.stream.fileno()], peer.stream,
                                           peer.cred.uid))
        self._flush(port.owner)

    def _admit(self, peer: _Peer, port: _Port, request: control.Connect) -> bool:
        """The port's ACL and the client's pinned server uid, checked before the server hears a word.

        Identity is the kernel's: SO_PEERCRED and SO_PEERGROUPS of the client's
        own socket, never anything it wrote.
        """
        owner_uid = port.owner.cred.uid
        decision = port.acl.check(peer.cred, self._peer_groups(peer, port.name), owner_uid)
        if not decision.allowed:
            port.connects_refused += 1
            self._refused_acl += 1
            self._refuse(peer, control.ErrorCode.ACCESS_DENIED,
                         f"access to port {port.name!r} denied: {decision.reason}", port.name)
            return False
        if request.required_server_uid >= 0 and request.required_server_uid != owner_uid:
            port.connects_refused += 1
            self._refuse(peer, control.ErrorCode.ACCESS_DENIED,
                         f"port {port.name!r} is owned by uid {owner_uid}, not the required "
                         f"uid {request.required_server_uid}", port.name)
            return False
        return True

    def _port_list(self, viewer: _Peer) -> control.PortList:
        """The ports ``viewer`` may inspect, with their clients; the ACL and quota usage to owner and root."""
        ports = []
        for port in self._visible_ports(viewer):
            settings = may_see_settings(viewer.cred, port.owner.cred.uid)
            ports.append(control.PortInfo(
                name=port.name, pid=port.owner.cred.pid, uid=port.owner.cred.uid, gid=port.owner.cred.gid,
                max_message_length=port.request.max_message_length, clients=port.clients(), details=True,
                limits=port.request.limits, acl=port.request.acl if settings else control.AclSpec(),
                owner_quota=self._owner_quota(port.owner.cred.uid, settings)))
        return control.PortList(ports=tuple(ports))

    def _stats(self, ports: list[_Port], viewer: PeerCred) -> control.StatsList:
        now = time.monotonic()
        return control.StatsList(
            uptime_ms=int((now - self._started) * 1000), connects_unknown_port=self._connects_unknown_port,
            protocol_errors=self._protocol_errors, ports=tuple(self._port_stats(port, now) for port in ports),
            broker=self._quota(viewer))

    @staticmethod
    def _port_stats(port: _Port, now: float) -> control.PortStats:
        status = port.status or control.PortStatus()
        return control.PortStats(
            name=port.name, pid=port.owner.cred.pid, uid=port.owner.cred.uid, connections=status.peers_total,
            report_age_ms=port.report_age_ms(now), connects_forwarded=port.connects_forwarded,
            # The broker's refusals (max_pending_connects) and the server's (max_connections).
            quota_refusals=min(port.quota_refusals + status.counters.quota_refusals, _MAX_COUNT),
            connects_refused=port.connects_refused, counters=status.counters)

    def _owner_quota(self, uid: int, details: bool) -> control.OwnerQuota:
        limits = self.limits
        if not details:
            return control.OwnerQuota(limits.max_connections_per_uid, limits.max_ports_per_uid)
        return control.OwnerQuota(limits.max_connections_per_uid, limits.max_ports_per_uid,
                                  self._usage.connections(uid), self._usage.ports(uid))

    def _quota(self, viewer: PeerCred) -> control.BrokerQuota:
        """The broker's quotas, and how much of them the viewer's uid uses (every uid's, for root)."""
        uids = self._usage.uids() if viewer.uid == ROOT_UID else [viewer.uid]
        return control.BrokerQuota(
            shared=self.shared, max_connections_per_uid=self.limits.max_connections_per_uid,
            max_ports_per_uid=self.limits.max_ports_per_uid, refused_connections=self._refused_connections,
            refused_ports=self._refused_ports, refused_acl=self._refused_acl,
            usage=tuple(control.UidUsageInfo(uid=uid, connections=self._usage.connections(uid),
                                             ports=self._usage.ports(uid)) for uid in uids))

    # -- graceful restart --------------------------------------------------------------

    def _hand_over(self, peer: _Peer, request: control.Handover) -> None:
        if not may_replace_broker(peer.cred, os.getuid()):
            self._refuse(peer, control.ErrorCode.ACCESS_DENIED,
                         f"uid {peer.cred.uid} may not take over a broker of uid {os.getuid()}")
            return
        assert self._listener is not None
        log.info("handing over to pid %d", peer.cred.pid, extra=peer.fields())
        self._forget(peer)
        self._uncount(peer)
        deadline = deadline_after(handover.HANDOVER_TIMEOUT)
        try:
            handover.send_state(peer.stream, self._export(), self._listener.owns_file, deadline)
            done = handover.await_done(peer.stream, deadline)
        except (AlpcError, OSError) as exc:
            done = False
            log.error("handover to pid %d failed (%s); serving on", peer.cred.pid, exc, extra=peer.fields())
        if not done:
            peer.stream.close()
            return
        self._let_go()
        self._handed_over_to = peer.cred.pid
        log.info("handed over to pid %d", peer.cred.pid)
        peer.stream.close()  # tells the successor the lock is free

    def _export(self) -> handover.BrokerState:
        """A description of everything this broker holds; nothing is changed or closed."""
        assert self._listener is not None
        state = handover.BrokerState(self._listener)
        index: dict[int, int] = {}
        for fd, peer in self._peers.items():
            index[fd] = len(state.peers)
            outbox = [handover.ItemState(b"".join(bytes(b) for b in item.buffers),
                                         item.handoff if item.fds else None) for item in peer.outbox]
            state.peers.append(handover.PeerState(peer.stream, peer.role, peer.decoder.partial(),
                                                  peer.close_when_flushed, outbox))
        for port in self._ports.values():
            state.ports.append(handover.PortState(
                port.name, index[port.owner.stream.fileno()], port.request, port.connects_forwarded,
                port.quota_refusals, port.connects_refused, port.status))
        return state

    def _let_go(self) -> None:
        """Close our copies of every socket without a word: the successor holds the same ones."""
        for peer in self._peers.values():
            for item in peer.outbox:
                if item.handoff is not None:
                    item.handoff.close()
            self._unwatch_death(peer)
            peer.stream.close()
        self._peers.clear()
        self._ports.clear()
        if self._listener is not None:
            self._listener.close(unlink=False)
            self._listener = None
        self._close_loop()
        self._stopping = True

    def _adopt(self, state: handover.BrokerState) -> None:
        """Serve what a predecessor handed over; identities are read afresh from the sockets."""
        self._listener = state.listener
        peers: list[_Peer | None] = []
        for item in state.peers:
            try:
                cred = item.stream.peer_cred()
            except OSError:
                cred = None
            peer = _Peer(item.stream, cred, close_when_flushed=item.close_when_flushed) if cred is not None else None
            if peer is not None:
                try:
                    peer.become(item.role)
                    # A predecessor only ever hands on the prefix of one frame.
                    if peer.decoder.feed(item.inbound):
                        raise ProtocolError("the half-read bytes hold a whole frame")
                except ProtocolError as exc:
                    log.warning("dropping a handed-over connection: %s", exc, extra=peer.fields())
                    peer.decoder.close_fds()
                    peer = None
            if peer is None:
                peers.append(None)
                item.stream.close()
                for out in item.outbox:
                    if out.handoff is not None:
                        out.handoff.close()
                continue
            peer.counted = True
            self._usage.add_connection(peer.cred.uid)
            for out in item.outbox:
                fds = [out.handoff.fileno()] if out.handoff is not None else []
                uid = self._handoff_uid(out.handoff)
                peer.outbox.append(_Outgoing([memoryview(out.data)], fds, out.handoff, uid))
            self._peers[item.stream.fileno()] = peer
            peers.append(peer)
        for port in state.ports:
            owner = peers[port.owner]
            if owner is None:
                continue
            try:
                acl = port.request.acl.acl()
            except ProtocolError:
                acl = PortAcl()  # the safe default: the owner's uid only
            owner.port = port.name
            if not self._watch_death(owner):
                self._drop(owner, None)  # died during the handover: a worker it forked may hold the socket
                continue
            self._ports[port.name] = _Port(port.name, owner, port.request, acl, port.status,
                                           time.monotonic() if port.status is not None else 0.0,
                                           port.connects_forwarded, port.quota_refusals, port.connects_refused)
            self._usage.add_port(owner.cred.uid)
        log.info("took over %d ports and %d connections (socket %s)", len(self._ports), len(self._peers),
                 state.listener.path)

    def _watch_death(self, peer: _Peer) -> bool:
        """Watch a port owner's process: a worker it forked may keep its socket (and the port) open.

        False if the owner is gone already (a kernel without SO_PEERPIDFD cannot open a pidfd of
        a reaped process, which is not the same as having no pidfds at all).
        """
        try:
            pidfd = peer.stream.peer_pidfd()
        except ProcessLookupError:
            return False
        except OSError:
            pidfd = None
        if pidfd is None:
            return True  # no pidfds in this kernel: the EOF alone ends the port
        peer.pidfd = pidfd
        self._deaths[pidfd] = peer
        if self._listener is not None and self._wake_r >= 0:  # serving (not adopting before bind)
            self._selector.register(pidfd, selectors.EVENT_READ, None)
        return True

    def _unwatch_death(self, peer: _Peer) -> None:
        pidfd, peer.pidfd = peer.pidfd, None
        if pidfd is None:
            return
        self._deaths.pop(pidfd, None)
        try:
            self._selector.unregister(pidfd)
        except (KeyError, ValueError):
            pass
        close_fds([pidfd])

    def _handoff_uid(self, handoff: Stream | None) -> int:
        if handoff is None:
            return -1
        try:
            uid = handoff.peer_cred().uid
        except OSError:
            return -1
        self._usage.add_connection(uid)
        return uid

    # -- output ------------------------------------------------------------------

    def _send(self, peer: _Peer, buffers: list[memoryview]) -> None:
        peer.outbox.append(_Outgoing(buffers, []))
        self._flush(peer)

    @staticmethod
    def _interest(peer: _Peer) -> int:
        if not peer.outbox:
            return selectors.EVENT_READ
        # A server's reports and hang-up are read whatever waits for it; anyone else gets
        # no further request read (and no further answer queued) until it took the last one.
        if peer.role == "server":
            return selectors.EVENT_READ | selectors.EVENT_WRITE
        return selectors.EVENT_WRITE

    def _flush(self, peer: _Peer) -> None:
        fd = peer.stream.fileno()
        try:
            while peer.outbox:
                item = peer.outbox[0]
                try:
                    written = peer.stream.try_send(item.buffers, item.fds)
                except OSError as exc:
                    if isinstance(exc, AlpcError) or not item.fds:
                        raise
                    # Nothing of it went out: the kernel would not pass this client's socket on
                    # (ETOOMANYREFS: the broker's uid has too many fds in flight, in the sockets
                    # of servers that do not read theirs). Refuse that client; the port stays.
                    peer.outbox.popleft()
                    self._refuse_handoff(peer, item, exc)
                    continue
                if not written:
                    break
                item.fds = []  # they rode with the first byte
                advance_buffers(item.buffers, written)
                if not item.buffers:
                    peer.outbox.popleft()
                    self._close_handoff(item)
        except (AlpcError, OSError) as exc:
            self._drop(peer, f"send failed: {exc}")
            return
        if not peer.outbox and peer.close_when_flushed:
            self._drop(peer, None)
            return
        wanted = self._interest(peer)
        if self._selector.get_key(fd).events != wanted:
            self._selector.modify(fd, wanted, None)

    def _refuse_handoff(self, owner: _Peer, item: _Outgoing, exc: OSError) -> None:
        """A client socket that could not be passed to ``owner``: tell the client, then let it go."""
        port = self._ports.get(owner.port) if owner.port is not None else None
        if port is not None and port.owner is owner:
            port.connects_refused += 1
            port.quota_refusals += 1
        message = f"the broker cannot pass a connection to port {owner.port!r} on now: {exc.strerror}; try again"
        self._limited.log(logging.WARNING, ("handoff", owner.port, exc.errno), message, extra=owner.fields())
        if item.handoff is not None:
            try:
                item.handoff.try_send(_frame(control.ErrorReply(code=control.ErrorCode.BUSY, message=message,
                                                                limit=Limit.MAX_PENDING_CONNECTS)))
            except (AlpcError, OSError):
                pass
        self._close_handoff(item)

    # -- removal -----------------------------------------------------------------

    def _close_handoff(self, item: _Outgoing) -> None:
        """The broker's copy of a client socket it handed on: close it, and stop counting it."""
        if item.handoff is not None:
            item.handoff.close()
            item.handoff = None
            if item.handoff_uid >= 0:
                self._usage.remove_connection(item.handoff_uid)

    def _uncount(self, peer: _Peer) -> None:
        if peer.counted:
            peer.counted = False
            self._usage.remove_connection(peer.cred.uid)

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
            self._limited.log(logging.WARNING, ("drop", peer.cred.uid, peer.cred.pid),
                              f"dropping {peer.describe()}: {problem}", extra=peer.fields())
        self._forget(peer)
        self._uncount(peer)
        self._unwatch_death(peer)
        for item in peer.outbox:
            self._close_handoff(item)
        peer.outbox.clear()
        if peer.port is not None and self._ports.get(peer.port, None) is not None:
            if self._ports[peer.port].owner is peer:
                self._lifecycle.log(logging.INFO, ("released", peer.cred.uid, peer.port),
                                    f"port {peer.port!r} released by {peer.describe()}", extra=peer.fields())
                del self._ports[peer.port]
                self._usage.remove_port(peer.cred.uid)
        peer.stream.close()


def _raise_fd_limit() -> None:
    """Take the hard RLIMIT_NOFILE as the soft one: the broker's fds are its capacity.

    max_connections_per_uid keeps one user from using up the broker's fds only
    while the broker may hold more than one uid's quota; service managers start
    it with a soft limit of 1024 (systemd's default), that quota's own default.
    The soft limit also caps the client sockets the broker has passed to
    servers that have not read them yet (past it, the kernel refuses to pass more).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return  # (infinity is above the kernel's nr_open: keep the soft limit as it is)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)


def _trimmed(status: control.PortStatus) -> control.PortStatus:
    """A report as kept: at most MAX_AGES in-flight ages per client, all an honest runtime sends."""
    if all(len(peer.in_flight_ages_ms) <= MAX_AGES for peer in status.peers):
        return status
    return dataclasses.replace(status, peers=tuple(
        dataclasses.replace(peer, in_flight_ages_ms=peer.in_flight_ages_ms[:MAX_AGES]) for peer in status.peers))


def _fitted(answer: control.PortList) -> control.PortList | None:
    """``answer`` within the MAX_CONTROL_BODY every client reads, or None if it cannot be.

    The ports that take the most room give up their clients and ACL first
    (``details`` False), so many ports with long reports cannot break ``alpc ports``.
    """
    ports = list(answer.ports)
    sizes = [control.encoded_size(port) for port in ports]
    excess = control.encoded_size(control.PortList()) + 5 + sum(sizes) - control.MAX_CONTROL_BODY  # 5: array header
    if excess <= 0:
        return answer
    for index in sorted(range(len(ports)), key=sizes.__getitem__, reverse=True):
        slim = dataclasses.replace(ports[index], clients=(), details=False, acl=control.AclSpec())
        excess -= sizes[index] - control.encoded_size(slim)
        ports[index] = slim
        if excess <= 0:
            return control.PortList(ports=tuple(ports))
    return None


_PORT_LIST_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.PORT_LIST, MessageType.ERROR, MessageType.SHUTDOWN}),
    max_data=control.MAX_CONTROL_BODY,
)


def list_ports(config: Config | None = None, timeout: float | None = 5.0) -> tuple[control.PortInfo, ...]:
    """Ask the broker for the live ports the caller may inspect, their owners and connected clients."""
    config = config_or_default(config)
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
