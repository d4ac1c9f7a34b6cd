"""The blocking API: communication ports and connect().

A thin driver of the sans-IO core (``connection.Connection``): it moves bytes
between a ``transport`` stream and the core, and wakes waiting threads. Every
rule (what to send, where a message goes, when releases go out, what a dead
peer means) lives in the core, shared with the asyncio driver (``aio``).

Locks: ``_cv`` (waiters; also the reader role) -> ``_send_lock`` (one writer
at a time) -> ``_state`` (the core; a leaf, held briefly). Never finalize
(close the socket) while holding ``_cv`` or from a thread holding
``_send_lock``. The server side (``ConnectionPort``) lives in ``server``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from . import control, qlpc
from .config import MAX_CONNECT_DATA, Config, config_or_default
from .connection import (
    BACKLOG_LIMIT,
    BUDGET_RECHECK,
    FILED_ERROR,
    FILED_INBOX,
    NOTICES,
    SPACE_REASK,
    Batch,
    Body,
    Connection,
    Owed,
    body_size,
    check_max_messages,
    copy_body,
    owned_body,
    reply_lost,
)
from .control import validate_port_name
from .errors import (
    AccessDenied,
    AlpcError,
    BrokerUnavailable,
    ConnectionClosed,
    ConnectionRejected,
    DeadlineExceeded,
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
from .logs import LogLimiter, fields
from .protocol import EAGER_COPY_MAX, QUICK_ID_BIT, Channel, ConnectionPolicy, Frames, Message
from .protocol import Payload as WirePayload
from .quotas import Limit, WindowClosed
from .retry import retry_until
from .section import ConnectionSections, RingView, SectionView, check_size, sweep_stale_names
from .security import PeerCred, kinds_from_mask, kinds_mask
from .transport import (
    Buffer,
    ChannelRead,
    Stream,
    advance_buffers,
    close_fds,
    deadline_after,
    finalize_unclosed,
    is_live_socket,
    pidfd_open,
    remaining,
    wait_readable,
)
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, Range

__all__ = [
    "RETRYABLE_CONNECT_ERRORS",
    "CommunicationPort",
    "Payload",
    "PendingRequest",
    "connect",
]

log = logging.getLogger(__name__)
# A hostile client reconnecting to send garbage must not flood the server's log.
_limited = LogLimiter(log)

T = TypeVar("T")

# Runtime frames (releases, PONG) go out from the reader; a peer that stops
# reading for this long keeps them queued rather than stalling our reads.
_RUNTIME_SEND_TIMEOUT = 1.0
# How long close() (and a process ending normally) waits for room for queued datagrams and
# its PORT_CLOSED.
_CLOSE_FLUSH_TIMEOUT = 1.0
# reply_at_once: the largest body it writes, and the room it wants in the socket for that body
# with everything the core may owe before it (queued datagrams up to BACKLOG_LIMIT, releases,
# a credit) and the kernel's overhead per buffer.
_AT_ONCE_BODY = 4096
_AT_ONCE_ROOM = BACKLOG_LIMIT + 32 * 1024
# send_many writes at most this many small datagrams per system call: the
# receiver decodes the first ones while the sender frames the next. Measured
# with 500 x 64 B per batch: 1024 (one write) ~610k msg/s on one CPU and
# ~600k across two; 128 the same on one CPU and ~710k across two; 64 lost a
# few percent on one CPU to the extra writes. The first write of a batch is
# smaller, so the receiver starts sooner.
_BATCH_FRAMES = 128
_FIRST_BATCH_FRAMES = 32
_REQUEST = MessageType.REQUEST
# Held only to make a port's _cv (once) when its first waiter comes.
_COND_MADE = threading.Lock()


def _ring_body(data: Payload, quick: qlpc.QuickLink) -> bytes | RingView | None:
    """What the rings can carry of a body that is not bytes: a copy of a bytes-like one, a
    view lent by this connection's own bulk area as it is; None: the socket path takes it."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if type(data) is RingView and data.owner is quick:
        return data
    if type(data) is SectionView:
        quick.views_in_ring = True  # a section's view where a lent one would have gone in place
    return None


def _owned(lock: threading.RLock) -> bool:
    """Whether this thread holds ``lock`` (an RLock's acquire would succeed for it, reentrantly)."""
    owned: bool = lock._is_owned()  # type: ignore[attr-defined]
    return owned


# A read stops after the write that carried fds, and a sender passes fds with
# one frame per write: a section's fd, then that message's handles (so one
# read takes 1 + max_handles_per_message).


# What request/send/reply take (connection.Body): one buffer, parts, or a filled view.
Payload = Body


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
        if quick is not None:
            quick.limit(channel.send_limit, channel.recv_limit)
        if quick is not None and not is_server:
            channel.quick_claims = quick.claims
            # The lean call is one Python frame around the C call on this connection.
            self.call = quick.bind_call(self)  # type: ignore[method-assign]
        self._channel = channel
        self._core = core = Connection(channel, is_server=is_server)
        core.owner = self
        core.on_releases_due = self._flush_releases
        core.on_request_dropped = self._request_dropped
        self._pidfd = peer_pidfd
        # A server bounds every send (its caller's None included): a client that
        # stops reading must not hold the server's thread forever.
        self._send_timeout = send_timeout
        self._max_fds_per_read = 1 + channel.policy.local.max_handles_per_message
        self._is_server = is_server
        self.accept_data = accept_data
        self._on_gone = on_gone
        # A multiplexer (ConnectionPort) hears when the inbox gets something.
        self._on_ready: Callable[[CommunicationPort], None] | None = None
        # Whether the multiplexer's ready queue holds this port (it is queued once, not per message).
        self._queued = False
        # ... and which requests the client cancelled (a completion port stops their handlers).
        self._on_cancel: Callable[[list[Message]], None] | None = None
        # ... and, asked by a send short of the port's section budget, has its other
        # connections give back their idle sections (idle, they never come back by themselves).
        self._on_budget_blocked: Callable[[CommunicationPort], None] | None = None
        self._state = threading.Lock()
        # Reentrant: a failing write may itself need to send (never to finalize).
        self._send_lock = threading.RLock()
        # _cv's lock, entered directly on the per-message path (Condition's own
        # __enter__ is a Python-level call).
        self._cv_lock = threading.Lock()
        # _cv itself is made by the first thread that waits on it: most ports never have two
        # threads at once, and a Condition (its deque of waiters) costs ~1 KiB per port.
        self._cond: threading.Condition | None = None
        # Threads blocked in _cv.wait(): the reader notifies only when there are some.
        self._waiters = 0
        self._reading = False
        # Ids of PendingRequests dropped unread (noted by their finalizers; the next read forgets
        # them). A list: append and pop(0) are atomic as a deque's are, at 56 bytes, not 760.
        self._dropped: list[int] = []
        # Runtime frames another thread left owed rather than wait for a write in progress.
        self._owed_left = False
        # Answers to requests dropped unanswered, queued in the core but not written (a write
        # was under way, or the socket had no room): the next read sends them if no write did.
        self._answers_owed = False
        # Set when _write raised after the caller's frames went out whole (see _written).
        self._frames_left = False
        self.stats = core.stats
        stream.watch([peer_pidfd] if peer_pidfd is not None else [])
        # Last: until here the caller owns the fds (it closes them if this fails), so __del__,
        # which acts only once this is set, never closes them a second time.
        self._released = False

    @property
    def _cv(self) -> threading.Condition:
        """The waiters' condition (on ``_cv_lock``), made at first use. Made once: two made at
        once would each have waiters the other's notify never reaches."""
        cond = self._cond
        if cond is None:
            with _COND_MADE:
                cond = self._cond
                if cond is None:
                    self._cond = cond = threading.Condition(self._cv_lock)
        return cond

    def _notify_waiters(self) -> None:
        """Wake the threads waiting on _cv; the caller holds ``_cv_lock``. No condition yet:
        nobody ever waited (a waiter makes it under that lock before it sleeps)."""
        cond = self._cond
        if cond is not None:
            cond.notify_all()

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
    def quick(self) -> bool:
        """Whether small requests and their replies go through Quick-LPC rings (alpc.qlpc)."""
        return self._quick is not None and self._core.failure is None and self._quick.active

    # What qlpc (which drives the rings for this driver) reads of its state.
    @property
    def _replies(self) -> dict[int, Message]:
        return self._core.replies

    @property
    def _inbox(self) -> deque[Message]:
        return self._core.inbox

    @property
    def _failure(self) -> ConnectionClosed | None:
        return self._core.failure

    def _pop_inbox(self) -> Message | None:
        with self._state:
            return self._core.take_message()

    def _dispatch(self, messages: list[Message]) -> None:
        """File messages that came through the rings, as if read from the socket."""
        with self._state:
            wake = self._core.route(Batch(messages, False, None))
        if wake.inbox and self._on_ready is not None and not self._queued:
            self._queued = True  # queued once, not per message (ConnectionPort._next_event clears it)
            self._on_ready(self)

    @property
    def closed(self) -> bool:
        return self._core.failure is not None

    def fileno(self) -> int:
        """The socket's fd number; -1 once the port released it, as a closed socket.socket says,
        never the old number: another file opened since may have it. (-1, not an exception:
        selectors.unregister() of a closed port finds its key by -1's ValueError.)"""
        if self._stream.closed:
            return -1
        return self._stream.fileno()

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._core.inbox)

    def __repr__(self) -> str:
        side = "server" if self._is_server else "client"
        state = "closed" if self.closed else "open"
        return f"<CommunicationPort {side} side, peer pid {self.peer.pid}, {state}>"

    # -- sending ----------------------------------------------------------------

    def request(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
                grant: MemoryGrant | None = None, deadline: float | None = None,
                on_message: Callable[[Message], None] | None = None, fds: Sequence[int] = ()) -> Message:
        """Send a request and wait for its reply.

        ``data`` longer than the inline threshold goes through a shared section;
        a ``SectionView`` from ``create_view`` goes with no copy at all. ``secure``
        sends it write-sealed; ``grant`` lends the server a buffer for this request.
        ``deadline`` (a ``time.monotonic()`` value) travels with the request: the
        server never dispatches it later, and this call waits at most until then
        (DeadlineExceeded). A timeout cancels the request at the server (CANCEL).
        ``data`` may also be a sequence of buffers, sent as one message without
        being joined. ``fds`` are passed along (the peer gets copies; these stay
        yours). While the peer holds ``max_pending_requests`` of ours, this waits
        for a reply first (Throttled when ``timeout`` runs out meanwhile).

        With ``on_message``, the REQUEST and DATAGRAM messages that arrive while
        this call waits (and that no other thread takes first with receive())
        are handed to it on this thread, so the peer may call back into us
        (ALPC's nested callbacks) instead of its request waiting in the inbox
        behind our own wait. If ``on_message`` raises (or a signal handler does, Ctrl-C),
        the request is cancelled at the server, as a timeout cancels it, and the exception
        propagates.
        """
        if timeout is None:
            timeout = self._send_timeout
        if fds:
            self._channel.check_handles(fds)
        if on_message is not None:
            if grant is not None or deadline is not None:
                raise ValueError("on_message cannot be combined with a memory grant or a deadline")
            return self._request_serving(data, timeout, secure, on_message, fds)
        if deadline is not None:
            # ``timeout`` bounds the whole call: the reply gets what the send (which may wait for
            # the peer's window or socket) left of it, not a fresh ``timeout``.
            wait_until = deadline_after(timeout)
            pending = self.start_request(data, secure=secure, grant=grant, deadline=deadline, timeout=timeout, fds=fds)
            return pending.result(remaining(wait_until))
        deadline = deadline_after(timeout)
        size = len(data) if type(data) is bytes else body_size(data)
        quick = self._quick
        # The rings carry the client's requests only: a server's go by the socket.
        if (quick is not None and not quick.server and size <= quick.carry_max
                and grant is None and not secure and not fds
                and (carried := data if type(data) is bytes else _ring_body(data, quick)) is not None):
            # Quick-LPC: the ring, unless it cannot take this one now. Datagrams queued
            # before (send(..., flush=False)) go first: order is kept.
            if self._core.backlogged:
                self._flush_by(deadline)
            self.stats.sent(size)
            reply = quick.request(self, carried, deadline)
            if reply is not None:
                return reply
            self.stats.messages_out -= 1
            self.stats.bytes_out -= size
        if grant is not None or isinstance(data, SectionView) or size > self._core.inline_threshold:
            self.stats.sent(size)
            return self._request_large(data, deadline, secure, grant, fds)
        body = owned_body(data)
        try:
            message_id = self._send_request(body, deadline, fds)
        except WindowClosed as closed:
            message_id = self._flow(lambda: self._send_request(body, deadline, fds), deadline, closed)
        self.stats.sent(size)
        return self._await_reply(message_id, deadline)

    def _lock_send(self, deadline: float | None) -> None:
        """Take the send lock by ``deadline`` (Timeout otherwise; the caller releases it).

        Another thread's send may hold it for as long as its own timeout allows, blocked
        on a peer that stopped reading: a call with a shorter timeout must not wait that long.
        """
        lock = self._send_lock
        if lock.acquire(blocking=False):
            return
        left = remaining(deadline)
        if not lock.acquire(timeout=-1 if left is None else min(left, threading.TIMEOUT_MAX)):
            raise Timeout("timed out waiting for another thread's send on this connection")

    def _send_request(self, body: WirePayload, deadline: float | None, fds: Sequence[int]) -> int:
        """Write a small request; its id. WindowClosed (nothing sent) while the peer's window is full."""
        core = self._core
        if not self._send_lock.acquire(False):  # uncontended: no call
            self._lock_send(deadline)
        try:
            with self._state:
                message_id, frames = core.request(body, fds=fds)
            try:
                self._write(frames, deadline, fds)
            except BaseException:
                self._forget_request(message_id)
                raise
        finally:
            self._send_lock.release()
        return message_id

    def _written(self) -> bool:
        """After ``_write`` raised: did any of the caller's frames leave? Part of one (the stream
        is cut), or all of them before a signal handler's exception (Ctrl-C) interrupted the
        write of what another thread left owed after them: the peer has them either way."""
        return self._stream.broken or self._frames_left

    def _forget_request(self, message_id: int) -> None:
        """A request whose write failed: gone entirely if none of it left, else abandoned."""
        if self._written():
            self._abandon(message_id)
        else:
            with self._state:
                self._core.unsent(message_id)

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
        If ``handler`` raises, the request it was given is answered empty at once (as
        CompletionPort and aio's serve answer a failed handler: the client would otherwise
        wait out its timeout, since nobody else holds the request) and the exception
        propagates; calling serve_requests() again serves on.
        """
        quick = self._quick
        while True:
            if quick is not None and quick.server and quick.active:
                other = quick.serve(self, handler, timeout)
                if other is not None:
                    if self._core.credit_due:
                        self._flush_releases()  # a datagram taken frees its slot in our window
                    return other
            # The slow way, one message at a time (the rings may be taken up meanwhile).
            message = self.receive(timeout)
            if message.type is not MessageType.REQUEST:
                return message
            self.reply(message, self._handled(handler, message), timeout)

    def _handled(self, handler: Callable[[bytes], Buffer], message: Message) -> Buffer:
        """``handler(message.data)``; if it raises, ``message`` is answered empty first (see serve_requests)."""
        try:
            return handler(message.data)
        except BaseException:
            self._answer_failed(message)
            raise

    def _answer_failed(self, message: Message) -> None:
        """An empty reply to a request whose handler raised; best effort, bounded: the
        handler's exception is what the caller hears about."""
        try:
            self.reply(message, b"", _RUNTIME_SEND_TIMEOUT)
        except (AlpcError, ValueError):
            pass  # the connection is gone or stuck (a stuck client is dropped), or it was answered

    def _request_serving(self, data: Payload, timeout: float | None, secure: bool,
                         on_message: Callable[[Message], None], fds: Sequence[int]) -> Message:
        """request(on_message=...): the peer's nested requests are served while we wait."""
        deadline = deadline_after(timeout)
        core = self._core
        size = len(data) if type(data) is bytes else body_size(data)
        if isinstance(data, SectionView) or size > core.inline_threshold:
            message_id = self._sending(
                lambda: self._send_section(MessageType.REQUEST, data, deadline, secure, fds=fds), deadline)
        else:
            body = owned_body(data)
            try:
                message_id = self._send_request(body, deadline, fds)
            except WindowClosed as closed:
                message_id = self._flow(lambda: self._send_request(body, deadline, fds), deadline, closed)
        self.stats.sent(size)
        try:
            while True:
                found = self._wait_reply(message_id, deadline, serving=True)
                if found.type is MessageType.REPLY:
                    return found
                if core.credit_due:
                    self._flush_releases()  # a datagram taken here frees its slot too
                on_message(found)
        except AlpcError as exc:
            if isinstance(exc, Timeout):
                self._give_up(message_id)
            else:
                self._abandon(message_id)
            raise
        except BaseException:
            # on_message's exception, or a signal handler's (Ctrl-C): nobody waits any more.
            self._give_up(message_id)
            raise

    def ping(self, timeout: float | None = None) -> None:
        """Round-trip a PING that the peer's runtime answers without its application."""
        deadline = deadline_after(timeout)
        message_id = self._send_new(self._core.ping, deadline)
        self._await_reply(message_id, deadline)

    def send(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
             flush: bool = True, fds: Sequence[int] = ()) -> None:
        """Send a datagram (no reply expected); ``fds`` are passed along.

        ``flush=False`` queues a small datagram instead of writing it: queued
        datagrams go out together, in one system call, with the next write on
        this port (any send, request or reply), on ``flush()``, or by themselves
        once 64 KiB are queued. Order is kept either way. (A datagram with fds
        is always written at once.) While the peer's application has
        ``max_queued_datagrams`` of ours still to take, this waits (Throttled
        when ``timeout`` runs out meanwhile).
        """
        if timeout is None:
            timeout = self._send_timeout
        deadline = deadline_after(timeout)
        size = len(data) if type(data) is bytes else body_size(data)
        core = self._core
        if fds:
            core.check_handles(fds)

        def send() -> None:
            if isinstance(data, SectionView) or size > core.inline_threshold:
                self._send_section(MessageType.DATAGRAM, data, deadline, secure, fds=fds)
            elif flush or fds:
                self._send_datagrams(lambda: (core.datagram(owned_body(data), fds), 1), deadline, fds)
            else:
                with self._state:
                    full = core.queue(core.datagram(owned_body(data)))
                if full:
                    self._flush_by(deadline)

        self._sending(send, deadline)
        self.stats.sent(size)

    def _sending(self, send: Callable[[], T], deadline: float | None) -> T:
        """Run ``send``; while the peer's flow window is closed, wait for it and try again."""
        try:
            return send()
        except WindowClosed as closed:
            return self._flow(send, deadline, closed)

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
        core = self._core
        if core.backlogged:
            # Datagrams queued by send(flush=False) hold their slots already: the peer credits
            # them only once they reach it, so waiting for that with them unsent waits for ever.
            self._flush_by(deadline)
        before = core.window_counts()

        def freed() -> bool | None:
            return True if any(now < was for now, was in zip(core.window_counts(), before, strict=True)) else None

        try:
            self._wait_for(freed, deadline, f"the peer to free its {closed.limit}")
        except Timeout:
            raise Throttled(f"waited for the peer to free its {closed.limit} until the timeout ({closed})",
                            limit=closed.limit) from None

    def send_many(self, items: Iterable[Payload], timeout: float | None = None) -> None:
        """Send datagrams in order, in as few system calls as possible (small ones are framed
        together and written at once; large ones go through the section as usual)."""
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)  # as send()
        threshold = self._core.inline_threshold
        small: list[bytes] = []
        append = small.append
        flush_at = _FIRST_BATCH_FRAMES
        for item in items:
            if not (type(item) is bytes and len(item) <= threshold):  # the common item passes one test
                try:
                    size = body_size(item)
                except TypeError:
                    # Not a body: the items before it go out, as one send() each would have sent them
                    # (those of earlier batches and large ones already did), and it raises then.
                    self._send_small(small, deadline)
                    raise
                if isinstance(item, SectionView) or size > threshold or not isinstance(
                        item, (bytes, bytearray, memoryview)):
                    self._send_small(small, deadline)
                    self.send(item, remaining(deadline))
                    continue
                item = bytes(item)
            append(item)
            if len(small) >= flush_at:
                self._send_small(small, deadline)
                flush_at = _BATCH_FRAMES
        self._send_small(small, deadline)

    def _send_small(self, items: list[bytes], deadline: float | None) -> None:
        """Write ``items`` in as few writes as the peer's datagram window allows."""
        while items:
            count = self._sending(lambda: self._send_batch(items, deadline), deadline)
            stats = self.stats
            stats.messages_out += count
            stats.bytes_out += sum(len(item) for item in items[:count])
            del items[:count]

    def _send_batch(self, items: list[bytes], deadline: float | None) -> int:
        return self._send_datagrams(lambda: self._core.datagrams(items), deadline)

    def _send_datagrams(self, make: Callable[[], tuple[Frames, int]], deadline: float | None,
                        fds: Sequence[int] = ()) -> int:
        """Write the datagrams ``make`` frames (and counts in the peer's window); how many. If
        none of their bytes left (a timeout), their slots are given back."""
        self._lock_send(deadline)
        try:
            with self._state:
                frames, count = make()
            try:
                self._write(frames, deadline, fds)
            except BaseException:
                # A timeout, or a signal handler's exception (Ctrl-C): if none of their bytes
                # left, the peer never counts them.
                if not self._written():
                    with self._state:
                        self._core.datagrams_unsent(count, len(fds))
                raise
        finally:
            self._send_lock.release()
        return count

    def flush(self, timeout: float | None = None) -> None:
        """Write every datagram queued by ``send(..., flush=False)``."""
        # A bad timeout is refused even with nothing queued; none is a server's send_timeout,
        # as for any send (a deaf client would hold this thread for ever otherwise).
        self._flush_by(deadline_after(self._send_timeout if timeout is None else timeout))

    def _flush_by(self, deadline: float | None) -> None:
        """flush() within a call that set its ``deadline`` before: what is left of it, not a
        fresh timeout (a send that waited for the peer's window, then flushed, lasted both)."""
        if self._core.owed:
            self._lock_send(deadline)
            try:
                self._write([], deadline)
            finally:
                self._send_lock.release()

    def start_request(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
                      grant: MemoryGrant | None = None, deadline: float | None = None,
                      fds: Sequence[int] = ()) -> PendingRequest:
        """Send a request without waiting: ``result(timeout)`` waits for the reply, and any
        thread may ``cancel()`` it meanwhile (the server sees the cancel; no reply is
        delivered after it). ``timeout`` bounds the send only (waiting for the peer's
        flow window included)."""
        send_by = deadline_after(self._send_timeout if timeout is None else timeout)
        if deadline is not None and (send_by is None or deadline < send_by):
            send_by = deadline
        core = self._core
        size = body_size(data)
        if fds:
            core.check_handles(fds)
        pinned = grant.pin() if grant is not None else None

        def send() -> int:
            if isinstance(data, SectionView) or size > core.inline_threshold:
                return self._send_section(MessageType.REQUEST, data, send_by, secure, grant=pinned,
                                          deadline_attr=deadline, fds=fds)
            body = owned_body(data)
            return self._send_new(lambda: core.request(body, pinned, deadline, fds), send_by, fds)

        try:
            message_id = self._sending(send, send_by)
        except BaseException:
            if pinned is not None:
                pinned.release()
            raise
        self.stats.sent(size)
        return PendingRequest(self, message_id, pinned, deadline)

    def cancel(self, message_id: int, timeout: float | None = 1.0) -> bool:
        """Cancel request ``message_id`` (NtAlpcCancelMessage): False if it is not in flight.

        The server's runtime answers for it (its handler sees ``message.cancelled``),
        a thread waiting for it gets Cancelled, and a late reply is dropped.
        """
        deadline = deadline_after(timeout)  # a bad timeout is refused even for an unknown id
        with self._state:
            frames = self._core.cancel(message_id)
        with self._cv_lock:
            self._notify_waiters()
        if not frames:
            return False
        try:
            self._lock_send(deadline)
            try:
                self._write(frames, deadline)
            finally:
                self._send_lock.release()
        except (Timeout, ConnectionClosed):
            pass  # the request is dropped here anyway; a dead or stuck peer will not answer it
        return True

    def reply(self, message: Message, data: Payload = b"", timeout: float | None = None, *,
              secure: bool = False, fds: Sequence[int] = ()) -> None:
        """Answer ``message``, a request received on this port (with ``fds`` passed along).

        On a server, a reply that cannot be written within the port's
        ``send_timeout`` (or ``timeout``) means the client stopped reading (or the
        port's section budget held it up): its connection is dropped (a
        CLIENT_DIED notice follows) and Throttled raised.
        """
        quick = self._quick
        if (quick is not None and message.id & QUICK_ID_BIT
                and (len(data) if type(data) is bytes else body_size(data)) <= quick.carry_max
                and (carried := data if type(data) is bytes else _ring_body(data, quick)) is not None
                and quick.server
                and not self._core.backlogged
                and message.type is _REQUEST and not (secure or fds or message.cancelled)
                and quick.reply(self, message.id, carried)):
            # Quick-LPC: a request that came through the ring, answered the same way.
            self.stats.replied(message.id, len(data))
            return
        if message.type is not MessageType.REQUEST:
            raise ValueError(f"only a REQUEST can be replied to, not {message.type.name}")
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        size = len(data) if type(data) is bytes else body_size(data)
        core = self._core
        if not core.wants_reply(message):
            if isinstance(data, SectionView):
                data.release()
            return
        if fds:
            core.check_handles(fds)
        try:
            if isinstance(data, SectionView) or size > core.inline_threshold:
                self._send_section(MessageType.REPLY, data, deadline, secure, callback_id=message.id, fds=fds)
            else:
                body = owned_body(data)
                if not self._send_lock.acquire(False):  # uncontended: no call
                    self._lock_send(deadline)
                try:
                    with self._state:
                        frames = core.reply(message, body, fds)
                    self._write(frames, deadline, fds)
                finally:
                    self._send_lock.release()
        except Timeout as exc:
            if not self._is_server:
                if not self._written():
                    with self._state:
                        core.reply_unsent(message)  # nothing left: the application may answer again
                raise
            self._reply_timed_out(exc)
        except (AlpcError, ValueError):
            raise  # refused before anything was taken, or the connection is gone
        except BaseException:
            # A signal handler's exception (Ctrl-C): with nothing of the reply written, the
            # request is still owed, so the application may answer it (a cut frame failed the
            # connection already; a whole one went out: see _written).
            if not self._written():
                with self._state:
                    core.reply_unsent(message)
            raise
        self.stats.replied(message.id, size)

    def reply_at_once(self, message: Message, data: Buffer) -> bool:
        """``reply(message, data)`` if that cannot wait, else False with nothing done.

        For a thread that must not block (an event loop): only an inline body, with the
        send lock free and room in the socket for it and everything the core owes the peer.
        """
        if isinstance(data, SectionView) or body_size(data) > min(self._core.inline_threshold, _AT_ONCE_BODY):
            return False
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            # An ended connection's reply() never waits: its error now (ConnectionClosed), not
            # False for the room of a released socket's fd number (0, or another file's).
            if self._core.failure is None and self._stream.send_room() < _AT_ONCE_ROOM:
                return False
            self.reply(message, data)
            return True
        finally:
            self._send_lock.release()

    def _reply_timed_out(self, exc: Timeout) -> None:
        """A reply that cannot go out is lost (it cannot be sent again), and the client would
        wait for it forever: drop it, saying why (see reply_lost)."""
        reason, limit = reply_lost(exc)
        if self._core.failure is None:
            self.stats.errors += 1
            self._fail(PeerGone(f"{reason}; its connection was dropped"), notice=reason)
        raise Throttled(f"the reply could not be written in time: {reason}, and its connection was dropped",
                        limit=limit) from None

    # -- sections ------------------------------------------------------------------

    def create_view(self, size: int, *, secure: bool = False, timeout: float | None = None) -> SectionView:
        """Writable space in this connection's section (NtAlpcCreateSectionView).

        Fill ``view.memory`` in place and pass the view to ``send``, ``request``
        or ``reply``: the peer gets a read-only view of the same memory, with no
        copy. Waits (up to ``timeout``) while the peer holds the section's space.
        ``secure`` gives the view its own section, write-sealed when sent.

        On a connection with Quick-LPC rings, a view of up to 1 MiB (and the
        peer's ``max_message_length``) lives in this side's bulk area when it
        is free (a ``RingView``): a request or reply then goes through the ring
        with no section and no socket frame; sent as a datagram it is copied
        into a section first.
        """
        check_size("a view", size)
        quick = self._quick
        if quick is not None and not secure and self._core.failure is None:
            view = quick.lend(size)
            if view is not None:
                return view
        return self._reserve(size, secure, deadline_after(timeout))

    def trim_sections(self, timeout: float | None = None) -> None:
        """Unmap the idle sections of this side's pool (and the peer's mappings of them), and
        give back the pages of this side's Quick-LPC bulk area when no body waits in it."""
        if self._quick is not None:
            self._quick.trim()
        self._send(self._core.trim, deadline_after(timeout))

    def _reserve(self, size: int, secure: bool, deadline: float | None) -> SectionView:
        """Section space for ``size`` bytes, waiting for the peer's releases if needed."""
        core = self._core
        with self._state:
            view = core.reserve(size, secure)
        if view is not None:
            return view
        self._send(core.space_wanted, deadline)

        def attempt() -> SectionView | None:
            return core.reserve(size, secure)

        reask, most = SPACE_REASK
        while True:
            if core.budget_blocked and self._on_budget_blocked is not None:
                self._on_budget_blocked(self)
            window = deadline_after(BUDGET_RECHECK if core.budget_blocked else reask)
            if deadline is not None and window is not None:
                window = min(window, deadline)
            try:
                return self._wait_for(attempt, window, "space in the connection's sections")
            except Timeout:
                if window == deadline or remaining(deadline) == 0:
                    limit = Limit.MAX_PORT_SECTION_BYTES if core.budget_blocked else Limit.MAX_SECTION_BYTES
                    raise Throttled(f"no section space freed up before the timeout ({limit})", limit=limit) from None
            if not core.budget_blocked:
                self._send(core.space_wanted, deadline)  # see SPACE_REASK
                reask = min(reask * 2, most)

    def _give_back_idle_sections(self) -> None:
        """Another connection of this port waits for the port's section budget: unmap our idle
        sections (their bytes are the budget's again at once) and tell the peer, unless this
        port is busy sending (then it is not idle). Never waits: the asker may be an event
        loop, or short of time; with no room in the socket (a peer not reading) the
        SECTION_CLOSE stays owed and goes with this connection's next write."""
        if self._core.failure is not None or self._stream.inherited or not self._send_lock.acquire(blocking=False):
            return  # (a forked child's sections are its parent's: see SectionPool.trim)
        try:
            with self._state:
                if self._core.failure is not None:
                    return
                self._core.trim()
            if self._core.owed and self._stream.send_room() >= _AT_ONCE_ROOM:
                self._write_runtime([], None)
        finally:
            self._send_lock.release()

    def _request_large(self, data: Payload, deadline: float | None, secure: bool,
                       grant: MemoryGrant | None, fds: Sequence[int] = ()) -> Message:
        pinned = grant.pin() if grant is not None else None
        core = self._core

        def send() -> int:
            if not isinstance(data, SectionView) and body_size(data) <= core.inline_threshold:
                return self._send_new(lambda: core.request(owned_body(data), pinned, fds=fds), deadline, fds)
            return self._send_section(MessageType.REQUEST, data, deadline, secure, grant=pinned, fds=fds)

        try:
            message_id = self._sending(send, deadline)
        except BaseException:
            if pinned is not None:
                pinned.release()
            raise
        if pinned is None:
            return self._await_reply(message_id, deadline)
        return self._await_granted_reply(message_id, pinned, deadline)

    def _send_section(self, kind: MessageType, data: Payload, deadline: float | None, secure: bool, *,
                      callback_id: int = 0, grant: LocalGrant | None = None, span: Range | None = None,
                      as_view: bool | None = None, deadline_attr: float | None = None,
                      fds: Sequence[int] = ()) -> int:
        """Send a body through a section: fill a reserved range (unless ``data`` is a
        view already), then send the small frame naming it. Returns the message id."""
        core = self._core
        lent = data if type(data) is RingView else None
        if lent is not None:
            # A view in this side's Quick-LPC bulk area that the ring does not carry now (a
            # datagram, a full ring): its bytes go as a view from a section, and the area is
            # free again once they are copied there.
            quick = self._quick
            if quick is None or lent.owner is not quick:
                raise SectionError("the view belongs to another connection")
            lent.check_secure(secure)
            lent.claim()
            lent.busy = True  # (returned() below ends the loan, not a release meanwhile)
            data, as_view = lent.memory, True if as_view is None else as_view
            if not lent.offered:
                quick.views_in_ring = False  # (see QuickLink.views_in_ring)
        if isinstance(data, SectionView):
            data.check_secure(secure)
            view, explicit = data, True
        else:
            if not (secure or grant or span or fds or as_view or deadline_attr is not None):
                message_id = self._send_copy(kind, data, deadline, callback_id)
                if message_id is not None:
                    return message_id
            copied = False
            try:
                self._channel.check_length(body_size(data))
                view, explicit = self._reserve(body_size(data), secure, deadline), False
                try:
                    copy_body(view.memory, data)
                except BaseException:
                    view.release()
                    raise
                copied = True
            finally:
                if lent is not None:
                    if copied:
                        lent.returned()
                    else:
                        # Not copied (no section space in time, too long): the view is the
                        # caller's still, to send again or release, as a section's view is.
                        lent.busy = False
                        lent.unclaim()
        message_id = 0
        try:
            self._lock_send(deadline)
        except BaseException:
            if not explicit:
                view.release()
            raise
        try:
            try:
                with self._state:
                    message_id, frames, passed = core.section_message(
                        kind, view, as_view=explicit if as_view is None else as_view,
                        callback_id=callback_id, grant=grant, span=span, deadline=deadline_attr, fds=fds)
            except BaseException:
                if not explicit:
                    view.release()
                raise
            written = False
            try:
                self._write(frames, deadline, passed)
                written = True
            except BaseException:
                written = self._written()
                if kind is MessageType.REQUEST and message_id:
                    self._forget_request(message_id)
                elif kind is MessageType.DATAGRAM and not written:
                    with self._state:
                        core.datagrams_unsent(1, len(fds))
                raise
            finally:
                with self._state:
                    core.section_sent(view, written)
        finally:
            self._send_lock.release()
        if core.should_drain():
            # A sender that never reads would let the peer's releases pile up
            # in its socket until the peer blocks writing them.
            self.pump()
        return message_id

    def _send_copy(self, kind: MessageType, data: Buffer | Sequence[Buffer], deadline: float | None,
                   callback_id: int) -> int | None:
        """A small body copied straight into a section the peer maps already, and its frame
        written: the message id; None (nothing done) when it needs the general path."""
        size = body_size(data)
        if size > EAGER_COPY_MAX:
            return None
        core = self._core
        if not self._send_lock.acquire(False):  # uncontended: no call
            self._lock_send(deadline)
        try:
            with self._state:
                made = core.copy_message(kind, data, size, callback_id=callback_id)
            if made is None:
                return None
            message_id, frames, slot = made
            written = False
            try:
                self._write(frames, deadline)
                written = True
            except BaseException:
                written = self._written()  # the frame (or part of it) left: the peer holds the range
                if kind is MessageType.REQUEST:
                    self._forget_request(message_id)
                elif kind is MessageType.DATAGRAM and not written:
                    with self._state:
                        core.datagrams_unsent(1)
                if not written:
                    with self._state:
                        core.copy_sent(slot, False)
                raise
        finally:
            self._send_lock.release()
        if core.should_drain():
            self.pump()  # see _send_section
        return message_id

    def _flush_releases(self) -> None:
        """Send every release (and the credit) not yet told to the peer, as one write of its own."""
        core = self._core
        if core.failure is not None:
            return
        if not self._send_lock.acquire(blocking=False):
            self._leave_owed()
            return
        try:
            with self._state:
                frames, token = core.release_frames()
            if frames:
                self._write_runtime(frames, token)
        finally:
            self._send_lock.release()

    def _write_runtime(self, frames: Frames, token: Owed | None) -> None:
        """Frames the runtime owes the peer; a peer not reading keeps its releases (and credits) owed."""
        if not self._send_lock.acquire(blocking=False):
            if frames:
                with self._state:
                    self._core.queue(frames)  # framed already: they go as they are, in order
            self._leave_owed()
            return
        try:
            self._write(frames, deadline_after(_RUNTIME_SEND_TIMEOUT), runtime=True)
        except Timeout:
            if not self._stream.broken and token is not None:
                with self._state:
                    self._core.restore_owed(token)
        except ConnectionClosed:
            pass
        finally:
            self._send_lock.release()

    def _leave_owed(self) -> None:
        """Another thread is writing (perhaps waiting, for its whole timeout, on a peer that reads
        nothing): what the runtime owes the peer goes after that write, not before this caller
        (a receive with its own timeout) may go on."""
        with self._state:
            self._core.owed = True
        self._owed_left = True

    def _send_left(self, deadline: float | None) -> None:
        """After a write: what another thread left owed meanwhile (_leave_owed). Never raises:
        the caller's own frames went out; a peer not reading keeps these owed."""
        self._owed_left = False
        if not self._core.owed:
            return
        runtime = deadline_after(_RUNTIME_SEND_TIMEOUT)
        try:
            self._write([], runtime if deadline is None or runtime is None else min(deadline, runtime), runtime=True)
        except (Timeout, ConnectionClosed):
            pass

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
                self._forget_request(message_id)
            raise
        return message_id

    def _send(self, make: Callable[[], Frames], deadline: float | None, fds: Sequence[int] = (),
              runtime: bool = False) -> None:
        """Write what ``make`` frames (under the state lock); ``runtime``: as ``_write``."""
        if not self._send_lock.acquire(False):  # uncontended: no call
            self._lock_send(deadline)
        try:
            with self._state:
                frames = make()
            self._write(frames, deadline, fds, runtime)
        finally:
            self._send_lock.release()

    def _write(self, frames: Frames, deadline: float | None, fds: Sequence[int] = (), runtime: bool = False) -> None:
        """Write ``frames`` after whatever the core owes the peer (caller holds _send_lock).
        ``runtime``: ``frames`` are the runtime's own (releases, credits), no message.

        A hang-up raises PeerGone; what the peer sent before it is still read (see _hung_up).
        """
        core = self._core
        self._frames_left = False
        token = None
        if self._channel.dropped_requests:
            self._queue_dropped_answers()
        if core.owed:
            with self._state:
                owed, token = core.take_owed()
            frames = owed + frames
            self._answers_owed = False  # they go now (or stay owed for the next write, if this one fails)
        try:
            written = self._stream.send(frames, fds, deadline=deadline)
            if self._quick is not None:
                # Quick-LPC: ring posts wait until the peer read these bytes, if they carry a
                # message: the caller's, or queued datagrams in the owed backlog (token[2]).
                queued = token is not None and bool(token[2])
                self._quick.sent(written, not runtime or queued)
        except ConnectionClosed as hung_up:
            self.stats.errors += 1
            self._hung_up()
            self._raise_if_failed()
            raise PeerGone("the peer's socket is closed") from hung_up
        except BaseException as exc:
            # A timeout, or a signal handler's exception (Ctrl-C) while the socket was full.
            if self._stream.broken:
                self._cut_mid_frame("timed out" if isinstance(exc, Timeout) else "was interrupted")
            elif token is not None:
                with self._state:
                    core.restore_owed(token)
            raise
        if self._owed_left:
            try:
                self._send_left(deadline)
            except BaseException:
                self._frames_left = True  # ``frames`` went out before it: see _written
                raise

    def _cut_mid_frame(self, how: str) -> None:
        """A write stopped after part of a frame went out: the peer would take the next
        frame's bytes as the rest of this one, so the connection is dropped."""
        self.stats.errors += 1
        self._fail(PeerGone(f"the peer stopped reading: a send {how} mid-frame; the connection was dropped"),
                   notice=f"the peer stopped reading (a send {how} mid-frame)")

    def _hung_up(self) -> None:
        """A write found the peer's socket closed.

        While bytes it sent before are unread (its PORT_CLOSED, if it closed cleanly), the
        read that takes them ends the connection, as closed or as died; with none, it ends now.
        A thread mid-read may hold them already, out of the socket and not yet delivered: its
        read (or the next, which takes the EOF) ends it then. Not under _cv (this thread holds
        _send_lock): the flag is set before a read's recv and cleared after its delivery.
        """
        if self._reading:
            return
        if not self._stream.unread():
            self._connection_lost("the peer's socket is closed")

    def _raise_if_failed(self) -> None:
        self._core.check_open()

    # -- receiving -------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message:
        """The next request or datagram from the peer.

        On the server side a closed or dead client is reported once as a
        PORT_CLOSED / CLIENT_DIED message; later calls raise PeerGone.
        """
        core = self._core
        message = None
        if core.inbox:
            with self._state:
                message = core.take_message()
        elif self._quick is not None and self._is_server and not self._quick.by_socket:
            # One deadline for both waits: a signal that ends the ring's wait early must not
            # give the general path's wait the whole timeout again.
            deadline = deadline_after(timeout)
            message = self._quick.receive(self, deadline)
            if message is None:
                message = self._wait_for(core.take_message, deadline, "a message")
        if message is None:
            message = self._wait_for(core.take_message, deadline_after(timeout), "a message")
        if core.finalize_wanted or core.channel._automatic or core.flow.credit_due:
            self._after_take()
        return message

    def receive_many(self, max_messages: int = 1024, timeout: float | None = None) -> list[Message]:
        """Every message waiting, in order (at least one, at most ``max_messages``).

        For consumers of many small messages: one wait and one lock for the
        lot. A notice (server side) ends the list.
        """
        check_max_messages(max_messages)
        first = self._wait_for(self._core.take_message, deadline_after(timeout), "a message")
        batch = [first]
        if first.type not in NOTICES:
            with self._state:
                self._core.take_messages(batch, max_messages)
        self._after_take()
        return batch

    def _expire(self, message: Message) -> None:
        """``message``, a request handed out (queued in a completion port) whose deadline passed
        before its handler ran: the runtime answers it as it answers one never handed out."""
        with self._state:
            self._core.expire(message)
        self._after_take()

    def _after_take(self) -> None:
        """After the application took messages: answers owed for expired requests, credits for
        datagrams (never under _cv), and the socket's release after a notice."""
        core = self._core
        if core.channel._automatic:
            with self._state:
                frames = core.take_automatic()
            if frames:
                self._write_runtime(frames, None)
        if core.flow.credit_due:
            self._flush_releases()
        if core.finalize_wanted:
            self._maybe_finalize()

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer goes away."""
        while True:
            try:
                message = self.receive()
            except ConnectionClosed:
                return
            last = message.type in NOTICES
            yield message
            # Not held while the next one is awaited: a body the caller dropped gives its
            # range back now (a sender waiting for that space would send nothing more).
            del message
            if last:
                return

    def _await_reply(self, message_id: int, deadline: float | None, keep_if_interrupted: bool = False) -> Message:
        """The reply; a wait that times out cancels the request at the server, and so does one a
        signal handler's exception (Ctrl-C) ends, unless ``keep_if_interrupted`` (a
        PendingRequest: its holder may wait again, or cancel it)."""
        try:
            return self._wait_reply(message_id, deadline)
        except Timeout:
            self._give_up(message_id)
            raise
        except AlpcError:
            self._abandon(message_id)
            raise
        except BaseException:
            if not keep_if_interrupted:
                self._give_up(message_id)
            raise

    def _give_up(self, message_id: int) -> None:
        """Nobody will wait for this request's reply: cancel it at the server (its handler sees
        ``message.cancelled``), or just drop it here if it is no longer in flight."""
        if not self.cancel(message_id):
            self._abandon(message_id)
        with self._state:
            self._core.forget_cancelled(message_id)

    def _abandon(self, message_id: int) -> None:
        with self._state:
            self._core.abandon(message_id)

    # -- memory grants ----------------------------------------------------------

    def _await_granted_reply(self, message_id: int, grant: LocalGrant, deadline: float | None,
                             keep_if_interrupted: bool = False) -> Message:
        """Wait for the reply, answering the server's fallback reads meanwhile (an ending wait
        gives up on the request as _await_reply's does).

        The reads come here, to the thread that made the request; fallback writes
        are applied into the grant as they are read, so each lands before the reply.
        """
        core = self._core
        kept = False
        try:
            while True:
                message = self._wait_for(lambda: core.take_granted(message_id), deadline, "the reply")
                if message.type is MessageType.GRANT_READ:
                    self._answer_grant_read(message_id, message, grant, deadline)
                else:
                    return message
        except Timeout:
            self._give_up(message_id)
            raise
        except AlpcError:
            self._abandon(message_id)
            raise
        except BaseException:
            kept = keep_if_interrupted
            if not kept:
                self._give_up(message_id)
            raise
        finally:
            if not kept:
                with self._state:
                    core.end_granted(message_id)

    def _answer_grant_read(self, request_id: int, message: Message, grant: LocalGrant,
                           deadline: float | None) -> None:
        with self._state:
            answer = self._core.grant_read_answer(request_id, message, grant)
        if isinstance(answer, memoryview):
            self._send_section(MessageType.GRANT_DATA, answer, deadline, False, callback_id=request_id,
                               span=message.grant, as_view=True)
        else:
            self._lock_send(deadline)
            try:
                self._write(answer, deadline)
            finally:
                self._send_lock.release()

    def _direct_ok(self, memory: PeerMemory) -> bool:
        """May we touch the client's memory directly for ``memory`` now?"""
        with self._state:
            ok = self._core.direct_ok(memory)
        if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
            raise PeerGone("the client process exited")
        return ok

    def _direct(self, memory: PeerMemory, move: Callable[[int], bool], deadline: float | None) -> bool:
        """Move bytes straight to or from the client's memory (``move(pid)``); False: take the
        connection instead. Check and move happen under _send_lock: our answer to the client's
        CANCEL of this request (after which its runtime lets the buffer go) cannot go out
        between them, so the move never touches memory the client put to other use."""
        self._lock_send(deadline)
        try:
            if not self._direct_ok(memory):
                return False
            if move(self.peer.pid):
                memory.direct = True
                return True
            self._core.vm_refused = True  # EPERM: the kernel will refuse the rest of this connection too
            return False
        finally:
            if self._owed_left:
                self._send_left(deadline)  # our answer to that CANCEL, say: now the move is done
            self._send_lock.release()

    def _grant_read(self, memory: PeerMemory, offset: int, into: memoryview, timeout: float | None) -> None:
        core = self._core
        deadline = deadline_after(timeout)
        if self._direct(memory, lambda pid: direct_read(pid, memory.attr, offset, into), deadline):
            return
        memory.direct = False
        self._send(lambda: core.grant_read(memory, offset, into.nbytes), deadline)
        try:
            answer = self._wait_for(lambda: core.take_grant_data(memory.request_id), deadline,
                                    "the client's granted data")
        except BaseException:
            with self._state:
                late = core.grant_read_abandoned(memory)
            for view in late:
                view.release()
            raise
        core.grant_data_into(answer, into)

    def _grant_write(self, memory: PeerMemory, offset: int, payload: memoryview, timeout: float | None) -> None:
        core = self._core
        deadline = deadline_after(timeout)
        if self._direct(memory, lambda pid: direct_write(pid, memory.attr, offset, payload), deadline):
            return
        memory.direct = False
        self._lock_send(deadline)
        try:
            with self._state:
                frames = core.grant_write(memory, offset, payload)
            if frames is not None:
                self._write(frames, deadline)
                return
        finally:
            self._send_lock.release()
        self._send_section(MessageType.GRANT_WRITE, payload, deadline, False, callback_id=memory.request_id,
                           span=Range(offset, payload.nbytes), as_view=True)

    # -- waiting and reading -----------------------------------------------------

    def _wait_for(self, take: Callable[[], T | None], deadline: float | None, what: str) -> T:
        """Wait until ``take`` (run under the core's lock) finds something, reading meanwhile."""
        try:
            return self._wait_locked(take, deadline, what)
        finally:
            if self._core.finalize_wanted:
                self._maybe_finalize()

    def _wait_reply(self, message_id: int, deadline: float | None, serving: bool = False) -> Message:
        """_wait_for(take_reply), or take_callback when ``serving``, with the loop written out:
        the per-request path."""
        core = self._core
        take = core.take_callback if serving else core.take_reply
        lock = self._cv_lock
        state = self._state
        try:
            with lock:
                while True:
                    with state:
                        found = take(message_id)
                    if found is not None:
                        return found
                    core.check_open()
                    if self._reading:
                        self._waiters += 1
                        try:
                            woken = self._cv.wait(remaining(deadline))
                        finally:
                            self._waiters -= 1
                        if not woken:
                            raise Timeout("timed out waiting for the reply")
                        continue
                    self._reading = True
                    lock.release()
                    try:
                        arrived = self._read(deadline)
                    finally:
                        lock.acquire()
                        self._reading = False
                        if self._waiters:
                            self._cv.notify_all()
                    if not arrived:
                        raise Timeout("timed out waiting for the reply")
        finally:
            if core.finalize_wanted:
                self._maybe_finalize()

    def _wait_locked(self, take: Callable[[], T | None], deadline: float | None, what: str) -> T:
        # One thread at a time reads (the reader role, under _cv); the others
        # wait on _cv and are woken at the end of each read.
        state = self._state
        core = self._core
        lock = self._cv_lock
        with lock:
            while True:
                with state:
                    found = take()
                if found is not None:
                    return found
                core.check_open()
                if self._reading:
                    self._waiters += 1
                    try:
                        woken = self._cv.wait(remaining(deadline))
                    finally:
                        self._waiters -= 1
                    if not woken:
                        raise Timeout(f"timed out waiting for {what}")
                    continue
                self._reading = True
                lock.release()
                try:
                    arrived = self._read(deadline)
                finally:
                    lock.acquire()
                    self._reading = False
                    if self._waiters:
                        self._cv.notify_all()
                if not arrived:
                    raise Timeout(f"timed out waiting for {what}")

    def _end_read(self) -> None:
        # Every read ends here, so whatever it filed wakes the waiters now.
        with self._cv_lock:
            self._reading = False
            if self._waiters:
                self._cv.notify_all()  # (a waiter made it)
        if self._core.finalize_wanted:
            self._maybe_finalize()

    def pump(self) -> None:
        """Read whatever is waiting without blocking, unless another thread is reading."""
        with self._cv_lock:
            if self._reading or self._core.failure is not None:
                return
            self._reading = True
        try:
            self._read(deadline=0.0, block=False)
        finally:
            self._end_read()

    def read_first(self, watch: int, watch2: int, deadline: float | None, spin_us: int) -> tuple[bool | None, bool]:
        """A multiplexer betting that this connection speaks next: wait for its socket, or
        for ``watch``/``watch2`` (the multiplexer's epoll set and link), and read the socket
        if it spoke. (True, whether a watched fd was ready too) after a read; (False, False)
        when the deadline passed; (None, True) when the watched fds are to be looked at
        (one fired); (None, False) when this connection cannot be read this way now."""
        with self._cv_lock:
            if self._reading or self._core.failure is not None or self._quick is not None or self._released:
                return None, False
            self._reading = True
        try:
            if self._answers_owed or self._channel.dropped_requests:
                self._answer_dropped()
            try:
                got, watched = self._stream.read_watching(watch, watch2, deadline, spin_us, self._max_fds_per_read)
            except BaseException:
                self._take_interrupted_read()
                raise
            if got is False:
                return False, False
            if got is None or got is True:
                return None, True
            self._take_read(got)
            return True, watched
        finally:
            self._end_read()

    def has_ready_message(self) -> bool:
        return bool(self._core.inbox)

    def next_ready_message(self) -> Message | None:
        """Pop a received message without reading; call _maybe_finalize() after a notice."""
        with self._state:
            return self._core.take_message()

    def wait_fds(self) -> list[int]:
        """What a multiplexer should poll for this port: its socket and the peer's pidfd."""
        if self._released:
            return []
        return self._fds()

    def _fds(self) -> list[int]:
        return [self._stream.fileno()] + ([self._pidfd] if self._pidfd is not None else [])

    def _read(self, deadline: float | None, block: bool = True) -> bool:
        """Read once and dispatch; False if nothing arrived before the deadline."""
        if self._dropped:
            self._forget_dropped()
        if self._answers_owed or self._channel.dropped_requests:
            self._answer_dropped()
        if block and self._core.releases_unannounced():
            self._flush_releases()
        quick = self._quick
        if quick is not None:
            # Quick-LPC: wait on the ring and the socket together; None means read the socket.
            done = quick.before_read(self, deadline, block)
            if done is not None:
                return done
            if quick.armed:
                try:
                    return self._read_socket(deadline, block)
                finally:
                    quick.disarm()
        return self._read_socket(deadline, block)

    def _read_socket(self, deadline: float | None, block: bool) -> bool:
        """``_read``'s socket half (the caller is the reader, its chores done)."""
        try:
            got = self._stream.read(deadline if block else 0.0, self._max_fds_per_read)
        except BaseException:
            self._take_interrupted_read()
            raise
        if got is False and block:
            return False
        if not got:
            if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
                self._connection_lost("the peer process exited")
            return True
        assert not isinstance(got, bool)
        self._take_read(got)
        return True

    def _take_interrupted_read(self) -> None:
        """A signal handler raised (Ctrl-C) as a read returned: deliver what it took from the
        socket, which the next read would otherwise miss (a message lost, or a frame cut)."""
        got = self._stream.take_interrupted()
        if got is not None:
            self._take_read(got)

    def _pending_dropped(self, message_id: int) -> None:
        """A PendingRequest's finalizer: forget its request now if the state lock is free (a
        reply already read would otherwise hold its fds and section range until a read that
        may never come), else at the next read. Never waits: a finalizer may run while this
        thread holds the lock."""
        self._dropped.append(message_id)
        if not self._state.acquire(blocking=False):
            return
        try:
            self._forget_dropped_locked()
        finally:
            self._state.release()

    def _forget_dropped(self) -> None:
        """Requests whose PendingRequest was dropped unread: their replies are dropped (now or as they come)."""
        with self._state:
            self._forget_dropped_locked()

    def _forget_dropped_locked(self) -> None:
        core = self._core
        while self._dropped:
            message_id = self._dropped.pop(0)
            core.abandon(message_id)
            core.forget_cancelled(message_id)

    def _request_dropped(self) -> None:
        """The core's hook: a request handed out was dropped unanswered. Called from its
        reference's callback, by whichever thread dropped it, at any moment: inside the
        collector too, maybe while this thread holds one of this port's locks. Its UNANSWERED
        reply goes now when this thread holds none of them, the state and send locks are free
        and the socket has room; else right after the write under way, or with the next read
        or write. Never waits (a send lock held by another thread is not waited for), never
        raises: a finalizer has nobody to raise to."""
        cv, send_lock = self._cv_lock, self._send_lock
        # Taken only to learn that this thread does not hold it: _write's error paths take it.
        if not cv.acquire(blocking=False):
            return  # the next read or write answers (a holder of _cv is about to do one or the other)
        cv.release()
        owns_send = _owned(send_lock)
        if not self._queue_dropped_answers(wait=False):
            return
        if owns_send or not send_lock.acquire(blocking=False):
            # A write is under way (this thread's own, the collector running inside it, or
            # another's): the answers go right after it, or with the next read or write.
            self._answers_owed = self._owed_left = True
            return
        try:
            if self._stream.send_room() >= _AT_ONCE_ROOM:
                self._write([], deadline_after(_RUNTIME_SEND_TIMEOUT))
            else:
                self._answers_owed = True  # a peer behind on its reads: with the next read or write
        except (AlpcError, OSError):
            pass  # the connection is gone or stuck: its reader reports that, not a finalizer
        finally:
            send_lock.release()

    def _queue_dropped_answers(self, wait: bool = True) -> bool:
        """Frame the answers to requests dropped unanswered as owed to the peer (they go with
        the next write); False with nothing done if ``wait`` is False and the state lock is
        held (maybe by this very thread), or if there was nothing to answer."""
        state = self._state
        if not state.acquire(blocking=wait):
            return False
        try:
            core = self._core
            frames = core.answer_dropped()
            if frames:
                core.queue(frames)
        finally:
            state.release()
        return bool(frames)

    def _answer_dropped(self) -> None:
        """Before a read, which holds no lock of this port: the answers to requests dropped
        unanswered that their callback could not write (a lock was held, or the socket full).
        Written only when the socket has room for them, as the callback does: a read does not
        wait on a peer behind on its reads (a poll, timeout=0 or pump(), waited for up to the
        runtime's send timeout); they stay owed for the next write, or a read once it has room."""
        owed = self._answers_owed
        self._answers_owed = False
        if (self._queue_dropped_answers() or owed) and self._core.owed:
            if self._core.failure is None and self._stream.send_room() < _AT_ONCE_ROOM:
                self._answers_owed = True
                return
            self._write_runtime([], None)

    def _take_read(self, got: ChannelRead) -> None:
        data, fds, sender, truncated = got
        if not data:
            close_fds(fds)
            self._connection_lost("the peer process died or dropped the connection")
            return
        self._deliver(data, fds, sender, truncated)

    def _deliver(self, data: bytes, fds: list[int], sender: PeerCred | None = None, truncated: int = False) -> None:
        """Hand one read (and its sender's credentials) to the core, send what it owes the peer,
        wake whoever waits."""
        core = self._core
        quick = self._quick
        # The one-frame read, unless Quick-LPC needs the general path's care: ring requests
        # older than these bytes go first, and a forked child's bytes are not the peer's.
        if not fds and not truncated and (quick is None or (
                (sender is None or sender.pid == self._channel.peer.pid) and quick.settled())):
            with self._state:
                filed = core.receive_one(data, sender)
            if filed:
                if quick is not None:
                    quick.consumed(len(data))
                    quick.by_socket = True
                if filed == FILED_INBOX and self._on_ready is not None and not self._queued:
                    self._queued = True
                    self._on_ready(self)
                elif filed == FILED_ERROR:
                    self._protocol_error(core.error)
                return
        with self._state:
            batch = core.receive(data, fds, sender, truncated)
            if batch.error is None:
                frames, token = core.outgoing(batch)
        if batch.error is not None:
            self._protocol_error(batch.error, batch.peer_fault)
            return
        if frames:
            self._write_runtime(frames, token)
        if quick is not None:
            # Quick-LPC: what waits in the ring was sent before these bytes.
            drained = quick.drain(self)
            if drained:
                batch = batch._replace(messages=drained + batch.messages)
            elif batch.messages:
                quick.by_socket = True
        with self._state:
            wake = core.route(batch)
        if quick is not None and wake.ids:
            quick.drop_late(self, wake.ids)
        if quick is not None and (sender is None or sender.pid == self._channel.peer.pid):
            # Only bytes from the process that maps the rings count: a child it forked (which
            # has no mapping) writes to the same socket, and counting its bytes would let the
            # peer's next ring post pass its own socket bytes not read yet.
            quick.consumed(len(data))
        # Waiters wake in _end_read, which every read goes through.
        if wake.cancelled:
            with self._state:
                cancelled = core.take_cancelled()
            if cancelled and self._on_cancel is not None:
                self._on_cancel(cancelled)
        if wake.inbox and self._on_ready is not None and not self._queued:
            self._queued = True  # queued once, not per message (ConnectionPort._next_event clears it)
            self._on_ready(self)

    def _protocol_error(self, error: str, peer_fault: bool = True) -> None:
        peer = self.peer
        # Not the peer's fault (this process ran out of fds): say so, rather than blame it.
        text = (f"protocol error from pid {peer.pid}, dropping the connection: {error}" if peer_fault
                else f"connection with pid {peer.pid}: {error}")
        _limited.log(logging.WARNING, ("protocol", peer.uid, peer.pid), text,
                     extra=fields(pid=peer.pid, uid=peer.uid, gid=peer.gid))
        self._ended()

    def _ended(self) -> None:
        with self._cv_lock:
            self._notify_waiters()
        if self._on_ready is not None and not self._queued:
            self._queued = True
            self._on_ready(self)

    def _connection_lost(self, reason: str) -> None:
        with self._state:
            news = self._core.connection_lost(reason)
        if news:
            self._ended()

    def _fail(self, failure: ConnectionClosed, notice: str | None = None) -> None:
        with self._state:
            self._core.fail(failure, notice)
        self._ended()

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Tell the peer (PORT_CLOSED) and release the connection. Idempotent."""
        self._close(deadline_after(_CLOSE_FLUSH_TIMEOUT))

    def _close(self, deadline: float | None) -> None:
        """close(), waiting until ``deadline`` at most for room for what goes before the notice
        and the notice itself (a ConnectionPort closing its connections gives them one between
        them, so deaf clients cannot make its close() last a second each)."""
        if self._stream.inherited:
            self._let_go()
            return
        core = self._core
        # The send lock before core.close(): from then on any thread whose wait ends may finalize,
        # closing the socket (under this lock). Taken after, the notice (and the datagrams queued
        # before it) went to a closed socket: a raw EBADF, or the C send's saved fd number that
        # another open() had reused meanwhile; and the peer heard a hang-up, not PORT_CLOSED.
        # Taken when the connection ended already too: another thread's close() may be writing
        # that notice now, and the shutdown below must not cut it off.
        wait = remaining(deadline)
        locked = self._send_lock.acquire(timeout=-1 if wait is None else wait)
        try:
            with self._state:
                # Datagrams queued by send(..., flush=False) go out before the notice.
                queued = core.backlogged
                owed = core.take_owed()[0] if core.owed and core.failure is None else []
                notice = core.close()
            if notice and locked:
                self._send_farewell(queued, owed, notice, deadline)
        finally:
            if locked:
                self._send_lock.release()
        with self._cv_lock:
            self._notify_waiters()
        if self._quick is not None:
            # Quick-LPC: wake a thread waiting on the rings.
            self._quick.close()
        # Wake a reader blocked in poll or a writer waiting for buffer space.
        self._stream.shutdown()
        self._maybe_finalize()

    def _send_farewell(self, queued: bool, owed: Frames, notice: Frames, deadline: float | None) -> None:
        """close()'s last writes (the caller holds _send_lock): what is owed, then PORT_CLOSED,
        waiting for room until ``deadline`` at most."""
        try:
            if queued:
                # The application's datagrams: a reader a little behind (its socket full
                # for now) must not lose them, so wait for room a while, as the asyncio
                # close() does (its timeout=1.0).
                self._stream.send(owed, deadline=deadline)
                owed = []
            if not self._stream.broken:
                frames = owed + notice
                written = self._stream.try_send(frames)
                if written < sum(map(len, frames)):
                    # The rest waits for room (within the same bound): sends just before that
                    # filled the socket left none, and the notice was dropped: the peer, a
                    # little behind, read the end of the stream with nothing before it, a
                    # death for an orderly close (or the rest of a frame cut short).
                    rest = advance_buffers([memoryview(frame).cast("B") for frame in frames], written)
                    self._stream.send(rest, deadline=deadline)
        except (ConnectionClosed, Timeout):
            pass

    def _let_go(self) -> None:
        """close() in a forked child: close this process's copies of the fds, and nothing else.

        The socket is the parent's connection too: no PORT_CLOSED, no shutdown, no unwatching
        from a multiplexer's epoll set (the parent's). No lock: a parent thread that held one at
        the fork (mid-send, mid-read) is not here to let go of it, so taking it would hang.
        """
        if self._released:
            return
        self._released = True
        core = self._core
        core.close()  # frames for the peer: the parent's to send
        if self._quick is not None:
            self._quick.close()
        self._stream.close()
        core.release_resources()
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def _maybe_finalize(self) -> None:
        """Close the socket and pidfd once nobody is using them any more.

        Never called with _cv held, and a sender holding _send_lock does not call
        it, so the lock order _cv -> _send_lock is never inverted.
        """
        with self._cv_lock:
            if not self._core.finalize_wanted or self._released or self._reading:
                return
            self._released = True
            self._reading = True  # nobody reads a released stream again
        self._stream.shutdown()
        if self._quick is not None:
            self._quick.close()
        # Before the fds close: a multiplexer must let go of their numbers first. Not in a
        # forked child: its epoll set is the parent's, and the parent still watches this socket.
        if self._on_gone is not None and not self._stream.inherited:
            self._on_gone(self)
        with self._send_lock:
            self._stream.close()
        with self._state:
            self._core.release_resources()
        if self._core.peer_died or (self._pidfd is not None and wait_readable([self._pidfd], 0.0)):
            # A peer killed between creating a POSIX section and unlinking its
            # name (a few syscalls) leaves the name behind: clean up after it.
            # Its EOF comes before its pidfd says it died: the sweep asks /proc.
            sweep_stale_names(self.peer.pid)
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def __del__(self) -> None:
        # Dropped without close() (a forgotten variable, an exception path): the fds the garbage
        # collector would never close (the peer's pidfd, the rings) close now, and the peer hears
        # PORT_CLOSED if the socket is still open (in a reference cycle the collector may have
        # closed the socket first: the peer then sees the hang-up). No thread can be inside this
        # object's methods any more (it would hold a reference), so no lock is taken; nothing
        # waits: one non-blocking write.
        if getattr(self, "_released", True):
            return  # closed already, or __init__ failed before there was anything to release
        self._released = True
        quick = [self._quick.close] if self._quick is not None else []
        finalize_unclosed(self._stream, self._core.close, [*quick, self._core.release_resources, self._close_pidfd])

    def flush_at_exit(self, timeout: float) -> None:
        """The process ends normally with this port open (see connection._flush_at_exit): write
        the datagrams queued here, waiting ``timeout`` at most for room, then tell the peer
        (PORT_CLOSED), as close() does: a normal exit is no death. A port a daemon thread still
        held (or a global the collector reaches too late) showed its peer CLIENT_DIED instead.

        The socket stays as it is: a daemon thread still waiting on it is not woken into an
        error while the interpreter ends, and the exit closes it."""
        deadline = deadline_after(timeout)
        if self._core.backlogged:
            self.flush(timeout)
        if self._stream.inherited:
            return
        # Another thread's write may be under way: a notice now would land inside its frame.
        if not self._send_lock.acquire(timeout=remaining(deadline) or 0.0):
            return
        try:
            core = self._core
            with self._state:
                owed = core.take_owed()[0] if core.owed and core.failure is None else []
                notice = core.close()
            if notice:
                self._send_farewell(False, owed, notice, deadline)  # the queued datagrams went just above
        finally:
            self._send_lock.release()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def __enter__(self) -> CommunicationPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- client side ------------------------------------------------------------------

_HANDSHAKE_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.CONNECTION_REPLY, MessageType.ERROR, MessageType.SHUTDOWN}),
    # Bounded by what an honest server can send (its accept data is at most MAX_CONNECT_DATA,
    # its reason MAX_REJECT_REASON characters), not by the 16 MiB any control body may have:
    # a hostile server made every client that connected to it take 16 MiB of accept data.
    max_data=MAX_CONNECT_DATA + 64 * 1024,
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
    stream, channel, pidfd, accept_data, quick = open_channel(name, data, timeout=timeout, config=config,
                                                              server_uid=server_uid)
    return CommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=False, accept_data=accept_data,
                             quick=quick)


def open_channel(name: str, data: bytes = b"", *, timeout: float | None = None, config: Config | None = None,
                 quick_ok: bool = True, server_uid: int | None = None,
                 on_stream: Callable[[Stream], None] | None = None,
                 ) -> tuple[Stream, Channel, int | None, bytes, qlpc.QuickLink | None]:
    """The connect handshake: the established stream, its channel, the server's pidfd, accept
    data, and the Quick-LPC rings if the server offered them and ``quick_ok`` takes them.

    Blocking; a driver (this module, or ``aio``, which declines the rings) wraps the result.
    The stream keeps SO_PASSCRED on: every read of the channel brings its sender's credentials.
    ``on_stream`` is handed the broker connection as soon as it exists: shutting it down from
    another thread ends the handshake at once (a cancelled ``aio.connect``).
    """
    config = config_or_default(config)
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
        if on_stream is not None:
            on_stream(stream)
        # SO_PASSCRED stays on: every read of the channel brings the sender's credentials.
        stream.set_passcred(True)
        # For the handshake only: the server's reply brings a pidfd of the server (SCM_PIDFD).
        passpidfd = stream.set_passpidfd(True)
        request = control.Connect(name=name, data=data, max_message_length=config.max_message_length,
                                  max_section_bytes=config.max_section_bytes,
                                  flow=control.FlowSpec.of(local_flow, kinds_mask(config.handle_kinds)),
                                  required_server_uid=-1 if server_uid is None else server_uid,
                                  quick=quick_ok and qlpc.asked_by(config))
        try:
            stream.send(control_frame(request), deadline=deadline)
        except ConnectionClosed:
            raise refusal_after_hangup(stream) or BrokerUnavailable("the broker went away during the connect") \
                from None
        reply, server, quick_fd = _await_connection_reply(stream, name, deadline, pidfds if passpidfd else None,
                                                          config)
        if server_uid is not None and server.uid != server_uid:
            # The broker said otherwise, or was not asked: the kernel's word wins, and before
            # anything the reply says (an impostor's rejection is not the server's).
            raise AccessDenied(f"the server of {name!r} runs as uid {server.uid}, not the required uid {server_uid}")
        if not reply.accepted:
            raise ConnectionRejected(reply.reason)
        peer_flow = reply.flow.limits()
        if passpidfd:
            stream.set_passpidfd(False)
    except BaseException:
        stream.close()
        close_fds(pidfds + ([quick_fd] if quick_fd is not None else []))
        raise
    pidfd = pidfds[0] if pidfds else pidfd_open(server.pid)
    try:
        quick = _accept_quick(reply, quick_fd, config if quick_ok else None, stream, pidfd)
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
    return stream, channel, pidfd, reply.data, quick


def _accept_quick(reply: control.ConnectionReply, fd: int | None, config: Config | None, stream: Stream,
                  pidfd: int | None) -> qlpc.QuickLink | None:
    """Quick-LPC: map the rings the server offered, or decline them (the connection stays on the socket)."""
    if (fd is None) != (reply.quick_slots == 0):
        close_fds([fd] if fd is not None else [])
        raise ProtocolError("the connection reply's Quick-LPC offer and its fd do not match")
    if fd is None:
        return None
    if config is None or not qlpc.asked_by(config):
        # (An offer nobody asked for: an older server, or a hostile one.)
        close_fds([fd])
        return None
    try:
        return qlpc.QuickLink.accept(fd, reply.quick_slots, reply.quick_slot_size, config.quick_spin_us,
                                     stream.fileno(), pidfd)
    except QuotaExceeded as exc:
        # This process could not set them up (out of fds for the watcher's copies, memory for
        # the mapping): the rings are an optimisation, and a server whose client never attaches
        # keeps that connection on its socket, as for a client that did not ask.
        _limited.log(logging.WARNING, ("quick-setup",),
                     f"the Quick-LPC rings the server offered could not be set up, the connection uses its "
                     f"socket: {exc}")
        return None


def _await_connection_reply(
    stream: Stream, name: str, deadline: float | None, pidfds: list[int] | None = None,
    config: Config | None = None,
) -> tuple[control.ConnectionReply, PeerCred, int | None]:
    frame, cred = read_frame(stream, FrameDecoder(_HANDSHAKE_LIMITS), deadline, f"port {name!r} to answer",
                             max_fds=1, pidfds=pidfds)
    if frame is None:
        raise _hung_up_before_answer(name, config)
    try:
        reply, server = _connection_reply(frame, cred)
    except BaseException:
        close_fds(frame.fds)
        raise
    return reply, server, frame.fds[0] if frame.fds else None


def _hung_up_before_answer(name: str, config: Config | None) -> AlpcError:
    """EOF before any answer: the broker died before passing our socket on, or the server after.

    The socket says nothing of which (its peer is the broker's end either way), but a broker
    that no longer listens cannot have been the one to answer: BrokerUnavailable, as for any
    connect while it is down, rather than blaming a server that may never have heard of us.
    """
    if config is not None and not is_live_socket(config.broker_socket):
        return BrokerUnavailable(f"the broker went away before passing the connect to {name!r} on")
    return PeerGone(f"the server of {name!r} went away before answering the connect")


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
    if len(reply.data) > MAX_CONNECT_DATA or len(reply.reason) > control.MAX_REJECT_REASON:
        raise ProtocolError(f"the connection reply's data ({len(reply.data)} bytes) or reason "
                            f"({len(reply.reason)} characters) is longer than any server sends")
    return reply, cred




class PendingRequest:
    """A request in flight (``CommunicationPort.start_request``): wait for it, or cancel it."""

    def __init__(self, port: CommunicationPort, message_id: int, grant: LocalGrant | None,
                 deadline: float | None) -> None:
        self._port = port
        self.id = message_id
        self._grant = grant
        self.deadline = deadline
        self._done = False

    def result(self, timeout: float | None = None) -> Message:
        """The reply; Timeout (the request is then cancelled at the server), Cancelled, or
        DeadlineExceeded once the request's deadline passed."""
        if self._done:
            raise ValueError("the reply of this request was already taken")
        wait_until = deadline_after(timeout)
        if self.deadline is not None and (wait_until is None or self.deadline < wait_until):
            wait_until = self.deadline
        self._done = True
        port = self._port
        try:
            if self._grant is None:
                return port._await_reply(self.id, wait_until, keep_if_interrupted=True)
            return port._await_granted_reply(self.id, self._grant, wait_until, keep_if_interrupted=True)
        except Timeout as exc:
            if self.deadline is not None and wait_until == self.deadline:
                raise DeadlineExceeded(f"request {self.id} ran past its deadline") from exc
            raise
        except AlpcError:
            raise
        except BaseException:
            # A signal handler's exception (Ctrl-C) ended the wait: the request is still in
            # flight and its reply (if one came meanwhile) kept, so result() may wait again.
            self._done = False
            raise

    def cancel(self) -> bool:
        """Cancel it (from any thread): False if its reply already came or it was cancelled."""
        return self._port.cancel(self.id)

    def __del__(self) -> None:
        # Dropped with its reply never taken: the reply must not wait in the port for ever
        # (see _pending_dropped: a finalizer may run while this thread holds the port's locks).
        if not self._done:
            self._port._pending_dropped(self.id)

    def __repr__(self) -> str:
        return f"<PendingRequest {self.id} on {self._port!r}>"


def __getattr__(name: str) -> object:
    # The server side moved to ``server``; its names stay importable from here
    # (resolved on first use: ``server`` itself imports this module).
    if name in ("ConnectionPort", "ConnectionRequest", "create_port"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
