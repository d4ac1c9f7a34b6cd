"""The sans-IO core of one communication port: every decision, for both drivers.

The blocking driver (``port.CommunicationPort``) and the asyncio driver
(``aio``) move bytes, fds and wake-ups; what to send, where a received
message goes, when section releases go out, how a memory grant falls back
to the connection, and what a dead or closed peer means is decided here,
once. Nothing here touches a socket, a lock or a clock-based wait: a driver
calls these methods under its own lock and writes the frames they return.

Entry points:

- **sending** -- ``request``, ``datagram``, ``reply``, ``ping``, ``trim``,
  ``section_message``/``section_sent`` and ``reserve``/``space_wanted``
  return the frames (``list[bytes]``) to write. Before writing, a driver
  with ``owed`` set prefixes ``take_owed()`` (releases held back for this
  frame, credits, queued datagrams) and, if the write failed with nothing
  written, gives them back with ``restore_owed``. Sends with fds call
  ``check_handles`` first. ``request``/``datagram``/``datagrams`` (and
  ``section_message``) raise ``quotas.WindowClosed`` while the peer's flow
  window is full: the driver waits until ``window_counts()`` goes down (a
  read brought replies or credits) and tries again, or raises Throttled. A
  request whose frames never left (nothing written) is forgotten with
  ``unsent``; one that may have reached the peer with ``abandon``.
- **receiving** -- ``receive(data, fds, sender, truncated)`` decodes a read
  (with its SCM_CREDENTIALS and MSG_CTRUNC flag) into a ``Batch``;
  then ``route(batch)``, which files every message (replies
  by id, requests and datagrams in the inbox, grant traffic by request) and
  returns a ``Wake`` naming what arrived. ``outgoing()`` then gives the
  frames the runtime owes the peer at once (PONG, urgent releases).
  ``connection_lost`` and ``fail`` end the connection.
- **taking** -- ``take_reply``, ``take_message``, ``take_grant_op``,
  ``take_grant_data`` hand a waiting caller what it waits for (or None).
  A datagram taken frees its slot in our window: once ``credit_due``, the
  driver sends ``release_frames()`` (releases and the CREDIT frame) at once.
- **dropped requests** -- a request handed to the application and dropped
  unanswered calls ``on_request_dropped`` (from its reference's callback: any
  thread, any moment); the driver then writes ``answer_dropped()`` (UNANSWERED
  replies) under its lock, and the requester's ``take_reply`` raises Unanswered.
- **closing** -- ``close()`` gives the PORT_CLOSED frame; ``finalize_wanted``
  says when the driver may close the socket, ``release_resources`` unmaps.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from . import _native
from .errors import (
    AlpcError,
    Cancelled,
    ConnectionClosed,
    DeadlineExceeded,
    PeerGone,
    ProtocolError,
    SectionError,
    Throttled,
    Timeout,
    Unanswered,
)
from .grant import LocalGrant, PeerMemory
from .handles import NOFILE, close_quietly
from .ledger import Slot
from .protocol import UNANSWERED_REASON, Buffer, Channel, Frames, Message, Payload, payload_parts
from .quotas import Limit
from .section import SectionView, View
from .security import PeerCred
from .stats import ConnectionStats
from .wire import MessageType, Range, Release

__all__ = ["BUDGET_RECHECK", "EXIT_FLUSH_TIMEOUT", "FILED_ERROR", "FILED_INBOX", "FILED_NOTHING", "FILED_REPLY",
           "NOTICES", "NOT_FILED", "SPACE_REASK", "Batch", "Body", "Connection", "Owed", "Wake",
           "answered_for_application", "body_size",
           "check_max_messages", "copy_body", "owned_body", "reply_lost"]

NOTICES = (MessageType.PORT_CLOSED, MessageType.CLIENT_DIED)
# Unflushed datagrams (send(..., flush=False)) beyond this many bytes go out at once.
BACKLOG_LIMIT = 64 * 1024
# With this many section messages unreleased, a sender reads its socket (without blocking).
DRAIN_EVERY = 64
# A receiver copying out a read's section bodies tells the sender of at most this many
# released ranges at once, so a sender waiting for space gets it back while the rest copy.
RELEASE_BATCH = 8
# A sender short of section space asks for releases (space_wanted) again after waiting this
# long, doubling up to the second figure: a body the peer dropped unread is released by its
# finalizer, which only queues the release, and the peer's next read is what sends it.
SPACE_REASK = (0.002, 0.1)
# Message ids are u32 on the wire (0: none).
MAX_MESSAGE_ID = 0xFFFFFFFF
# Space freed by other connections of a port-wide budget comes without a read: look again this often.
BUDGET_RECHECK = 0.05

# What a driver's request/send/reply take: one bytes-like buffer, parts sent back to back
# without being joined first, or a filled view of the connection's section.
Body = Buffer | Sequence[Buffer] | SectionView


def body_size(data: Body) -> int:
    if type(data) is bytes or isinstance(data, (bytearray, SectionView)):
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    return payload_parts(data)[1]


def check_callables(**callbacks: object) -> None:
    """A server loop's handler (and its optional accept hook), checked when given: None or a
    non-callable was taken, and every message then failed in the handler (logged) and was
    answered with an empty reply, as if it had been served."""
    for name, callback in callbacks.items():
        if callback is None and name != "handler":
            continue
        if not callable(callback):
            raise TypeError(f"{name} must be callable, not {type(callback).__name__}")


def check_max_messages(max_messages: object) -> None:
    """receive_many's bound, checked before a message is taken: 0 still returned one, and a
    non-int failed after the first message had left the inbox (lost)."""
    if type(max_messages) is not int:
        raise TypeError(f"max_messages must be an int, not {type(max_messages).__name__}")
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")


def copy_body(into: memoryview, data: Buffer | Sequence[Buffer]) -> None:
    """Copy a body (one buffer, or parts back to back) into reserved section space."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        _native.copy_into(into, data)
        return
    offset = 0
    for part in payload_parts(data)[0]:
        size = len(part) if isinstance(part, bytes) else memoryview(part).nbytes
        _native.copy_into(into[offset:offset + size], part)
        offset += size


def owned_body(data: Buffer | Sequence[Buffer]) -> Payload:
    """A single buffer is copied to bytes; parts are sent as given.

    Parts are written to the kernel before send/request/reply return, so the
    caller may reuse its buffers afterwards.
    """
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return tuple(data)


_REPLY, _PONG, _PORT_CLOSED = MessageType.REPLY, MessageType.PONG, MessageType.PORT_CLOSED
_REQUEST = MessageType.REQUEST
_INCOMING = (MessageType.REQUEST, MessageType.DATAGRAM)
_monotonic = time.monotonic
# What receive_one did.
NOT_FILED, FILED_REPLY, FILED_INBOX, FILED_NOTHING, FILED_ERROR = 0, 1, 2, 3, 4
_GRANT_READ, _GRANT_DATA = MessageType.GRANT_READ, MessageType.GRANT_DATA


def answered_for_application(reply: Message, request_id: int) -> AlpcError:
    """What a reply the peer's runtime sent in its application's place (``reply.cancelled``)
    means to the caller waiting for request ``request_id``."""
    if reply.reason == UNANSWERED_REASON:
        return Unanswered(f"the server dropped request {request_id} without replying (its runtime answered for it)")
    return DeadlineExceeded(f"the peer dropped request {request_id}: its deadline passed before dispatch")


def reply_lost(exc: Timeout) -> tuple[str, str]:
    """Why a server's reply that did not go out in time cost the client its connection, and
    the limit that stopped it (for both drivers' notice and Throttled). The port's section
    budget is held by other connections: that client may well be reading."""
    limit = exc.limit if isinstance(exc, Throttled) else Limit.SEND_TIMEOUT
    if limit == Limit.MAX_PORT_SECTION_BYTES:
        return f"the reply waited for the port's section budget ({limit}) until its timeout", limit
    return "the client stopped reading its replies", limit


class Batch(NamedTuple):
    """What one read decoded, before it is filed."""

    messages: list[Message]
    urgent: bool  # the peer must hear of our releases at once
    error: str | None  # a protocol violation: the connection is dropped
    # False when the error is this process's own (out of fds), not the peer's violation.
    peer_fault: bool = True


class Wake(NamedTuple):
    """What ``route`` filed: whom a driver should wake."""

    ids: list[int]  # requests with a reply, grant operation or grant data now waiting
    inbox: bool  # requests, datagrams or a notice for receive()
    failed: bool  # the connection ended: every waiter should look
    cancelled: bool = False  # the peer cancelled requests: take_cancelled() names them


_NOTHING = Wake([], False, False)
# What ``take_owed``/``release_frames`` took, to give back if the write sent none of it:
# releases, a credit (datagrams, fds), queued datagrams.
Owed = tuple[list[Release], tuple[int, int], Frames]
_NO_CREDIT = (0, 0)
# Every live connection, for the fork handler.
_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def _forked() -> None:
    for connection in list(_connections):
        connection.forked()


os.register_at_fork(after_in_child=_forked)


# How long a process ending normally waits, in all, for room for its ports' queued datagrams.
EXIT_FLUSH_TIMEOUT = 1.0


def _flush_at_exit() -> None:
    """The process ends normally: the datagrams its ports still queue (send(flush=False) on a
    port nobody closed, or one the collector will not reach in time) go out, not with it.

    One bound for every port: a bound each made a process with N peers that stopped reading
    take N seconds to exit. A port reached after it still writes what fits at once."""
    deadline = _monotonic() + EXIT_FLUSH_TIMEOUT
    for connection in list(_connections):
        # The driver knows what it has still to write (an asyncio one, a cancelled send too).
        flush = getattr(connection.owner, "flush_at_exit", None)
        if not connection.inherited and connection.failure is None and flush:
            try:
                flush(max(0.0, deadline - _monotonic()))
            except Exception:  # the peer gone or stuck: nothing left to do at exit
                pass


atexit.register(_flush_at_exit)
_DATAGRAM = MessageType.DATAGRAM


class Connection:
    """The state and rules of one communication port, seen from one side."""

    def __init__(self, channel: Channel, *, is_server: bool) -> None:
        self.channel = channel
        self.is_server = is_server
        self.stats = ConnectionStats()
        self.replies: dict[int, Message] = {}
        self.inbox: deque[Message] = deque()
        self.failure: ConnectionClosed | None = None
        # Set once the socket may be closed: the notice was taken, or nobody will read again.
        self.finalize_wanted = False
        # The stream ended (or the peer process died) without a PORT_CLOSED: a crash, most likely.
        self.peer_died = False
        # Memory grants: client side, the server's pending fallback read for each request in
        # flight (its writes are applied as they are read); server side, the client's answers.
        self._grant_reads: dict[int, Message] = {}
        self._grant_data: dict[int, Message] = {}
        self.vm_refused = False
        # Requests cancelled here while a thread may be waiting for their reply. A new request
        # (or ping) taking one of these ids clears it: the ids came round, and a cancel no waiter
        # saw is not the new request's.
        self._cancelled_ids: set[int] = set()
        # The last protocol violation, for the driver's log.
        self.error = ""
        # Constant for the connection; read on every send.
        self.inline_threshold = channel.inline_threshold
        self.flow = channel.flow
        self._peer_sections = None if channel.sections is None else channel.sections.peer
        # Frames to go before the next one we write: releases held back for it,
        # datagrams queued by send(..., flush=False).
        self.owed = False
        self._releases_owed = False
        self._backlog: Frames = []
        self._backlog_bytes = 0
        # The driver's hook for releases that must go out now (called from any thread).
        self.on_releases_due: Callable[[], None] | None = None
        # The driver's hook for a received body or view collected unreleased (called from its
        # finalizer, any thread, any moment: it may only schedule a flush). None: the driver
        # sends such releases before it sleeps (releases_unannounced).
        self.on_releases_dropped: Callable[[], None] | None = None
        # The driver's hook for a request handed to the application and dropped unanswered
        # (called from its reference's callback: any thread, any moment, maybe inside the
        # collector while the driver's locks are held; it may only try a lock or schedule):
        # the driver then writes ``answer_dropped()`` under its lock.
        self.on_request_dropped: Callable[[], None] | None = None
        channel.on_request_dropped = self._request_dropped
        # The driver object: every message and notice names it as ``message.port``.
        self.owner: object = None
        if self._peer_sections is not None:
            self._peer_sections.wake = self._view_released
            self._peer_sections.dropped = self._view_dropped
        # A forked child's copy (set by the fork handler): see forked().
        self.inherited = False
        _connections.add(self)

    def forked(self) -> None:
        """In a forked child (its only thread, at the fork): what this connection owed the peer
        is the parent's to send. Datagrams queued by send(flush=False), credits, releases and
        answers to expired requests would otherwise reach the peer twice, once per process."""
        self.inherited = True
        self._backlog, self._backlog_bytes = [], 0
        self._releases_owed = self.owed = False
        channel = self.channel
        channel.unsent_releases = []
        channel._automatic.clear()
        channel.dropped_requests.clear()  # the parent's requests: the parent answers them
        channel.flow.take_credit()

    @property
    def peer(self) -> PeerCred:
        return self.channel.peer

    @property
    def closed(self) -> bool:
        return self.failure is not None

    def check_open(self) -> None:
        failure = self.failure
        if failure is not None:
            raise type(failure)(*failure.args)

    # -- sending --------------------------------------------------------------------

    def request(self, data: Payload, grant: LocalGrant | None = None,
                deadline: float | None = None, fds: Sequence[int] = ()) -> tuple[int, Frames]:
        self.check_open()
        message_id, frames = self.channel.request(data, grant, deadline, fds)
        self._cancelled_ids.discard(message_id)  # see _cancelled_ids
        return message_id, frames

    def check_handles(self, fds: Sequence[int]) -> None:
        """HandleNotAllowed for fds the peer would refuse (kind or count), before anything is sent."""
        self.channel.check_handles(fds)

    def window_counts(self) -> tuple[int, int, int]:
        """What the peer holds of ours (requests, datagrams, fds): a sender waiting for its
        window compares these before and after each read."""
        flow = self.flow
        return flow.requests_out, flow.datagrams_out, flow.handles_out

    def cancel(self, request_id: int) -> Frames:
        """Cancel a request in flight: the CANCEL frame for the peer (empty if it is not in
        flight any more). A thread waiting for its reply gets Cancelled; its reply, if one
        comes, is dropped."""
        # A wrong argument is not "not in flight": False would hide the caller's mistake.
        if type(request_id) is not int:
            raise TypeError(f"a request id is an int (a Message's id), not {type(request_id).__name__}")
        if not 0 < request_id <= MAX_MESSAGE_ID:
            raise ValueError(f"a request id is in 1..{MAX_MESSAGE_ID}, not {request_id}")
        if request_id not in self.channel.pending_ids:
            return []
        frames = self.channel.cancel(request_id) if self.failure is None else []
        self.abandon(request_id)
        self._cancelled_ids.add(request_id)
        return frames

    def ping(self) -> tuple[int, Frames]:
        self.check_open()
        message_id, frames = self.channel.ping()
        self._cancelled_ids.discard(message_id)  # see _cancelled_ids
        return message_id, frames

    def datagram(self, data: Payload, fds: Sequence[int] = ()) -> Frames:
        self.check_open()
        if self.inherited:
            self._refuse_datagrams()
        return self.channel.datagram(data, fds)

    def _refuse_datagrams(self) -> None:
        # The peer's window counts both processes' datagrams, and its credits come back to
        # whichever reads first: the parent, credited for datagrams it never sent, dropped
        # the connection ("CREDIT returns more than were sent").
        raise ConnectionClosed("a forked child cannot send datagrams on its parent's connection (their "
                               "credits return to whichever process reads): connect from the child")

    def datagrams_unsent(self, count: int, handles: int = 0) -> None:
        self.channel.datagrams_unsent(count, handles)

    def datagrams(self, items: list[bytes]) -> tuple[Frames, int]:
        """Small datagrams as one frame buffer (one write for all): as many of ``items`` as the
        peer's window takes, and how many that is (WindowClosed if none)."""
        self.check_open()
        if self.inherited:
            self._refuse_datagrams()
        frame, count = self.channel.datagrams(items)
        return [frame], count

    def reply(self, message: Message, data: Payload, fds: Sequence[int] = ()) -> Frames:
        """The reply's frames; none for a request the client cancelled (nobody waits for it)."""
        if message.cancelled:
            return []
        self.check_open()
        return self.channel.reply(message.id, data, fds)

    def reply_unsent(self, message: Message) -> None:
        """The reply's write sent nothing (a timeout): the request is owed again."""
        self.channel.reply_unsent(message)

    def _request_dropped(self) -> None:
        hook = self.on_request_dropped
        if hook is not None:
            hook()

    @property
    def drops_waiting(self) -> bool:
        """Requests dropped unanswered wait for ``answer_dropped``."""
        return bool(self.channel.dropped_requests)

    def answer_dropped(self) -> Frames:
        """The UNANSWERED replies to requests the application dropped unanswered (their client
        gets Unanswered at once, not at its timeout), with anything else the runtime owes the
        peer at once; nothing once the connection ended, or in a forked child (the requests
        are the parent's to answer)."""
        channel = self.channel
        if self.failure is not None or self.inherited:
            channel.dropped_requests.clear()
            return []
        in_flight = self.stats.in_flight
        for request_id in channel.answer_dropped():
            in_flight.pop(request_id, None)
        return channel.take_automatic()

    @property
    def backlogged(self) -> bool:
        """Datagrams queued by send(..., flush=False) wait for the next write."""
        return bool(self._backlog)

    @staticmethod
    def wants_reply(message: Message) -> bool:
        return not message.cancelled

    def trim(self) -> Frames:
        """Unmap our idle sections; their SECTION_CLOSE is owed (it goes with this write or,
        if that sends nothing, the next), so a timed-out trim does not leave the peer's
        mappings of them behind for the connection's life."""
        self.check_open()
        frames = self.channel.trim()
        if frames:
            self.queue(frames)
        return []

    def abandon(self, request_id: int) -> None:
        """The caller stopped waiting: drop its reply (now or when it comes) and the server's
        pending fallback read of its grant."""
        self.channel.abandon(request_id)
        reply = self.replies.pop(request_id, None)
        if reply is not None:
            reply.close_handles()  # now, not whenever the message is collected
        self._grant_reads.pop(request_id, None)

    def unsent(self, request_id: int) -> None:
        """A request none of whose bytes were written: forget it, and its flow-control slot."""
        self.channel.unsent(request_id)
        self.replies.pop(request_id, None)
        self._grant_reads.pop(request_id, None)

    def queue(self, frames: Frames) -> bool:
        """Hold ``frames`` for the next write (batching); True when the backlog should be flushed now."""
        self._backlog += frames
        self._backlog_bytes += sum(len(frame) for frame in frames)
        self.owed = True
        return self._backlog_bytes >= BACKLOG_LIMIT

    def take_owed(self) -> tuple[Frames, Owed]:
        """Frames owed before the next write, and a token to give them back if it fails."""
        entries: list[Release] = []
        frames: Frames = []
        if self._releases_owed:
            self._releases_owed = False
            entries = self.channel.take_releases()
            frames = self.channel.release_frames(entries)
        # Credits ride along with whatever else is owed (they go out by themselves once due).
        credit, credit_frames = self.channel.take_credit()
        backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
        if len(backlog) > 1:
            # One buffer for the kernel instead of hundreds of iovecs (a copy of at most 64 KiB).
            backlog = [b"".join(backlog)]
        self.owed = False
        return frames + credit_frames + backlog, (entries, credit, backlog)

    def restore_owed(self, token: Owed) -> None:
        """The write that carried ``take_owed()``'s (or ``release_frames()``'s) frames sent none
        of them: keep them owed."""
        entries, credit, backlog = token
        if entries:
            self.channel.requeue_releases(entries)
            self._releases_owed = True
            self.owed = True
        if credit != _NO_CREDIT:
            self.channel.restore_credit(credit)
        if backlog:
            self._backlog = backlog + self._backlog
            self._backlog_bytes += sum(len(frame) for frame in backlog)
            self.owed = True

    # -- sections -------------------------------------------------------------------

    def reserve(self, size: int, secure: bool) -> SectionView | None:
        """Section space for ``size`` bytes, or None: send ``space_wanted()`` and wait for releases."""
        self.check_open()
        return self.channel.reserve(size, secure)

    def space_wanted(self) -> Frames:
        return self.channel.release_wanted()

    @property
    def budget_blocked(self) -> bool:
        """Waiting on the port-wide budget (other connections free it, without telling us)."""
        sections = self.channel.sections
        return sections is not None and sections.pool.ledger.budget_blocked

    def section_message(self, kind: MessageType, view: SectionView, *, as_view: bool, callback_id: int = 0,
                        grant: LocalGrant | None = None, span: Range | None = None,
                        deadline: float | None = None, fds: Sequence[int] = ()) -> tuple[int, Frames, list[int]]:
        self.check_open()
        message_id, frames, passed = self.channel.section_message(
            kind, view, as_view=as_view, callback_id=callback_id, grant=grant, span=span, deadline=deadline, fds=fds)
        if kind is _REQUEST:
            self._cancelled_ids.discard(message_id)  # see _cancelled_ids
        return message_id, frames, passed

    def copy_message(self, kind: MessageType, data: Buffer | Sequence[Buffer], length: int, *,
                     callback_id: int = 0) -> tuple[int, Frames, Slot] | None:
        """``data`` copied straight into a section the peer maps already, and its frame; None
        when that takes more (``reserve``, then ``section_message``)."""
        self.check_open()
        made = self.channel.copy_message(kind, length, lambda into: copy_body(into, data), callback_id=callback_id)
        if made is not None and kind is _REQUEST:
            self._cancelled_ids.discard(made[0])  # see _cancelled_ids
        return made

    def copy_sent(self, slot: Slot, written: bool) -> None:
        self.channel.copy_sent(slot, written)

    def section_sent(self, view: SectionView, written: bool) -> None:
        self.channel.section_sent(view, written)

    def should_drain(self) -> bool:
        """A sender of many section messages should read the peer's releases now and then."""
        sections = self.channel.sections
        if sections is None:
            return False
        unreleased = sections.pool.ledger.unreleased
        return unreleased >= DRAIN_EVERY and unreleased % DRAIN_EVERY == 0

    def _view_released(self) -> None:
        # A received view was released or a body copied out (any thread).
        peer = self._peer_sections
        if peer is not None and peer.copies_held and len(peer.pending) < RELEASE_BATCH:
            # More bodies of the same read are still to be copied out: tell the peer
            # with the last of them (or with any frame we write before).
            self._releases_owed = True
            self.owed = True
            return
        if self.releases_due() and self.on_releases_due is not None:
            self.on_releases_due()

    def _view_dropped(self) -> None:
        hook = self.on_releases_dropped
        if hook is not None:
            hook()

    def releases_unannounced(self) -> bool:
        """Ranges given back without a word to the peer (a received body or view dropped
        unreleased, its finalizer only queueing the release) that no reply of ours will
        carry: a driver sends them before it sleeps, or a sender waiting for that space
        (its RELEASE_WANTED already answered with nothing) would wait for ever."""
        peer = self._peer_sections
        return peer is not None and bool(peer.pending) and not self.channel.owes_replies

    def releases_due(self, urgent: bool = False) -> bool:
        """Ranges were released: True when the peer must hear now (send ``release_frames()``).

        While we owe the peer replies, the reply is coming and carries the
        releases in the same write, saving the peer a wake-up per request. A
        sender short of space says so (RELEASE_WANTED), which makes it urgent.
        """
        if urgent or not self.channel.owes_replies:
            return True
        self._releases_owed = True
        self.owed = True
        return False

    def release_frames(self) -> tuple[Frames, Owed]:
        """Every release not yet told to the peer, and the credit owed, as frames of their own
        (and the token for ``restore_owed`` should the write time out)."""
        channel = self.channel
        if self.failure is not None or not (channel.releases_pending or self.flow.credit_owed):
            return [], ([], _NO_CREDIT, [])
        entries: list[Release] = []
        frames: Frames = []
        if channel.releases_pending:
            self._releases_owed = False
            entries = channel.take_releases()
            frames = channel.release_frames(entries)
        credit, credit_frames = channel.take_credit()
        return frames + credit_frames, (entries, credit, [])

    @property
    def credit_due(self) -> bool:
        """The application took enough datagrams that the peer should hear now (``release_frames``)."""
        return self.flow.credit_due

    # -- memory grants ---------------------------------------------------------------

    def take_granted(self, request_id: int) -> Message | None:
        """Client: the server's pending fallback read of a granted request, else its reply."""
        read = self._grant_reads.pop(request_id, None)
        if read is not None:
            return read
        return self.replies.pop(request_id, None)

    def end_granted(self, request_id: int) -> None:
        self._grant_reads.pop(request_id, None)

    def grant_read_answer(self, request_id: int, message: Message, grant: LocalGrant) -> Frames | memoryview:
        """Client: the server asked for part of the grant. Inline frames, or the chunk to send through a section."""
        span: Range = message.grant
        chunk = grant.memory[span.offset:span.offset + span.length]
        if span.length <= self.inline_threshold:
            return self.channel.grant_payload(MessageType.GRANT_DATA, request_id, span, bytes(chunk))
        return chunk

    def direct_ok(self, memory: PeerMemory) -> bool:
        """Server: may we touch the client's memory directly for ``memory`` (else the fallback)?"""
        if not self.channel.grant_active(memory):
            raise SectionError("the grant ended: its request was already replied to")
        self.check_open()
        sections = self.channel.sections
        # Direct access goes to the pid that connected; a request from another process
        # sharing the socket (a forked child) names addresses in its own memory.
        return (sections is not None and sections.direct_memory and not self.vm_refused
                and memory.sender_pid == self.channel.peer.pid)

    def grant_read(self, memory: PeerMemory, offset: int, length: int) -> Frames:
        return self.channel.grant_read(memory, offset, length)

    def take_grant_data(self, request_id: int) -> Message | None:
        return self._grant_data.pop(request_id, None)

    def grant_read_abandoned(self, memory: PeerMemory) -> list[View]:
        """The server stopped waiting for a fallback read; views to release (outside the lock)."""
        self.channel.grant_read_abandoned(memory)
        late = self._grant_data.pop(memory.request_id, None)
        return [late.view] if late is not None and late.view is not None else []

    @staticmethod
    def grant_data_into(answer: Message, into: memoryview) -> None:
        if answer.grant is None:
            raise SectionError("the client withdrew the grant (its request is over)")
        if answer.view is not None:
            with answer.view as source:
                _native.copy_into(into, source)
        else:
            _native.copy_into(into, answer.data)

    def grant_write(self, memory: PeerMemory, offset: int, payload: memoryview) -> Frames | None:
        """Server: inline GRANT_WRITE frames, or None: send ``payload`` through a section."""
        if payload.nbytes <= self.inline_threshold:
            return self.channel.grant_payload(MessageType.GRANT_WRITE, memory.request_id,
                                              Range(offset, payload.nbytes), bytes(payload))
        return None

    # -- receiving --------------------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[int] = (), sender: PeerCred | None = None,
                truncated: int = False) -> Batch:
        """Decode one read (``sender``: its SCM_CREDENTIALS; ``truncated``: MSG_CTRUNC, or
        handles.NOFILE when this process could not take the fds).

        A protocol violation ends the connection (``Batch.error``).
        """
        if truncated == NOFILE:
            close_quietly(fds)
            return self._out_of_fds()
        channel = self.channel
        try:
            messages = channel.receive(data, fds, sender, bool(truncated))
        except ProtocolError as exc:
            self.stats.errors += 1
            self.fail(PeerGone(f"protocol error: {exc}"), notice=f"protocol error: {exc}")
            return Batch([], False, str(exc))
        urgent = channel.releases_urgent
        if urgent:
            channel.releases_urgent = False
        return Batch(messages, urgent, None)

    def _out_of_fds(self) -> Batch:
        """The fds of the peer's last write were lost: our fd table is full (RLIMIT_NOFILE).

        The message (and a section it introduced) cannot be rebuilt, so the connection
        ends; but the peer broke no rule, and its notice and the log say whose fault it is.
        """
        error = ("this process is out of fds (RLIMIT_NOFILE): the fds the peer passed "
                 "could not be received, so its connection was dropped")
        self.fail(ConnectionClosed(error), notice=error)
        return Batch([], False, error, peer_fault=False)

    def receive_one(self, data: bytes, sender: PeerCred | None = None) -> int:
        """The common read in one step: one plain reply, request or datagram, decoded and filed.

        Returns FILED_REPLY, FILED_INBOX or FILED_NOTHING (a late reply
        dropped) when done, FILED_ERROR after a protocol violation (the
        connection ended; ``error`` says why), or NOT_FILED (nothing
        consumed: use ``receive``) for anything that needs more (several
        frames, fds, new sections, runtime frames, releases to send now).
        """
        peer = self._peer_sections
        if peer is not None and (peer.pending or self.channel.unsent_releases):
            return NOT_FILED
        try:
            message = self.channel.receive_one(data, sender)
        except ProtocolError as exc:
            self.stats.errors += 1
            self.fail(PeerGone(f"protocol error: {exc}"), notice=f"protocol error: {exc}")
            self.error = str(exc)
            return FILED_ERROR
        if message is False:
            return NOT_FILED
        if message is None or message is True:
            return FILED_NOTHING
        kind = message.type
        message.port = self.owner
        stats = self.stats
        stats.messages_in += 1
        stats.bytes_in += message.size
        if peer is not None and peer.pending:
            self.releases_due()  # a request's body copied out: its release rides with the reply
        if kind is _REPLY:
            self.replies[message.callback_id] = message
            return FILED_REPLY
        if kind is _REQUEST:
            stats.in_flight[message.id] = _monotonic()
        self.inbox.append(message)
        return FILED_INBOX

    def outgoing(self, batch: Batch) -> tuple[Frames, Owed]:
        """After a read: frames the runtime owes the peer now (automatic answers, releases
        that cannot wait), and the token to ``restore_owed`` if that write times out."""
        frames = self.channel.take_automatic()
        peer = self._peer_sections
        if peer is not None and (peer.pending or self.channel.unsent_releases):
            if self.releases_due(batch.urgent):
                releases, token = self.release_frames()
                return frames + releases, token
        return frames, ([], _NO_CREDIT, [])

    def route(self, batch: Batch) -> Wake:
        """File the messages of a read; returns who should wake."""
        messages = batch.messages
        cancelled = bool(self.channel.cancelled)
        if not messages:
            if batch.error is None:
                return _NOTHING if not cancelled else Wake([], False, False, True)
            return Wake([], True, True)
        stats = self.stats
        ids: list[int] = []
        inbox = failed = False
        owner = self.owner
        file = self.inbox.append
        count = size = 0
        for message in messages:
            message.port = owner
            kind = message.type
            if kind is _DATAGRAM or kind is _REQUEST:
                file(message)
                inbox = True
                count += 1
                body = message._data
                size += len(body) if body is not None else message.size
                if kind is _REQUEST:
                    stats.in_flight[message.id] = _monotonic()
            elif kind is _REPLY or kind is _PONG:
                if kind is _REPLY:
                    count += 1
                    size += message.size
                self.replies[message.callback_id] = message
                ids.append(message.callback_id)
            elif kind is _PORT_CLOSED:
                self._set_failure(PeerGone(message.reason), message)
                inbox = failed = True
            elif kind is _GRANT_READ:
                # An honest server has one fallback read per request waiting for its answer
                # (a new one only after it gave up on the last): the latest replaces any
                # still queued, so a server cannot queue them without bound.
                self._grant_reads[message.callback_id] = message
                ids.append(message.callback_id)
            elif kind is _GRANT_DATA:
                self._grant_data[message.callback_id] = message
                ids.append(message.callback_id)
            else:
                file(message)
                inbox = True
        stats.messages_in += count
        stats.bytes_in += size
        return Wake(ids, inbox, failed, cancelled)

    # -- taking -----------------------------------------------------------------------

    def take_reply(self, request_id: int) -> Message | None:
        """The reply to ``request_id`` if it came; raises Cancelled or DeadlineExceeded for a
        request cancelled here, or dropped by the peer because its deadline passed, and
        Unanswered for one its application dropped without replying."""
        message = self.replies.pop(request_id, None)
        if message is None:
            if request_id in self._cancelled_ids:
                self._cancelled_ids.discard(request_id)
                raise Cancelled(f"request {request_id} was cancelled")
            return None
        if message.cancelled:
            raise answered_for_application(message, request_id)
        return message

    def forget_cancelled(self, request_id: int) -> None:
        self._cancelled_ids.discard(request_id)

    def take_message(self) -> Message | None:
        """The next request, datagram or notice for the application, or None.

        A request whose deadline passed is never handed out: the peer gets a
        CANCELLED reply instead (``take_automatic`` has it for the driver).
        """
        inbox = self.inbox
        while inbox:
            message = inbox.popleft()
            if message.type is _DATAGRAM:
                self.channel.consumed(message)  # its slot in our window is free: a credit is owed
                return message
            if not self._dispatchable(message):
                continue
            if message.type in NOTICES:
                self.finalize_wanted = True
            return message
        return None

    def put_back(self, message: Message) -> None:
        """A message ``take_message`` gave out goes back to the head of the queue, untaken: a
        datagram's window slot is not free (no credit is owed for it until it is taken again)."""
        self.inbox.appendleft(message)
        self.channel.unconsumed(message)

    def _dispatchable(self, message: Message) -> bool:
        """False (and dealt with) for a request cancelled, or past its deadline, before dispatch."""
        if message.cancelled:
            self._drop_body(message)  # the client cancelled it before anyone took it
            return False
        deadline = message.deadline
        if deadline is not None and deadline <= _monotonic():
            self.expire(message)
            return False
        return True

    def expire(self, message: Message) -> None:
        """A request whose deadline passed before any handler ran: answer it as cancelled
        (``take_automatic``; the peer's caller gets DeadlineExceeded) and drop its body."""
        self.channel.expire(message)
        self.stats.in_flight.pop(message.id, None)
        self._drop_body(message)

    def take_callback(self, request_id: int) -> Message | None:
        """While a request waits for its reply: a request or datagram from the peer first (a
        nested callback, ALPC-style), else the reply. Notices stay queued for receive()."""
        inbox = self.inbox
        while inbox and inbox[0].type in _INCOMING:
            message = inbox.popleft()
            if message.type is _DATAGRAM:
                self.channel.consumed(message)
                return message
            if self._dispatchable(message):
                return message
        return self.take_reply(request_id)

    def take_messages(self, into: list[Message], limit: int) -> None:
        """More of ``take_message`` into ``into``, up to ``limit`` in all; stops after a notice."""
        inbox = self.inbox
        while len(into) < limit:
            if inbox and inbox[0].type is _DATAGRAM and inbox[0]._handles is None:
                self._take_datagrams(into, limit)
                continue
            message = self.take_message()
            if message is None:
                return
            into.append(message)
            if message.type in NOTICES:
                return

    def _take_datagrams(self, into: list[Message], limit: int) -> None:
        """The run of datagrams without fds at the head of the inbox, their window slots freed at once."""
        inbox = self.inbox
        append = into.append
        count = 0
        room = limit - len(into)
        while count < room and inbox:
            head = inbox[0]
            if head.type is not _DATAGRAM or head._handles is not None:
                break
            append(inbox.popleft())
            count += 1
        self.channel.consumed_datagrams(count)

    def _drop_body(self, message: Message) -> None:
        """A request nobody will handle: its section range goes back with our next frame, its fds close."""
        message.close_handles()
        body = message._copy if message._copy is not None else message.view
        if body is not None:
            message._copy = None
            body.release(notify=False)
            self._releases_owed = True
            self.owed = True

    def take_automatic(self) -> Frames:
        """Frames the runtime owes the peer after ``take_message`` (answers to expired requests)."""
        return self.channel.take_automatic()

    def take_cancelled(self) -> list[Message]:
        """Requests the peer cancelled since the last call, already out of the inbox: their
        handlers should stop (their ``cancelled`` is set, and their replies are dropped)."""
        cancelled = self.channel.cancelled
        if not cancelled:
            return cancelled
        self.channel.cancelled = []
        for message in cancelled:
            self.stats.in_flight.pop(message.id, None)
            try:
                self.inbox.remove(message)
            except ValueError:
                continue  # already handed to the application, which owns its body
            self._drop_body(message)
        return cancelled

    # -- the end ------------------------------------------------------------------------

    def connection_lost(self, reason: str) -> bool:
        """The stream ended or the peer process died. True if that is news."""
        notice = self.channel.connection_lost(reason)
        if notice is None:
            return False
        self.peer_died = True
        self._set_failure(PeerGone(reason), notice)
        return True

    def fail(self, failure: ConnectionClosed, notice: str | None = None) -> None:
        """End the connection (a protocol error, a broken stream); ``notice`` for the server's application."""
        self.channel.mark_closed(str(failure))
        message = None
        if notice is not None:
            message = Message(MessageType.CLIENT_DIED, 0, 0, b"", self.channel.peer, reason=notice)
        self._set_failure(failure, message)

    def _set_failure(self, failure: ConnectionClosed, notice: Message | None) -> None:
        # The server side sees the notice as a message and releases the socket
        # when it is taken; the client side sees PeerGone on every pending and
        # later call and releases at once.
        if self.failure is None:
            self.failure = failure
        if notice is not None:
            notice.port = self.owner
        if notice is not None and self.is_server:
            self.inbox.append(notice)
        else:
            self.finalize_wanted = True

    def close(self) -> Frames:
        """The PORT_CLOSED frame to send (unless the connection already ended); ends it."""
        frames = [] if self.failure is not None else self.channel.close_notice()
        if self.failure is None:
            self.failure = ConnectionClosed("the port is closed")
        # Nobody will take them: replies read for requests whose caller never asked (a
        # PendingRequest still held) as much as the inbox, or their fds would live as long
        # as the port object does.
        for message in (*self.inbox, *self.replies.values()):
            message.close_handles()
        self.inbox.clear()
        self.replies.clear()
        self.finalize_wanted = True
        return frames

    def release_resources(self) -> None:
        """Unmap the sections; a message not yet taken keeps its body as bytes, not a mapping."""
        for message in (*self.inbox, *self.replies.values()):
            message.keep_body()
        self.channel.release_resources()
