"""Sans-IO state of one channel: message ids, pending requests, and frame dispatch.

Both drivers (the blocking ``port`` module and ``aio``) feed received bytes in
and send the frames this returns; the rules live here once.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .errors import ConnectionClosed, MessageTooLarge, ProtocolError, SectionError
from .grant import LocalGrant, PeerMemory
from .section import ConnectionSections, SectionView, View
from .security import PeerCred
from .wire import (
    CHANNEL_FLAGS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_ATTR_LENGTH,
    MAX_RELEASES_PER_FRAME,
    VERSION,
    Access,
    Attributes,
    Flag,
    Frame,
    FrameDecoder,
    FrameLimits,
    MessageType,
    Range,
    Release,
    SectionFlag,
    SectionRef,
    decode_attributes,
    decode_releases,
    decode_section_ids,
    encode_attributes,
    encode_header,
    encode_releases,
    encode_section_ids,
)

__all__ = [
    "CHANNEL_TYPES",
    "INLINE_FLOOR",
    "MAX_ABANDONED",
    "MAX_UNREPLIED",
    "QUICK_ID_BIT",
    "SECTION_TYPES",
    "Buffer",
    "Channel",
    "Frames",
    "Message",
    "Payload",
    "Replier",
    "channel_limits",
    "materialize",
    "payload_parts",
]

CHANNEL_TYPES = frozenset({
    MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM,
    MessageType.PORT_CLOSED, MessageType.PING, MessageType.PONG, MessageType.CANCEL,
    MessageType.QUICK_DOORBELL,
})
# Runtime traffic of a connection with sections: releases, retirements, grants.
SECTION_TYPES = frozenset({
    MessageType.RELEASE, MessageType.SECTION_CLOSE, MessageType.RELEASE_WANTED,
    MessageType.GRANT_READ, MessageType.GRANT_DATA, MessageType.GRANT_WRITE,
})
# However small the inline threshold, inline frames up to this size are
# accepted, so runtime frames (release lists) always fit.
INLINE_FLOOR = 64 * 1024
# Late replies to requests we gave up on are dropped; remember this many ids.
MAX_ABANDONED = 65536
# A peer with more requests than this awaiting our reply is flooding us.
MAX_UNREPLIED = 65536
# Ids of requests sent through Quick-LPC rings have this bit set (the C side
# picks them); ours never do, so the two kinds cannot collide.
QUICK_ID_BIT = 0x40000000
_ID_MASK = QUICK_ID_BIT - 1


def channel_limits(max_data: int, sections: bool = False) -> FrameLimits:
    if not sections:
        return FrameLimits(allowed_types=CHANNEL_TYPES, max_data=max_data, flag_mask=CHANNEL_FLAGS)
    return FrameLimits(allowed_types=CHANNEL_TYPES | SECTION_TYPES, max_data=max_data,
                       max_attr=MAX_ATTR_LENGTH, max_fds=1, flag_mask=CHANNEL_FLAGS)


class Replier(Protocol):
    def reply(self, message: Message, data: bytes = b"") -> None: ...


class Message:
    """One received message.

    ``id`` is the sender's message id; ``callback_id`` is the id a reply answers.
    ``sender`` is the kernel-verified identity of the peer; ``sender_pid`` and
    ``sender_tid`` are what the peer wrote in the header, informational only.
    ``reason`` explains a PORT_CLOSED or CLIENT_DIED notice.

    A message its sender sent as a view carries ``view``: a read-only
    memoryview into the sender's section (``with message.view as memory:``),
    released when the block ends; ``data`` is then a copy, made on first use.
    A request whose client granted memory carries ``grant`` (a PeerMemory).
    """

    __slots__ = ("_copy", "_data", "callback_id", "cancelled", "deadline", "fds", "grant", "id", "port", "reason",
                 "sender", "sender_pid",
                 "sender_tid", "type", "view")

    def __init__(
        self,
        message_type: MessageType,
        message_id: int,
        callback_id: int,
        data: bytes,
        sender: PeerCred,
        *,
        sender_pid: int = 0,
        sender_tid: int = 0,
        fds: tuple[int, ...] = (),
        reason: str = "",
    ) -> None:
        self.type = message_type
        self.id = message_id
        self.callback_id = callback_id
        self._data: bytes | None = data
        self._copy: View | None = None  # a section body still to copy out (automatic path)
        self.view: View | None = None
        self.grant: Any = None
        self.sender = sender
        self.sender_pid = sender_pid
        self.sender_tid = sender_tid
        self.fds = fds
        self.reason = reason
        self.port: Any = None
        # A request the client cancelled (or whose deadline passed): a handler
        # polls this; its reply is dropped.
        self.cancelled = False
        # The client's absolute deadline (time.monotonic() seconds), or None.
        self.deadline: float | None = None

    @property
    def data(self) -> bytes:
        """The body as bytes (for a view message, a copy of the view)."""
        data = self._data
        if data is None:
            if self._copy is not None:
                materialize([self])
                return self._data or b""
            if self.view is None:
                raise SectionError("the message body is gone")
            data = self._data = self.view.tobytes()
        return data

    @data.setter
    def data(self, value: bytes) -> None:
        self._data = value

    @property
    def size(self) -> int:
        """The body's length, without copying a section body out."""
        if self._data is not None:
            return len(self._data)
        body = self._copy if self._copy is not None else self.view
        return 0 if body is None else len(body)

    def reply(self, data: Any = b"", timeout: float | None = None, **options: Any) -> Any:
        """Reply to this request on the port it arrived on (on an asyncio port, await the result)."""
        if self.port is None:
            raise ConnectionClosed("this message is not attached to a port")
        return self.port.reply(self, data, timeout, **options)

    def __repr__(self) -> str:
        extra = f" reason={self.reason!r}" if self.reason else ""
        size = len(self.view) if self.view is not None else len(self._data or b"")
        kind = " view" if self.view is not None else ""
        return (f"<Message {self.type.name} id={self.id} callback_id={self.callback_id} "
                f"len={size}{kind} from pid {self.sender.pid}{extra}>")


def materialize(messages: list[Message]) -> None:
    """Copy out the bodies that came through a section automatically, releasing their ranges.

    Drivers call this outside the connection's lock: the copy of a large
    body is the one slow step of receiving it.
    """
    for message in messages:
        view = message._copy
        if view is not None:
            message._copy = None
            try:
                message._data = view.tobytes()
            finally:
                view.release(notify=False)


Buffer = bytes | bytearray | memoryview
# One buffer, or several parts sent back to back as one message without being
# joined first, so a large part reaches the socket without an extra copy.
Payload = bytes | Sequence[Buffer]
Frames = list[Buffer]


def payload_parts(data: Payload) -> tuple[Frames, int]:
    """The non-empty parts of ``data`` as flat byte buffers, and their total length."""
    if isinstance(data, bytes):
        return ([data] if data else []), len(data)
    parts: Frames = []
    total = 0
    for part in data:
        if isinstance(part, bytes):
            view: Buffer = part
            size = len(part)
        else:
            flat = memoryview(part)
            if not flat.c_contiguous:
                raise ValueError("message parts must be contiguous buffers")
            view = flat.cast("B") if flat.ndim != 1 or flat.format != "B" else flat
            size = flat.nbytes
        if size:
            parts.append(view)
            total += size
    return parts, total


class Channel:
    """Protocol state of one established connection, seen from one side.

    With ``sections`` the channel also carries large bodies through shared
    sections (the caller reserves a ``SectionView``, fills it, and sends it
    with ``section_message``), memory grants, and the runtime frames both
    need. Without, every body travels inline (tests of the bare protocol).
    """

    def __init__(self, peer: PeerCred, *, send_limit: int, recv_limit: int, local_pid: int,
                 sections: ConnectionSections | None = None) -> None:
        self.peer = peer
        self.send_limit = send_limit
        self.recv_limit = recv_limit
        self.sections = sections
        inline_cap = recv_limit
        if sections is not None:
            inline_cap = min(recv_limit, max(sections.inline_threshold, INLINE_FLOOR))
        self._decoder = FrameDecoder(channel_limits(inline_cap, sections is not None))
        self._local_pid = local_pid
        self._next_id = 1
        self._pending: set[int] = set()
        self._abandoned: dict[int, None] = {}
        # Requests awaiting our reply: id -> the message handed to the application.
        self._unreplied: dict[int, Message | None] = {}
        # Requests the peer cancelled since the driver last looked (their handlers should stop).
        self.cancelled: list[Message] = []
        self._automatic: Frames = []
        # Client with Quick-LPC rings: is a socket reply to ring request id
        # awaited (True), late (False, dropped)? ProtocolError if neither.
        self.quick_claims: Callable[[int], bool] | None = None
        # Client side: grants of requests in flight. Server side: grants of
        # requests not yet replied to, and the fallback reads awaiting data.
        self._grants: dict[int, LocalGrant] = {}
        self._peer_grants: dict[int, PeerMemory] = {}
        self._grant_reads: dict[int, Range] = {}
        self._late_grant_reads: dict[int, None] = {}
        self.unsent_releases: list[Release] = []
        # Set when a received body still has to be copied out of its section.
        self.copies_waiting = False
        # Set when the peer must hear of our releases at once: it asked
        # (RELEASE_WANTED), or it sent a body that no reply of ours will follow.
        self.releases_urgent = False
        self.peer_closed = False
        self.closed = False
        self.close_reason = ""

    @property
    def inline_threshold(self) -> int:
        """Bodies longer than this go through a section (never, without sections)."""
        return self.sections.inline_threshold if self.sections is not None else self.send_limit

    # -- sending -----------------------------------------------------------

    def _frame(self, message_type: MessageType, data: Payload, *, message_id: int = 0,
               callback_id: int = 0, attrs: bytes = b"", n_fds: int = 0) -> Frames:
        if self.closed:
            raise ConnectionClosed(self.close_reason or "the channel is closed")
        if attrs or type(data) is not bytes:
            parts, length = payload_parts(data)
            header = encode_header(
                message_type, length, message_id=message_id, callback_id=callback_id,
                sender_pid=self._local_pid, sender_tid=_native_tid(),
                attr_length=len(attrs), n_fds=n_fds,
            )
            return [header, attrs, *parts] if attrs else [header, *parts]
        # The per-message path: positional packing, and one buffer for a small
        # body (joining 100 bytes costs less than a second iovec).
        header = _pack_header(MAGIC, VERSION, message_type, 0, len(data), 0, message_id, callback_id,
                              self._local_pid, _native_tid(), 0, 0, 0)
        if len(data) <= _JOIN_BELOW:
            return [header + data]
        return [header, data]

    def _check_size(self, data: Payload) -> None:
        length = len(data) if isinstance(data, bytes) else payload_parts(data)[1]
        if length > self.send_limit:
            self.check_length(length)

    def check_length(self, length: int) -> None:
        if length > self.send_limit:
            raise MessageTooLarge(
                f"message of {length} bytes exceeds the peer's max_message_length of {self.send_limit}"
            )

    def _allocate_id(self) -> int:
        message_id = self._next_id
        while message_id in self._pending or message_id in self._abandoned:
            message_id = (message_id + 1) & _ID_MASK or 1
        self._next_id = (message_id + 1) & _ID_MASK or 1
        return message_id

    def request(self, data: Payload, grant: LocalGrant | None = None,
                deadline: float | None = None) -> tuple[int, Frames]:
        """Frames for a request; its reply is matched by the returned id.

        ``deadline`` (time.monotonic() seconds, a clock every process on the
        machine shares) travels with it: the peer never dispatches it later.
        ``data`` is one buffer, or parts sent back to back without being joined.
        """
        if (grant is None and deadline is None and type(data) is bytes and len(data) <= _JOIN_BELOW
                and not self.closed):
            # The per-message path, inlined: _check_size, _allocate_id and _frame in one.
            if len(data) > self.send_limit:
                self.check_length(len(data))
            message_id = self._next_id
            pending = self._pending
            while message_id in pending or message_id in self._abandoned:
                message_id = (message_id + 1) & _ID_MASK or 1
            self._next_id = (message_id + 1) & _ID_MASK or 1
            pending.add(message_id)
            return message_id, [_pack_header(MAGIC, VERSION, _REQUEST_INT, 0, len(data), 0, message_id, 0,
                                             self._local_pid, _native_tid(), 0, 0, 0) + data]
        self._check_size(data)
        message_id = self._allocate_id()
        if grant is None and deadline is None:
            frames = self._frame(MessageType.REQUEST, data, message_id=message_id)
        else:
            attrs = self._request_attrs(grant, deadline)
            frames = self._frame(MessageType.REQUEST, data, message_id=message_id, attrs=attrs)
            if grant is not None:
                self._grants[message_id] = grant
        self._pending.add(message_id)
        return message_id, frames

    def _request_attrs(self, grant: LocalGrant | None, deadline: float | None) -> bytes:
        if self.sections is None:
            raise SectionError("memory grants and deadlines need a connection with sections")
        return encode_attributes(Attributes(grant=None if grant is None else grant.attr,
                                            deadline=None if deadline is None else _deadline_ns(deadline)))

    def cancel(self, request_id: int) -> Frames:
        """Stop waiting for a request and tell the peer (CANCEL); its reply, if any comes, is dropped.

        Empty when the request is not in flight (answered already, or never sent).
        """
        if request_id not in self._pending:
            return []
        self.abandon(request_id)
        return self._frame(MessageType.CANCEL, b"", callback_id=request_id)

    def _cancel_received(self, request_id: int) -> None:
        """The peer gave up on a request of its: answer for the application, which never will.

        A CANCEL racing the reply (already sent) finds nothing and is ignored.
        """
        if request_id not in self._unreplied:
            return
        message = self._unreplied.get(request_id)
        self._answer_cancelled(request_id)
        if message is not None:
            message.cancelled = True
            self.cancelled.append(message)

    def expire(self, message: Message) -> None:
        """A request whose deadline passed before dispatch: answer it as cancelled instead."""
        if message.id in self._unreplied and self._unreplied[message.id] is message:
            message.cancelled = True
            self._answer_cancelled(message.id)

    def _answer_cancelled(self, request_id: int) -> None:
        header = _pack_header(MAGIC, VERSION, MessageType.REPLY, _CANCELLED, 0, 0, self._allocate_id(), request_id,
                              self._local_pid, _native_tid(), 0, 0, 0)
        self._automatic.append(header)
        self._replied(request_id)


    def ping(self) -> tuple[int, Frames]:
        message_id = self._allocate_id()
        frames = self._frame(MessageType.PING, b"", message_id=message_id)
        self._pending.add(message_id)
        return message_id, frames

    def datagrams(self, items: list[bytes]) -> bytes:
        """Many small datagrams as one buffer (ids allocated in order): a batch for one write."""
        parts: list[bytes] = []
        pid, tid = self._local_pid, _native_tid()
        if self.closed:
            raise ConnectionClosed(self.close_reason or "the channel is closed")
        for data in items:
            if len(data) > self.send_limit:
                self.check_length(len(data))
            parts.append(_pack_header(MAGIC, VERSION, _DATAGRAM_INT, 0, len(data), 0, self._allocate_id(), 0,
                                      pid, tid, 0, 0, 0))
            parts.append(data)
        return b"".join(parts)

    def datagram(self, data: Payload) -> Frames:
        self._check_size(data)
        return self._frame(MessageType.DATAGRAM, data, message_id=self._allocate_id())

    def reply(self, request_id: int, data: Payload) -> Frames:
        if request_id not in self._unreplied:
            raise ValueError(f"message {request_id} is not a request awaiting a reply on this port")
        if type(data) is bytes:
            if len(data) > self.send_limit:
                self.check_length(len(data))
        else:
            self._check_size(data)
        frames = self._frame(MessageType.REPLY, data, message_id=self._allocate_id(), callback_id=request_id)
        del self._unreplied[request_id]
        if self._peer_grants:
            self._replied(request_id)
        return frames

    def _check_reply(self, request_id: int) -> None:
        if request_id not in self._unreplied:
            raise ValueError(f"message {request_id} is not a request awaiting a reply on this port")

    def _replied(self, request_id: int) -> None:
        self._unreplied.pop(request_id, None)
        if self._peer_grants:
            self._peer_grants.pop(request_id, None)
            self._grant_reads.pop(request_id, None)

    # -- sending through sections ---------------------------------------------------

    def _require_sections(self) -> ConnectionSections:
        if self.sections is None:
            raise SectionError("this connection has no sections")
        if self.closed:
            raise ConnectionClosed(self.close_reason or "the channel is closed")
        return self.sections

    def reserve(self, length: int, secure: bool = False) -> SectionView | None:
        """Space for a body of ``length`` bytes, or None: wait for the peer's releases."""
        sections = self._require_sections()
        self.check_length(length)
        return sections.pool.reserve(length, secure or sections.secure)

    def section_message(self, kind: MessageType, view: SectionView, *, as_view: bool, callback_id: int = 0,
                        grant: LocalGrant | None = None, span: Range | None = None,
                        deadline: float | None = None) -> tuple[int, Frames, list[int]]:
        """Frames (and the fd to pass) carrying a filled ``view`` as a message of ``kind``.

        ``as_view`` asks the receiver for a view instead of a copy. The view is
        handed over: call ``section_sent`` once the frames went out (or not).
        """
        sections = self._require_sections()
        if not view.belongs_to(sections.pool):
            raise SectionError("the view belongs to another connection")
        self.check_length(view.length)
        if kind is MessageType.REPLY:
            self._check_reply(callback_id)
        frames: Frames = []
        retired = sections.pool.take_retired()
        if retired:
            frames += self._frame(MessageType.SECTION_CLOSE, encode_section_ids(retired))
        new, fd = sections.pool.prepare(view)
        flags = (_VIEW if as_view else 0) | (_SECURE if view.secure else 0)
        attrs = Attributes(ref=SectionRef(view.section_id, flags, view.offset, view.length), new=new,
                           grant=grant.attr if grant is not None else None, range=span,
                           deadline=None if deadline is None else _deadline_ns(deadline))
        message_id = self._allocate_id() if kind in _NUMBERED else 0
        frames += self._frame(kind, b"", message_id=message_id, callback_id=callback_id,
                              attrs=encode_attributes(attrs), n_fds=1 if fd is not None else 0)
        if kind is MessageType.REQUEST:
            self._pending.add(message_id)
            if grant is not None:
                self._grants[message_id] = grant
        elif kind is MessageType.REPLY:
            self._replied(callback_id)
        return message_id, frames, [] if fd is None else [fd]

    def section_sent(self, view: SectionView, written: bool) -> None:
        """After ``section_message``: did its frames leave (``written``) or not at all?"""
        if self.sections is not None:
            self.sections.pool.after_send(view, written)

    @property
    def owes_replies(self) -> bool:
        """Requests received and not yet answered: a reply will go out soon."""
        return bool(self._unreplied)

    @property
    def releases_pending(self) -> bool:
        sections = self.sections
        return sections is not None and (bool(self.unsent_releases) or bool(sections.peer.pending))

    def take_releases(self) -> list[Release]:
        """Every range our side finished with and has not told the peer about yet."""
        if self.sections is None or self.closed:
            return []
        entries, self.unsent_releases = self.unsent_releases, []
        return entries + self.sections.peer.take_releases()

    def requeue_releases(self, entries: list[Release]) -> None:
        """Their RELEASE frames could not be sent (the peer is not reading): later."""
        self.unsent_releases = entries + self.unsent_releases

    def release_frames(self, entries: list[Release]) -> Frames:
        """RELEASE frames for ``entries``."""
        frames: Frames = []
        for start in range(0, len(entries), MAX_RELEASES_PER_FRAME):
            frames += self._frame(MessageType.RELEASE,
                                  encode_releases(entries[start:start + MAX_RELEASES_PER_FRAME]))
        return frames

    def release_wanted(self) -> Frames:
        """Ask the peer to send its releases now (a sender waiting for space)."""
        return self._frame(MessageType.RELEASE_WANTED, b"")

    def trim(self) -> Frames:
        """Unmap our idle pooled sections and tell the peer to do the same."""
        retired = self._require_sections().pool.trim()
        retired += self.sections.pool.take_retired() if self.sections is not None else []
        return self._frame(MessageType.SECTION_CLOSE, encode_section_ids(sorted(set(retired)))) if retired else []

    # -- memory grants ------------------------------------------------------------------

    def grant_read(self, memory: PeerMemory, offset: int, length: int) -> Frames:
        """Server: ask the client's runtime for a range of its grant (the kernel refused us)."""
        self._check_grant(memory)
        if memory.request_id in self._grant_reads:
            raise SectionError("one fallback read per request at a time")
        span = Range(offset, length)
        frames = self._frame(MessageType.GRANT_READ, b"", callback_id=memory.request_id,
                             attrs=encode_attributes(Attributes(range=span)))
        self._grant_reads[memory.request_id] = span
        return frames

    def grant_read_abandoned(self, memory: PeerMemory) -> None:
        """The server stopped waiting for a fallback read; its answer will be dropped."""
        if self._grant_reads.pop(memory.request_id, None) is not None:
            self._late_grant_reads[memory.request_id] = None
            if len(self._late_grant_reads) > MAX_ABANDONED:
                del self._late_grant_reads[next(iter(self._late_grant_reads))]

    def grant_active(self, memory: PeerMemory) -> bool:
        return self._peer_grants.get(memory.request_id) is memory

    def grant_payload(self, kind: MessageType, callback_id: int, span: Range | None, data: bytes) -> Frames:
        """An inline GRANT_DATA (client) or GRANT_WRITE (server) frame."""
        if kind is MessageType.GRANT_WRITE:
            self._check_grant(self._peer_grants.get(callback_id))
        attrs = encode_attributes(Attributes(range=span)) if span is not None else b""
        return self._frame(kind, data, callback_id=callback_id, attrs=attrs)

    def _check_grant(self, memory: PeerMemory | None) -> None:
        if memory is None or self._peer_grants.get(memory.request_id) is not memory:
            raise SectionError("the grant ended: its request was already replied to")

    def finish_grant(self, request_id: int) -> None:
        """Client: the request is over (reply, abandon, close); unpin its buffer."""
        grant = self._grants.pop(request_id, None)
        if grant is not None:
            grant.release()

    # -- Quick-LPC (alpc.qlpc): small requests and their replies through shared rings --
    # A client's ring requests (ids with QUICK_ID_BIT) are tracked by the C
    # side; a reply to one that comes over the socket is claimed through
    # ``quick_claims``. A server owes replies to ring requests it handed out
    # as Messages here, exactly as to socket ones.

    def quick_request_received(self, message_id: int) -> None:
        """Server: a request came through the ring (ProtocolError if its id is in use)."""
        self._request_received(message_id)

    def quick_replying(self, request_id: int) -> None:
        """Server: a reply is about to go through the ring (ValueError if none is owed)."""
        self._check_reply(request_id)
        self._replied(request_id)

    def quick_reply_failed(self, request_id: int) -> None:
        """Server: the ring refused that reply after all; it is owed again."""
        self._unreplied[request_id] = None

    def doorbell(self) -> Frames:
        """Tell a peer waiting in poll() to look at its ring."""
        return self._frame(MessageType.QUICK_DOORBELL, b"")

    def close_notice(self) -> Frames:
        """The PORT_CLOSED frame to send before closing; marks the channel closed."""
        frames = [] if self.closed or self.peer_closed else self._frame(MessageType.PORT_CLOSED, b"")
        self.mark_closed("the port was closed")
        return frames

    def abandon(self, request_id: int) -> None:
        """Forget a request whose caller stopped waiting; its late reply is dropped."""
        if request_id in self._pending:
            self._pending.discard(request_id)
            self._abandoned[request_id] = None
            if len(self._abandoned) > MAX_ABANDONED:
                del self._abandoned[next(iter(self._abandoned))]
        self.finish_grant(request_id)

    def take_automatic(self) -> Frames:
        """Frames the protocol answers by itself (PONG), to be sent by the driver."""
        frames, self._automatic = self._automatic, []
        return frames

    @property
    def pending_requests(self) -> frozenset[int]:
        return frozenset(self._pending)

    @property
    def pending_ids(self) -> set[int]:
        """Requests in flight (the live set, for membership tests; do not modify)."""
        return self._pending

    def mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._decoder.close_fds()

    def release_resources(self) -> None:
        """Unmap every section and unpin every grant (views still held stay valid)."""
        self.mark_closed(self.close_reason or "the channel is closed")
        if self.sections is not None:
            self.sections.close()
        for request_id in list(self._grants):
            self.finish_grant(request_id)

    # -- receiving ---------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[int] = ()) -> list[Message]:
        """Decode received bytes into messages. Raises ProtocolError on a violation."""
        messages: list[Message] = []
        if not fds and not self._automatic and not self._decoder.busy:
            # A batch of plain frames (many datagrams in one read) decodes
            # without building Frames; the rest takes the general path.
            start = self._plain_run(data, messages)
            if start:
                if start == len(data):
                    return messages
                data = data[start:]
        for frame in self._decoder.feed(data, fds):
            message = self._dispatch(frame)
            if message is not None:
                messages.append(message)
        return messages

    def receive_one(self, data: bytes) -> Message | bool | None:
        """The common read: exactly one plain frame (no fds, no attributes), decoded in one step.

        Returns the message, None when the frame needs no delivery (a late
        reply), or False when ``data`` is anything else (or anything wrong),
        with nothing consumed: use ``receive``, which names any violation.
        """
        if self._automatic or self._decoder.busy or len(data) < HEADER_SIZE:
            return False
        data_length, attr_length = _unpack_lengths(data, 8)
        if HEADER_SIZE + data_length + attr_length != len(data):
            return False  # not exactly one frame: nothing is consumed
        message, end = self._plain(data, 0)
        if not end:
            return False
        return message

    def _plain_run(self, data: bytes, messages: list[Message]) -> int:
        """Decode the leading run of plain frames of ``data`` into ``messages``; returns where it stopped."""
        pos = 0
        size = len(data)
        while size - pos >= HEADER_SIZE:
            message, end = self._plain(data, pos)
            if not end:
                break
            if message is not None:
                messages.append(message)
            pos = end
        return pos

    def _plain(self, data: bytes, pos: int) -> tuple[Message | None, int]:
        """The frame at ``pos`` if it is a whole plain REPLY/REQUEST/DATAGRAM (no fds, no
        attributes) that is valid here: (message or None for a late reply, its end); (None, 0)
        for anything else, with nothing consumed (the general path then names any violation).
        The rules of ``_dispatch`` for the frames that carry almost all traffic."""
        (magic, version, kind, flags, data_length, attr_length, message_id, callback_id,
         pid, tid, n_fds, reserved16, reserved32) = _unpack_header(data, pos)
        end = pos + HEADER_SIZE + data_length
        if (attr_length or n_fds or reserved16 or reserved32 or magic != MAGIC or version != VERSION
                or end > len(data) or data_length > self._decoder.max_data or self.peer_closed):
            return None, 0
        if kind == _REPLY_INT:
            if flags and (flags != _CANCELLED or data_length):
                return None, 0
            pending = self._pending
            if callback_id in pending:
                pending.discard(callback_id)
                if self._grants:
                    self.finish_grant(callback_id)
            elif callback_id in self._abandoned:
                del self._abandoned[callback_id]
                return None, end
            else:
                return None, 0
            message = Message(MessageType.REPLY, message_id, callback_id, data[pos + HEADER_SIZE:end], self.peer,
                              sender_pid=pid, sender_tid=tid)
            if flags:
                message.cancelled = True
            return message, end
        if flags:
            return None, 0
        if kind == _DATAGRAM_INT:
            return Message(MessageType.DATAGRAM, message_id, callback_id, data[pos + HEADER_SIZE:end], self.peer,
                           sender_pid=pid, sender_tid=tid), end
        if kind == _REQUEST_INT:
            unreplied = self._unreplied
            if message_id in unreplied or len(unreplied) >= MAX_UNREPLIED:
                return None, 0
            message = Message(MessageType.REQUEST, message_id, callback_id, data[pos + HEADER_SIZE:end], self.peer,
                              sender_pid=pid, sender_tid=tid)
            unreplied[message_id] = message
            return message, end
        return None, 0

    def _dispatch(self, frame: Frame) -> Message | None:
        if self.peer_closed:
            for fd in frame.fds:
                _close_fd(fd)
            raise ProtocolError(f"{frame.type.name} frame after the peer closed its port")
        attrs = self._attributes(frame) if frame.attrs or frame.fds else None
        kind = frame.type
        if frame.flags and (kind is not MessageType.REPLY or frame.data or attrs is not None):
            raise ProtocolError(f"{kind.name} frame with the CANCELLED flag (only an empty REPLY has it)")
        if kind is MessageType.REQUEST:
            self._request_received(frame.message_id)
        elif kind is MessageType.CANCEL:
            self._cancel_received(frame.callback_id)
            return None
        elif kind is MessageType.REPLY or kind is MessageType.PONG:
            if frame.callback_id in self._pending:
                self._pending.discard(frame.callback_id)
                if self._grants:
                    self.finish_grant(frame.callback_id)
            elif frame.callback_id in self._abandoned:
                del self._abandoned[frame.callback_id]
                self._drop_body(attrs)
                return None
            elif kind is MessageType.REPLY and frame.callback_id & QUICK_ID_BIT and self.quick_claims is not None:
                if not self.quick_claims(frame.callback_id):
                    self._drop_body(attrs)
                    return None
            else:
                raise ProtocolError(f"reply to message id {frame.callback_id}, which was never sent")
        elif kind is MessageType.PING:
            self._automatic += self._frame(MessageType.PONG, b"", callback_id=frame.message_id)
            return None
        elif kind is MessageType.QUICK_DOORBELL:
            if frame.data or attrs is not None:
                raise ProtocolError("a QUICK_DOORBELL frame carries nothing")
            return None
        elif kind is MessageType.PORT_CLOSED:
            self.peer_closed = True
            return self._notice(MessageType.PORT_CLOSED, "the peer closed its port")
        elif kind is not MessageType.DATAGRAM:
            return self._runtime(frame, attrs)
        # A frame's fd (a new section) is consumed by the section layer, never handed on.
        message = Message(kind, frame.message_id, frame.callback_id, frame.data, self.peer,
                          sender_pid=frame.sender_pid, sender_tid=frame.sender_tid)
        if attrs is not None:
            self._attach(message, attrs)
        if kind is MessageType.REQUEST:
            self._unreplied[frame.message_id] = message
        elif frame.flags:
            message.cancelled = True
        return message

    def _request_received(self, message_id: int) -> None:
        if message_id in self._unreplied:
            raise ProtocolError(f"request id {message_id} reused while awaiting its reply")
        if len(self._unreplied) >= MAX_UNREPLIED:
            raise ProtocolError("too many requests awaiting a reply")
        self._unreplied[message_id] = None

    def _attributes(self, frame: Frame) -> Attributes:
        """Validate a frame's attributes and map the section it introduces, if any."""
        if self.sections is None:
            for fd in frame.fds:
                _close_fd(fd)
            raise ProtocolError("attributes or fds on a connection without sections")
        try:
            attrs = decode_attributes(frame)
        except ProtocolError:
            for fd in frame.fds:
                _close_fd(fd)
            raise
        if attrs.new is not None:
            self.sections.peer.add(attrs.new, frame.fds[0])
        return attrs

    def _attach(self, message: Message, attrs: Attributes) -> None:
        """Give a message its section body (view or copy) and its grant."""
        if attrs.ref is not None:
            assert self.sections is not None
            view = self.sections.peer.resolve(attrs.ref)
            message._data = None
            if attrs.ref.flags & _VIEW:
                message.view = view
            else:
                message._copy = view
                self.copies_waiting = True
            if message.type is not MessageType.REQUEST:
                self.releases_urgent = True
        if attrs.deadline is not None:
            message.deadline = attrs.deadline / 1e9
        if attrs.grant is not None:
            memory = PeerMemory(message, attrs.grant)
            message.grant = memory
            self._peer_grants[message.id] = memory

    def _drop_body(self, attrs: Attributes | None) -> None:
        """A body nobody will read (a late reply): give its range back at once."""
        if attrs is not None and attrs.ref is not None and self.sections is not None:
            self.sections.peer.resolve(attrs.ref).release(notify=False)

    def _body_length(self, frame: Frame, attrs: Attributes | None) -> int:
        return attrs.ref.length if attrs is not None and attrs.ref is not None else len(frame.data)

    def _runtime(self, frame: Frame, attrs: Attributes | None) -> Message | None:
        """Section and grant bookkeeping frames; most never reach the application."""
        sections = self.sections
        if frame.type not in SECTION_TYPES:
            raise ProtocolError(f"{frame.type.name} frame is not allowed on a channel")
        if sections is None:
            raise ProtocolError(f"{frame.type.name} frame on a connection without sections")
        kind = frame.type
        if kind is MessageType.RELEASE:
            sections.pool.released(decode_releases(frame.data))
            return None
        if kind is MessageType.SECTION_CLOSE:
            sections.peer.retire(decode_section_ids(frame.data))
            return None
        if kind is MessageType.RELEASE_WANTED:
            self.releases_urgent = True
            return None
        if kind is MessageType.GRANT_READ:
            return self._grant_read_received(frame, attrs)
        if kind is MessageType.GRANT_DATA:
            return self._grant_data_received(frame, attrs)
        return self._grant_write_received(frame, attrs)

    def _grant_message(self, frame: Frame, attrs: Attributes | None, span: Range | None) -> Message:
        message = Message(frame.type, frame.message_id, frame.callback_id, frame.data, self.peer,
                          sender_pid=frame.sender_pid, sender_tid=frame.sender_tid)
        message.grant = span
        if attrs is not None:
            self._attach(message, attrs)
        return message

    def _grant_read_received(self, frame: Frame, attrs: Attributes | None) -> Message | None:
        span = attrs.range if attrs is not None else None
        if span is None:
            raise ProtocolError("GRANT_READ without a range")
        grant = self._grants.get(frame.callback_id)
        if grant is None:
            # The request is over (abandoned): refuse, so the server stops waiting.
            self._automatic += self._frame(MessageType.GRANT_DATA, b"", callback_id=frame.callback_id)
            return None
        if not grant.allows(span, Access.READ):
            raise ProtocolError(f"GRANT_READ of [{span.offset}, +{span.length}) outside what the grant allows")
        return self._grant_message(frame, None, span)

    def _grant_data_received(self, frame: Frame, attrs: Attributes | None) -> Message | None:
        asked = self._grant_reads.pop(frame.callback_id, None)
        span = attrs.range if attrs is not None else None
        if asked is None and frame.callback_id in self._late_grant_reads:
            del self._late_grant_reads[frame.callback_id]
            self._drop_body(attrs)
            return None
        if asked is None:
            raise ProtocolError(f"GRANT_DATA for request {frame.callback_id}, which asked for none")
        if span is not None and (span != asked or self._body_length(frame, attrs) != span.length):
            raise ProtocolError("GRANT_DATA does not match the range asked for")
        if span is None and (frame.data or (attrs is not None and attrs.ref is not None)):
            raise ProtocolError("a refused GRANT_DATA carries a body")
        return self._grant_message(frame, attrs, span)

    def _grant_write_received(self, frame: Frame, attrs: Attributes | None) -> Message | None:
        span = attrs.range if attrs is not None else None
        if span is None or self._body_length(frame, attrs) != span.length:
            raise ProtocolError("GRANT_WRITE without a range matching its body")
        grant = self._grants.get(frame.callback_id)
        if grant is None:
            if frame.callback_id in self._abandoned:
                self._drop_body(attrs)
                return None
            raise ProtocolError(f"GRANT_WRITE for request {frame.callback_id}, which granted nothing")
        if not grant.allows(span, Access.WRITE):
            raise ProtocolError(f"GRANT_WRITE of [{span.offset}, +{span.length}) outside what the grant allows")
        return self._grant_message(frame, attrs, span)

    def _notice(self, kind: MessageType, reason: str) -> Message:
        return Message(kind, 0, 0, b"", self.peer, reason=reason)

    def connection_lost(self, reason: str) -> Message | None:
        """The stream ended or the peer process died: the notice to deliver, if any."""
        if self.peer_closed:
            return None
        self.peer_closed = True
        if self._decoder.buffered:
            reason += " (mid-frame)"
        return self._notice(MessageType.CLIENT_DIED, reason)


_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_unpack_lengths = struct.Struct("<II").unpack_from
_REQUEST_INT, _REPLY_INT, _DATAGRAM_INT = int(MessageType.REQUEST), int(MessageType.REPLY), int(MessageType.DATAGRAM)
_CANCELLED = int(Flag.CANCELLED)


def _deadline_ns(deadline: float) -> int:
    return max(0, int(deadline * 1e9))
_PLAIN = frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM})
_tids = threading.local()


def _native_tid() -> int:
    """This thread's id for the header, asked of the kernel (gettid) once per thread."""
    tid: int | None = getattr(_tids, "tid", None)
    if tid is None:
        tid = _tids.tid = threading.get_native_id()
    return tid


def _forget_tid() -> None:
    _tids.__dict__.pop("tid", None)  # a forked child's thread has a new id


os.register_at_fork(after_in_child=_forget_tid)
_JOIN_BELOW = 16 * 1024

# Plain ints: IntFlag arithmetic costs microseconds on a per-message path.
_VIEW = int(SectionFlag.VIEW)
_SECURE = int(SectionFlag.SECURE)
_NUMBERED = frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM})


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
