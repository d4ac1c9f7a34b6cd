"""The blocking API: connection ports, communication ports, connect().

A thin driver of the sans-IO core: it moves bytes between ``transport`` streams
and ``protocol.Channel`` objects and holds no protocol rules of its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import control
from .config import Config, PortAttributes
from .control import validate_port_name
from .errors import (
    BrokerUnavailable,
    ConnectionClosed,
    ConnectionRejected,
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    Timeout,
)
from .exchange import control_frame, read_frame
from .protocol import Channel, Frames, Message, Payload
from .security import PeerCred
from .transport import Stream, close_fds, deadline_after, pidfd_open, remaining, wait_readable
from .wire import Frame, FrameDecoder, FrameLimits, MessageType

__all__ = [
    "CommunicationPort",
    "ConnectionPort",
    "ConnectionRequest",
    "connect",
    "create_port",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class CommunicationPort:
    """One end of an established connection (ALPC communication port).

    Thread-safe: any number of threads may request, send and receive at once.
    One of them at a time reads the socket and hands each reply to the thread
    waiting for it, so replies are matched by id whatever order they come in.
    """

    def __init__(
        self,
        stream: Stream,
        channel: Channel,
        *,
        peer_pidfd: int | None,
        is_server: bool,
        accept_data: bytes = b"",
        on_gone: Callable[[CommunicationPort], None] | None = None,
    ) -> None:
        self._stream = stream
        self._channel = channel
        self._pidfd = peer_pidfd
        self._is_server = is_server
        self.accept_data = accept_data
        self._on_gone = on_gone
        self._state = threading.Lock()
        # Reentrant: a failing write may itself need to send (never to finalize).
        self._send_lock = threading.RLock()
        self._cv = threading.Condition()
        self._reading = False
        self._replies: dict[int, Message] = {}
        self._inbox: deque[Message] = deque()
        self._failure: ConnectionClosed | None = None
        self._release_wanted = False
        self._released = False

    # -- identity --------------------------------------------------------------

    @property
    def peer(self) -> PeerCred:
        """The kernel-verified identity of the other side."""
        return self._channel.peer

    @property
    def server(self) -> PeerCred:
        return self._channel.peer

    @property
    def client(self) -> PeerCred:
        return self._channel.peer

    @property
    def closed(self) -> bool:
        return self._failure is not None

    def fileno(self) -> int:
        return self._stream.fileno()

    def __repr__(self) -> str:
        side = "server" if self._is_server else "client"
        state = "closed" if self.closed else "open"
        return f"<CommunicationPort {side} side, peer pid {self.peer.pid}, {state}>"

    # -- sending ----------------------------------------------------------------

    def request(
        self,
        data: Payload = b"",
        timeout: float | None = None,
        *,
        on_message: Callable[[Message], None] | None = None,
    ) -> Message:
        """Send a request and wait for its reply.

        ``data`` is one buffer, or a sequence of buffers sent as one message
        without being joined. With ``on_message``, the REQUEST and DATAGRAM
        messages that arrive while this call waits (and that no other thread
        takes first with receive()) are handed to it on this thread, so the
        peer may call back into us (ALPC's nested callbacks) instead of its
        request waiting in the inbox behind our own wait. If ``on_message``
        raises, the request is abandoned and the exception propagates.
        """
        deadline = deadline_after(timeout)
        message_id = self._send_new(lambda: self._channel.request(_owned(data)), deadline)
        return self._await_reply(message_id, deadline, on_message)

    def ping(self, timeout: float | None = None) -> None:
        """Round-trip a PING that the peer's runtime answers without its application."""
        deadline = deadline_after(timeout)
        message_id = self._send_new(self._channel.ping, deadline)
        self._await_reply(message_id, deadline)

    def send(self, data: Payload = b"", timeout: float | None = None) -> None:
        """Send a datagram (no reply expected)."""
        self._send(lambda: self._channel.datagram(_owned(data)), deadline_after(timeout))

    def reply(self, message: Message, data: Payload = b"", timeout: float | None = None) -> None:
        """Answer ``message``, a request received on this port."""
        if message.type is not MessageType.REQUEST:
            raise ValueError(f"only a REQUEST can be replied to, not {message.type.name}")
        self._send(lambda: self._channel.reply(message.id, _owned(data)), deadline_after(timeout))

    def _send_new(self, make: Callable[[], tuple[int, Frames]], deadline: float | None) -> int:
        message_id = 0

        def frames() -> Frames:
            nonlocal message_id
            message_id, out = make()
            return out

        try:
            self._send(frames, deadline)
        except BaseException:
            if message_id:
                with self._state:
                    self._channel.abandon(message_id)
            raise
        return message_id

    def _send(self, make: Callable[[], Frames], deadline: float | None) -> None:
        with self._send_lock:
            self._raise_if_failed()
            with self._state:
                frames = make()
            self._write(frames, deadline)

    def _write(self, frames: Frames, deadline: float | None) -> None:
        try:
            self._stream.send(frames, deadline=deadline)
        except Timeout:
            if self._stream.broken:
                self._fail(ConnectionClosed("a send timed out mid-frame; the connection was dropped"))
            raise
        except ConnectionClosed:
            self._connection_lost("the peer's socket is closed")
            self._raise_if_failed()
            raise

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise type(failure)(*failure.args)

    # -- receiving -------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message:
        """The next request or datagram from the peer.

        On the server side a closed or dead client is reported once as a
        PORT_CLOSED / CLIENT_DIED message; later calls raise PeerGone.
        """
        message = self._wait_for(self._pop_inbox, deadline_after(timeout), "a message")
        self._maybe_finalize()
        return message

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer goes away."""
        while True:
            try:
                message = self.receive()
            except ConnectionClosed:
                return
            yield message
            if message.type in _NOTICES:
                return

    def _pop_inbox(self) -> Message | None:
        # Caller holds _cv.
        if not self._inbox:
            return None
        message = self._inbox.popleft()
        if message.type in _NOTICES:
            self._release_wanted = True
        return message

    def _await_reply(self, message_id: int, deadline: float | None,
                     on_message: Callable[[Message], None] | None = None) -> Message:
        try:
            if on_message is None:
                return self._wait_for(lambda: self._replies.pop(message_id, None), deadline, "the reply")
            # Incoming messages are taken before the reply: one read may bring
            # both, and whatever this thread leaves in the inbox would wait for a
            # poll wake-up that already happened. Notices stay queued for
            # receive() / ConnectionPort.wait(). (take runs with _cv held.)
            inbox, replies = self._inbox, self._replies

            def take() -> Message | None:
                if inbox and inbox[0].type in _INCOMING:
                    return inbox.popleft()
                return replies.pop(message_id, None)

            while True:
                found = self._wait_for(take, deadline, "the reply")
                if found.type is MessageType.REPLY:
                    return found
                on_message(found)
        except BaseException:
            with self._state:
                self._channel.abandon(message_id)
            with self._cv:
                self._replies.pop(message_id, None)
            raise

    def _wait_for(self, take: Callable[[], T | None], deadline: float | None, what: str) -> T:
        while True:
            with self._cv:
                while True:
                    found = take()
                    if found is not None:
                        return found
                    self._raise_if_failed()
                    if not self._reading:
                        self._reading = True
                        break
                    if not self._cv.wait(remaining(deadline)):
                        raise Timeout(f"timed out waiting for {what}")
            try:
                if not self._read(deadline):
                    raise Timeout(f"timed out waiting for {what}")
            finally:
                self._end_read()

    def _end_read(self) -> None:
        with self._cv:
            self._reading = False
            self._cv.notify_all()
        self._maybe_finalize()

    def pump(self) -> None:
        """Read whatever is waiting without blocking, unless another thread is reading."""
        with self._cv:
            if self._reading or self._failure is not None:
                return
            self._reading = True
        try:
            self._read(deadline=0.0, block=False)
        finally:
            self._end_read()

    def has_ready_message(self) -> bool:
        return bool(self._inbox)

    def next_ready_message(self) -> Message | None:
        """Pop a received message without reading; call _maybe_finalize() after a notice."""
        with self._cv:
            return self._pop_inbox()

    def wait_fds(self) -> list[int]:
        """What a multiplexer should poll for this port: its socket and the peer's pidfd."""
        if self._released:
            return []
        return [self._stream.fileno()] + ([self._pidfd] if self._pidfd is not None else [])

    def _read(self, deadline: float | None, block: bool = True) -> bool:
        """Read once and dispatch; False if nothing arrived before the deadline."""
        if block and not wait_readable(self.wait_fds(), deadline):
            return False
        data = self._stream.recv()
        if data is None:
            if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
                self._connection_lost("the peer process exited")
            return True
        if not data:
            self._connection_lost("the peer process died or dropped the connection")
            return True
        try:
            with self._state:
                messages = self._channel.receive(data)
                automatic = self._channel.take_automatic()
        except ProtocolError as exc:
            log.warning("protocol error from pid %d, dropping the connection: %s", self.peer.pid, exc)
            self._fail(PeerGone(f"protocol error: {exc}"), notice=f"protocol error: {exc}")
            return True
        if automatic:
            self._send(lambda: automatic, deadline_after(1.0))
        self._dispatch(messages)
        return True

    def _dispatch(self, messages: list[Message]) -> None:
        with self._cv:
            for message in messages:
                message.port = self
                if message.type is MessageType.REPLY or message.type is MessageType.PONG:
                    self._replies[message.callback_id] = message
                elif message.type is MessageType.PORT_CLOSED:
                    self._set_failure(PeerGone(message.reason), message)
                else:
                    self._inbox.append(message)

    def _connection_lost(self, reason: str) -> None:
        with self._state:
            notice = self._channel.connection_lost(reason)
        if notice is not None:
            notice.port = self
            with self._cv:
                self._set_failure(PeerGone(reason), notice)

    def _set_failure(self, failure: ConnectionClosed, notice: Message | None) -> None:
        # Caller holds _cv. The server side sees the notice as a message and
        # releases the socket when it is taken; the client side sees PeerGone
        # on every pending and later call and releases at once.
        if self._failure is None:
            self._failure = failure
        if notice is not None and self._is_server:
            self._inbox.append(notice)
        else:
            self._release_wanted = True
        self._cv.notify_all()

    def _fail(self, failure: ConnectionClosed, notice: str | None = None) -> None:
        with self._state:
            self._channel.mark_closed(str(failure))
        message = None
        if notice is not None:
            message = Message(MessageType.CLIENT_DIED, 0, 0, b"", self.peer, reason=notice)
            message.port = self
        with self._cv:
            self._set_failure(failure, message)

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Tell the peer (PORT_CLOSED) and release the connection. Idempotent."""
        with self._state:
            notice = [] if self._failure is not None else self._channel.close_notice()
        if notice and self._send_lock.acquire(timeout=1.0):
            try:
                self._stream.try_send(notice)
            except ConnectionClosed:
                pass
            finally:
                self._send_lock.release()
        with self._cv:
            if self._failure is None:
                self._failure = ConnectionClosed("the port is closed")
            self._inbox.clear()
            self._release_wanted = True
            self._cv.notify_all()
        # Wake a reader blocked in poll or a writer waiting for buffer space.
        self._stream.shutdown()
        self._maybe_finalize()

    def _maybe_finalize(self) -> None:
        """Close the socket and pidfd once nobody is using them any more.

        Never called with _cv held, and a sender holding _send_lock does not call
        it, so the lock order port -> _cv -> _send_lock is never inverted.
        """
        with self._cv:
            if not self._release_wanted or self._released or self._reading:
                return
            self._released = True
            self._reading = True  # nobody reads a released stream again
        self._stream.shutdown()
        with self._send_lock:
            self._stream.close()
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None
        if self._on_gone is not None:
            self._on_gone(self)

    def __enter__(self) -> CommunicationPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NOTICES = (MessageType.PORT_CLOSED, MessageType.CLIENT_DIED)
_INCOMING = (MessageType.REQUEST, MessageType.DATAGRAM)


def _owned(data: Payload) -> Payload:
    """A single buffer is copied to bytes as before; parts are sent as given.

    Parts are written to the kernel before send/request/reply return, so the
    caller may reuse its buffers afterwards.
    """
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    return tuple(data)


# -- client side ------------------------------------------------------------------

_HANDSHAKE_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.CONNECTION_REPLY, MessageType.ERROR, MessageType.SHUTDOWN}),
    max_data=control.MAX_CONTROL_BODY,
)


def connect(
    name: str,
    data: bytes = b"",
    *,
    timeout: float | None = None,
    config: Config | None = None,
) -> CommunicationPort:
    """Connect to the named port; returns the client communication port once accepted.

    Raises PortNotFound, ConnectionRejected (with the server's reason), Timeout,
    BrokerUnavailable, or PeerGone if the server vanished before answering.
    """
    config = config or Config.from_env()
    validate_port_name(name)
    data = bytes(data)
    if len(data) > config.max_connect_data:
        raise MessageTooLarge(f"connect data of {len(data)} bytes exceeds {config.max_connect_data}")
    timeout = config.connect_timeout if timeout is None else timeout
    deadline = deadline_after(timeout)
    stream = Stream.connect(config.broker_socket, timeout)
    try:
        stream.set_passcred(True)
        request = control.Connect(name=name, data=data, max_message_length=config.max_message_length)
        stream.send(control_frame(request), deadline=deadline)
        reply, server = _await_connection_reply(stream, name, deadline)
        if not reply.accepted:
            raise ConnectionRejected(reply.reason)
        stream.set_passcred(False)
    except BaseException:
        stream.close()
        raise
    channel = Channel(server, send_limit=reply.max_message_length,
                      recv_limit=config.max_message_length, local_pid=os.getpid())
    return CommunicationPort(stream, channel, peer_pidfd=pidfd_open(server.pid), is_server=False,
                             accept_data=reply.data)


def _await_connection_reply(
    stream: Stream, name: str, deadline: float | None
) -> tuple[control.ConnectionReply, PeerCred]:
    frame, cred = read_frame(stream, FrameDecoder(_HANDSHAKE_LIMITS), deadline, f"port {name!r} to answer")
    if frame is None:
        raise PeerGone(f"the server of {name!r} went away before answering the connect")
    if frame.type is MessageType.ERROR:
        raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
    if frame.type is MessageType.SHUTDOWN:
        raise BrokerUnavailable("the broker is shutting down")
    if cred is None:
        raise ProtocolError("the connection reply carried no credentials")
    return control.decode_body(frame.type, frame.data, control.ConnectionReply), cred


# -- server side -------------------------------------------------------------------


class ConnectionRequest:
    """A client asking to connect; ``client`` is its kernel-verified identity."""

    def __init__(self, port: ConnectionPort, stream: Stream, info: control.ConnectionRequestInfo) -> None:
        self._port = port
        self._stream: Stream | None = stream
        self.client = stream.peer_cred()
        self._pidfd = stream.peer_pidfd()
        self.data = info.data
        self.port_name = info.name
        self._client_max_message = info.max_message_length

    def __repr__(self) -> str:
        return f"<ConnectionRequest to {self.port_name!r} from pid {self.client.pid} uid {self.client.uid}>"

    def _take_stream(self) -> Stream:
        if self._stream is None:
            raise ValueError("this connection request was already answered")
        stream, self._stream = self._stream, None
        self._port._forget_request(self)
        return stream

    def accept(self, data: bytes = b"", timeout: float | None = 5.0) -> CommunicationPort:
        """Accept: the client's connect() returns with ``data`` as its accept_data."""
        data = bytes(data)
        if len(data) > self._port.config.max_connect_data:
            raise MessageTooLarge(f"accept data of {len(data)} bytes exceeds {self._port.config.max_connect_data}")
        stream = self._take_stream()
        pidfd, self._pidfd = self._pidfd, None
        reply = control.ConnectionReply(accepted=True, data=data, reason="",
                                        max_message_length=self._port.attributes.max_message_length)
        try:
            stream.send(control_frame(reply), deadline=deadline_after(timeout))
        except (ConnectionClosed, Timeout):
            stream.close()
            close_fds([pidfd] if pidfd is not None else [])
            raise PeerGone(f"client pid {self.client.pid} went away before the accept") from None
        channel = Channel(self.client, send_limit=self._client_max_message,
                          recv_limit=self._port.attributes.max_message_length, local_pid=os.getpid())
        return self._port._adopt(stream, channel, pidfd)

    def reject(self, reason: str = "rejected") -> None:
        """Refuse: the client's connect() raises ConnectionRejected carrying ``reason``."""
        stream = self._take_stream()
        reply = control.ConnectionReply(accepted=False, data=b"", reason=str(reason)[:1024], max_message_length=0)
        try:
            stream.try_send(control_frame(reply))
        except ConnectionClosed:
            pass
        finally:
            stream.close()
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def close(self) -> None:
        """Drop an unanswered request (the client sees the server go away)."""
        if self._stream is not None:
            self.reject("the server closed the port")


_REGISTRATION_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.PORT_CREATED, MessageType.ERROR,
                             MessageType.CONNECTION_REQUEST, MessageType.SHUTDOWN}),
    max_data=control.MAX_CONTROL_BODY,
    max_fds=1,
)


def create_port(
    name: str,
    attributes: PortAttributes | None = None,
    *,
    config: Config | None = None,
    timeout: float | None = None,
) -> ConnectionPort:
    """Create a named connection port through the broker.

    Raises NameInUse if a live port has the name, InvalidName for a bad name,
    BrokerUnavailable if no broker runs.
    """
    config = config or Config.from_env()
    attributes = attributes or PortAttributes()
    validate_port_name(name)
    timeout = config.connect_timeout if timeout is None else timeout
    deadline = deadline_after(timeout)
    stream = Stream.connect(config.broker_socket, timeout)
    decoder = FrameDecoder(_REGISTRATION_LIMITS)
    try:
        request = control.CreatePort(
            name=name, max_message_length=attributes.max_message_length,
            max_connect_data=attributes.max_connect_data,
            max_pending_connects=attributes.max_pending_connects,
        )
        stream.send(control_frame(request), deadline=deadline)
        frame, _ = read_frame(stream, decoder, deadline, "the broker to create the port")
        if frame is None:
            raise BrokerUnavailable("the broker closed the connection while creating the port")
        if frame.type is MessageType.ERROR:
            raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
        control.decode_body(frame.type, frame.data, control.PortCreated)
    except BaseException:
        decoder.close_fds()
        stream.close()
        raise
    return ConnectionPort(name, stream, decoder, attributes, config)


class ConnectionPort:
    """A named server port: listen for connections and wait on every client at once."""

    def __init__(self, name: str, registration: Stream, decoder: FrameDecoder,
                 attributes: PortAttributes, config: Config) -> None:
        self.name = name
        self.attributes = attributes
        self.config = config
        self._registration = registration
        self._decoder = decoder
        self._lock = threading.RLock()
        self._requests: deque[ConnectionRequest] = deque()
        self._unanswered: set[ConnectionRequest] = set()
        self._connections: list[CommunicationPort] = []
        self._broker_error: BrokerUnavailable | None = None
        self._closed = False
        self._turn = 0

    def __repr__(self) -> str:
        return f"<ConnectionPort {self.name!r} with {len(self._connections)} clients>"

    @property
    def connections(self) -> list[CommunicationPort]:
        with self._lock:
            return list(self._connections)

    # -- connection requests ---------------------------------------------------

    def listen(self, timeout: float | None = None) -> ConnectionRequest:
        """Wait for the next connection request."""
        deadline = deadline_after(timeout)
        while True:
            with self._lock:
                request = self._next_request()
                if request is not None:
                    return request
            if not wait_readable([self._registration.fileno()], deadline):
                raise Timeout("no connection request arrived in time")
            with self._lock:
                self._read_registration()

    def _next_request(self) -> ConnectionRequest | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        if self._broker_error is not None:
            raise type(self._broker_error)(*self._broker_error.args)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"port {self.name!r} is closed")

    def _read_registration(self) -> None:
        if self._broker_error is not None or self._closed:
            return
        got = self._registration.recv_with_ancillary(max_fds=16)
        if got is None:
            return
        if not got.data:
            self._broker_error = BrokerUnavailable("the broker went away; established connections still work")
            return
        try:
            frames = self._decoder.feed(got.data, got.fds)
        except ProtocolError as exc:
            log.error("protocol error from the broker: %s", exc)
            self._broker_error = BrokerUnavailable(f"the broker sent a malformed frame: {exc}")
            return
        for frame in frames:
            self._handle_registration_frame(frame)

    def _handle_registration_frame(self, frame: Frame) -> None:
        if frame.type is MessageType.SHUTDOWN:
            self._broker_error = BrokerUnavailable("the broker shut down; established connections still work")
            close_fds(frame.fds)
            return
        if frame.type is not MessageType.CONNECTION_REQUEST or len(frame.fds) != 1:
            close_fds(frame.fds)
            log.error("unexpected %s frame from the broker", frame.type.name)
            return
        try:
            info = control.decode_body(frame.type, frame.data, control.ConnectionRequestInfo)
            stream = Stream.from_fd(frame.fds[0])
        except (ProtocolError, OSError) as exc:
            close_fds(frame.fds)
            log.error("bad connection request from the broker: %s", exc)
            return
        if wait_readable([stream.fileno()], 0.0):
            # The client already gave up (timeout or death); nobody to answer.
            stream.close()
            return
        request = ConnectionRequest(self, stream, info)
        self._unanswered.add(request)
        self._requests.append(request)

    def _forget_request(self, request: ConnectionRequest) -> None:
        with self._lock:
            self._unanswered.discard(request)

    # -- communication ports ----------------------------------------------------

    def _adopt(self, stream: Stream, channel: Channel, pidfd: int | None) -> CommunicationPort:
        comm = CommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=True, on_gone=self._forget)
        with self._lock:
            self._connections.append(comm)
        self._report_status()
        return comm

    def _forget(self, comm: CommunicationPort) -> None:
        with self._lock:
            if comm in self._connections:
                self._connections.remove(comm)
        self._report_status()

    def _report_status(self) -> None:
        """Tell the broker who is connected, for ``alpc ports``; best effort."""
        with self._lock:
            if self._closed or self._broker_error is not None:
                return
            clients = tuple(control.ClientInfo.of(comm.peer) for comm in self._connections)
            try:
                self._registration.try_send(control_frame(control.PortStatus(clients=clients)))
            except ConnectionClosed:
                pass

    def wait(self, timeout: float | None = None) -> ConnectionRequest | Message:
        """The next event on this port: a connection request, or a message from any client.

        Messages carry ``message.port``, the communication port to answer on.
        Client death and close arrive as CLIENT_DIED / PORT_CLOSED messages.
        """
        deadline = deadline_after(timeout)
        while True:
            with self._lock:
                ready = self._next_event()
                owners = self._wait_owners() if ready is None else {}
            if isinstance(ready, Message):
                ready.port._maybe_finalize()
            if ready is not None:
                return ready
            fired = wait_readable(list(owners), deadline)
            if not fired:
                raise Timeout("nothing arrived on the port in time")
            for fd in fired:
                owner = owners[fd]
                if isinstance(owner, CommunicationPort):
                    owner.pump()
                else:
                    with self._lock:
                        self._read_registration()

    def _wait_owners(self) -> dict[int, ConnectionPort | CommunicationPort]:
        owners: dict[int, ConnectionPort | CommunicationPort] = {}
        if self._broker_error is None:
            owners[self._registration.fileno()] = self
        for comm in self._connections:
            for fd in comm.wait_fds():
                owners[fd] = comm
        return owners

    def _next_event(self) -> ConnectionRequest | Message | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        count = len(self._connections)
        for step in range(count):
            comm = self._connections[(self._turn + step) % count]
            if comm.has_ready_message():
                message = comm.next_ready_message()
                if message is not None:
                    self._turn = (self._turn + step + 1) % max(count, 1)
                    return message
        return None

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Close every connection and give the name back to the broker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            requests = list(self._unanswered)
            connections = list(self._connections)
        for request in requests:
            request.close()
        for comm in connections:
            comm.close()
        self._registration.close()
        self._decoder.close_fds()

    def __enter__(self) -> ConnectionPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
