"""Sans-IO state of one channel: message ids, pending requests, and frame dispatch.

Both drivers (the blocking ``port`` module and ``aio``) feed received bytes in
and send the frames this returns; the rules live here once.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from . import _native
from .errors import ConnectionClosed, MessageTooLarge, ProtocolError, SectionError
from .grant import LocalGrant, PeerMemory
from .handles import Classifier, Handle, ReceivedHandles, check_outgoing, classify, close_quietly, sort_received
from .ledger import Slot
from .quotas import Flow, FlowLimits, decode_credit, encode_credit
from .section import ConnectionSections, SectionView, View
from .security import HandleKind, PeerCred, identity_changed
from .wire import (
    CHANNEL_FLAGS,
    HEADER,
    HEADER_SIZE,
    LONE_REF_SIZE,
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
    decode_lone_ref,
    decode_releases,
    decode_section_ids,
    encode_attributes,
    encode_header,
    encode_lone_ref,
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
    "UNANSWERED_REASON",
    "Buffer",
    "Channel",
    "ConnectionPolicy",
    "Frames",
    "Message",
    "Payload",
    "Replier",
    "channel_limits",
    "payload_parts",
]


class _Types:
    """MessageType members as plain class attributes: on Python 3.11 looking a member up on
    an Enum class costs ~90 ns, and the per-frame code compares kinds a dozen times."""

    CANCEL: Final = MessageType.CANCEL
    CLIENT_DIED: Final = MessageType.CLIENT_DIED
    CREDIT: Final = MessageType.CREDIT
    DATAGRAM: Final = MessageType.DATAGRAM
    GRANT_DATA: Final = MessageType.GRANT_DATA
    GRANT_READ: Final = MessageType.GRANT_READ
    GRANT_WRITE: Final = MessageType.GRANT_WRITE
    PING: Final = MessageType.PING
    PONG: Final = MessageType.PONG
    PORT_CLOSED: Final = MessageType.PORT_CLOSED
    QUICK_DOORBELL: Final = MessageType.QUICK_DOORBELL
    RELEASE: Final = MessageType.RELEASE
    RELEASE_WANTED: Final = MessageType.RELEASE_WANTED
    REPLY: Final = MessageType.REPLY
    REQUEST: Final = MessageType.REQUEST
    SECTION_CLOSE: Final = MessageType.SECTION_CLOSE


CHANNEL_TYPES = frozenset({
    MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM,
    MessageType.PORT_CLOSED, MessageType.PING, MessageType.PONG, MessageType.CANCEL, MessageType.CREDIT,
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
# An automatic section body up to this size that comes alone in a read (a request taken by
# ``receive_one``) is copied out on arrival and its range given back at once (no more heap
# than an inline frame may take). A larger one, or one of several in a read (a stream of
# datagrams), waits in the section until ``data`` is first read: copying a whole read's bodies
# at once grew the heap for each read and faulted its pages in (one-way 64 KiB datagrams on
# one CPU went 2x slower).
EAGER_COPY_MAX = INLINE_FLOOR
# Late replies to requests we gave up on are dropped; remember this many ids.
MAX_ABANDONED = 65536
# A peer with more requests than this awaiting our reply is flooding us.
MAX_UNREPLIED = 65536
# Ids of requests sent through Quick-LPC rings have this bit set (the C side
# picks them); ours never do, so the two kinds cannot collide.
QUICK_ID_BIT = 0x40000000
_ID_MASK = QUICK_ID_BIT - 1


_SECTION_CHANNEL_TYPES = CHANNEL_TYPES | SECTION_TYPES


# Cached: every connection's decoder takes one, and the connections of a port ask for the same
# few (a fresh frozenset, limits and native struct each cost ~1 KiB per side per connection).
@functools.lru_cache(maxsize=64)
def channel_limits(max_data: int, sections: bool = False, max_handles: int = 0) -> FrameLimits:
    """What a channel accepts: a frame's fds are the section it introduces (if any) and its handles."""
    if not sections:
        return FrameLimits(allowed_types=CHANNEL_TYPES, max_data=max_data, max_fds=max_handles,
                           flag_mask=CHANNEL_FLAGS)
    return FrameLimits(allowed_types=_SECTION_CHANNEL_TYPES, max_data=max_data,
                       max_attr=MAX_ATTR_LENGTH, max_fds=1 + max_handles, flag_mask=CHANNEL_FLAGS)


@dataclass(frozen=True)
class ConnectionPolicy:
    """The security settings of one connection, from both sides' announcements.

    ``local``/``peer``: the flow limits this side enforces / the peer enforces.
    ``accept_kinds``: handle kinds this side keeps (others are closed on
    arrival); ``peer_kinds``: what the peer keeps, checked before sending.
    ``refuse_identity_change``: drop the connection when a message arrives
    from another uid/gid than the one that connected, instead of flagging it.
    """

    local: FlowLimits = field(default_factory=FlowLimits)
    peer: FlowLimits = field(default_factory=FlowLimits)
    accept_kinds: frozenset[HandleKind] = frozenset()
    peer_kinds: frozenset[HandleKind] = frozenset()
    refuse_identity_change: bool = False


class Replier(Protocol):
    def reply(self, message: Message, data: bytes = b"") -> None: ...


class Message:
    """One received message.

    ``id`` is the sender's message id; ``callback_id`` is the id a reply answers.
    ``sender`` is the kernel-verified identity of the peer; ``sender_pid`` and
    ``sender_tid`` are what the peer wrote in the header, informational only.
    ``reason`` explains a PORT_CLOSED or CLIENT_DIED notice, or (``UNANSWERED_REASON``)
    a REPLY the peer's runtime sent because its application dropped the request.

    A message its sender sent as a view carries ``view``: a read-only
    memoryview into the sender's section (``with message.view as memory:``),
    released when the block ends; ``data`` is then a copy, made on first use.
    A body the sender's runtime put in a section by itself (a large message)
    is copied out on first use of ``data``, which gives its range back (until
    then it holds that space of the sender's section quota); a request of up
    to ``EAGER_COPY_MAX`` bytes alone in its read is copied out on arrival.
    A request whose client granted memory carries ``grant`` (a PeerMemory).

    ``sender`` comes from the SCM_CREDENTIALS of the read that carried the
    message; ``identity_changed`` is True when its uid or gid is not the one
    that connected (the peer called setuid() since, or passed the socket on).
    ``handles`` are the fds the message brought, each with the kind the
    receiver found (``refused_handles`` lists the kinds it closed instead);
    the message owns them until ``take_handles()``, and closes untaken ones
    when it is dropped.

    A request dropped unanswered (its last reference gone) is answered by this
    side's runtime: the requester gets Unanswered at once.
    """

    # __weakref__: the channel tracks the requests it handed out weakly (Channel._unreplied).
    __slots__ = ("__weakref__", "_copy", "_data", "_handles", "callback_id", "cancelled", "deadline", "grant", "id",
                 "identity_changed", "port", "reason", "sender", "sender_pid", "sender_tid", "type", "view")

    def __init__(
        self,
        message_type: MessageType,
        message_id: int,
        callback_id: int,
        data: bytes,
        sender: PeerCred,
        # Positional too: a batch of datagrams builds one Message each, and keywords cost.
        sender_pid: int = 0,
        sender_tid: int = 0,
        *,
        reason: str = "",
        identity_changed: bool = False,
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
        self.reason = reason
        self.identity_changed = identity_changed
        self._handles: ReceivedHandles | None = None
        self.port: Any = None
        # A request the client cancelled (or whose deadline passed): a handler
        # polls this; its reply is dropped. On a REPLY: the peer's runtime sent it for its
        # application (``reason`` says why).
        self.cancelled = False
        # The client's absolute deadline (time.monotonic() seconds), or None.
        self.deadline: float | None = None

    @property
    def data(self) -> bytes:
        """The body as bytes (for a view message, a copy of the view)."""
        data = self._data
        if data is None:
            if self._copy is not None:
                # Copied on first use, by the thread that reads it: a read of many large
                # bodies then never holds fresh copies of all of them at once.
                return self._copy_out(notify=True)
            with _body_lock(self):  # another thread may have copied it out meanwhile
                data = self._data
                if data is None:
                    if self.view is None:
                        raise SectionError("the message body is gone")
                    data = self._data = self.view.tobytes()
        return data

    @data.setter
    def data(self, value: bytes) -> None:
        self._data = value

    def _copy_out(self, *, notify: bool) -> bytes:
        # One copy per message: a second thread reading ``data`` meanwhile waits for it rather
        # than finding neither the bytes nor the range ("the body is gone", a size of 0).
        copy: View | None = None
        try:
            with _body_lock(self):
                data = self._data
                if data is not None:
                    return data  # another thread copied it meanwhile
                copy = self._copy
                if copy is None:
                    raise SectionError("the message body is gone")
                try:
                    data = self._data = copy.tobytes()
                finally:
                    self._copy = None  # only now: until then ``size`` and other readers use the range
        finally:
            if copy is not None:
                # Outside the lock: telling the peer wakes the driver, which takes the connection's.
                copy.release(notify=notify)
        return data

    def keep_body(self) -> None:
        """Copy a body still waiting in its section out now, without telling the peer.

        For a connection that is ending: its sections go, so a message nobody
        has read yet keeps its bytes rather than a mapping.
        """
        if self._copy is not None:
            self._copy_out(notify=False)

    @property
    def handles(self) -> tuple[Handle, ...]:
        """The fds this message brought (and still owns), with their kinds."""
        return self._handles.handles if self._handles is not None else ()

    @property
    def refused_handles(self) -> tuple[HandleKind, ...]:
        """The kinds of the fds this message brought that this side closed on arrival."""
        return self._handles.refused if self._handles is not None else ()

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(handle.fd for handle in self.handles)

    def take_handles(self) -> tuple[Handle, ...]:
        """Take the fds over (the caller closes them from now on)."""
        return self._handles.take() if self._handles is not None else ()

    def close_handles(self) -> None:
        if self._handles is not None:
            self._handles.close()

    @property
    def pidfd(self) -> int | None:
        """A pidfd for the sending process (the connection's), when the kernel gave one.

        None when the message came from another process than the one that
        connected (a forked child sharing the socket). Owned by the port.
        """
        port = self.port
        if port is None or self.sender.pid != port.peer.pid:
            return None
        pidfd: int | None = port.peer_pidfd
        return pidfd

    @property
    def size(self) -> int:
        """The body's length, without copying a section body out."""
        if self._data is not None:
            return len(self._data)
        body = self._copy if self._copy is not None else self.view
        return 0 if body is None else len(body)

    def reply(self, data: Any = b"", timeout: float | None = None, **options: Any) -> Any:
        """Reply to this request on the port it arrived on (on an asyncio port, await the result)."""
        port = self.port
        if port is None:
            raise ConnectionClosed("this message is not attached to a port")
        if not options:  # (the common call: no keyword dict to unpack)
            return port.reply(self, data, timeout)
        return port.reply(self, data, timeout, **options)

    def __repr__(self) -> str:
        extra = f" reason={self.reason!r}" if self.reason else ""
        size = self.size
        kind = " view" if self.view is not None else ""
        if self._handles is not None and len(self._handles):
            kind += f" +{len(self._handles)} fds"
        return (f"<Message {self.type.name} id={self.id} callback_id={self.callback_id} "
                f"len={size}{kind} from pid {self.sender.pid}{extra}>")


# Serialise the first read of a section body between threads, one lock per stripe of messages
# (a lock each would cost every small message; unrelated messages seldom share a stripe).
_BODY_LOCKS = tuple(threading.Lock() for _ in range(64))


def _body_lock(message: Message) -> threading.Lock:
    return _BODY_LOCKS[id(message) >> 4 & 63]


Buffer = bytes | bytearray | memoryview
# One buffer, or several parts sent back to back as one message without being
# joined first, so a large part reaches the socket without an extra copy.
Payload = bytes | Sequence[Buffer]
Frames = list[Buffer]


def payload_parts(data: Payload) -> tuple[Frames, int]:
    """The non-empty parts of ``data`` as flat byte buffers, and their total length."""
    if isinstance(data, bytes):
        return ([data] if data else []), len(data)
    if type(data) is not tuple and type(data) is not list:
        _check_parts(data)
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


def _check_parts(data: object) -> None:
    """TypeError unless ``data`` is a sequence of buffers: iterating a dict sent its keys, a str
    failed part by part, and a generator was used up by the size count, leaving an empty body."""
    if isinstance(data, (str, Mapping)) or not isinstance(data, Sequence):
        raise TypeError(f"a message body is a bytes-like object or a sequence of them, not {type(data).__name__}")


class _Handed(weakref.ref[Message]):
    """A weak reference to a request handed to the application, knowing the request's id:
    its callback (the channel's) tells the channel when the application drops the request."""

    __slots__ = ("request_id",)

    request_id: int


# A request owed a reply: a weak reference to the Message handed out, or None while none was.
_Owed = _Handed | None
# What the requester's runtime makes of an UNANSWERED reply (Message.reason).
UNANSWERED_REASON = "the peer dropped the request without replying"


def _drop_callback(channel: Channel) -> Callable[[_Handed], None]:
    """The callback of every _Handed of ``channel``. Run by whichever thread drops a request's
    last reference, at any moment (inside the collector too, maybe while that thread holds the
    driver's locks): it only queues the reference and tells the driver, which answers it
    under its own lock (``answer_dropped``). Holds the channel weakly: no cycle through it."""
    channel_ref = weakref.ref(channel)

    def dropped(owed: _Handed) -> None:
        held = channel_ref()
        if held is None:
            return
        held.dropped_requests.append(owed)
        hook = held.on_request_dropped
        if hook is not None:
            hook()

    return dropped


# quick_replying's "no such request" (None means owed, not handed out as a Message).
_NOT_OWED: Any = object()


def _alive(owed: _Owed) -> Message | None:
    """The Message of an owed request, if it was handed out and is still referenced."""
    return None if owed is None else owed()


class Channel:
    """Protocol state of one established connection, seen from one side.

    With ``sections`` the channel also carries large bodies through shared
    sections (the caller reserves a ``SectionView``, fills it, and sends it
    with ``section_message``), memory grants, and the runtime frames both
    need. Without, every body travels inline (tests of the bare protocol).
    """

    # Slots: one instance per side of every connection, with more attributes than CPython shares
    # keys for (29): past that each instance's __dict__ is a 1.5 KiB table of its own, where slots
    # take 8 bytes an attribute. __weakref__: _channels and the drop callbacks hold it weakly.
    __slots__ = ("__weakref__", "_abandoned", "_automatic", "_classify", "_decoder", "_grant_reads", "_grants",
                 "_held_grants", "_last_changed", "_last_sender", "_late_grant_reads", "_local_pid", "_lone_read",
                 "_max_handles", "_next_id", "_on_drop", "_partial_sender", "_peer_grants", "_pending",
                 "_unreplied", "cancelled", "close_reason", "closed", "dropped_requests", "flow",
                 "on_request_dropped", "peer", "peer_closed", "policy", "quick_claims", "recv_limit",
                 "releases_urgent", "sections", "send_limit", "unsent_releases")

    def __init__(self, peer: PeerCred, *, send_limit: int, recv_limit: int, local_pid: int,
                 sections: ConnectionSections | None = None, policy: ConnectionPolicy | None = None,
                 classifier: Classifier = classify) -> None:
        self.peer = peer
        self.send_limit = send_limit
        self.recv_limit = recv_limit
        self.sections = sections
        self.policy = policy = policy or ConnectionPolicy()
        self.flow = Flow(policy.local, policy.peer)
        self._max_handles = policy.local.max_handles_per_message
        self._classify = classifier
        inline_cap = recv_limit
        if sections is not None:
            inline_cap = min(recv_limit, max(sections.inline_threshold, INLINE_FLOOR))
        self._decoder = FrameDecoder(channel_limits(inline_cap, sections is not None,
                                                    policy.local.max_handles_per_message))
        # The credentials of the read that began the frame still incomplete.
        self._partial_sender: PeerCred | None = None
        self._last_sender = peer
        self._last_changed = False
        self._local_pid = local_pid
        _channels.add(self)  # a forked child's frames name the child (_forget_tid)
        self._next_id = 1
        self._pending: set[int] = set()
        self._abandoned: dict[int, None] = {}
        # Requests awaiting our reply: id -> the message handed to the application, weakly: one
        # the application dropped unanswered goes (its fds closed, its body given back) as the
        # README says a dropped message does, and the runtime answers it (UNANSWERED): its
        # reference's callback queues it in ``dropped_requests`` and calls
        # ``on_request_dropped`` (the driver's: from any thread, it may only try a lock or
        # schedule), and ``answer_dropped`` answers it under the driver's lock.
        self._unreplied: dict[int, _Owed] = {}
        # A list (56 bytes empty; a deque is 760, on every connection): append and pop(0) are
        # atomic all the same, and few requests are dropped between two answers.
        self.dropped_requests: list[_Handed] = []
        self.on_request_dropped: Callable[[], None] | None = None
        self._on_drop = _drop_callback(self)
        # Requests the peer cancelled since the driver last looked (their handlers should stop).
        self.cancelled: list[Message] = []
        self._automatic: Frames = []
        # Client with Quick-LPC rings: is a socket reply to ring request id
        # awaited (True), late (False, dropped)? ProtocolError if neither.
        self.quick_claims: Callable[[int], bool] | None = None
        # Client side: grants of requests in flight. Server side: grants of
        # requests not yet replied to, and the fallback reads awaiting data.
        self._grants: dict[int, LocalGrant] = {}
        # Client side: grants of requests given up on (cancelled, timed out, dropped). The server
        # may still write into them directly until it answers (its reply, or the CANCELLED answer
        # to our CANCEL): they stay pinned until then (or until the channel closes), so the
        # application cannot free the memory under a late write.
        self._held_grants: dict[int, LocalGrant] = {}
        self._peer_grants: dict[int, PeerMemory] = {}
        self._grant_reads: dict[int, Range] = {}
        self._late_grant_reads: dict[int, int] = {}  # request id -> fallback reads given up on
        self.unsent_releases: list[Release] = []
        # Set when the peer must hear of our releases at once: it asked
        # (RELEASE_WANTED), or it sent a body that no reply of ours will follow.
        self.releases_urgent = False
        # While receive_one decodes its one frame: a small section body is copied on arrival.
        self._lone_read = False
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
                              self._local_pid, _native_tid(), n_fds, 0, 0)
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

    def check_handles(self, fds: Sequence[int]) -> None:
        """Refuse fds the peer would not take (HandleNotAllowed), before anything is sent."""
        policy = self.policy
        check_outgoing(fds, policy.peer_kinds, policy.peer.max_handles_per_message, self._classify)

    def request(self, data: Payload, grant: LocalGrant | None = None,
                deadline: float | None = None, fds: Sequence[int] = ()) -> tuple[int, Frames]:
        """Frames for a request; its reply is matched by the returned id.

        ``deadline`` (time.monotonic() seconds, a clock every process on the
        machine shares) travels with it: the peer never dispatches it later.
        ``data`` is one buffer, or parts sent back to back without being joined;
        ``fds`` are passed with it. Raises WindowClosed while the peer holds
        ``max_pending_requests`` of ours (or too many of our fds): the driver
        waits for replies and retries.
        """
        if (grant is None and deadline is None and not fds and type(data) is bytes and len(data) <= _JOIN_BELOW
                and not self.closed):
            # The per-message path, inlined: _check_size, _allocate_id and _frame in one.
            if len(data) > self.send_limit:
                self.check_length(len(data))
            message_id = self._next_id
            pending = self._pending
            while message_id in pending or message_id in self._abandoned:
                message_id = (message_id + 1) & _ID_MASK or 1
            self.flow.take_request(message_id)
            self._next_id = (message_id + 1) & _ID_MASK or 1
            pending.add(message_id)
            return message_id, [_pack_header(MAGIC, VERSION, _REQUEST_INT, 0, len(data), 0, message_id, 0,
                                             self._local_pid, _native_tid(), 0, 0, 0) + data]
        self._check_size(data)
        message_id = self._allocate_id()
        if grant is None and deadline is None:
            frames = self._frame(_Types.REQUEST, data, message_id=message_id, n_fds=len(fds))
        else:
            attrs = self._request_attrs(grant, deadline)
            frames = self._frame(_Types.REQUEST, data, message_id=message_id, attrs=attrs, n_fds=len(fds))
        self.flow.take_request(message_id, len(fds))
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
        return self._frame(_Types.CANCEL, b"", callback_id=request_id)

    def _cancel_received(self, request_id: int) -> None:
        """The peer gave up on a request of its: answer for the application, which never will.

        A CANCEL racing the reply (already sent) finds nothing and is ignored.
        """
        if request_id not in self._unreplied:
            return
        message = _alive(self._unreplied.get(request_id))
        self._answer_cancelled(request_id)
        if message is not None:
            message.cancelled = True
            self.cancelled.append(message)

    def expire(self, message: Message) -> None:
        """A request whose deadline passed before dispatch: answer it as cancelled instead."""
        if message.id in self._unreplied and _alive(self._unreplied[message.id]) is message:
            message.cancelled = True
            self._answer_cancelled(message.id)

    def _answer_cancelled(self, request_id: int) -> None:
        self._answer_for_application(request_id, _CANCELLED)

    def _answer_for_application(self, request_id: int, flag: int) -> None:
        """The empty REPLY flagged ``flag`` the runtime owes for a request its application
        will never answer (``take_automatic`` has it); the request is answered."""
        header = _pack_header(MAGIC, VERSION, _Types.REPLY, flag, 0, 0, self._allocate_id(), request_id,
                              self._local_pid, _native_tid(), 0, 0, 0)
        self._automatic.append(header)
        self._replied(request_id)

    def _handed(self, message: Message, request_id: int) -> _Handed:
        """The weak reference by which ``_unreplied`` holds a request handed out (see there)."""
        owed = _Handed(message, self._on_drop)
        owed.request_id = request_id
        return owed

    def answer_dropped(self) -> list[int]:
        """Requests the application dropped unanswered since the last call: each still owed
        (by the very reference that died: its id may have been answered and reused since, or
        owed again through another reference) is answered with an empty UNANSWERED reply
        (``take_automatic`` has them). Returns their ids. A closed or closing channel
        answers nothing: nobody would read the answer."""
        dropped = self.dropped_requests
        answered: list[int] = []
        unreplied = self._unreplied
        while dropped:
            owed = dropped.pop(0)
            if self.closed or self.peer_closed:
                continue
            request_id = owed.request_id
            if unreplied.get(request_id) is owed:
                self._answer_for_application(request_id, _UNANSWERED)
                answered.append(request_id)
        return answered


    def ping(self) -> tuple[int, Frames]:
        message_id = self._allocate_id()
        frames = self._frame(_Types.PING, b"", message_id=message_id)
        self._pending.add(message_id)
        return message_id, frames

    def datagrams(self, items: list[bytes]) -> tuple[bytes, int]:
        """Small datagrams as one buffer (ids allocated in order): a batch for one write.

        Frames as many of ``items`` as the peer's datagram window has room for
        and returns how many; raises WindowClosed when it has room for none.
        """
        if self.closed:
            raise ConnectionClosed(self.close_reason or "the channel is closed")
        count = min(len(items), self.flow.datagram_room())
        if not count and items:
            self.flow.check_datagram()  # names the limit
        parts: list[bytes] = []
        append = parts.append
        pid, tid = self._local_pid, _native_tid()
        chosen = items[:count]
        for data in chosen:
            if len(data) > self.send_limit:
                self.check_length(len(data))
        # _allocate_id, inlined: a method call per datagram is a good part of a batch's cost.
        pending, abandoned, next_id = self._pending, self._abandoned, self._next_id
        for data in chosen:
            while next_id in pending or next_id in abandoned:
                next_id = (next_id + 1) & _ID_MASK or 1
            append(_pack_header(MAGIC, VERSION, _DATAGRAM_INT, 0, len(data), 0, next_id, 0, pid, tid, 0, 0, 0))
            append(data)
            next_id = (next_id + 1) & _ID_MASK or 1
        self._next_id = next_id
        self.flow.sent_datagrams(count)
        return b"".join(parts), count

    def datagram(self, data: Payload, fds: Sequence[int] = ()) -> Frames:
        """Frames for a datagram; raises WindowClosed while the peer's queue is full."""
        self._check_size(data)
        frames = self._frame(_Types.DATAGRAM, data, message_id=self._allocate_id(), n_fds=len(fds))
        self.flow.take_datagram(len(fds))
        return frames

    def datagrams_unsent(self, count: int, handles: int = 0) -> None:
        """Datagrams framed by datagram()/datagrams()/section_message() whose write sent nothing."""
        self.flow.unsent_datagrams(count, handles)

    def reply(self, request_id: int, data: Payload, fds: Sequence[int] = ()) -> Frames:
        """Frames for a reply; never held back by flow control (room for replies is reserved)."""
        if request_id not in self._unreplied:
            raise ValueError(f"message {request_id} is not a request awaiting a reply on this port")
        if type(data) is bytes:
            if len(data) > self.send_limit:
                self.check_length(len(data))
        else:
            self._check_size(data)
        frames = self._frame(_Types.REPLY, data, message_id=self._allocate_id(), callback_id=request_id,
                             n_fds=len(fds))
        del self._unreplied[request_id]
        if not request_id & QUICK_ID_BIT:  # ring requests are bounded by their ring, not the flow window
            self.flow.replied(request_id)
        if self._peer_grants:
            self._peer_grants.pop(request_id, None)
            self._grant_reads.pop(request_id, None)
        return frames

    def _check_reply(self, request_id: int) -> None:
        if request_id not in self._unreplied:
            raise ValueError(f"message {request_id} is not a request awaiting a reply on this port")

    def _replied(self, request_id: int) -> None:
        self._unreplied.pop(request_id, None)
        if not request_id & QUICK_ID_BIT:
            self.flow.replied(request_id)
        if self._peer_grants:
            self._peer_grants.pop(request_id, None)
            self._grant_reads.pop(request_id, None)

    def reply_unsent(self, message: Message) -> None:
        """The reply to ``message`` never left (nothing of it was written): it is owed again,
        so the application, which still holds the request, can answer it."""
        request_id = message.id
        if self.closed or request_id in self._unreplied:
            return
        self._unreplied[request_id] = self._handed(message, request_id)
        if not request_id & QUICK_ID_BIT:
            self.flow.reply_unsent(request_id, message._handles.received if message._handles is not None else 0)
        if isinstance(message.grant, PeerMemory):
            self._peer_grants[request_id] = message.grant

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
                        deadline: float | None = None, fds: Sequence[int] = ()) -> tuple[int, Frames, list[int]]:
        """Frames (and the fds to pass) carrying a filled ``view`` as a message of ``kind``.

        ``as_view`` asks the receiver for a view instead of a copy. The view is
        handed over: call ``section_sent`` once the frames went out (or not).
        ``fds`` are the message's handles; they follow the section's fd, if any.
        """
        sections = self._require_sections()
        if not view.belongs_to(sections.pool):
            raise SectionError("the view belongs to another connection")
        self.check_length(view.length)
        # Refused (NaN, not a number) before the pool marks a new section as announced: else
        # the next message names a section the peer never saw, and it drops the connection.
        deadline_ns = None if deadline is None else _deadline_ns(deadline)
        self._check_sendable(kind, callback_id, len(fds))
        frames: Frames = []
        retired = sections.pool.take_retired()
        if retired:
            frames += self._frame(_Types.SECTION_CLOSE, encode_section_ids(retired))
        try:
            new, fd = sections.pool.prepare(view)
        except BaseException:
            sections.pool.requeue_retired(retired)
            raise
        view.retired = retired  # told only if the frames leave (section_sent)
        flags = (_VIEW if as_view else 0) | (_SECURE if view.secure else 0)
        if new is None and grant is None and span is None and deadline is None:
            encoded = encode_lone_ref(view.section_id, flags, view.offset, view.length)
        else:
            encoded = encode_attributes(Attributes(
                ref=SectionRef(view.section_id, flags, view.offset, view.length), new=new,
                grant=grant.attr if grant is not None else None, range=span, deadline=deadline_ns))
        message_id = self._allocate_id() if kind in _NUMBERED else 0
        frames += self._frame(kind, b"", message_id=message_id, callback_id=callback_id,
                              attrs=encoded, n_fds=(fd is not None) + len(fds))
        self._section_sent_as(kind, message_id, callback_id, len(fds))
        if grant is not None and kind is _Types.REQUEST:
            self._grants[message_id] = grant
        return message_id, frames, ([] if fd is None else [fd]) + list(fds)

    def copy_message(self, kind: MessageType, length: int, fill: Callable[[memoryview], None], *,
                     callback_id: int = 0) -> tuple[int, Frames, Slot] | None:
        """A small automatic body (``fill`` writes its ``length`` bytes) placed straight into a
        pooled section the peer maps already, and the one frame naming it; None (nothing done)
        when that takes more (a new or secure section, a retirement to tell): ``reserve``.
        Call ``copy_sent`` if the frame was not written."""
        sections = self._require_sections()
        if sections.secure or length > EAGER_COPY_MAX:
            return None
        self.check_length(length)
        self._check_sendable(kind, callback_id, 0)
        slot = sections.pool.place_copy(length, fill)
        if slot is None:
            return None
        message_id = self._allocate_id() if kind in _NUMBERED else 0
        frames = self._frame(kind, b"", message_id=message_id, callback_id=callback_id,
                             attrs=encode_lone_ref(slot.section_id, 0, slot.offset, length))
        self._section_sent_as(kind, message_id, callback_id, 0)
        return message_id, frames, slot

    def _check_sendable(self, kind: MessageType, callback_id: int, handles: int) -> None:
        """Before a section message of ``kind`` is framed: a reply must be owed, a request or
        datagram must fit the peer's window (WindowClosed otherwise)."""
        if kind is _Types.REPLY:
            self._check_reply(callback_id)
        elif kind is _Types.REQUEST:
            self.flow.check_request(handles)
        elif kind is _Types.DATAGRAM:
            self.flow.check_datagram(handles)

    def _section_sent_as(self, kind: MessageType, message_id: int, callback_id: int, handles: int) -> None:
        """A section message of ``kind`` was framed: count it as the inline paths do."""
        if kind is _Types.REQUEST:
            self._pending.add(message_id)
            self.flow.sent_request(message_id, handles)
        elif kind is _Types.REPLY:
            self._replied(callback_id)
        elif kind is _Types.DATAGRAM:
            self.flow.sent_datagram(handles)

    def copy_sent(self, slot: Slot, written: bool) -> None:
        """After ``copy_message``: its frame left (``written``) or nothing of it did."""
        if not written and self.sections is not None:
            self.sections.pool.unplace(slot)

    def section_sent(self, view: SectionView, written: bool) -> None:
        """After ``section_message``: did its frames leave (``written``) or not at all?"""
        if self.sections is not None:
            if not written and view.retired:
                self.sections.pool.requeue_retired(view.retired)
            view.retired = []
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
            frames += self._frame(_Types.RELEASE,
                                  encode_releases(entries[start:start + MAX_RELEASES_PER_FRAME]))
        return frames

    # -- flow control ------------------------------------------------------------------------

    def consumed(self, message: Message) -> None:
        """The application took ``message`` from the queue: a datagram's slot (and fds) free up."""
        if message.type is _Types.DATAGRAM:
            self.flow.consumed_datagram(message._handles.received if message._handles is not None else 0)

    def unconsumed(self, message: Message) -> None:
        """``message``, taken, went back to the queue: undo ``consumed``."""
        if message.type is _Types.DATAGRAM:
            self.flow.unconsumed_datagram(message._handles.received if message._handles is not None else 0)

    def consumed_datagrams(self, count: int) -> None:
        """``consumed`` for ``count`` datagrams that carried no fds."""
        self.flow.consumed_datagrams(count)

    def take_credit(self) -> tuple[tuple[int, int], Frames]:
        """The CREDIT frame owed to the peer, if any; ``restore_credit`` if it was not sent."""
        if not self.flow.credit_owed or self.closed:
            return (0, 0), []
        credit = self.flow.take_credit()
        return credit, self._frame(_Types.CREDIT, encode_credit(*credit))

    def restore_credit(self, credit: tuple[int, int]) -> None:
        if credit != (0, 0):
            self.flow.restore_credit(credit)

    def release_wanted(self) -> Frames:
        """Ask the peer to send its releases now (a sender waiting for space)."""
        return self._frame(_Types.RELEASE_WANTED, b"")

    def trim(self) -> Frames:
        """Unmap our idle pooled sections and tell the peer to do the same."""
        retired = self._require_sections().pool.trim()
        retired += self.sections.pool.take_retired() if self.sections is not None else []
        return self._frame(_Types.SECTION_CLOSE, encode_section_ids(sorted(set(retired)))) if retired else []

    # -- memory grants ------------------------------------------------------------------

    def grant_read(self, memory: PeerMemory, offset: int, length: int) -> Frames:
        """Server: ask the client's runtime for a range of its grant (the kernel refused us)."""
        self._check_grant(memory)
        if memory.request_id in self._grant_reads:
            raise SectionError("one fallback read per request at a time")
        span = Range(offset, length)
        frames = self._frame(_Types.GRANT_READ, b"", callback_id=memory.request_id,
                             attrs=encode_attributes(Attributes(range=span)))
        self._grant_reads[memory.request_id] = span
        return frames

    def grant_read_abandoned(self, memory: PeerMemory) -> None:
        """The server stopped waiting for a fallback read; its answer will be dropped."""
        if self._grant_reads.pop(memory.request_id, None) is not None:
            late = self._late_grant_reads
            late[memory.request_id] = late.get(memory.request_id, 0) + 1
            if len(late) > MAX_ABANDONED:
                del late[next(iter(late))]

    def grant_active(self, memory: PeerMemory) -> bool:
        return self._peer_grants.get(memory.request_id) is memory

    def grant_payload(self, kind: MessageType, callback_id: int, span: Range | None, data: bytes) -> Frames:
        """An inline GRANT_DATA (client) or GRANT_WRITE (server) frame."""
        if kind is _Types.GRANT_WRITE:
            self._check_grant(self._peer_grants.get(callback_id))
        attrs = encode_attributes(Attributes(range=span)) if span is not None else b""
        return self._frame(kind, data, callback_id=callback_id, attrs=attrs)

    def _check_grant(self, memory: PeerMemory | None) -> None:
        if memory is None or self._peer_grants.get(memory.request_id) is not memory:
            raise SectionError("the grant ended: its request was already replied to")

    def finish_grant(self, request_id: int) -> None:
        """Client: the request is over (reply, abandon, close); unpin its buffer."""
        grant = self._grants.pop(request_id, None)
        if grant is None and self._held_grants:
            grant = self._held_grants.pop(request_id, None)
        if grant is not None:
            grant.release()

    # -- Quick-LPC (alpc.qlpc): small requests and their replies through shared rings --
    # A client's ring requests (ids with QUICK_ID_BIT) are tracked by the C
    # side; a reply to one that comes over the socket is claimed through
    # ``quick_claims``. A server owes replies to ring requests it handed out
    # as Messages here, exactly as to socket ones.

    def quick_request_received(self, message_id: int, message: Message | None = None) -> None:
        """Server: a request came through the ring (ProtocolError if its id is in use); ``message``,
        when it is handed out as one, is told if the client cancels it."""
        # (_request_received and _handed inline: once per ring request.)
        unreplied = self._unreplied
        if message_id in unreplied:
            raise ProtocolError(f"request id {message_id} reused while awaiting its reply")
        if len(unreplied) >= MAX_UNREPLIED:
            raise ProtocolError("too many requests awaiting a reply")
        if message is None:
            unreplied[message_id] = None
        else:
            owed = _Handed(message, self._on_drop)
            owed.request_id = message_id
            unreplied[message_id] = owed

    def quick_request_known(self, message_id: int) -> bool:
        """Server: has quick_request_received taken this ring request (and no reply gone yet)?"""
        return message_id in self._unreplied

    def quick_cancel(self, request_id: int) -> Frames:
        """Client: the CANCEL of a ring request its caller gave up on (the C side tracks it)."""
        return self._frame(_Types.CANCEL, b"", callback_id=request_id)

    def quick_replying(self, request_id: int) -> tuple[bool, Message | None]:
        """Server: a reply to this ring request is about to go through the ring. (False, None)
        when none is owed (not a ring request, answered or cancelled): it takes the socket
        path, which says why; else (True, the request's Message, for quick_reply_failed)."""
        if not request_id & QUICK_ID_BIT:
            return False, None
        # (One lookup per ring reply: _replied's work for an id that is a ring request's.)
        owed = self._unreplied.pop(request_id, _NOT_OWED)
        if owed is _NOT_OWED:
            return False, None
        if self._peer_grants:
            self._peer_grants.pop(request_id, None)
            self._grant_reads.pop(request_id, None)
        return True, None if owed is None else owed()

    def quick_reply_failed(self, request_id: int, message: Message | None = None) -> None:
        """Server: the ring refused that reply after all; it is owed again."""
        self._unreplied[request_id] = None if message is None else self._handed(message, request_id)

    def doorbell(self) -> Frames:
        """Tell a peer waiting in poll() to look at its ring."""
        return self._frame(_Types.QUICK_DOORBELL, b"")

    def close_notice(self) -> Frames:
        """The PORT_CLOSED frame to send before closing; marks the channel closed."""
        frames = [] if self.closed or self.peer_closed else self._frame(_Types.PORT_CLOSED, b"")
        self.mark_closed("the port was closed")
        return frames

    def unsent(self, request_id: int) -> None:
        """A request whose frames never left (nothing of them was written): forget it entirely."""
        self._pending.discard(request_id)
        self.flow.unsent_request(request_id)
        self.finish_grant(request_id)

    def abandon(self, request_id: int) -> None:
        """Forget a request whose caller stopped waiting; its late reply is dropped."""
        if request_id in self._pending:
            self._pending.discard(request_id)
            self._abandoned[request_id] = None
            if len(self._abandoned) > MAX_ABANDONED:
                del self._abandoned[next(iter(self._abandoned))]
            grant = self._grants.pop(request_id, None)
            if grant is not None:
                self._held_grants[request_id] = grant
        elif request_id not in self._held_grants:  # held: given up on already, answer still to come
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
        for request_id in [*self._grants, *self._held_grants]:
            self.finish_grant(request_id)

    # -- receiving ---------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[int] = (), sender: PeerCred | None = None,
                truncated: bool = False) -> list[Message]:
        """Decode received bytes into messages. Raises ProtocolError on a violation.

        ``sender`` is the SCM_CREDENTIALS of the read that brought ``data`` (the
        kernel never joins two senders' writes in one read); without it, the
        identity from connect time is used. ``truncated``: the read had more
        fds attached than this side takes (MSG_CTRUNC; they were closed).
        """
        if truncated:
            close_quietly(fds)
            raise ProtocolError("the peer attached more fds to one write than this side takes (MSG_CTRUNC)")
        partial = self._partial_sender
        if sender is None:
            sender = self.peer
        elif partial is not None and sender != partial:
            close_quietly(fds)
            raise ProtocolError(f"a frame arrived in pieces from two processes (pids {partial.pid} and {sender.pid})")
        if sender is not self._last_sender:
            self._last_sender = sender
            self._last_changed = identity_changed(self.peer, sender)
        changed = self._last_changed
        if changed and self.policy.refuse_identity_change:
            close_quietly(fds)
            raise ProtocolError(f"the sender's identity changed since connect (uid {self.peer.uid}/gid {self.peer.gid} "
                                f"became uid {sender.uid}/gid {sender.gid}) and the port refuses that")
        messages: list[Message] = []
        if not fds and not changed and not self._automatic and not self._decoder.busy:
            # A batch of plain frames (many datagrams in one read) decodes
            # without building Frames; the rest takes the general path.
            start = self._plain_run(data, messages)
            if start:
                if start == len(data):
                    return messages
                data = data[start:]
        frames = self._decoder.feed(data, fds)
        for index, frame in enumerate(frames):
            try:
                message = self._dispatch(frame, sender, changed)
            except BaseException:
                for later in frames[index + 1:]:
                    close_quietly(later.fds)  # never dispatched: nobody else will close them
                raise
            if message is not None:
                messages.append(message)
        self._partial_sender = sender if self._decoder.buffered else None
        return messages

    def receive_one(self, data: bytes, sender: PeerCred | None = None) -> Message | bool | None:
        """The common read: exactly one plain frame (no fds, no attributes but a request's
        section reference), possibly after a RELEASE riding before it, decoded in one step.

        Returns the message, None when the frame needs no delivery (a late
        reply), or False when ``data`` is anything else (or anything wrong),
        with nothing consumed: use ``receive``, which names any violation.
        ``sender`` is as for ``receive``; a read from another sender than the
        last one (or from a changed identity) takes the general path.
        """
        if sender is None:
            sender = self.peer
        if (sender is not self._last_sender or self._last_changed or self._automatic or self._decoder.busy
                or len(data) < HEADER_SIZE):
            return False
        release_end = self._leading_release(data)
        if release_end and len(data) - release_end < HEADER_SIZE:
            return False
        data_length, attr_length = _unpack_lengths(data, release_end + 8)
        if release_end + HEADER_SIZE + data_length + attr_length != len(data):
            return False  # not exactly one frame: nothing is consumed
        if attr_length and (attr_length != LONE_REF_SIZE or data[release_end + 3] != _REQUEST_INT):
            return False  # a section body only for a request: its release rides with the reply
        self._lone_read = True
        try:
            message, end = self._plain(data, release_end)
        finally:
            self._lone_read = False
        if not end:
            return False
        if release_end:
            assert self.sections is not None
            self.sections.pool.released(decode_releases(data[HEADER_SIZE:release_end]))
        return message

    def _leading_release(self, data: bytes) -> int:
        """Where the frame after a valid RELEASE frame at the start of ``data`` begins (0: none).

        Checked as ``_plain`` would, so that taking the frame after it first never leaves
        the release half-done; only its entries remain to check (a violation then fails
        the connection anyway)."""
        if data[3] != _RELEASE_INT or self.sections is None:
            return 0
        (magic, version, _, flags, data_length, attr_length, _, _, _, _, n_fds, reserved16,
         reserved32) = _unpack_header(data, 0)
        if (magic != MAGIC or version != VERSION or flags or attr_length or n_fds or reserved16 or reserved32
                or data_length > self._decoder.max_data or self.peer_closed):
            return 0
        end: int = HEADER_SIZE + data_length
        return end

    def _plain_run(self, data: bytes, messages: list[Message]) -> int:
        """Decode the leading run of plain frames of ``data`` into ``messages``; returns where it stopped.

        Plain datagrams, what a batch of small one-way messages is made of, are
        decoded right here (the rules of ``_plain``, the window counted once per
        run); any other frame goes through ``_plain``.
        """
        if self.peer_closed:
            return 0
        pos = 0
        size = len(data)
        flow = self.flow
        room = flow.incoming_room()
        max_data = self._decoder.max_data
        sender = self._last_sender
        append = messages.append
        datagram = _Types.DATAGRAM
        taken = 0
        while size - pos >= HEADER_SIZE:
            # The header as ten words: magic, version and type are the first, the fd count
            # and the reserved half-word the ninth (HEADER is the field-by-field view).
            (lead, flags, data_length, attr_length, message_id, callback_id,
             pid, tid, fds_word, reserved32) = _unpack_words(data, pos)
            start = pos + HEADER_SIZE
            end = start + data_length
            if (lead == _DATAGRAM_LEAD and taken < room and end <= size and data_length <= max_data
                    and not (flags or attr_length or fds_word or reserved32)):
                append(Message(datagram, message_id, callback_id, data[start:end], sender, pid, tid))
                taken += 1
                pos = end
                continue
            if fds_word & 0xFFFF:
                break  # a section's fd or handles: the general path
            if taken:
                flow.received_datagrams(taken)
                room -= taken
                taken = 0
            message, end = self._plain(data, pos)
            if not end:
                break
            if message is not None:
                append(message)
            pos = end
        if taken:
            flow.received_datagrams(taken)
        return pos

    def _plain(self, data: bytes, pos: int) -> tuple[Message | None, int]:
        """The frame at ``pos`` if it is a whole plain REPLY/REQUEST/DATAGRAM (no fds, no
        attributes) that is valid here: (message or None for a late reply, its end); (None, 0)
        for anything else, with nothing consumed (the general path then names any violation).
        The rules of ``_dispatch`` for the frames that carry almost all traffic; the sender is
        the last read's, whose identity has not changed (the callers make sure)."""
        (magic, version, kind, flags, data_length, attr_length, message_id, callback_id,
         pid, tid, n_fds, reserved16, reserved32) = _unpack_header(data, pos)
        end = pos + HEADER_SIZE + data_length
        if (n_fds or reserved16 or reserved32 or magic != MAGIC or version != VERSION
                or end + attr_length > len(data) or data_length > self._decoder.max_data or self.peer_closed):
            return None, 0
        ref = None
        if attr_length:
            # A body in a section the peer already mapped for us; any other attributes
            # (a new section, a grant, a deadline) take the general path.
            if attr_length != LONE_REF_SIZE or data_length or flags or self.sections is None:
                return None, 0
            ref = decode_lone_ref(data, pos + HEADER_SIZE, kind)  # attributes come before the data
            if ref is None:
                return None, 0
            end += attr_length
        if kind == _REPLY_INT:
            if flags and ((flags != _CANCELLED and flags != _UNANSWERED) or data_length):
                return None, 0
            pending = self._pending
            if callback_id in pending:
                pending.discard(callback_id)
                self.flow.reply_received(callback_id)
                if self._grants:
                    self.finish_grant(callback_id)
            elif callback_id in self._abandoned and ref is None:
                del self._abandoned[callback_id]
                self.flow.reply_received(callback_id)
                if self._held_grants:
                    self.finish_grant(callback_id)  # the server answered: it writes no more
                return None, end
            else:
                return None, 0
            message = Message(_Types.REPLY, message_id, callback_id, _body(data, pos, end, ref),
                              self._last_sender, pid, tid)
            if flags:
                _mark_runtime_reply(message, flags)
            elif ref is not None:
                self._attach_ref(message, ref)
            return message, end
        if flags:
            return None, 0
        if kind == _DATAGRAM_INT:
            try:
                self.flow.received_datagram()
            except ProtocolError:
                return None, 0  # past the window: the general path names it
            message = Message(_Types.DATAGRAM, message_id, callback_id, _body(data, pos, end, ref),
                              self._last_sender, pid, tid)
            if ref is not None:
                self._attach_ref(message, ref)
            return message, end
        if kind == _REQUEST_INT:
            unreplied = self._unreplied
            if message_id in unreplied or len(unreplied) >= MAX_UNREPLIED or message_id & QUICK_ID_BIT:
                return None, 0
            try:
                self.flow.received_request(message_id)
            except ProtocolError:
                return None, 0
            message = Message(_Types.REQUEST, message_id, callback_id, _body(data, pos, end, ref),
                              self._last_sender, pid, tid)
            if ref is not None:
                self._attach_ref(message, ref)
            owed = _Handed(message, self._on_drop)
            owed.request_id = message_id
            unreplied[message_id] = owed
            return message, end
        if kind == _RELEASE_INT and not (flags or attr_length) and self.sections is not None:
            # The peer is done with ranges of our sections (it often rides just before a reply).
            self.sections.pool.released(decode_releases(data[pos + HEADER_SIZE:end]))
            return None, end
        return None, 0

    def _dispatch(self, frame: Frame, sender: PeerCred, changed: bool) -> Message | None:
        if self.peer_closed:
            close_quietly(frame.fds)
            raise ProtocolError(f"{frame.type.name} frame after the peer closed its port")
        attrs = self._attributes(frame) if frame.attrs or frame.fds else None
        # A frame's fds: the section it introduces (kept by the section layer), then its handles.
        handle_fds = frame.fds[1:] if attrs is not None and attrs.new is not None else frame.fds
        handles = len(handle_fds)
        kind = frame.type
        try:
            if handles > self._max_handles:
                raise ProtocolError(f"{kind.name} frame carries {handles} fds; this side takes at most "
                                    f"{self._max_handles} per message")
            if frame.flags and (kind is not _Types.REPLY or frame.data or attrs is not None or handles
                                or (frame.flags != _CANCELLED and frame.flags != _UNANSWERED)):
                raise ProtocolError(f"{kind.name} frame with flags {frame.flags:#x} (only an empty REPLY has one, "
                                    "CANCELLED or UNANSWERED)")
            if kind is _Types.REQUEST:
                if frame.message_id & QUICK_ID_BIT:
                    raise ProtocolError(f"request id {frame.message_id} on the socket is a Quick-LPC ring id")
                self._request_received(frame.message_id)
                self.flow.received_request(frame.message_id, handles)
            elif kind is _Types.CANCEL:
                if handles:
                    raise ProtocolError(f"a CANCEL frame carries {handles} fds")
                self._cancel_received(frame.callback_id)
                return None
            elif kind is _Types.REPLY or kind is _Types.PONG:
                if frame.callback_id in self._pending:
                    self._pending.discard(frame.callback_id)
                    self.flow.reply_received(frame.callback_id)
                    if self._grants:
                        self.finish_grant(frame.callback_id)
                elif frame.callback_id in self._abandoned:
                    del self._abandoned[frame.callback_id]
                    self.flow.reply_received(frame.callback_id)
                    if self._held_grants:
                        self.finish_grant(frame.callback_id)  # the server answered: it writes no more
                    self._drop_body(attrs)
                    close_quietly(handle_fds)  # a late reply nobody waits for
                    return None
                elif kind is _Types.REPLY and frame.callback_id & QUICK_ID_BIT and self.quick_claims is not None:
                    if not self.quick_claims(frame.callback_id):
                        self._drop_body(attrs)
                        close_quietly(handle_fds)
                        return None
                else:
                    raise ProtocolError(f"reply to message id {frame.callback_id}, which was never sent")
            elif kind is _Types.DATAGRAM:
                self.flow.received_datagram(handles)
            elif kind is _Types.CREDIT:
                self.flow.credit_received(*decode_credit(frame.data))
                return None
            elif kind is _Types.PING:
                self._automatic += self._frame(_Types.PONG, b"", callback_id=frame.message_id)
                return None
            elif kind is _Types.QUICK_DOORBELL:
                if frame.data or attrs is not None:
                    raise ProtocolError("a QUICK_DOORBELL frame carries nothing")
                return None
            elif kind is _Types.PORT_CLOSED:
                self.peer_closed = True
                return self._notice(_Types.PORT_CLOSED, "the peer closed its port")
            else:
                return self._runtime(frame, attrs)
            message = Message(kind, frame.message_id, frame.callback_id, frame.data, sender,
                              sender_pid=frame.sender_pid, sender_tid=frame.sender_tid)
            if changed:
                message.identity_changed = True
            if attrs is not None:
                self._attach(message, attrs)
        except BaseException:
            close_quietly(handle_fds)
            raise
        if handle_fds:
            self._give_handles(message, handle_fds)
        if kind is _Types.REQUEST:
            self._unreplied[frame.message_id] = self._handed(message, frame.message_id)
        elif frame.flags:
            _mark_runtime_reply(message, frame.flags)
        return message

    def _request_received(self, message_id: int) -> None:
        if message_id in self._unreplied:
            raise ProtocolError(f"request id {message_id} reused while awaiting its reply")
        if len(self._unreplied) >= MAX_UNREPLIED:
            raise ProtocolError("too many requests awaiting a reply")
        self._unreplied[message_id] = None

    def _give_handles(self, message: Message, fds: Sequence[int]) -> None:
        """Keep the fds of the kinds this side accepts; close the others now."""
        kept, refused = sort_received(fds, self.policy.accept_kinds, self._classify)
        message._handles = ReceivedHandles(kept, refused, len(fds))


    def _attributes(self, frame: Frame) -> Attributes:
        """Validate a frame's attributes and map the section it introduces, if any."""
        if self.sections is None and frame.attrs:
            close_quietly(frame.fds)
            raise ProtocolError("attributes on a connection without sections")
        try:
            attrs = decode_attributes(frame)
        except ProtocolError:
            close_quietly(frame.fds)
            raise
        if attrs.new is not None:
            assert self.sections is not None
            try:
                self.sections.peer.add(attrs.new, frame.fds[0])  # always consumes fds[0]
            except BaseException:
                close_quietly(frame.fds[1:])  # the frame's handles
                raise
        return attrs

    def _attach(self, message: Message, attrs: Attributes) -> None:
        """Give a message its section body (view or copy) and its grant."""
        if attrs.ref is not None:
            self._attach_ref(message, attrs.ref)
        if attrs.deadline is not None:
            message.deadline = attrs.deadline / 1e9
        if attrs.grant is not None:
            memory = PeerMemory(message, attrs.grant)
            message.grant = memory
            self._peer_grants[message.id] = memory

    def _attach_ref(self, message: Message, ref: SectionRef) -> None:
        """Give a message its section body: a view (the sender sent one) or a range to copy out."""
        assert self.sections is not None
        as_view = bool(ref.flags & _VIEW)
        if not as_view and self._lone_read and ref.length <= EAGER_COPY_MAX:
            # Only receive_one sets _lone_read, for a request: its release rides with the reply.
            message._data = self.sections.peer.copy_out(ref)
            return
        view = self.sections.peer.resolve(ref, copy=not as_view)
        message._data = None
        if as_view:
            message.view = view
        else:
            message._copy = view
        if message.type is not _Types.REQUEST:
            self.releases_urgent = True

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
        if kind is _Types.RELEASE:
            sections.pool.released(decode_releases(frame.data))
            return None
        if kind is _Types.SECTION_CLOSE:
            sections.peer.retire(decode_section_ids(frame.data))
            return None
        if kind is _Types.RELEASE_WANTED:
            self.releases_urgent = True
            return None
        if kind is _Types.GRANT_READ:
            return self._grant_read_received(frame, attrs)
        if kind is _Types.GRANT_DATA:
            return self._grant_data_received(frame, attrs)
        return self._grant_write_received(frame, attrs)

    def _grant_message(self, frame: Frame, attrs: Attributes | None, span: Range | None) -> Message:
        message = Message(frame.type, frame.message_id, frame.callback_id, frame.data, self._last_sender,
                          sender_pid=frame.sender_pid, sender_tid=frame.sender_tid,
                          identity_changed=self._last_changed)
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
            self._automatic += self._frame(_Types.GRANT_DATA, b"", callback_id=frame.callback_id)
            return None
        if not grant.allows(span, Access.READ):
            raise ProtocolError(f"GRANT_READ of [{span.offset}, +{span.length}) outside what the grant allows")
        return self._grant_message(frame, None, span)

    def _grant_data_received(self, frame: Frame, attrs: Attributes | None) -> Message | None:
        late = self._late_grant_reads.get(frame.callback_id)
        if late:
            # The client answers reads in the order they were asked: an answer to one given up
            # on comes before the answer to the read asked since (which it must not be taken for).
            if late == 1:
                del self._late_grant_reads[frame.callback_id]
            else:
                self._late_grant_reads[frame.callback_id] = late - 1
            self._drop_body(attrs)
            return None
        asked = self._grant_reads.pop(frame.callback_id, None)
        span = attrs.range if attrs is not None else None
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
        # Applied on arrival, in order, rather than queued for the requesting thread: an
        # honest server sends writes without waiting for an answer, so a queue of them
        # would have no bound but the server's will. They still land before the reply,
        # which comes after them on the stream.
        target = grant.memory[span.offset:span.offset + span.length]
        if attrs is not None and attrs.ref is not None:
            assert self.sections is not None
            view = self.sections.peer.resolve(attrs.ref)
            try:
                _native.copy_into(target, view.memory)
            finally:
                view.release(notify=False)
            self.releases_urgent = True
        else:
            _native.copy_into(target, frame.data)
        return None

    def _notice(self, kind: MessageType, reason: str) -> Message:
        return Message(kind, 0, 0, b"", self.peer, reason=reason)

    def connection_lost(self, reason: str) -> Message | None:
        """The stream ended or the peer process died: the notice to deliver, if any."""
        if self.peer_closed:
            return None
        self.peer_closed = True
        if self._decoder.buffered:
            reason += " (mid-frame)"
        return self._notice(_Types.CLIENT_DIED, reason)


_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_unpack_lengths = struct.Struct("<II").unpack_from
_unpack_words = struct.Struct("<10I").unpack_from
assert HEADER.size == 40 and HEADER.format == "<HBBIIIIIIIHHI"
# The first word of a valid DATAGRAM header: magic, version and type in one compare.
_DATAGRAM_LEAD = MAGIC | VERSION << 16 | int(MessageType.DATAGRAM) << 24
_REQUEST_INT, _REPLY_INT, _DATAGRAM_INT = int(_Types.REQUEST), int(_Types.REPLY), int(_Types.DATAGRAM)
_RELEASE_INT = int(_Types.RELEASE)


def _body(data: bytes, pos: int, end: int, ref: SectionRef | None) -> bytes:
    """A plain frame's inline body; none when it is in a section."""
    return data[pos + HEADER_SIZE:end] if ref is None else b""
_CANCELLED = int(Flag.CANCELLED)
_UNANSWERED = int(Flag.UNANSWERED)


def _mark_runtime_reply(reply: Message, flags: int) -> None:
    """A REPLY the peer's runtime sent in its application's place: cancelled (the request
    was cancelled, or expired before dispatch), or dropped unanswered (``reason`` says so)."""
    reply.cancelled = True
    if flags == _UNANSWERED:
        reply.reason = UNANSWERED_REASON


# The wire's DEADLINE is a u64 of nanoseconds: a later deadline (inf included) is "never".
_NEVER_NS = 2**64 - 1


def _deadline_ns(deadline: float) -> int:
    if not deadline == deadline:  # NaN: int() would raise a bare "cannot convert" deep in the send
        raise ValueError("a deadline must be a time.monotonic() value, got nan")
    if deadline >= _NEVER_NS / 1e9:
        return _NEVER_NS
    # Long past (-inf included, which int() refuses with a bare OverflowError): expired on arrival.
    return int(deadline * 1e9) if deadline > 0 else 0
_PLAIN = frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM})
_tids = threading.local()
_pid = os.getpid()
# Every live channel, for the fork handler: a set per header would cost a getpid per frame.
_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def _native_tid() -> int:
    """This thread's id for the header, asked of the kernel (gettid) once per thread."""
    tid: int | None = getattr(_tids, "tid", None)
    if tid is None:
        tid = _tids.tid = threading.get_native_id()
    return tid


def _forget_tid() -> None:
    global _pid
    _tids.__dict__.pop("tid", None)  # a forked child's thread has a new id
    # ... and so has the process: a frame the child sends on a connection it inherited is its
    # own (the peer's kernel says so too), and its header must not name the parent.
    parent, _pid = _pid, os.getpid()
    for channel in list(_channels):
        if channel._local_pid == parent:
            channel._local_pid = _pid


os.register_at_fork(after_in_child=_forget_tid)
_JOIN_BELOW = 16 * 1024

# Plain ints: IntFlag arithmetic costs microseconds on a per-message path.
_VIEW = int(SectionFlag.VIEW)
_SECURE = int(SectionFlag.SECURE)
_NUMBERED = frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM})



