"""The blocking API: connection ports, communication ports, connect().

A thin driver of the sans-IO core: it moves bytes between ``transport`` streams
and ``protocol.Channel`` objects and holds no protocol rules of its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from . import _native, control, qlpc
from .config import Config, PortAttributes
from .control import validate_port_name
from .errors import (
    AccessDenied,
    BrokerUnavailable,
    ConnectionClosed,
    ConnectionRejected,
    MessageTooLarge,
    PeerGone,
    PortNotFound,
    ProtocolError,
    QuotaExceeded,
    SectionError,
    Throttled,
    Timeout,
)
from .exchange import control_frame, read_frame, refusal_after_hangup
from .grant import LocalGrant, MemoryGrant, PeerMemory, direct_read, direct_write
from .ledger import Budget
from .logs import LogLimiter, fields
from .protocol import Channel, ConnectionPolicy, Frames, Message, materialize, payload_parts
from .protocol import Payload as WirePayload
from .quotas import FlowLimits, Limit, WindowClosed
from .registration import Registration
from .retry import retry_until
from .section import ConnectionSections, SectionView, sweep_stale_names
from .security import PeerCred, kinds_from_mask, kinds_mask
from .stats import ConnectionStats, LiveConnection, PortStatistics
from .transport import Buffer, Stream, close_fds, deadline_after, pidfd_open, remaining, wait_readable
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, Range

__all__ = [
    "CommunicationPort",
    "ConnectionPort",
    "ConnectionRequest",
    "connect",
    "create_port",
]

log = logging.getLogger(__name__)
# A hostile client reconnecting to send garbage must not flood the server's log.
_limited = LogLimiter(log)

T = TypeVar("T")

# A sender waiting for section space on a port-wide budget (which other
# connections free) re-checks this often; its own releases wake it at once.
_BUDGET_RECHECK = 0.05
# Releases go out from the reader; a peer that stops reading for this long
# keeps them queued rather than stalling our reads.
_RELEASE_SEND_TIMEOUT = 1.0
# A read stops after the write that carried fds, and a sender passes fds with
# one frame per write: a section's fd, then that message's handles.
# With this many section messages unreleased, a sender reads its socket (without blocking).
_DRAIN_EVERY = 64


# What request/send/reply take: one bytes-like buffer, parts sent back to back
# without being joined first, or a filled view of the connection's section.
Payload = Buffer | Sequence[Buffer] | SectionView


def _size(data: Payload) -> int:
    if isinstance(data, (bytes, bytearray, SectionView)):
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    return payload_parts(data)[1]


def _copy_body(into: memoryview, data: Buffer | Sequence[Buffer]) -> None:
    """Copy a body (one buffer, or parts back to back) into reserved section space."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        _native.copy_into(into, data)
        return
    offset = 0
    for part in payload_parts(data)[0]:
        size = len(part) if isinstance(part, bytes) else memoryview(part).nbytes
        _native.copy_into(into[offset:offset + size], part)
        offset += size


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
        send_timeout: float | None = None,
        quick: qlpc.QuickLink | None = None,
    ) -> None:
        self._stream = stream
        # Quick-LPC rings beside the socket (alpc.qlpc), when negotiated.
        self._quick = quick
        if quick is not None and not is_server:
            channel.quick_claims = quick.claims
            # The lean call is one Python frame around the C call on this connection.
            self.call = quick.bind_call(self)  # type: ignore[method-assign]
        self._channel = channel
        self._pidfd = peer_pidfd
        # A server bounds every send (its caller's None included): a client that
        # stops reading must not hold the server's thread forever.
        self._send_timeout = send_timeout
        self._max_fds_per_read = 1 + channel.policy.local.max_handles_per_message
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
        self.stats = ConnectionStats()
        # Memory grants: client side, the server's fallback reads/writes for each
        # request in flight; server side, the client's answers to our reads.
        self._grant_ops: dict[int, deque[Message]] = {}
        self._grant_data: dict[int, Message] = {}
        self._vm_refused = False
        # Constant for the connection; read on every send.
        self._inline_threshold = channel.inline_threshold
        self._peer_sections = None if channel.sections is None else channel.sections.peer
        # Releases held back to ride with our next frame (usually the reply).
        self._releases_owed = False
        if self._peer_sections is not None:
            self._peer_sections.wake = self._releases_due

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
    def peer_pidfd(self) -> int | None:
        """A pidfd of the peer process (SO_PEERPIDFD / SCM_PIDFD), owned by this port; None if none."""
        return self._pidfd

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def quick(self) -> bool:
        """Whether small requests and their replies go through Quick-LPC rings (alpc.qlpc)."""
        return self._quick is not None and self._failure is None and self._quick.active

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._inbox)

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
        secure: bool = False,
        grant: MemoryGrant | None = None,
        on_message: Callable[[Message], None] | None = None,
        fds: Sequence[int] = (),
    ) -> Message:
        """Send a request and wait for its reply.

        ``data`` is one buffer, a sequence of buffers sent as one message
        without being joined, or a ``SectionView`` from ``create_view`` (sent
        with no copy at all). A body longer than the inline threshold goes
        through a shared section. ``secure`` sends it write-sealed; ``grant``
        lends the server a buffer for this request. ``fds`` are passed along
        (the peer gets copies; these stay yours). While the peer holds
        ``max_pending_requests`` of ours, this waits for a reply first
        (Throttled when ``timeout`` runs out meanwhile).

        With ``on_message``, the REQUEST and DATAGRAM messages that arrive while
        this call waits (and that no other thread takes first with receive())
        are handed to it on this thread, so the peer may call back into us
        (ALPC's nested callbacks) instead of its request waiting in the inbox
        behind our own wait. If ``on_message`` raises, the request is abandoned
        and the exception propagates.
        """
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        size = _size(data)
        if fds:
            self._channel.check_handles(fds)
        self.stats.sent(size)
        quick = self._quick
        if (quick is not None and size <= quick.payload_max and isinstance(data, (bytes, bytearray, memoryview))
                and grant is None and on_message is None and not secure and not fds):
            # Quick-LPC: the ring, unless it cannot take this one now.
            reply = quick.request(self, data if type(data) is bytes else bytes(data), deadline)
            if reply is not None:
                return reply
        if grant is not None or isinstance(data, SectionView) or size > self._inline_threshold:
            return self._request_large(data, deadline, secure, grant, on_message, fds)
        try:
            message_id = self._send_new(lambda: self._channel.request(_owned(data), fds=fds), deadline, fds)
        except WindowClosed as closed:
            message_id = self._flow(lambda: self._send_new(lambda: self._channel.request(_owned(data), fds=fds),
                                                           deadline, fds), deadline, closed)
        return self._await_reply(message_id, deadline, on_message)

    def call(self, data: bytes, timeout: float | None = None) -> bytes:
        """``request(data, timeout).data``, without a Message: Quick-LPC's lean call.

        Over Quick-LPC rings this is one C call with the GIL released (the
        instance then carries ``qlpc.QuickLink.bind_call``'s version); on any
        other connection it is ``request``.
        """
        return self.request(data, timeout).data

    def serve_requests(self, handler: Callable[[bytes], Buffer], timeout: float | None = None) -> Message:
        """Answer each REQUEST with ``handler(body)`` until another message arrives, and return it.

        The other message is a datagram or a notice (PORT_CLOSED, CLIENT_DIED);
        ``timeout`` bounds each wait for the next message (Timeout). Over
        Quick-LPC rings each reply and the wait for the next request are one C
        call (ALPC's reply-and-receive); otherwise it is receive() and reply().
        """
        quick = self._quick
        while True:
            if quick is not None and quick.server and quick.active:
                other = quick.serve(self, handler, timeout)
                if other is not None:
                    if other.type is MessageType.DATAGRAM:
                        self._credit_check()
                    return other
            # The slow way, one message at a time (the rings may be taken up meanwhile).
            message = self.receive(timeout)
            if message.type is not MessageType.REQUEST:
                return message
            self.reply(message, handler(message.data), timeout)

    def ping(self, timeout: float | None = None) -> None:
        """Round-trip a PING that the peer's runtime answers without its application."""
        deadline = deadline_after(timeout)
        message_id = self._send_new(self._channel.ping, deadline)
        self._await_reply(message_id, deadline)

    def send(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
             fds: Sequence[int] = ()) -> None:
        """Send a datagram (no reply expected); ``data`` as for ``request``, ``fds`` passed along.

        While the peer's application has ``max_queued_datagrams`` of ours still
        to take, this waits (Throttled when ``timeout`` runs out meanwhile).
        """
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        size = _size(data)
        if fds:
            self._channel.check_handles(fds)

        def send() -> None:
            if isinstance(data, SectionView) or size > self._inline_threshold:
                self._send_section(MessageType.DATAGRAM, data, deadline, secure, fds=fds)
            else:
                self._send(lambda: self._channel.datagram(_owned(data), fds=fds), deadline, fds)

        try:
            send()
        except WindowClosed as closed:
            self._flow(send, deadline, closed)
        self.stats.sent(size)

    def reply(self, message: Message, data: Payload = b"", timeout: float | None = None, *,
              secure: bool = False, fds: Sequence[int] = ()) -> None:
        """Answer ``message``, a request received on this port (with ``fds`` passed along).

        On a server, a reply that cannot be written within the port's
        ``send_timeout`` (or ``timeout``) means the client stopped reading: its
        connection is dropped (a CLIENT_DIED notice follows) and Throttled raised.
        """
        if message.type is not MessageType.REQUEST:
            raise ValueError(f"only a REQUEST can be replied to, not {message.type.name}")
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        size = _size(data)
        if fds:
            self._channel.check_handles(fds)
        quick = self._quick
        if (quick is not None and quick.ring_requests and size <= quick.payload_max and not secure and not fds
                and isinstance(data, (bytes, bytearray)) and quick.reply(self, message.id, bytes(data))):
            # Quick-LPC: a request that came through the ring, answered the same way.
            self.stats.replied(message.id, size)
            return
        try:
            if isinstance(data, SectionView) or size > self._inline_threshold:
                self._send_section(MessageType.REPLY, data, deadline, secure, callback_id=message.id, fds=fds)
            else:
                self._send(lambda: self._channel.reply(message.id, _owned(data), fds=fds), deadline, fds)
        except Timeout as exc:
            if not self._is_server:
                raise
            # A reply that cannot go out is lost (it cannot be sent again), and the
            # client would wait for it forever: the client stopped reading, drop it.
            if self._failure is None:
                self.stats.errors += 1
                self._fail(PeerGone("the client stopped reading its replies; its connection was dropped"),
                           notice="the client stopped reading its replies")
            limit = exc.limit if isinstance(exc, Throttled) else Limit.SEND_TIMEOUT
            raise Throttled("the reply could not be written in time: the client stopped reading its replies, "
                            "and its connection was dropped", limit=limit) from None
        self.stats.replied(message.id, size)

    # -- flow control ------------------------------------------------------------------

    def _flow(self, send: Callable[[], T], deadline: float | None, closed: WindowClosed) -> T:
        """``send`` found the peer's window closed: wait for replies or credits and retry, until it goes."""
        while True:
            if closed.limit is Limit.MAX_HANDLES_PER_MESSAGE:
                raise QuotaExceeded("more fds than the peer takes in one message", limit=closed.limit)
            self._await_window(closed, deadline)
            try:
                return send()
            except WindowClosed as again:
                closed = again

    def _await_window(self, closed: WindowClosed, deadline: float | None) -> None:
        """Wait until a reply or a credit frees something the peer counts (or raise Throttled)."""
        flow = self._channel.flow

        def counts() -> tuple[int, int, int]:
            return flow.requests_out, flow.datagrams_out, flow.handles_out

        before = counts()

        def freed() -> bool | None:
            return True if any(now < was for now, was in zip(counts(), before, strict=True)) else None

        try:
            self._wait_for(freed, deadline, f"the peer to free its {closed.limit}")
        except Timeout:
            raise Throttled(f"waited for the peer to free its {closed.limit} until the timeout ({closed})",
                            limit=closed.limit) from None

    # -- sections ------------------------------------------------------------------

    def create_view(self, size: int, *, secure: bool = False, timeout: float | None = None) -> SectionView:
        """Writable space in this connection's section (NtAlpcCreateSectionView).

        Fill ``view.memory`` in place and pass the view to ``send``, ``request``
        or ``reply``: the peer gets a read-only view of the same memory, with no
        copy. Waits (up to ``timeout``) while the peer holds the section's space.
        ``secure`` gives the view its own section, write-sealed when sent.
        """
        if size <= 0:
            raise SectionError(f"a view needs a positive size, not {size}")
        return self._reserve(size, secure, deadline_after(timeout))

    def trim_sections(self, timeout: float | None = None) -> None:
        """Unmap the idle sections of this side's pool (and the peer's mappings of them)."""
        self._send(self._channel.trim, deadline_after(timeout))

    def _reserve(self, size: int, secure: bool, deadline: float | None) -> SectionView:
        """Section space for ``size`` bytes, waiting for the peer's releases if needed."""
        self._raise_if_failed()
        with self._state:
            view = self._channel.reserve(size, secure)
        if view is not None:
            return view
        self._send(self._channel.release_wanted, deadline)

        def attempt() -> SectionView | None:
            with self._state:
                return self._channel.reserve(size, secure)

        while True:
            window = deadline
            sections = self._channel.sections
            if sections is not None and sections.pool.ledger.budget_blocked:
                window = deadline_after(_BUDGET_RECHECK)
                if deadline is not None and window is not None:
                    window = min(window, deadline)
            try:
                return self._wait_for(attempt, window, "space in the connection's sections")
            except Timeout:
                if window == deadline or remaining(deadline) == 0:
                    port_wide = sections is not None and sections.pool.ledger.budget_blocked
                    limit = Limit.MAX_PORT_SECTION_BYTES if port_wide else Limit.MAX_SECTION_BYTES
                    raise Throttled(f"no section space freed up before the timeout ({limit})", limit=limit) from None

    def _request_large(self, data: Payload, deadline: float | None, secure: bool, grant: MemoryGrant | None,
                       on_message: Callable[[Message], None] | None, fds: Sequence[int] = ()) -> Message:
        if grant is not None and on_message is not None:
            raise ValueError("a request cannot both grant memory and serve callbacks (on_message)")
        pinned = grant.pin() if grant is not None else None
        try:
            def send() -> int:
                if not isinstance(data, SectionView) and _size(data) <= self._channel.inline_threshold:
                    return self._send_new(lambda: self._channel.request(_owned(data), pinned, fds=fds), deadline,
                                          fds)
                return self._send_section(MessageType.REQUEST, data, deadline, secure, grant=pinned, fds=fds)

            try:
                message_id = send()
            except WindowClosed as closed:
                message_id = self._flow(send, deadline, closed)
        except BaseException:
            if pinned is not None:
                pinned.release()
            raise
        if pinned is None:
            return self._await_reply(message_id, deadline, on_message)
        return self._await_granted_reply(message_id, pinned, deadline)

    def _send_section(self, kind: MessageType, data: Payload, deadline: float | None, secure: bool, *,
                      callback_id: int = 0, grant: LocalGrant | None = None, span: Range | None = None,
                      as_view: bool | None = None, fds: Sequence[int] = ()) -> int:
        """Send a body through a section: fill a reserved range (unless ``data`` is a
        view already), then send the small frame naming it. Returns the message id."""
        if isinstance(data, SectionView):
            view, explicit = data, True
        else:
            self._channel.check_length(_size(data))
            view, explicit = self._reserve(_size(data), secure, deadline), False
            try:
                _copy_body(view.memory, data)
            except BaseException:
                view.release()
                raise
        message_id = 0
        with self._send_lock:
            try:
                self._raise_if_failed()
                with self._state:
                    message_id, frames, passed = self._channel.section_message(
                        kind, view, as_view=explicit if as_view is None else as_view,
                        callback_id=callback_id, grant=grant, span=span, fds=fds)
            except BaseException:
                if not explicit:
                    view.release()
                raise
            written = False
            try:
                if self._releases_owed:
                    self._write_with_releases(frames, deadline, passed)
                else:
                    self._write(frames, deadline, passed)
                written = True
            except BaseException:
                written = self._stream.broken
                if kind is MessageType.REQUEST and message_id:
                    with self._state:
                        if written:
                            self._channel.abandon(message_id)
                        else:
                            self._channel.unsent(message_id)
                raise
            finally:
                with self._state:
                    self._channel.section_sent(view, written)
        self._drain_releases()
        return message_id

    def _drain_releases(self) -> None:
        """Read the peer's releases now and then while sending many section messages.

        A sender that never reads would otherwise let them pile up in its socket
        until the peer blocks writing them.
        """
        sections = self._channel.sections
        if sections is not None:
            unreleased = sections.pool.ledger.unreleased
            if unreleased >= _DRAIN_EVERY and unreleased % _DRAIN_EVERY == 0:
                self.pump()

    def _releases_due(self, urgent: bool = False) -> None:
        """Ranges were released: tell the peer now, or with our next frame.

        While we owe the peer replies, the reply is coming and can carry the
        releases in the same sendmsg, saving the peer a wake-up per request. A
        sender short of space says so (RELEASE_WANTED), which makes it urgent.
        """
        if urgent or not self._channel.owes_replies:
            self._flush_releases()
        else:
            self._releases_owed = True

    def _flush_releases(self) -> None:
        """Send every release (and credit) not yet told to the peer, as frames of their own."""
        if self._failure is not None or not (self._channel.releases_pending or self._channel.flow.credit_owed):
            return
        with self._send_lock:
            self._write_with_releases([], deadline_after(_RELEASE_SEND_TIMEOUT))

    def _credit_check(self) -> None:
        """The application took a datagram: return credits once enough are owed (after taking, never under _cv)."""
        if self._channel.flow.credit_due:
            self._flush_releases()

    def _write_with_releases(self, frames: Frames, deadline: float | None,
                             fds: Sequence[int] = ()) -> None:
        """Write ``frames`` preceded by the pending RELEASE and CREDIT frames (caller holds _send_lock)."""
        self._releases_owed = False
        with self._state:
            entries = self._channel.take_releases()
            releases = self._channel.release_frames(entries)
            credit, credit_frames = self._channel.take_credit()
        try:
            self._write([*releases, *credit_frames, *frames], deadline, fds)
        except Timeout:
            if (entries or credit_frames) and not self._stream.broken:
                with self._state:
                    self._channel.requeue_releases(entries)
                    self._channel.restore_credit(credit)
                self._releases_owed = True
            if frames:
                raise
        except ConnectionClosed:
            if frames:
                raise

    def _send_new(self, make: Callable[[], tuple[int, Frames]], deadline: float | None,
                  fds: Sequence[int] = ()) -> int:
        message_id = 0

        def frames() -> Frames:
            nonlocal message_id
            message_id, out = make()
            return out

        try:
            self._send(frames, deadline, fds)
        except BaseException:
            if message_id:
                with self._state:
                    if self._stream.broken:
                        self._channel.abandon(message_id)
                    else:
                        self._channel.unsent(message_id)  # nothing of it was written
            raise
        return message_id

    def _send(self, make: Callable[[], Frames], deadline: float | None, fds: Sequence[int] = ()) -> None:
        with self._send_lock:
            self._raise_if_failed()
            with self._state:
                frames = make()
            if self._releases_owed:
                self._write_with_releases(frames, deadline, fds)
            else:
                self._write(frames, deadline, fds)

    def _write(self, frames: Frames, deadline: float | None, fds: Sequence[int] = ()) -> None:
        try:
            self._stream.send(frames, fds, deadline=deadline)
            if self._quick is not None:
                # Quick-LPC: ring posts wait until the peer read these bytes.
                self._quick.sent(frames)
        except Timeout:
            if self._stream.broken:
                self.stats.errors += 1
                self._fail(PeerGone("the peer stopped reading: a send timed out mid-frame; the connection was dropped"),
                           notice="the peer stopped reading (a send timed out mid-frame)")
            raise
        except ConnectionClosed:
            self.stats.errors += 1
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
        if self._channel.flow.credit_due:
            self._flush_releases()
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
        elif message.type is MessageType.DATAGRAM:
            with self._state:
                self._channel.consumed(message)
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
                    return self._pop_inbox()  # (a datagram taken frees its credit)
                return replies.pop(message_id, None)

            while True:
                found = self._wait_for(take, deadline, "the reply")
                if found.type is MessageType.REPLY:
                    return found
                if found.type is MessageType.DATAGRAM:
                    self._credit_check()
                on_message(found)
        except BaseException:
            with self._state:
                self._channel.abandon(message_id)
            with self._cv:
                self._replies.pop(message_id, None)
            raise

    # -- memory grants ----------------------------------------------------------

    def _await_granted_reply(self, message_id: int, grant: LocalGrant, deadline: float | None) -> Message:
        """Wait for the reply, serving the server's fallback reads and writes meanwhile.

        They come here, to the thread that made the request, in the order they
        were sent: every write into the grant lands before the reply returns.
        """
        def take() -> Message | None:
            ops = self._grant_ops.get(message_id)
            if ops:
                return ops.popleft()
            return self._replies.pop(message_id, None)

        try:
            while True:
                message = self._wait_for(take, deadline, "the reply")
                if message.type is MessageType.GRANT_READ:
                    self._answer_grant_read(message_id, message, grant, deadline)
                elif message.type is MessageType.GRANT_WRITE:
                    self._apply_grant_write(message, grant)
                else:
                    return message
        except BaseException:
            with self._state:
                self._channel.abandon(message_id)
            with self._cv:
                self._replies.pop(message_id, None)
                leftovers = self._grant_ops.pop(message_id, deque())
            for op in leftovers:
                if op.view is not None:
                    op.view.release()
            raise
        finally:
            with self._cv:
                self._grant_ops.pop(message_id, None)

    def _answer_grant_read(self, request_id: int, message: Message, grant: LocalGrant,
                           deadline: float | None) -> None:
        span: Range = message.grant
        chunk = grant.memory[span.offset:span.offset + span.length]
        if span.length <= self._channel.inline_threshold:
            self._send(lambda: self._channel.grant_payload(MessageType.GRANT_DATA, request_id, span, bytes(chunk)),
                       deadline)
        else:
            self._send_section(MessageType.GRANT_DATA, chunk, deadline, False, callback_id=request_id, span=span,
                               as_view=True)

    @staticmethod
    def _apply_grant_write(message: Message, grant: LocalGrant) -> None:
        span: Range = message.grant
        target = grant.memory[span.offset:span.offset + span.length]
        if message.view is not None:
            with message.view as memory:
                _native.copy_into(target, memory)
        else:
            _native.copy_into(target, message.data)

    def _direct_ok(self, memory: PeerMemory) -> bool:
        """May we touch the client's memory directly for ``memory`` now?"""
        with self._state:
            if not self._channel.grant_active(memory):
                raise SectionError("the grant ended: its request was already replied to")
        self._raise_if_failed()
        if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
            raise PeerGone("the client process exited")
        sections = self._channel.sections
        return sections is not None and sections.direct_memory and not self._vm_refused

    def _grant_read(self, memory: PeerMemory, offset: int, into: memoryview, timeout: float | None) -> None:
        if self._direct_ok(memory):
            if direct_read(self.peer.pid, memory.attr, offset, into):
                memory.direct = True
                return
            self._vm_refused = True  # EPERM: the kernel will refuse the rest of this connection too
        memory.direct = False
        deadline = deadline_after(timeout)
        self._send(lambda: self._channel.grant_read(memory, offset, into.nbytes), deadline)
        try:
            answer = self._wait_for(lambda: self._grant_data.pop(memory.request_id, None), deadline,
                                    "the client's granted data")
        except BaseException:
            with self._state:
                self._channel.grant_read_abandoned(memory)
            with self._cv:
                late = self._grant_data.pop(memory.request_id, None)
            if late is not None and late.view is not None:
                late.view.release()
            raise
        if answer.grant is None:
            raise SectionError("the client withdrew the grant (its request is over)")
        if answer.view is not None:
            with answer.view as source:
                _native.copy_into(into, source)
        else:
            _native.copy_into(into, answer.data)

    def _grant_write(self, memory: PeerMemory, offset: int, payload: memoryview, timeout: float | None) -> None:
        if self._direct_ok(memory):
            if direct_write(self.peer.pid, memory.attr, offset, payload):
                memory.direct = True
                return
            self._vm_refused = True
        memory.direct = False
        deadline = deadline_after(timeout)
        span = Range(offset, payload.nbytes)
        if payload.nbytes <= self._channel.inline_threshold:
            self._send(lambda: self._channel.grant_payload(MessageType.GRANT_WRITE, memory.request_id, span,
                                                           bytes(payload)), deadline)
        else:
            self._send_section(MessageType.GRANT_WRITE, payload, deadline, False, callback_id=memory.request_id,
                               span=span, as_view=True)

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
        quick = self._quick
        if quick is not None:
            # Quick-LPC: wait on the ring and the socket together; None means read the socket.
            done = quick.before_read(self, deadline, block)
            if done is not None:
                return done
        if block and not wait_readable(self.wait_fds(), deadline):
            return False
        got = self._stream.recv_fds(self._max_fds_per_read)
        if got is None:
            if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
                self._connection_lost("the peer process exited")
            return True
        data, fds, sender, truncated = got
        if not data:
            close_fds(fds)
            self._connection_lost("the peer process died or dropped the connection")
            return True
        try:
            with self._state:
                messages = self._channel.receive(data, fds, sender, truncated)
                automatic = self._channel.take_automatic()
                copies, self._channel.copies_waiting = self._channel.copies_waiting, False
                urgent, self._channel.releases_urgent = self._channel.releases_urgent, False
            if copies:
                materialize(messages)
        except ProtocolError as exc:
            self.stats.errors += 1
            peer = self.peer
            _limited.log(logging.WARNING, ("protocol", peer.uid, peer.pid),
                         f"protocol error from pid {peer.pid}, dropping the connection: {exc}",
                         extra=fields(pid=peer.pid, uid=peer.uid, gid=peer.gid))
            self._fail(PeerGone(f"protocol error: {exc}"), notice=f"protocol error: {exc}")
            return True
        if automatic:
            self._send(lambda: automatic, deadline_after(1.0))
        if self._peer_sections is not None and (copies or self._peer_sections.pending or self._channel.unsent_releases):
            self._releases_due(urgent)
        if quick is not None:
            # Quick-LPC: what waits in the ring was sent before these bytes.
            messages = quick.drain(self) + messages
        self._dispatch(messages)
        if quick is not None:
            quick.consumed(len(data))
        return True

    def _dispatch(self, messages: list[Message]) -> None:
        with self._cv:
            self.stats.received(messages)
            for message in messages:
                message.port = self
                kind = message.type
                if kind is MessageType.REPLY or kind is MessageType.PONG:
                    self._replies[message.callback_id] = message
                elif kind is MessageType.PORT_CLOSED:
                    self._set_failure(PeerGone(message.reason), message)
                elif kind is MessageType.GRANT_READ or kind is MessageType.GRANT_WRITE:
                    self._grant_ops.setdefault(message.callback_id, deque()).append(message)
                elif kind is MessageType.GRANT_DATA:
                    self._grant_data[message.callback_id] = message
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
        if self._quick is not None:
            # Quick-LPC: wake a thread waiting on the rings.
            self._quick.close()
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
        if self._quick is not None:
            self._quick.close()
        with self._send_lock:
            self._stream.close()
        with self._state:
            self._channel.release_resources()
        if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
            # A peer killed between creating a POSIX section and unlinking its
            # name (a few syscalls) leaves the name behind: clean up after it.
            sweep_stale_names(self.peer.pid)
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


def _owned(data: Buffer | Sequence[Buffer]) -> WirePayload:
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
    # A reply offering Quick-LPC rings carries their memfd.
    max_fds=1,
)


# What a restarting broker or server (or a full one: QuotaExceeded) looks like to a connecting client.
RETRYABLE_CONNECT_ERRORS = (BrokerUnavailable, PortNotFound, PeerGone, QuotaExceeded)


def connect(
    name: str,
    data: bytes = b"",
    *,
    timeout: float | None = None,
    config: Config | None = None,
    retry_timeout: float | None = None,
    server_uid: int | None = None,
) -> CommunicationPort:
    """Connect to the named port; returns the client communication port once accepted.

    Raises PortNotFound, ConnectionRejected (with the server's reason), Timeout,
    BrokerUnavailable, AccessDenied (the port's ACL refused us, or its owner
    is not ``server_uid``), QuotaExceeded (a limit of the port or the broker is
    full), or PeerGone if the server vanished before answering.
    ``server_uid`` pins the server (ALPC's RequiredServerSid): the broker
    refuses a port owned by another uid before the connect data leaves, and
    this side checks the kernel's credentials of the server's reply too.
    With ``retry_timeout`` (seconds), BrokerUnavailable, PortNotFound, that
    PeerGone and QuotaExceeded are retried with backoff while the broker or the
    server restarts or is full; no attempt starts after it runs out, and each
    attempt has ``timeout``.
    """
    if retry_timeout:
        return retry_until(lambda: _connect_once(name, data, timeout=timeout, config=config, server_uid=server_uid),
                           retry_timeout, RETRYABLE_CONNECT_ERRORS)
    return _connect_once(name, data, timeout=timeout, config=config, server_uid=server_uid)


def _connect_once(
    name: str,
    data: bytes = b"",
    *,
    timeout: float | None = None,
    config: Config | None = None,
    server_uid: int | None = None,
) -> CommunicationPort:
    config = config or Config.from_env()
    validate_port_name(name)
    data = bytes(data)
    if len(data) > config.max_connect_data:
        raise MessageTooLarge(f"connect data of {len(data)} bytes exceeds {config.max_connect_data}")
    timeout = config.connect_timeout if timeout is None else timeout
    deadline = deadline_after(timeout)
    if server_uid is not None and (type(server_uid) is not int or server_uid < 0):
        raise ValueError(f"server_uid must be a uid (int >= 0), not {server_uid!r}")
    local_flow = config.flow_limits()
    stream = Stream.connect(config.broker_socket, timeout)
    pidfds: list[int] = []
    quick_fd: int | None = None
    try:
        # SO_PASSCRED stays on: every read of the channel brings the sender's credentials.
        stream.set_passcred(True)
        # For the handshake only: the server's reply brings a pidfd of the server (SCM_PIDFD).
        passpidfd = stream.set_passpidfd(True)
        request = control.Connect(name=name, data=data, max_message_length=config.max_message_length,
                                  max_section_bytes=config.max_section_bytes,
                                  flow=control.FlowSpec.of(local_flow, kinds_mask(config.handle_kinds)),
                                  required_server_uid=-1 if server_uid is None else server_uid)
        try:
            stream.send(control_frame(request), deadline=deadline)
        except ConnectionClosed:
            raise refusal_after_hangup(stream) or BrokerUnavailable("the broker went away during the connect") \
                from None
        reply, server, quick_fd = _await_connection_reply(stream, name, deadline, pidfds if passpidfd else None)
        if not reply.accepted:
            raise ConnectionRejected(reply.reason)
        if server_uid is not None and server.uid != server_uid:
            # The broker said otherwise, or was not asked: the kernel's word wins.
            raise AccessDenied(f"the server of {name!r} runs as uid {server.uid}, not the required uid {server_uid}")
        peer_flow = reply.flow.limits()
        if passpidfd:
            stream.set_passpidfd(False)
    except BaseException:
        stream.close()
        close_fds(pidfds + ([quick_fd] if quick_fd is not None else []))
        raise
    pidfd = pidfds[0] if pidfds else pidfd_open(server.pid)
    try:
        quick = _accept_quick(reply, quick_fd, config, stream, pidfd)
    except BaseException:
        stream.close()
        close_fds([pidfd] if pidfd is not None else [])
        raise
    sections = ConnectionSections.build(
        inline_threshold=reply.inline_threshold,
        send_quota=min(config.max_section_bytes, reply.max_section_bytes),
        recv_quota=config.max_section_bytes, max_length=config.max_message_length,
        section_size=config.section_size, backend=config.section_backend,
        allow_unsealed=config.allow_unsealed_sections, secure=reply.secure_views,
    )
    policy = ConnectionPolicy(local=local_flow, peer=peer_flow, accept_kinds=config.accept_kinds(),
                              peer_kinds=kinds_from_mask(reply.flow.handle_kinds),
                              refuse_identity_change=config.refuse_identity_change)
    channel = Channel(server, send_limit=reply.max_message_length,
                      recv_limit=config.max_message_length, local_pid=os.getpid(), sections=sections, policy=policy)
    return CommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=False, accept_data=reply.data,
                             quick=quick)


def _accept_quick(reply: control.ConnectionReply, fd: int | None, config: Config, stream: Stream,
                  pidfd: int | None) -> qlpc.QuickLink | None:
    """Quick-LPC: map the rings the server offered, or decline them (the connection stays on the socket)."""
    if (fd is None) != (reply.quick_slots == 0):
        close_fds([fd] if fd is not None else [])
        raise ProtocolError("the connection reply's Quick-LPC offer and its fd do not match")
    if fd is None:
        return None
    if not config.quick_lpc or config.refuse_identity_change or not qlpc.available():
        # (Ring messages carry no SCM_CREDENTIALS: a side that refuses identity changes keeps to the socket.)
        close_fds([fd])
        return None
    return qlpc.QuickLink.accept(fd, reply.quick_slots, reply.quick_slot_size, config.quick_spin_us,
                                 stream.fileno(), pidfd)


def _await_connection_reply(
    stream: Stream, name: str, deadline: float | None, pidfds: list[int] | None = None,
) -> tuple[control.ConnectionReply, PeerCred, int | None]:
    frame, cred = read_frame(stream, FrameDecoder(_HANDSHAKE_LIMITS), deadline, f"port {name!r} to answer",
                             max_fds=1, pidfds=pidfds)
    if frame is None:
        raise PeerGone(f"the server of {name!r} went away before answering the connect")
    try:
        reply, server = _connection_reply(frame, cred)
    except BaseException:
        close_fds(frame.fds)
        raise
    return reply, server, frame.fds[0] if frame.fds else None


def _connection_reply(frame: Frame, cred: PeerCred | None) -> tuple[control.ConnectionReply, PeerCred]:
    if frame.type is not MessageType.CONNECTION_REPLY and frame.fds:
        raise ProtocolError(f"a {frame.type.name} frame carried an fd")
    if frame.type is MessageType.ERROR:
        raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
    if frame.type is MessageType.SHUTDOWN:
        raise BrokerUnavailable("the broker is shutting down")
    if cred is None:
        raise ProtocolError("the connection reply carried no credentials")
    reply = control.decode_body(frame.type, frame.data, control.ConnectionReply)
    if reply.accepted and (reply.inline_threshold < 0 or reply.max_section_bytes < 0 or reply.max_message_length < 0):
        raise ProtocolError("the connection reply announced negative limits")
    if not reply.accepted and frame.fds:
        raise ProtocolError("a rejection carried an fd")
    return reply, cred


# -- server side -------------------------------------------------------------------


class ConnectionRequest:
    """A client asking to connect; ``client`` is its kernel-verified identity.

    ``groups`` are its supplementary groups (SO_PEERGROUPS). The port's ACL
    has admitted it already (the broker checked, and this runtime again).
    """

    def __init__(self, port: ConnectionPort, stream: Stream, info: control.ConnectionRequestInfo,
                 client: PeerCred, groups: tuple[int, ...], peer_flow: FlowLimits) -> None:
        self._port = port
        self._stream: Stream | None = stream
        self.client = client
        self.groups = groups
        # Every read of the channel brings the sender's SCM_CREDENTIALS from now on.
        stream.set_passcred(True)
        self._pidfd = stream.peer_pidfd()
        self.data = info.data
        self.port_name = info.name
        self._client_max_message = info.max_message_length
        self._client_max_sections = info.max_section_bytes
        self._peer_flow = peer_flow
        self._peer_kinds = kinds_from_mask(info.flow.handle_kinds)

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
        attributes = self._port.attributes
        local_flow = attributes.flow_limits()
        quick, ring_fds = _offer_quick(attributes, stream, pidfd)
        reply = control.ConnectionReply(accepted=True, data=data, reason="",
                                        max_message_length=attributes.max_message_length,
                                        inline_threshold=attributes.inline_threshold,
                                        max_section_bytes=attributes.max_section_bytes,
                                        secure_views=attributes.secure_views,
                                        flow=control.FlowSpec.of(local_flow, kinds_mask(attributes.handle_kinds)),
                                        quick_slots=attributes.quick_slots if quick else 0,
                                        quick_slot_size=attributes.quick_slot_size if quick else 0)
        try:
            stream.send(control_frame(reply, n_fds=len(ring_fds)), ring_fds, deadline=deadline_after(timeout))
        except (ConnectionClosed, Timeout):
            if quick is not None:
                quick.close()
            stream.close()
            close_fds([pidfd] if pidfd is not None else [])
            raise PeerGone(f"client pid {self.client.pid} went away before the accept") from None
        finally:
            # The client holds its own copy now (the rings stay mapped on our side).
            close_fds(ring_fds)
        sections = ConnectionSections.build(
            inline_threshold=attributes.inline_threshold,
            send_quota=min(attributes.max_section_bytes, max(self._client_max_sections, 0)),
            recv_quota=attributes.max_section_bytes, max_length=attributes.max_message_length,
            section_size=attributes.section_size, backend=attributes.section_backend,
            allow_unsealed=attributes.allow_unsealed_sections, secure=attributes.secure_views,
            budget=self._port._section_budget, direct_memory=attributes.direct_memory,
        )
        policy = ConnectionPolicy(local=local_flow, peer=self._peer_flow, accept_kinds=attributes.accept_kinds(),
                                  peer_kinds=self._peer_kinds,
                                  refuse_identity_change=attributes.refuse_identity_change)
        channel = Channel(self.client, send_limit=self._client_max_message,
                          recv_limit=attributes.max_message_length, local_pid=os.getpid(), sections=sections,
                          policy=policy)
        return self._port._adopt(stream, channel, pidfd, quick)

    def reject(self, reason: str = "rejected") -> None:
        """Refuse: the client's connect() raises ConnectionRejected carrying ``reason``."""
        stream = self._take_stream()
        self._port._stats.connects_rejected += 1
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


def _offer_quick(attributes: PortAttributes, stream: Stream,
                 pidfd: int | None) -> tuple[qlpc.QuickLink | None, list[int]]:
    """Quick-LPC: the rings to offer with an accept (and the fd to pass), if the port offers them."""
    if not attributes.quick_lpc or not qlpc.available():
        return None, []
    try:
        quick, fd = qlpc.offer(attributes.quick_slots, attributes.quick_slot_size, attributes.quick_spin_us,
                               stream.fileno(), pidfd)
    except (QuotaExceeded, OSError) as exc:
        log.warning("cannot offer Quick-LPC rings, the connection uses its socket: %s", exc)
        return None, []
    return quick, [fd]


def create_port(
    name: str,
    attributes: PortAttributes | None = None,
    *,
    config: Config | None = None,
    timeout: float | None = None,
    reregister_timeout: float = 60.0,
    report_interval: float = 1.0,
) -> ConnectionPort:
    """Create a named connection port through the broker.

    Raises NameInUse if a live port has the name, InvalidName for a bad name,
    BrokerUnavailable if no broker runs. If the broker goes away later, the
    port registers its name again by itself, with backoff, for up to
    ``reregister_timeout`` seconds (0: never); established connections keep
    working meanwhile. ``report_interval`` is how often the port reports its
    figures to the broker (``alpc peers``, ``alpc stats``).
    """
    config = config or Config.from_env()
    attributes = attributes or PortAttributes()
    validate_port_name(name)
    timeout = config.connect_timeout if timeout is None else timeout
    link = Registration(name, attributes, config, reregister_timeout=reregister_timeout,
                        report_interval=report_interval)
    try:
        link.open(timeout)
    except BaseException:
        link.close()
        raise
    port = ConnectionPort(name, link, attributes, config)
    link.start(port._status, port._drain_registration)
    return port


class ConnectionPort:
    """A named server port: listen for connections and wait on every client at once.

    If the broker goes away, the port keeps serving its established
    connections and registers its name again when the broker is back. Should
    that fail (the timeout ran out, or another process took the name
    meanwhile), ``listen`` raises the error (BrokerUnavailable or NameInUse)
    and ``wait`` raises it once, then goes on delivering messages.
    """

    def __init__(self, name: str, link: Registration, attributes: PortAttributes, config: Config) -> None:
        self.name = name
        self.attributes = attributes
        self.config = config
        self._link = link
        self._lock = threading.RLock()
        self._requests: deque[ConnectionRequest] = deque()
        self._unanswered: set[ConnectionRequest] = set()
        self._connections: list[CommunicationPort] = []
        self._stats = PortStatistics()
        self._error_reported = False
        self._closed = False
        self._turn = 0
        self._section_budget = Budget(attributes.max_port_section_bytes)
        # Quick-LPC: the watcher thread lives as long as a port offering the rings.
        self._quick_held = attributes.quick_lpc and qlpc.hold_watcher()

    def __repr__(self) -> str:
        return f"<ConnectionPort {self.name!r} with {len(self._connections)} clients>"

    @property
    def connections(self) -> list[CommunicationPort]:
        with self._lock:
            return list(self._connections)

    @property
    def registered(self) -> bool:
        """Whether the broker knows this port now (False during a broker restart)."""
        return self._link.live

    @property
    def registrations(self) -> int:
        """How many times the name was registered: 1, plus one per re-registration."""
        return self._link.registrations

    # -- connection requests ---------------------------------------------------

    def listen(self, timeout: float | None = None) -> ConnectionRequest:
        """Wait for the next connection request."""
        deadline = deadline_after(timeout)
        while True:
            with self._lock:
                request = self._next_request()
                if request is not None:
                    return request
                fds = self._link.wait_fds()
            if not wait_readable(fds, deadline):
                raise Timeout("no connection request arrived in time")
            with self._lock:
                self._read_registration()

    def _next_request(self) -> ConnectionRequest | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        error = self._link.error
        if error is not None:
            raise type(error)(*error.args)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"port {self.name!r} is closed")

    def _read_registration(self) -> None:
        # Caller holds _lock.
        if self._closed:
            return
        for frame in self._link.read():
            self._handle_registration_frame(frame)

    def _drain_registration(self) -> None:
        """The keeper saw the broker hang up: take what it sent before, and notice the EOF."""
        with self._lock:
            self._read_registration()

    def _handle_registration_frame(self, frame: Frame) -> None:
        try:
            info = control.decode_body(frame.type, frame.data, control.ConnectionRequestInfo)
            peer_flow = info.flow.limits()
            stream = Stream.from_fd(frame.fds[0])
        except (ProtocolError, OSError) as exc:
            close_fds(frame.fds)
            log.error("bad connection request from the broker: %s", exc, extra=fields(port=self.name))
            return
        if wait_readable([stream.fileno()], 0.0):
            # The client already gave up (timeout or death); nobody to answer.
            stream.close()
            return
        try:
            client, groups = stream.peer_cred(), stream.peer_groups()
        except OSError:
            stream.close()
            return
        refusal = self._refusal(client, groups)
        if refusal is not None:
            self._turn_away(stream, client, *refusal)
            return
        request = ConnectionRequest(self, stream, info, client, groups, peer_flow)
        self._unanswered.add(request)
        self._requests.append(request)

    def _refusal(self, client: PeerCred, groups: tuple[int, ...]) -> tuple[str, str, str] | None:
        """Why this runtime refuses a client before the application sees it: (code, message, limit).

        The broker checked the ACL already; checking again here, against the
        kernel's identity of the very socket we were handed, keeps the port
        closed even to a broker that erred.
        """
        decision = self.attributes.acl.check(client, groups, os.geteuid())
        if not decision.allowed:
            self._stats.connects_rejected += 1
            return control.ErrorCode.ACCESS_DENIED, f"access to port {self.name!r} denied: {decision.reason}", ""
        held = len(self._connections) + len(self._unanswered)
        if held >= self.attributes.max_connections:
            self._stats.connects_rejected += 1
            return (control.ErrorCode.BUSY, f"port {self.name!r} has {held} connections, its max_connections",
                    Limit.MAX_CONNECTIONS)
        return None

    def _turn_away(self, stream: Stream, client: PeerCred, code: str, message: str, limit: str) -> None:
        _limited.log(logging.WARNING, ("refused", code, client.uid), f"refused pid {client.pid} uid {client.uid}: "
                     f"{message}", extra=fields(port=self.name, pid=client.pid, uid=client.uid))
        try:
            stream.try_send(control_frame(control.ErrorReply(code=code, message=message, limit=limit)))
        except ConnectionClosed:
            pass
        stream.close()

    def _forget_request(self, request: ConnectionRequest) -> None:
        with self._lock:
            self._unanswered.discard(request)

    # -- communication ports ----------------------------------------------------

    def _adopt(self, stream: Stream, channel: Channel, pidfd: int | None,
               quick: qlpc.QuickLink | None = None) -> CommunicationPort:
        comm = CommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=True, on_gone=self._forget,
                                 send_timeout=self.attributes.send_timeout, quick=quick)
        with self._lock:
            self._connections.append(comm)
            self._stats.connects_accepted += 1
        self._link.report_soon()
        return comm

    def _forget(self, comm: CommunicationPort) -> None:
        with self._lock:
            if comm in self._connections:
                self._connections.remove(comm)
                self._stats.retire(comm.stats)
        self._link.report_soon()

    def _status(self) -> control.PortStatus:
        """The report the keeper sends the broker: every client and the port's counters."""
        with self._lock:
            live = [LiveConnection(comm.peer, comm.stats, comm.queue_depth) for comm in self._connections]
            return self._stats.report(live)

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
                hot = self._quick_armed() if ready is None else []
            if isinstance(ready, Message):
                ready.port._maybe_finalize()
                if ready.type is MessageType.DATAGRAM:
                    ready.port._credit_check()
            if ready is not None:
                return ready
            fired = wait_readable(list(owners), 0.0 if hot else deadline)
            if not fired and not hot:
                raise Timeout("nothing arrived on the port in time")
            for comm in hot:
                comm.pump()
            for fd in fired:
                owner = owners[fd]
                if isinstance(owner, CommunicationPort):
                    owner.pump()
                else:
                    with self._lock:
                        self._read_registration()

    def _wait_owners(self) -> dict[int, ConnectionPort | CommunicationPort]:
        owners: dict[int, ConnectionPort | CommunicationPort] = dict.fromkeys(self._link.wait_fds(), self)
        for comm in self._connections:
            for fd in comm.wait_fds():
                owners[fd] = comm
        return owners

    def _quick_armed(self) -> list[CommunicationPort]:
        """Quick-LPC: ring each client's doorbell from now on; those whose ring already holds requests."""
        return [comm for comm in self._connections if comm._quick is not None and comm._quick.arm()]

    def _next_event(self) -> ConnectionRequest | Message | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        error = self._link.error
        if error is not None and not self._error_reported:
            self._error_reported = True
            raise type(error)(*error.args)
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
        # The link first: its keeper must not keep watching a port that no longer reads it.
        self._link.close()
        for request in requests:
            request.close()
        for comm in connections:
            comm.close()
        if self._quick_held:
            self._quick_held = False
            qlpc.release_watcher()

    def __enter__(self) -> ConnectionPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
