"""Sans-IO wire format: the fixed frame header, message types, and the frame decoder.

A frame is ``header | attributes | data``. The header is 40 little-endian bytes
(the size of ALPC's PORT_MESSAGE on x64)::

    magic u16, version u8, type u8, flags u32, data_length u32, attr_length u32,
    message_id u32, callback_id u32, sender_pid u32, sender_tid u32,
    n_fds u16, reserved u16, reserved u32

The attribute area is a sequence of TLVs (kind u16, length u16, value), each
kind at most once, each with the fixed length of its kind (ALPC's message
attributes: a section reference is the VIEW attribute, a memory grant the
legacy PORT_DATA_INFORMATION).

Nothing here knows about sockets: bytes and fds go in, frames come out.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

from . import _native
from .errors import ProtocolError

__all__ = [
    "ATTR_TYPES",
    "CHANNEL_FLAGS",
    "HANDLE_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "LONE_REF_SIZE",
    "MAGIC",
    "MAX_ATTR_LENGTH",
    "MAX_RELEASES_PER_FRAME",
    "VERSION",
    "Access",
    "AttrKind",
    "Attributes",
    "Flag",
    "Frame",
    "FrameDecoder",
    "FrameLimits",
    "GrantAttr",
    "MessageType",
    "Range",
    "Release",
    "SectionFlag",
    "SectionNew",
    "SectionRef",
    "decode_attributes",
    "decode_lone_ref",
    "decode_releases",
    "decode_section_ids",
    "encode_attributes",
    "encode_frame",
    "encode_header",
    "encode_lone_ref",
    "encode_releases",
    "encode_section_ids",
]

MAGIC = 0xA1C5
VERSION = 1
HEADER = struct.Struct("<HBBIIIIIIIHHI")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == _native.HEADER_SIZE == 40


class MessageType(IntEnum):
    """Frame types; numbering follows ALPC's LPC_* values where one exists."""

    REQUEST = 1
    REPLY = 2
    DATAGRAM = 3
    LOST_REPLY = 4
    PORT_CLOSED = 5
    CLIENT_DIED = 6
    CONNECTION_REQUEST = 10
    CONNECTION_REPLY = 11
    CANCEL = 12
    PING = 20
    PONG = 21
    # Section and memory-grant bookkeeping, answered by the runtime itself.
    RELEASE = 22
    SECTION_CLOSE = 23
    RELEASE_WANTED = 24
    GRANT_READ = 25
    GRANT_DATA = 26
    GRANT_WRITE = 27
    # Quick-LPC (alpc.qlpc): "look at your ring", for a receiver waiting in poll().
    QUICK_DOORBELL = 28
    # Flow control: the receiver's application took datagrams (and their fds).
    CREDIT = 29
    # Broker control traffic; never seen on an established channel.
    CREATE_PORT = 32
    PORT_CREATED = 33
    CONNECT = 34
    ERROR = 35
    LIST_PORTS = 36
    PORT_LIST = 37
    PORT_STATUS = 38
    SHUTDOWN = 39
    # Introspection and graceful restart, also broker-only.
    PEERS = 40
    PEER_LIST = 41
    STATS = 42
    STATS_LIST = 43
    HANDOVER = 44
    HANDOVER_STATE = 45
    HANDOVER_DONE = 46


class Flag(IntFlag):
    """Header flags. Unknown bits are a protocol error, so peers cannot smuggle state."""

    NONE = 0
    # A REPLY the peer's runtime sent for a request its application never
    # answered: cancelled by the client, or its deadline passed before dispatch.
    CANCELLED = 1
    # A REPLY the peer's runtime sent because its application dropped the request
    # (its last reference went) without replying.
    UNANSWERED = 2


KNOWN_FLAGS = 0
# Flags an established channel accepts (the broker's control frames take none); an empty
# REPLY carries at most one of them, any other frame none (protocol.Channel checks that).
CHANNEL_FLAGS = int(Flag.CANCELLED | Flag.UNANSWERED)


def type_mask(types: Iterable[MessageType]) -> int:
    mask = 0
    for message_type in types:
        mask |= 1 << int(message_type)
    return mask


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts; anything outside is a protocol error on that channel."""

    allowed_types: frozenset[MessageType]
    max_data: int
    max_attr: int = 0
    max_fds: int = 0
    flag_mask: int = KNOWN_FLAGS

    def native(self) -> _native.ScanLimits:
        return _scan_limits(self)


# Shared by the decoders of equal limits (every connection of a port): the scan only reads them.
@functools.lru_cache(maxsize=64)
def _scan_limits(limits: FrameLimits) -> _native.ScanLimits:
    return _native.ScanLimits(
        max_data=limits.max_data,
        max_attr=limits.max_attr,
        type_mask=type_mask(limits.allowed_types),
        flag_mask=limits.flag_mask,
        max_fds=limits.max_fds,
    )


class Frame(NamedTuple):
    type: MessageType
    flags: int
    message_id: int
    callback_id: int
    sender_pid: int
    sender_tid: int
    attrs: bytes
    data: bytes
    fds: tuple[int, ...]


def encode_header(
    message_type: int,
    data_length: int,
    *,
    message_id: int = 0,
    callback_id: int = 0,
    flags: int = 0,
    attr_length: int = 0,
    n_fds: int = 0,
    sender_pid: int = 0,
    sender_tid: int = 0,
) -> bytes:
    return HEADER.pack(
        MAGIC, VERSION, message_type, flags, data_length, attr_length,
        message_id, callback_id, sender_pid, sender_tid, n_fds, 0, 0,
    )


def encode_frame(message_type: int, data: bytes = b"", **fields: int) -> bytes:
    """One whole frame as bytes; the hot path sends header and data as separate buffers."""
    return encode_header(message_type, len(data), **fields) + data


_unpack_header = HEADER.unpack_from
_TYPES = {int(kind): kind for kind in MessageType}

_ERRORS = {
    _native.E_MAGIC: "bad magic (not an alpc frame)",
    _native.E_VERSION: "unsupported protocol version",
    _native.E_TYPE: "message type not allowed here",
    _native.E_FLAGS: "unknown flag bits",
    _native.E_RESERVED: "reserved header fields are not zero",
    _native.E_DATA: "data length exceeds the limit",
    _native.E_ATTR: "attribute length exceeds the limit",
    _native.E_FDS: "fd count exceeds the limit",
}


class FrameDecoder:
    """Reassembles frames from a byte stream, validating every header before use.

    fds arrive with the first byte of the ``sendmsg`` that carried them, so they
    are queued and handed to frames in order by each header's ``n_fds``.
    """

    def __init__(self, limits: FrameLimits) -> None:
        self._limits = limits
        self._scan_limits = limits.native()
        # Bytes of an incomplete frame, kept as chunks so a large frame arriving
        # piecewise is joined once instead of re-copied on every read.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._need = HEADER_SIZE
        # A list, not a deque (760 bytes empty): every connection has a decoder, and it
        # holds at most one read's fds.
        self._fds: list[int] = []

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def busy(self) -> bool:
        """Part of a frame, or fds, are held: the next bytes continue them."""
        return bool(self._chunks) or bool(self._fds)

    @property
    def max_data(self) -> int:
        return self._limits.max_data

    def wanted(self) -> int:
        """Bytes still missing from the frame being assembled (a header's worth if none).

        Reading exactly this much never consumes bytes past one frame, which
        the handshake needs: what follows belongs to whoever takes the socket next.
        """
        return self._need - self._buffered

    def partial(self) -> bytes:
        """The bytes of the incomplete frame held so far (a restarting broker hands them on)."""
        return b"".join(self._chunks)

    def set_limits(self, limits: FrameLimits) -> None:
        self._limits = limits
        self._scan_limits = limits.native()

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> list[Frame]:
        """Add received bytes (and fds); return every frame now complete.

        On a violation the queued fds are closed and ProtocolError is raised; the
        caller must then drop the channel, as the stream can no longer be trusted.
        """
        arriving = 0
        if fds:
            parked = len(self._fds)
            self._fds.extend(fds)
            arriving = len(self._fds) - parked
        elif not self._chunks and len(data) >= HEADER_SIZE:
            single = self.single(data)
            if single is not None:
                return single
        if self._chunks:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered < self._need:
                self._check_parked(arriving, [])
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
        else:
            buf = data
        frames: list[Frame] = []
        start = 0
        while True:
            ends, error = _native.scan_frames(buf, start, self._scan_limits)
            for end in ends:
                try:
                    frames.append(self._frame_at(buf, start, end))
                except ProtocolError:
                    self._abort(frames)
                    raise
                start = end
            if error:
                self._abort(frames)
                raise ProtocolError(f"malformed frame: {_ERRORS.get(error, error)}")
            if len(ends) < _native.SCAN_BATCH:
                break
        self._keep_partial(buf, start)
        if self._fds and not self._buffered:
            self._abort(frames)
            raise ProtocolError("fds received that no frame announced")
        self._check_parked(arriving, frames)
        return frames

    def _check_parked(self, arriving: int, frames: list[Frame]) -> None:
        """Refuse fds parked for a frame still incomplete when newer fds have arrived.

        A read brings the fds of at most one write, and every byte of the writes
        before it: by the time a write's fds arrive, the frames of every earlier
        write are complete and have claimed theirs. Older fds still unclaimed
        mean a peer is parking fds behind a frame it never finishes, which no
        per-message or in-flight limit would count.
        """
        if arriving and len(self._fds) > arriving:
            self._abort(frames)
            raise ProtocolError("fds arrived while earlier ones still wait for a frame that never came")

    def single(self, data: bytes) -> list[Frame] | None:
        """The common read, exactly one whole frame with no fds, decoded without a scan call.

        None (nothing consumed) for anything else: ``feed`` takes it and names any error.
        """
        if self._chunks or len(data) < HEADER_SIZE:
            return None
        (magic, version, mtype, flags, data_length, attr_length, message_id, callback_id,
         pid, tid, n_fds, reserved16, reserved32) = _unpack_header(data)
        limits = self._limits
        if (HEADER_SIZE + attr_length + data_length != len(data) or magic != MAGIC or version != VERSION
                or n_fds or reserved16 or reserved32 or flags & ~limits.flag_mask
                or data_length > limits.max_data or attr_length > limits.max_attr
                or mtype not in limits.allowed_types or self._fds):
            return None  # anything unusual takes the full path, which names the error
        if attr_length:
            attrs = data[HEADER_SIZE:HEADER_SIZE + attr_length]
            body = data[HEADER_SIZE + attr_length:]
        else:
            attrs, body = b"", data[HEADER_SIZE:]
        return [Frame(_TYPES[mtype], flags, message_id, callback_id, pid, tid, attrs, body, ())]

    def _abort(self, frames: list[Frame]) -> None:
        """The stream broke: close every fd received, those of frames already cut out included."""
        for frame in frames:
            for fd in frame.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.close_fds()

    def _keep_partial(self, buf: bytes, start: int) -> None:
        rest = len(buf) - start
        self._buffered = rest
        if not rest:
            self._need = HEADER_SIZE
            return
        self._chunks = [buf[start:] if start else buf]
        if rest >= HEADER_SIZE:
            # scan_frames already validated this header, so the length is bounded.
            data_length, attr_length = struct.unpack_from("<II", buf, start + 8)
            self._need = HEADER_SIZE + attr_length + data_length
        else:
            self._need = HEADER_SIZE

    def _frame_at(self, buf: bytes, start: int, end: int) -> Frame:
        (_, _, mtype, flags, _, attr_length, message_id, callback_id,
         pid, tid, n_fds, _, _) = HEADER.unpack_from(buf, start)
        attrs_start = start + HEADER_SIZE
        data_start = attrs_start + attr_length
        fds: tuple[int, ...] = ()
        if n_fds:
            if len(self._fds) < n_fds:
                self.close_fds()
                raise ProtocolError("frame announces more fds than were received")
            fds = tuple(self._fds[:n_fds])
            del self._fds[:n_fds]
        return Frame(
            _TYPES[mtype], flags, message_id, callback_id, pid, tid,
            buf[attrs_start:data_start], buf[data_start:end], fds,
        )

    def close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop(0))


# -- attributes ----------------------------------------------------------------


class AttrKind(IntEnum):
    SECTION_REF = 1   # the message body lives in a section: id, flags, offset, length
    SECTION_NEW = 2   # a section this frame introduces, passed as the frame's one fd
    GRANT = 3         # a request grants the server access to a client buffer
    RANGE = 4         # offset and length inside a grant (GRANT_* frames)
    DEADLINE = 5      # a request's absolute deadline, CLOCK_MONOTONIC nanoseconds


class SectionFlag(IntFlag):
    """Flags of SECTION_REF and SECTION_NEW; unknown bits are a protocol error."""

    NONE = 0
    VIEW = 1     # deliver as a read-only view instead of copying out
    SECURE = 2   # a one-shot section the sender write-sealed (immutable)


class Access(IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2


class SectionRef(NamedTuple):
    section_id: int
    flags: int
    offset: int
    length: int


class SectionNew(NamedTuple):
    section_id: int
    flags: int
    size: int


class GrantAttr(NamedTuple):
    address: int
    length: int
    access: int


class Range(NamedTuple):
    offset: int
    length: int


class Attributes(NamedTuple):
    ref: SectionRef | None = None
    new: SectionNew | None = None
    grant: GrantAttr | None = None
    range: Range | None = None
    deadline: int | None = None


_TLV = struct.Struct("<HH")
_REF = struct.Struct("<IIQQ")
_NEW = struct.Struct("<IIQ")
_GRANT = struct.Struct("<QQII")
_RANGE = struct.Struct("<QQ")
_DEADLINE = struct.Struct("<Q")
assert (_REF.size, _NEW.size, _GRANT.size, _RANGE.size) == (
    _native.ATTR_SIZES[1], _native.ATTR_SIZES[2], _native.ATTR_SIZES[3], _native.ATTR_SIZES[4])
MAX_ATTR_LENGTH = 5 * _TLV.size + _REF.size + _NEW.size + _GRANT.size + _RANGE.size + _DEADLINE.size

_REF_ONLY = (1 << AttrKind.SECTION_REF) | (1 << AttrKind.SECTION_NEW)
# Which attributes each frame type may carry; everything else must be empty.
ATTR_TYPES: dict[MessageType, int] = {
    MessageType.REQUEST: _REF_ONLY | (1 << AttrKind.GRANT) | (1 << AttrKind.DEADLINE),
    MessageType.REPLY: _REF_ONLY,
    MessageType.DATAGRAM: _REF_ONLY,
    MessageType.GRANT_READ: 1 << AttrKind.RANGE,
    MessageType.GRANT_DATA: _REF_ONLY | (1 << AttrKind.RANGE),
    MessageType.GRANT_WRITE: _REF_ONLY | (1 << AttrKind.RANGE),
}


def encode_attributes(attrs: Attributes) -> bytes:
    parts: list[bytes] = []
    if attrs.ref is not None:
        parts += [_TLV.pack(AttrKind.SECTION_REF, _REF.size), _REF.pack(*attrs.ref)]
    if attrs.new is not None:
        parts += [_TLV.pack(AttrKind.SECTION_NEW, _NEW.size), _NEW.pack(*attrs.new)]
    if attrs.grant is not None:
        parts += [_TLV.pack(AttrKind.GRANT, _GRANT.size), _GRANT.pack(*attrs.grant, 0)]
    if attrs.range is not None:
        parts += [_TLV.pack(AttrKind.RANGE, _RANGE.size), _RANGE.pack(*attrs.range)]
    if attrs.deadline is not None:
        parts += [_TLV.pack(AttrKind.DEADLINE, _DEADLINE.size), _DEADLINE.pack(attrs.deadline)]
    return b"".join(parts)


_ATTR_ERRORS = {
    _native.E_ATTR_KIND: "unknown attribute kind, or one this frame type may not carry",
    _native.E_ATTR_LENGTH: "attribute length does not match its kind",
    _native.E_ATTR_DUP: "attribute appears twice",
    _native.E_ATTR_TRUNC: "attribute area ends inside an attribute",
    _native.E_ATTR_VALUE: "attribute has unknown flags or non-zero reserved bits",
}


# Frame types that may carry handles (fds the application passes), after any section fd.
HANDLE_TYPES = frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM})


def decode_attributes(frame: Frame) -> Attributes:
    """Validate a frame's attributes, and their agreement with its fds and data.

    A section is introduced by the first frame that refers to it, so SECTION_NEW
    comes with a SECTION_REF to the same id and its fd, the frame's first; any
    further fds are the message's handles, which only requests, replies and
    datagrams carry (the header's fd count is checked against the receiver's
    limit before this). A frame whose body is in a section carries no inline data.
    """
    allowed = ATTR_TYPES.get(frame.type, 0)
    error, fields = _native.parse_attributes(frame.attrs, allowed)
    if error:
        raise ProtocolError(f"{frame.type.name} frame: {_ATTR_ERRORS.get(error, error)}")
    present = fields[0]
    attrs = Attributes(
        SectionRef(*fields[1:5]) if present & (1 << AttrKind.SECTION_REF) else None,
        SectionNew(*fields[5:8]) if present & (1 << AttrKind.SECTION_NEW) else None,
        GrantAttr(*fields[8:11]) if present & (1 << AttrKind.GRANT) else None,
        Range(*fields[11:13]) if present & (1 << AttrKind.RANGE) else None,
        fields[13] if present & (1 << AttrKind.DEADLINE) else None,
    )
    section_fds = 1 if attrs.new is not None else 0
    if len(frame.fds) < section_fds:
        raise ProtocolError(f"{frame.type.name} frame introduces a section but carries no fd")
    if len(frame.fds) > section_fds and frame.type not in HANDLE_TYPES:
        raise ProtocolError(f"{frame.type.name} frame carries {len(frame.fds)} fds; only a new section may carry one")
    if attrs.new is not None and (attrs.ref is None or attrs.ref.section_id != attrs.new.section_id):
        raise ProtocolError("a new section must come with a reference into it")
    if attrs.ref is not None and frame.data:
        raise ProtocolError("a frame whose body is in a section carries inline data too")
    return attrs


# The attribute area of a message whose body is in a section the peer already knows:
# one SECTION_REF and nothing else (what a section message carries in steady state).
LONE_REF_SIZE = _TLV.size + _REF.size
_REF_BIT = 1 << AttrKind.SECTION_REF
_LONE_REF_KINDS = frozenset(int(kind) for kind in HANDLE_TYPES if ATTR_TYPES[kind] & _REF_BIT)
_SECTION_REF = int(AttrKind.SECTION_REF)
_SECTION_FLAG_BITS = int(SectionFlag.VIEW | SectionFlag.SECURE)
_LONE_REF = struct.Struct("<HH" + _REF.format[1:])  # the TLV header and the reference, one pack
assert _LONE_REF.size == LONE_REF_SIZE


def encode_lone_ref(section_id: int, flags: int, offset: int, length: int) -> bytes:
    """``encode_attributes`` of a SECTION_REF alone, in one pack."""
    return _LONE_REF.pack(AttrKind.SECTION_REF, _REF.size, section_id, flags, offset, length)


def decode_lone_ref(data: bytes, start: int, kind: int) -> SectionRef | None:
    """The SECTION_REF of a REQUEST/REPLY/DATAGRAM (``kind``) whose ``LONE_REF_SIZE``
    attribute bytes at ``start`` hold exactly that one attribute, validated as
    ``decode_attributes`` does; None for anything else (the caller then takes the
    general path, which names any violation)."""
    # One unpack instead of the general parser: this runs for every section message.
    if kind not in _LONE_REF_KINDS or len(data) - start < LONE_REF_SIZE:
        return None
    attr, length, section_id, flags, offset, size = _LONE_REF.unpack_from(data, start)
    if attr != _SECTION_REF or length != _REF.size or flags & ~_SECTION_FLAG_BITS:
        return None
    return SectionRef(section_id, flags, offset, size)


class Release(NamedTuple):
    section_id: int
    offset: int
    length: int


_RELEASE = struct.Struct("<IIQQ")
_SECTION_ID = struct.Struct("<I")
MAX_RELEASES_PER_FRAME = 2048


def encode_releases(entries: Iterable[Release]) -> bytes:
    return b"".join(_RELEASE.pack(sid, 0, offset, length) for sid, offset, length in entries)


def decode_releases(data: bytes) -> list[Release]:
    if len(data) % _RELEASE.size or len(data) > MAX_RELEASES_PER_FRAME * _RELEASE.size:
        raise ProtocolError(f"RELEASE body of {len(data)} bytes is not a whole number of entries")
    entries = []
    for sid, reserved, offset, length in _RELEASE.iter_unpack(data):
        if reserved:
            raise ProtocolError("RELEASE entry has non-zero reserved bits")
        entries.append(Release(sid, offset, length))
    return entries


def encode_section_ids(ids: Iterable[int]) -> bytes:
    return b"".join(_SECTION_ID.pack(sid) for sid in ids)


def decode_section_ids(data: bytes) -> list[int]:
    if len(data) % _SECTION_ID.size or len(data) > MAX_RELEASES_PER_FRAME * _SECTION_ID.size:
        raise ProtocolError(f"SECTION_CLOSE body of {len(data)} bytes is not a whole number of ids")
    return [sid for (sid,) in _SECTION_ID.iter_unpack(data)]
