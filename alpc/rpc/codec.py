"""Sans-IO RPC message format: a binary head, a msgpack envelope, out-of-band buffers.

An RPC message is the data of one alpc message (all integers little-endian)::

    head       version u8, kind u8, n_segments u16
    table      n_segments x u32: the length of each segment
    envelope   msgpack (limits enforced on unpacking; no pickle, ever)
    segments   the raw bytes of each segment, back to back

The envelope runs from the end of the table to the first segment, so a
message without segments is its 4-byte head and the envelope, nothing else.

Envelopes: a CALL is ``[object_id, method, args, kwargs | nil, deadline | nil]``,
a RESULT is the value, an ERROR is ``[code, type_name, message, traceback | nil]``.

A bytes-like argument or result larger than the inline threshold is not packed
into the envelope: it becomes a segment, referenced from the envelope by a
BUFFER ext value holding its index, and is handed to the port as a buffer of
its own, never joined with the rest; the receiver gets it as a read-only
memoryview of the message data. Buffers are lifted when they are a top-level
argument, the result, or an item of a returned tuple; anywhere deeper they are
packed inline (still correct).

How the parts travel is the port's business: ``encode_*`` return the message
as parts ``[head + table, envelope, *segments]``. A message over the
connection's inline threshold goes through its shared-memory section (each
part copied once, straight into the section, by either driver); a smaller one
is gathered by sendmsg. ``decode`` slices segments out of
``memoryview(message.data)``, the body the port copied out of the section.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

from ..errors import MarshalError, RemoteError, remote_error_class
from ..protocol import Buffer, Payload
from .faults import error_for, exception_type_name
from .hello import RPC_VERSION

__all__ = [
    "DEFAULT_LIMITS",
    "HEAD",
    "INLINE_THRESHOLD",
    "RPC_VERSION",
    "Call",
    "Codec",
    "ErrorReply",
    "Ext",
    "Kind",
    "Limits",
    "ObjectRef",
    "check_options",
    "parse_call",
]

HEAD = struct.Struct("<BBH")
_U32 = struct.Struct("<I")
_TIMEDELTA = struct.Struct("<iii")
# Bytes-like values up to this size are packed inline; larger ones travel as segments.
INLINE_THRESHOLD = 256
_MAX_SEGMENTS = 0xFFFF

KIB = 1024
MIB = 1024 * KIB


class Kind(IntEnum):
    CALL = 1
    RESULT = 2
    ERROR = 3


class Ext(IntEnum):
    """msgpack ext type codes; any other code is refused."""

    BUFFER = 1  # u32 segment index
    DATETIME = 2  # ISO 8601 text
    DATE = 3  # ISO 8601 text
    TIMEDELTA = 4  # i32 days, i32 seconds, i32 microseconds
    EXCEPTION = 5  # msgpack [type_name, message]
    OBJECT = 6  # msgpack [object_id, interface, {method: oneway}]


@dataclass(frozen=True)
class Limits:
    """What an unpacker accepts, so a hostile peer cannot make us allocate without bound.

    msgpack also refuses any length larger than the bytes actually received.
    Each length limit bounds one object; ``max_containers`` bounds how many
    lists and dicts one message may build, because an empty one costs a byte
    on the wire and ~60 in memory. Map keys must be str or bytes (msgpack's
    strict_map_key): hashing attacker-chosen ints would make a dict quadratic.
    Large buffers are segments, not msgpack, and none of this applies to them.
    """

    max_str_len: int = 16 * MIB
    max_bin_len: int = 16 * MIB
    max_array_len: int = 1 << 20
    max_map_len: int = 1 << 18
    max_ext_len: int = 64 * KIB
    max_containers: int = 1 << 18
    max_segments: int = 1024

    def __post_init__(self) -> None:
        # Checked here, not when a connection first decodes with them: msgpack reads -1 as "no
        # limit" and cannot take more than a C ssize_t, and rpc.connect applies its limits only
        # once it is connected.
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= sys.maxsize:
                raise ValueError(f"Limits.{name} must be a positive int up to {sys.maxsize}, got {value!r}")

    def unpack_options(self) -> dict[str, Any]:
        return {
            "raw": False,
            "strict_map_key": True,
            "use_list": True,
            "max_str_len": self.max_str_len,
            "max_bin_len": self.max_bin_len,
            "max_array_len": self.max_array_len,
            "max_map_len": self.max_map_len,
            "max_ext_len": self.max_ext_len,
        }


DEFAULT_LIMITS = Limits()


def check_options(limits: Limits, inline_threshold: int) -> None:
    """ValueError/TypeError for options a Codec refuses: a client or server checks them up front,
    before it connects or accepts anyone, rather than when its first connection needs a Codec."""
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be an rpc.Limits, not {limits!r}")
    if type(inline_threshold) is not int or not 0 <= inline_threshold <= sys.maxsize:
        raise ValueError(f"inline_threshold must be an int >= 0, got {inline_threshold!r}")


# A decoded call: [object_id, method, args, kwargs | None, deadline | None], types checked.
# A list rather than a class: building an object per call costs more than the call.
Call = list[Any]


class ErrorReply(NamedTuple):
    code: str
    type_name: str
    message: str
    traceback: str | None


class ObjectRef(NamedTuple):
    """An object exported by its owner, as named on the wire."""

    object_id: int
    interface: str
    methods: dict[str, bool]  # method name -> one-way


# Exporter: returns the reference for an exportable object, None for anything else.
Exporter = Callable[[object], ObjectRef | None]
Importer = Callable[[ObjectRef], object]

# Values packed as they are; tuples too (msgpack sends them as arrays).
_PLAIN = frozenset({int, str, float, bool, type(None), list, dict, tuple})
_BUFFERS = frozenset({bytes, bytearray, memoryview})
_NO_SEGMENTS: list[memoryview] = []


_CALL_HEAD = HEAD.pack(RPC_VERSION, Kind.CALL, 0)
_RESULT_HEAD = HEAD.pack(RPC_VERSION, Kind.RESULT, 0)
_ERROR_HEAD = HEAD.pack(RPC_VERSION, Kind.ERROR, 0)
_NO_EXPORTS: list[int] = []
# One msgpack Packer per thread: making one per message costs as much as packing.
_local = threading.local()


def _packer() -> Any:
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(default=_default)
        return packer


class Codec:
    """Encodes and decodes RPC messages for one connection. Thread-safe (no mutable state).

    Every method has a fast path for the common message (no segments, plain
    values) and falls back to the general one for anything else.
    """

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        inline_threshold: int = INLINE_THRESHOLD,
        export: Exporter | None = None,
        import_object: Importer | None = None,
        release: Callable[[list[int]], None] | None = None,
    ) -> None:
        check_options(limits, inline_threshold)
        self.limits = limits
        self.inline_threshold = inline_threshold
        self._export = export
        self._import = import_object
        self._release = release  # undoes export() for a call that fails to encode
        self._options = limits.unpack_options()
        self._hook = self._refuse_ext  # bound once, not per message
        self._ext_options = dict(self._options, ext_hook=self._hook)
        # For the payload of an ext value: it holds plain values only. An ext inside one would
        # be decoded by a nested unpackb, and a chain of them (a few bytes a level) overflows
        # the C stack long before Python's recursion limit (SIGSEGV).
        self._flat_options = dict(self._options, ext_hook=_refuse_nested_ext)
        # msgpack's own limits are the length of its input, so an envelope no
        # longer than every configured limit needs no explicit limits at all.
        self._small = min(limits.max_str_len, limits.max_bin_len, limits.max_array_len,
                          2 * limits.max_map_len, limits.max_ext_len, limits.max_containers)

    # -- encoding ----------------------------------------------------------------

    def encode_call(
        self,
        object_id: int,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        deadline: float | None,
    ) -> tuple[Payload, list[int]]:
        """The message for a call, and the ids of objects it exported (to release after the call)."""
        if not kwargs:
            threshold = self.inline_threshold
            for value in args:
                kind = type(value)
                if kind not in _PLAIN and (kind is not bytes or len(value) > threshold):
                    break
            else:
                try:
                    return _CALL_HEAD + _packer().pack([object_id, method, args, None, deadline]), _NO_EXPORTS
                except (TypeError, ValueError, OverflowError):
                    pass  # the general path below names the problem
        segments = _NO_SEGMENTS
        exported: list[int] = []
        try:
            if args:
                args, segments = self._lift_all(args, segments, exported)
            if kwargs:
                values, segments = self._lift_all(list(kwargs.values()), segments, exported)
                kwargs = dict(zip(kwargs, values, strict=True))
            envelope = self._pack([object_id, method, args, kwargs or None, deadline])
            return self._assemble(Kind.CALL, envelope, segments), exported
        except BaseException:
            # The call never leaves: the objects exported for it must not outlive it.
            if exported and self._release is not None:
                self._release(exported)
            raise

    def encode_result(self, value: Any) -> Payload:
        kind = type(value)
        if (kind in _PLAIN and kind is not tuple) or (kind is bytes and len(value) <= self.inline_threshold):
            try:
                packed: bytes = _packer().pack(value)
                return _RESULT_HEAD + packed
            except (TypeError, ValueError, OverflowError):
                pass  # the general path below names the problem
        segments = _NO_SEGMENTS
        if kind is tuple:
            value, segments = self._lift_all(value, segments, None)
        else:
            value, segments = self._lift(value, segments, None)
        return self._assemble(Kind.RESULT, self._pack(value), segments)

    def encode_error(self, code: str, type_name: str, message: str, traceback: str | None = None) -> bytes:
        return _ERROR_HEAD + self._pack([code, type_name, message, traceback])

    def _lift_all(
        self, values: Sequence[Any], segments: list[memoryview], exported: list[int] | None
    ) -> tuple[Sequence[Any], list[memoryview]]:
        out: list[Any] | None = None
        for index, value in enumerate(values):
            if type(value) in _PLAIN:
                continue
            lifted, segments = self._lift(value, segments, exported)
            if lifted is not value:
                if out is None:
                    out = list(values)
                out[index] = lifted
        return (values if out is None else out), segments

    def _lift(
        self, value: Any, segments: list[memoryview], exported: list[int] | None
    ) -> tuple[Any, list[memoryview]]:
        """A large buffer becomes a segment reference; an exportable object an OBJECT ext."""
        if type(value) not in _BUFFERS:
            if exported is not None and self._export is not None:
                ref = self._export(value)
                if ref is not None:
                    exported.append(ref.object_id)
                    return msgpack.ExtType(Ext.OBJECT, self._pack(list(ref))), segments
            try:
                memoryview(value)
            except TypeError:
                return value, segments
        view = memoryview(value)
        if view.nbytes <= self.inline_threshold:
            return value, segments
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        if segments is _NO_SEGMENTS:
            segments = []
        segments.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
        return msgpack.ExtType(Ext.BUFFER, _U32.pack(len(segments) - 1)), segments

    def _pack(self, value: Any) -> bytes:
        try:
            packed: bytes = _packer().pack(value)
        except MarshalError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise MarshalError(f"cannot marshal the value: {exc}") from None
        return packed

    def _assemble(self, kind: Kind, envelope: bytes, segments: list[memoryview]) -> Payload:
        if not segments:
            return HEAD.pack(RPC_VERSION, kind, 0) + envelope
        if len(segments) > _MAX_SEGMENTS:
            raise MarshalError(f"{len(segments)} large buffers in one message; at most {_MAX_SEGMENTS}")
        head = HEAD.pack(RPC_VERSION, kind, len(segments))
        table = struct.pack(f"<{len(segments)}I", *(segment.nbytes for segment in segments))
        parts: list[Buffer] = [head + table, envelope]
        parts.extend(segments)
        return parts

    # -- decoding ----------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[Kind, Any]:
        """The kind and envelope of a received message. Raises MarshalError if malformed."""
        if len(data) < HEAD.size:
            raise MarshalError(f"an RPC message needs at least {HEAD.size} bytes, got {len(data)}")
        version, kind, count = HEAD.unpack_from(data)
        if version != RPC_VERSION:
            raise MarshalError(f"RPC message version {version}, expected {RPC_VERSION}")
        if kind not in _KINDS:
            raise MarshalError(f"unknown RPC message kind {kind}")
        if count:
            return Kind(kind), self._decode_segmented(data, count)
        return Kind(kind), self._unpack_envelope(data)

    def _unpack_envelope(self, data: bytes) -> Any:
        """The envelope of a message without segments."""
        if len(data) <= self._small:
            try:
                value = msgpack.unpackb(data[HEAD.size:], ext_hook=self._hook)
            except MarshalError:
                raise
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                raise MarshalError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
        else:
            value = self._unpack(data[HEAD.size:], self._ext_options)
        if data.find(_TIMESTAMP_TYPE, HEAD.size) < 0:  # the common message: no call
            return value
        return _without_timestamps(data, HEAD.size, len(data), value)

    def _decode_segmented(self, data: bytes, count: int) -> Any:
        if count > self.limits.max_segments:
            raise MarshalError(f"{count} segments exceed the limit of {self.limits.max_segments}")
        table_end = HEAD.size + 4 * count
        if table_end > len(data):
            raise MarshalError("the segment table runs past the end of the message")
        lengths = struct.unpack_from(f"<{count}I", data, HEAD.size)
        envelope_end = len(data) - sum(lengths)
        if envelope_end <= table_end:
            raise MarshalError("segment lengths exceed the message length")
        view = memoryview(data).toreadonly()
        segments = []
        offset = envelope_end
        for length in lengths:
            segments.append(view[offset:offset + length])
            offset += length

        def hook(code: int, payload: bytes) -> Any:
            if code == Ext.BUFFER:
                index = _segment_index(payload)
                if index >= count:
                    raise MarshalError(f"reference to segment {index}, but the message has {count}")
                return segments[index]
            return self._ext(code, payload)

        value = self._unpack(view[table_end:envelope_end], dict(self._options, ext_hook=hook))
        return _without_timestamps(data, table_end, envelope_end, value)

    def _unpack(self, buf: bytes | memoryview, options: dict[str, Any]) -> Any:
        left = self.limits.max_containers

        def count(container: Any) -> Any:
            nonlocal left
            left -= 1
            if left < 0:
                raise MarshalError(f"more than {self.limits.max_containers} lists and maps in one message")
            return container

        try:
            return msgpack.unpackb(buf, list_hook=count, object_hook=count, **options)
        except MarshalError:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise MarshalError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None

    def _refuse_ext(self, code: int, payload: bytes) -> Any:
        if code == Ext.BUFFER:
            raise MarshalError(f"reference to segment {_segment_index(payload)}, but the message has none")
        return self._ext(code, payload)

    def _ext(self, code: int, payload: bytes) -> Any:
        if code == Ext.DATETIME:
            return datetime.fromisoformat(payload.decode())
        if code == Ext.DATE:
            return date.fromisoformat(payload.decode())
        if code == Ext.TIMEDELTA:
            if len(payload) != _TIMEDELTA.size:
                raise MarshalError("a timedelta ext holds 12 bytes")
            days, seconds, micros = _TIMEDELTA.unpack(payload)
            return timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == Ext.EXCEPTION:
            type_name, message = _strings(self._unpack(payload, self._flat_options), 2, "an exception ext")
            return remote_error_class(type_name)(type_name, message)
        if code == Ext.OBJECT:
            return self._import_object(payload)
        raise MarshalError(f"unknown msgpack extension type {code}")

    def _import_object(self, payload: bytes) -> object:
        if self._import is None:
            raise MarshalError("an object reference is not accepted here")
        fields = self._unpack(payload, self._flat_options)
        if not (isinstance(fields, list) and len(fields) == 3):
            raise MarshalError("an object ext is [object_id, interface, methods]")
        object_id, interface, methods = fields
        if (type(object_id) is not int or not 0 < object_id <= 0xFFFFFFFF or type(interface) is not str
                or not isinstance(methods, dict)
                or not all(type(k) is str and type(v) is bool for k, v in methods.items())):
            raise MarshalError("malformed object reference")
        return self._import(ObjectRef(object_id, interface, methods))

    # -- envelopes ---------------------------------------------------------------

    def decode_call(self, data: bytes) -> Call:
        """The call in ``data``; MarshalError if it is malformed or not a call."""
        if data[:HEAD.size] == _CALL_HEAD:
            envelope = self._unpack_envelope(data)
        else:
            kind, envelope = self.decode(data)
            if kind is not Kind.CALL:
                raise MarshalError(f"expected a call, got a {kind.name} message")
        if type(envelope) is list and len(envelope) == 5:
            object_id, method, args, kwargs, deadline = envelope
            if (type(object_id) is int and object_id >= 0 and type(method) is str and type(args) is list
                    and (kwargs is None or type(kwargs) is dict)
                    and (deadline is None or (type(deadline) is float and -_INF < deadline < _INF))):
                return envelope
        return parse_call(envelope)

    def result(self, data: bytes) -> Any:
        """The value of a RESULT reply; raises the error an ERROR reply carries."""
        if data[:HEAD.size] == _RESULT_HEAD and len(data) <= self._small:
            try:
                value = msgpack.unpackb(data[HEAD.size:], ext_hook=self._hook)
            except MarshalError:
                raise
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                raise MarshalError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
            if data.find(_TIMESTAMP_TYPE, HEAD.size) < 0:  # the common reply: no call
                return value
            return _without_timestamps(data, HEAD.size, len(data), value)
        kind, value = self.decode_reply(data)
        if kind is Kind.ERROR:
            raise error_for(*value)
        return value

    def decode_reply(self, data: bytes) -> tuple[Kind, Any]:
        """(RESULT, value) or (ERROR, ErrorReply); MarshalError for anything else."""
        if data[:HEAD.size] == _RESULT_HEAD:
            return Kind.RESULT, self._unpack_envelope(data)
        kind, envelope = self.decode(data)
        if kind is Kind.RESULT:
            return kind, envelope
        if kind is Kind.ERROR:
            if type(envelope) is not list or len(envelope) != 4:
                raise MarshalError("an error reply is [code, type_name, message, traceback]")
            code, type_name, message = _strings(envelope[:3], 3, "an error reply")
            traceback = envelope[3]
            if traceback is not None and type(traceback) is not str:
                raise MarshalError("an error reply's traceback must be a str or nil")
            return kind, ErrorReply(code, type_name, message, traceback)
        raise MarshalError(f"expected a reply, got a {kind.name} message")


_KINDS = frozenset(int(kind) for kind in Kind)
_INF = math.inf


def parse_call(envelope: Any) -> Call:
    """Check a call envelope field by field, naming what is wrong."""
    if type(envelope) is not list or len(envelope) != 5:
        raise MarshalError("a call is [object_id, method, args, kwargs, deadline]")
    object_id, method, args, kwargs, deadline = envelope
    if type(object_id) is not int or object_id < 0:
        raise MarshalError(f"a call's object id must be a non-negative int, not {type(object_id).__name__}")
    if type(method) is not str:
        raise MarshalError(f"a call's method name must be a str, not {type(method).__name__}")
    if type(args) is not list:
        raise MarshalError(f"a call's args must be an array, not {type(args).__name__}")
    if kwargs is not None and type(kwargs) is not dict:
        raise MarshalError(f"a call's kwargs must be a map or nil, not {type(kwargs).__name__}")
    if deadline is not None and type(deadline) is not float and type(deadline) is not int:
        raise MarshalError(f"a call's deadline must be a number or nil, not {type(deadline).__name__}")
    if deadline is not None and not math.isfinite(deadline):
        # NaN never passes (the handler's remaining() said 0.0 and its nested calls raised
        # ValueError); inf made a nested call into the caller's callback wait ~25 days.
        raise MarshalError(f"a call's deadline must be a finite time, not {deadline}")
    return [object_id, method, args, kwargs, None if deadline is None else float(deadline)]


# msgpack decodes its own timestamp ext (type -1) itself, without calling ext_hook; each of its
# encodings (fixext 4, fixext 8, ext 8 of 12 bytes) carries the type byte 0xff.
_TIMESTAMP_TYPE = b"\xff"


def _without_timestamps(data: Any, start: int, end: int, value: Any) -> Any:
    """``value``, decoded from ``data[start:end]``; MarshalError if it holds a msgpack Timestamp.

    Only an envelope holding a 0xff byte is searched (never in UTF-8 text, and rare in the
    small ints and headers of a call): the common message costs one byte search.
    """
    if not isinstance(data, (bytes, bytearray)):
        data, start, end = bytes(memoryview(data)[start:end]), 0, end - start
    if data.find(_TIMESTAMP_TYPE, start, end) < 0:
        return value
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is list:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.values())
        elif kind is msgpack.Timestamp:
            raise MarshalError("msgpack timestamps (ext type -1) are not accepted; send a datetime")
    return value


def _refuse_nested_ext(code: int, payload: bytes) -> Any:
    raise MarshalError(f"an ext value (type {code}) inside another ext value")


def _segment_index(payload: bytes) -> int:
    if len(payload) != _U32.size:
        raise MarshalError("a buffer ext holds a 4-byte segment index")
    index: int = _U32.unpack(payload)[0]
    return index


def _strings(fields: Any, count: int, what: str) -> list[str]:
    if not (isinstance(fields, list) and len(fields) == count and all(type(f) is str for f in fields)):
        raise MarshalError(f"{what} must hold {count} strings")
    return fields


def _default(value: Any) -> Any:
    """msgpack's hook for types it lacks; each becomes an explicit ext type."""
    if isinstance(value, datetime):
        return msgpack.ExtType(Ext.DATETIME, value.isoformat().encode())
    if isinstance(value, date):
        return msgpack.ExtType(Ext.DATE, value.isoformat().encode())
    if isinstance(value, timedelta):
        return msgpack.ExtType(Ext.TIMEDELTA, _TIMEDELTA.pack(value.days, value.seconds, value.microseconds))
    if isinstance(value, BaseException):
        message = value.remote_message if isinstance(value, RemoteError) else str(value)
        return msgpack.ExtType(Ext.EXCEPTION, msgpack.packb([exception_type_name(value), message]))
    if isinstance(value, int):
        raise MarshalError(f"integer {value} is outside msgpack's 64-bit range")
    if getattr(type(value), "__alpc_methods__", None) is not None:
        raise MarshalError("an interface object can only be passed as a top-level call argument")
    try:
        view = memoryview(value)
    except TypeError:
        raise MarshalError(f"cannot marshal a {type(value).__qualname__}") from None
    return view.tobytes() if not view.c_contiguous else view.cast("B")
