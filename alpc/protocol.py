"""Sans-IO state of one channel: message ids, pending requests, and frame dispatch.

Both drivers (the blocking ``port`` module and ``aio``) feed received bytes in
and send the frames this returns; the rules live here once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from .errors import ConnectionClosed, MessageTooLarge, ProtocolError
from .security import PeerCred
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, encode_header

__all__ = [
    "CHANNEL_TYPES",
    "MAX_ABANDONED",
    "MAX_UNREPLIED",
    "Buffer",
    "Channel",
    "Frames",
    "Message",
    "Payload",
    "Replier",
    "channel_limits",
    "payload_parts",
]

CHANNEL_TYPES = frozenset({
    MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM,
    MessageType.PORT_CLOSED, MessageType.PING, MessageType.PONG,
})
# Late replies to requests we gave up on are dropped; remember this many ids.
MAX_ABANDONED = 65536
# A peer with more requests than this awaiting our reply is flooding us.
MAX_UNREPLIED = 65536
_ID_MASK = 0xFFFFFFFF


def channel_limits(max_data: int) -> FrameLimits:
    return FrameLimits(allowed_types=CHANNEL_TYPES, max_data=max_data)


class Replier(Protocol):
    def reply(self, message: Message, data: bytes = b"") -> None: ...


class Message:
    """One received message.

    ``id`` is the sender's message id; ``callback_id`` is the id a reply answers.
    ``sender`` is the kernel-verified identity of the peer; ``sender_pid`` and
    ``sender_tid`` are what the peer wrote in the header, informational only.
    ``reason`` explains a PORT_CLOSED or CLIENT_DIED notice.
    """

    __slots__ = ("callback_id", "data", "fds", "id", "port", "reason", "sender", "sender_pid",
                 "sender_tid", "type")

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
        self.data = data
        self.sender = sender
        self.sender_pid = sender_pid
        self.sender_tid = sender_tid
        self.fds = fds
        self.reason = reason
        self.port: Any = None

    def reply(self, data: bytes = b"") -> None:
        """Reply to this request on the port it arrived on."""
        if self.port is None:
            raise ConnectionClosed("this message is not attached to a port")
        self.port.reply(self, data)

    def __repr__(self) -> str:
        extra = f" reason={self.reason!r}" if self.reason else ""
        return (f"<Message {self.type.name} id={self.id} callback_id={self.callback_id} "
                f"len={len(self.data)} from pid {self.sender.pid}{extra}>")


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
    """Protocol state of one established connection, seen from one side."""

    def __init__(self, peer: PeerCred, *, send_limit: int, recv_limit: int, local_pid: int) -> None:
        self.peer = peer
        self.send_limit = send_limit
        self._decoder = FrameDecoder(channel_limits(recv_limit))
        self._local_pid = local_pid
        self._next_id = 1
        self._pending: set[int] = set()
        self._abandoned: dict[int, None] = {}
        self._unreplied: set[int] = set()
        self._automatic: Frames = []
        self.peer_closed = False
        self.closed = False
        self.close_reason = ""

    # -- sending -----------------------------------------------------------

    def _frame(self, message_type: MessageType, data: Payload, *, message_id: int = 0,
               callback_id: int = 0) -> Frames:
        if self.closed:
            raise ConnectionClosed(self.close_reason or "the channel is closed")
        parts, length = payload_parts(data)
        header = encode_header(
            message_type, length, message_id=message_id, callback_id=callback_id,
            sender_pid=self._local_pid, sender_tid=threading.get_native_id(),
        )
        return [header, *parts]

    def _check_size(self, data: Payload) -> None:
        length = len(data) if isinstance(data, bytes) else payload_parts(data)[1]
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

    def request(self, data: Payload) -> tuple[int, Frames]:
        """Frames for a request; its reply is matched by the returned id."""
        self._check_size(data)
        message_id = self._allocate_id()
        frames = self._frame(MessageType.REQUEST, data, message_id=message_id)
        self._pending.add(message_id)
        return message_id, frames

    def ping(self) -> tuple[int, Frames]:
        message_id = self._allocate_id()
        frames = self._frame(MessageType.PING, b"", message_id=message_id)
        self._pending.add(message_id)
        return message_id, frames

    def datagram(self, data: Payload) -> Frames:
        self._check_size(data)
        return self._frame(MessageType.DATAGRAM, data, message_id=self._allocate_id())

    def reply(self, request_id: int, data: Payload) -> Frames:
        if request_id not in self._unreplied:
            raise ValueError(f"message {request_id} is not a request awaiting a reply on this port")
        self._check_size(data)
        frames = self._frame(MessageType.REPLY, data, message_id=self._allocate_id(), callback_id=request_id)
        self._unreplied.discard(request_id)
        return frames

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

    def take_automatic(self) -> Frames:
        """Frames the protocol answers by itself (PONG), to be sent by the driver."""
        frames, self._automatic = self._automatic, []
        return frames

    @property
    def pending_requests(self) -> frozenset[int]:
        return frozenset(self._pending)

    def mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._decoder.close_fds()

    # -- receiving ---------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[int] = ()) -> list[Message]:
        """Decode received bytes into messages. Raises ProtocolError on a violation."""
        messages: list[Message] = []
        for frame in self._decoder.feed(data, fds):
            message = self._dispatch(frame)
            if message is not None:
                messages.append(message)
        return messages

    def _dispatch(self, frame: Frame) -> Message | None:
        if self.peer_closed:
            raise ProtocolError(f"{frame.type.name} frame after the peer closed its port")
        kind = frame.type
        if kind is MessageType.REQUEST:
            if frame.message_id in self._unreplied:
                raise ProtocolError(f"request id {frame.message_id} reused while awaiting its reply")
            if len(self._unreplied) >= MAX_UNREPLIED:
                raise ProtocolError("too many requests awaiting a reply")
            self._unreplied.add(frame.message_id)
        elif kind is MessageType.REPLY or kind is MessageType.PONG:
            if frame.callback_id in self._pending:
                self._pending.discard(frame.callback_id)
            elif frame.callback_id in self._abandoned:
                del self._abandoned[frame.callback_id]
                return None
            else:
                raise ProtocolError(f"reply to message id {frame.callback_id}, which was never sent")
        elif kind is MessageType.PING:
            self._automatic += self._frame(MessageType.PONG, b"", callback_id=frame.message_id)
            return None
        elif kind is MessageType.PORT_CLOSED:
            self.peer_closed = True
            return self._notice(MessageType.PORT_CLOSED, "the peer closed its port")
        return Message(kind, frame.message_id, frame.callback_id, frame.data, self.peer,
                       sender_pid=frame.sender_pid, sender_tid=frame.sender_tid, fds=frame.fds)

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
