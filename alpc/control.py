"""Sans-IO bodies of the control messages: broker requests and the connect handshake.

Bodies are msgpack maps, unpacked with tight limits and checked field by field,
so a hostile peer gets a ProtocolError rather than a surprise type or a huge
allocation. Nothing here touches a socket.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import (
    AccessDenied,
    AlpcError,
    BrokerUnavailable,
    InvalidName,
    MessageTooLarge,
    NameInUse,
    PortNotFound,
    ProtocolError,
    QuotaExceeded,
)
from .quotas import FlowLimits, flow_limits
from .security import PeerCred, PortAcl
from .wire import MessageType

__all__ = [
    "MAX_CONTROL_BODY",
    "MAX_NAME_LENGTH",
    "MAX_REJECT_REASON",
    "AclSpec",
    "Body",
    "BrokerQuota",
    "ClientInfo",
    "Connect",
    "ConnectionReply",
    "ConnectionRequestInfo",
    "CreatePort",
    "ErrorCode",
    "ErrorReply",
    "FlowSpec",
    "Handover",
    "HandoverDone",
    "HandoverItem",
    "HandoverPeer",
    "HandoverPort",
    "HandoverState",
    "OwnerQuota",
    "LATENCY_BUCKETS",
    "ListPorts",
    "MAX_REPORTED_PEERS",
    "PeerList",
    "PeerReport",
    "Peers",
    "PortCounters",
    "PortCreated",
    "PortInfo",
    "PortLimits",
    "PortList",
    "PortStats",
    "PortStatus",
    "Record",
    "Shutdown",
    "Stats",
    "StatsList",
    "UidUsageInfo",
    "check_connect_limits",
    "decode_body",
    "encode_body",
    "encoded_size",
    "validate_port_name",
]

MAX_NAME_LENGTH = 128
# A server's reason for rejecting a connect is cut to this many characters (and a longer one
# from a hostile server refused by the client).
MAX_REJECT_REASON = 1024
# Control bodies carry connect data; its own limit is enforced separately.
MAX_CONTROL_BODY = 16 * 1024 * 1024
# A server reports at most this many of its clients one by one (and the total).
MAX_REPORTED_PEERS = 2048
# Latency histogram: bucket i counts latencies below 2**i microseconds; the last is "longer".
LATENCY_BUCKETS = 26
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@/-]*")


def validate_port_name(name: object) -> str:
    """Return ``name`` if it is a valid port name, else raise InvalidName saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"port name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise InvalidName(f"port name must be 1..{MAX_NAME_LENGTH} characters, got {len(name)}")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"port name {name!r} may only use letters, digits and _ . : @ / -, "
            "and must start with a letter, digit or _"
        )
    if ".." in name or "//" in name or name.endswith(("/", ".")):
        raise InvalidName(f"port name {name!r} has an empty segment or a trailing separator")
    return name


class ErrorCode:
    NAME_IN_USE = "name_in_use"
    NOT_FOUND = "not_found"
    INVALID_NAME = "invalid_name"
    BUSY = "busy"
    ACCESS_DENIED = "access_denied"
    SHUTTING_DOWN = "shutting_down"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"


_ERROR_TYPES: dict[str, type[AlpcError]] = {
    ErrorCode.NAME_IN_USE: NameInUse,
    ErrorCode.NOT_FOUND: PortNotFound,
    ErrorCode.INVALID_NAME: InvalidName,
    ErrorCode.BUSY: QuotaExceeded,
    ErrorCode.ACCESS_DENIED: AccessDenied,
    ErrorCode.SHUTTING_DOWN: BrokerUnavailable,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.TOO_LARGE: MessageTooLarge,
}

R = TypeVar("R", bound="Record")
T = TypeVar("T", bound="Body")


# A field's check: (owner, field name, raw value) -> the value to store, or ProtocolError.
_Check = Callable[[str, str, Any], Any]
# Per Record class: (name, check, has a default) for each field, built on first use
# (the annotations name classes defined further down this module).
_SCHEMAS: dict[type[Record], tuple[tuple[str, _Check, bool], ...]] = {}


@dataclass(frozen=True)
class Record:
    """A msgpack map with a fixed set of typed fields."""

    @classmethod
    def from_map(cls: type[R], raw: dict[str, Any]) -> R:
        owner = cls.__name__
        values: dict[str, Any] = {}
        for name, check, has_default in _schema(cls):
            if name in raw:
                values[name] = check(owner, name, raw[name])
            elif not has_default:
                raise ProtocolError(f"{owner}: missing field {name!r}")
            # (else an older peer: the default is the safe setting)
        if len(values) != len(raw):
            extra = set(raw) - set(values)
            raise ProtocolError(f"{owner}: unknown fields {sorted(map(repr, extra))}")
        return cls(**values)

    def to_map(self) -> dict[str, Any]:
        """The msgpack map of this record (nested records as maps, tuples as they are)."""
        out: dict[str, Any] = {}
        for name, _, _ in _schema(type(self)):
            value = getattr(self, name)
            if isinstance(value, Record):
                value = value.to_map()
            elif type(value) is tuple and value and isinstance(value[0], Record):
                value = [item.to_map() for item in value]
            out[name] = value
        return out


def _schema(cls: type[Record]) -> tuple[tuple[str, _Check, bool], ...]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = tuple(
            (spec.name, _checker(str(spec.type)),
             spec.default is not MISSING or spec.default_factory is not MISSING)
            for spec in fields(cls))
    return schema


def _checker(annotation: str) -> _Check:
    """The check of a field annotated ``annotation`` (a string: annotations are postponed)."""
    expected = {"str": str, "bytes": bytes, "int": int, "bool": bool}.get(annotation)
    if expected is not None:
        return functools.partial(_check_exact, expected)
    if annotation == "tuple[int, ...]":
        return functools.partial(_check_items, int, "ints")
    if annotation == "tuple[str, ...]":
        return functools.partial(_check_items, str, "strings")
    single = _NESTED_ONE.get(annotation)
    if single is not None:
        return functools.partial(_check_record, single)
    nested = _NESTED.get(annotation)
    if nested is None:
        raise TypeError(f"unsupported annotation {annotation!r}")
    return functools.partial(_check_records, nested)


def _check_exact(expected: type, owner: str, name: str, value: Any) -> Any:
    # bool is an int subclass; keep the two apart so a flag is never a count.
    if type(value) is not expected:
        raise ProtocolError(f"{owner}.{name}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _check_items(item_type: type, items: str, owner: str, name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(type(item) is item_type for item in value):
        raise ProtocolError(f"{owner}.{name}: expected a list of {items}")
    return tuple(value)


def _check_record(record: type[Record], owner: str, name: str, value: Any) -> Record:
    if not isinstance(value, dict):
        raise ProtocolError(f"{owner}.{name}: expected a map")
    return record.from_map(value)


def _check_records(record: type[Record], owner: str, name: str, value: Any) -> tuple[Record, ...]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ProtocolError(f"{owner}.{name}: expected a list of maps")
    return tuple(record.from_map(item) for item in value)


@dataclass(frozen=True)
class Body(Record):
    """A control frame's body; subclasses name their frame type."""

    TYPE: ClassVar[MessageType]


@dataclass(frozen=True)
class AclSpec(Record):
    """A port's ACL on the wire (security.PortAcl); the broker checks connects against it."""

    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    deny_uids: tuple[int, ...] = ()
    deny_gids: tuple[int, ...] = ()
    allow_root: bool = False
    allow_everyone: bool = False

    @classmethod
    def of(cls, acl: PortAcl) -> AclSpec:
        return cls(allow_uids=tuple(sorted(acl.allow_uids)), allow_gids=tuple(sorted(acl.allow_gids)),
                   deny_uids=tuple(sorted(acl.deny_uids)), deny_gids=tuple(sorted(acl.deny_gids)),
                   allow_root=acl.allow_root, allow_everyone=acl.allow_everyone)

    def acl(self) -> PortAcl:
        try:
            return PortAcl(frozenset(self.allow_uids), frozenset(self.allow_gids), frozenset(self.deny_uids),
                           frozenset(self.deny_gids), self.allow_root, self.allow_everyone)
        except ValueError as exc:
            raise ProtocolError(f"AclSpec: {exc}") from None


@dataclass(frozen=True)
class PortLimits(Record):
    """Every limit of a port, as its server set them (shown by ``alpc ports --json``)."""

    max_message_length: int = 0
    max_connect_data: int = 0
    max_pending_connects: int = 0
    max_connections: int = 0
    max_pending_requests: int = 0
    max_queued_datagrams: int = 0
    max_handles_per_message: int = 0
    max_inflight_handles: int = 0
    handle_kinds: tuple[str, ...] = ()
    max_section_bytes: int = 0
    max_port_section_bytes: int = 0
    send_timeout_ms: int = 0
    refuse_identity_change: bool = False


@dataclass(frozen=True)
class FlowSpec(Record):
    """What one side of a connection takes from the other (quotas.FlowLimits, plus handle kinds)."""

    max_pending_requests: int = 1024
    max_queued_datagrams: int = 1024
    max_handles_per_message: int = 0
    max_inflight_handles: int = 64
    handle_kinds: int = 0  # security.kinds_mask

    @classmethod
    def of(cls, limits: FlowLimits, kinds_mask: int) -> FlowSpec:
        return cls(max_pending_requests=limits.max_pending_requests,
                   max_queued_datagrams=limits.max_queued_datagrams,
                   max_handles_per_message=limits.max_handles_per_message,
                   max_inflight_handles=limits.max_inflight_handles, handle_kinds=kinds_mask)

    def limits(self) -> FlowLimits:
        """The announced limits, checked (a ProtocolError for values no honest peer sends)."""
        try:
            return flow_limits(self.max_pending_requests, self.max_queued_datagrams, self.max_handles_per_message,
                               self.max_inflight_handles)
        except ValueError as exc:
            raise ProtocolError(f"announced flow limits: {exc}") from None


@dataclass(frozen=True)
class CreatePort(Body):
    TYPE: ClassVar[MessageType] = MessageType.CREATE_PORT
    name: str
    max_message_length: int
    max_connect_data: int
    max_pending_connects: int
    acl: AclSpec = field(default_factory=AclSpec)
    limits: PortLimits = field(default_factory=PortLimits)


@dataclass(frozen=True)
class PortCreated(Body):
    TYPE: ClassVar[MessageType] = MessageType.PORT_CREATED
    name: str


@dataclass(frozen=True)
class Connect(Body):
    TYPE: ClassVar[MessageType] = MessageType.CONNECT
    name: str
    data: bytes
    max_message_length: int
    # The most section memory the client maps from the server (its receive quota).
    max_section_bytes: int
    flow: FlowSpec = field(default_factory=FlowSpec)
    # ALPC's RequiredServerSid: the uid the port's owner must have (-1: any).
    # The broker refuses a mismatch before the connect data reaches anyone; the
    # client checks again against the kernel's credentials of the server's reply.
    required_server_uid: int = -1
    # The client maps Quick-LPC rings if the port offers them: a server creates
    # no ring memfd for a client that would only close it (pure Python, opted out).
    quick: bool = False


@dataclass(frozen=True)
class ConnectionRequestInfo(Body):
    """Broker to server, with the client's connected socket attached as an fd."""

    TYPE: ClassVar[MessageType] = MessageType.CONNECTION_REQUEST
    name: str
    data: bytes
    max_message_length: int
    max_section_bytes: int
    flow: FlowSpec = field(default_factory=FlowSpec)
    quick: bool = False  # Connect.quick, relayed


def check_connect_limits(request: Connect | ConnectionRequestInfo) -> None:
    """ProtocolError for a connect announcing limits no honest client does (Config keeps them
    in range): a server would build the channel on them, and a max_message_length below 0
    made even an empty reply raise MessageTooLarge at the server."""
    if not 1 <= request.max_message_length <= 0xFFFFFFFF:
        raise ProtocolError(f"announced max_message_length of {request.max_message_length} is outside 1..2**32-1")
    if request.max_section_bytes < 0:
        raise ProtocolError(f"announced max_section_bytes of {request.max_section_bytes} is negative")


@dataclass(frozen=True)
class ConnectionReply(Body):
    """Server to client, the first frame on the new channel."""

    TYPE: ClassVar[MessageType] = MessageType.CONNECTION_REPLY
    accepted: bool
    data: bytes
    reason: str
    max_message_length: int
    # The port's section settings, used by both directions of the connection.
    inline_threshold: int = 0
    max_section_bytes: int = 0
    secure_views: bool = False
    flow: FlowSpec = field(default_factory=FlowSpec)
    # Quick-LPC rings offered (alpc.qlpc): their geometry, 0 when none; the
    # region's memfd rides with this frame.
    quick_slots: int = 0
    quick_slot_size: int = 0


@dataclass(frozen=True)
class ErrorReply(Body):
    """A refusal; ``limit`` names the exhausted limit of a BUSY refusal (quotas.Limit)."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: str
    message: str
    limit: str = ""

    def exception(self) -> AlpcError:
        kind = _ERROR_TYPES.get(self.code, ProtocolError)
        if issubclass(kind, QuotaExceeded):
            return kind(self.message, limit=self.limit)
        return kind(self.message)


@dataclass(frozen=True)
class ListPorts(Body):
    TYPE: ClassVar[MessageType] = MessageType.LIST_PORTS


@dataclass(frozen=True)
class ClientInfo(Record):
    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, cred: PeerCred) -> ClientInfo:
        return cls(pid=cred.pid, uid=cred.uid, gid=cred.gid)


@dataclass(frozen=True)
class PeerReport(Record):
    """One client of a port as its server's runtime sees it (``alpc peers``).

    ``in_flight_ages_ms`` are the ages of the oldest requests still awaiting
    the server's reply, oldest first (at most a handful; ``in_flight`` counts all).
    """

    pid: int
    uid: int
    gid: int
    connected_ms: int
    queue_depth: int
    in_flight: int
    in_flight_ages_ms: tuple[int, ...]
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    errors: int
    section_bytes: int

    def client(self) -> ClientInfo:
        return ClientInfo(pid=self.pid, uid=self.uid, gid=self.gid)


@dataclass(frozen=True)
class PortCounters(Record):
    """A port's totals since it was created, kept by its server's runtime (``alpc stats``).

    ``latency_us`` is the histogram of request service times (receipt to reply):
    bucket i counts those under 2**i microseconds, the last one everything longer.
    """

    connects_accepted: int = 0
    connects_rejected: int = 0
    disconnects: int = 0
    # Connects the server's runtime refused at the port's max_connections (also in connects_rejected).
    quota_refusals: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    latency_us: tuple[int, ...] = field(default=(0,) * LATENCY_BUCKETS)

    def __post_init__(self) -> None:
        if len(self.latency_us) != LATENCY_BUCKETS:
            raise ProtocolError(f"PortCounters.latency_us: expected {LATENCY_BUCKETS} buckets, "
                                f"got {len(self.latency_us)}")


@dataclass(frozen=True)
class PortStatus(Body):
    """Server to broker, periodically and rate-limited: its clients and counters."""

    TYPE: ClassVar[MessageType] = MessageType.PORT_STATUS
    peers: tuple[PeerReport, ...] = field(default=())
    peers_total: int = 0
    counters: PortCounters = field(default_factory=PortCounters)

    def __post_init__(self) -> None:
        if len(self.peers) > MAX_REPORTED_PEERS:
            raise ProtocolError(f"PortStatus reports {len(self.peers)} peers, more than {MAX_REPORTED_PEERS}")


@dataclass(frozen=True)
class OwnerQuota(Record):
    """The broker's per-uid quotas as they apply to a port's owner; usage is -1 when not shown."""

    max_connections_per_uid: int = 0
    max_ports_per_uid: int = 0
    connections: int = -1
    ports: int = -1


@dataclass(frozen=True)
class PortInfo(Record):
    """One live port for ``alpc ports``.

    The broker lists only the ports the asker may inspect (``security.may_inspect``),
    so ``details`` is True; it is kept for peers that still send or expect it.
    """

    name: str
    pid: int
    uid: int
    gid: int
    max_message_length: int
    clients: tuple[ClientInfo, ...] = field(default=())
    details: bool = True
    limits: PortLimits = field(default_factory=PortLimits)
    # The ACL is shown only to the owner's uid and root (security.may_see_settings); empty otherwise.
    acl: AclSpec = field(default_factory=AclSpec)
    owner_quota: OwnerQuota = field(default_factory=OwnerQuota)


@dataclass(frozen=True)
class Peers(Body):
    """``alpc peers NAME``: the clients of one port."""

    TYPE: ClassVar[MessageType] = MessageType.PEERS
    name: str


@dataclass(frozen=True)
class PeerList(Body):
    """``report_age_ms`` is how old the server's last report is (-1: none yet)."""

    TYPE: ClassVar[MessageType] = MessageType.PEER_LIST
    name: str
    pid: int
    report_age_ms: int
    peers_total: int
    peers: tuple[PeerReport, ...] = field(default=())


@dataclass(frozen=True)
class Stats(Body):
    """``alpc stats [NAME]``: counters of one port, or of every port the asker may see (name "")."""

    TYPE: ClassVar[MessageType] = MessageType.STATS
    name: str


@dataclass(frozen=True)
class PortStats(Record):
    """The server's counters plus what only the broker knows (connects it forwarded or refused).

    ``quota_refusals`` counts connects refused for a quota of the port: by the
    broker at ``max_pending_connects`` plus by the server at ``max_connections``
    (the latter also in ``counters.quota_refusals``).
    """

    name: str
    pid: int
    uid: int
    connections: int
    report_age_ms: int
    connects_forwarded: int
    quota_refusals: int
    connects_refused: int
    counters: PortCounters


@dataclass(frozen=True)
class UidUsageInfo(Record):
    """How much of the broker one uid holds, against its per-uid quotas."""

    uid: int
    connections: int
    ports: int


@dataclass(frozen=True)
class BrokerQuota(Record):
    """The broker's mode and per-uid quotas; ``usage`` lists the asker's uid (every uid for root)."""

    shared: bool = False
    max_connections_per_uid: int = 0
    max_ports_per_uid: int = 0
    refused_connections: int = 0
    refused_ports: int = 0
    refused_acl: int = 0
    usage: tuple[UidUsageInfo, ...] = field(default=())


@dataclass(frozen=True)
class StatsList(Body):
    TYPE: ClassVar[MessageType] = MessageType.STATS_LIST
    uptime_ms: int
    connects_unknown_port: int
    protocol_errors: int
    ports: tuple[PortStats, ...] = field(default=())
    broker: BrokerQuota = field(default_factory=BrokerQuota)


@dataclass(frozen=True)
class Handover(Body):
    """A successor asks the running broker for its listening socket and state."""

    TYPE: ClassVar[MessageType] = MessageType.HANDOVER
    pid: int


@dataclass(frozen=True)
class HandoverPeer(Record):
    """A broker peer in transit; its socket rides as an fd, in order.

    ``role`` is new, server or query; ``inbound`` holds the bytes of a frame
    the old broker had only partly read.
    """

    id: int
    role: str
    inbound: bytes
    close_when_flushed: bool


@dataclass(frozen=True)
class HandoverItem(Record):
    """Unsent bytes queued for a peer; ``with_fd`` when a client socket still rides with them."""

    peer: int
    data: bytes
    with_fd: bool


@dataclass(frozen=True)
class HandoverPort(Record):
    name: str
    owner: int
    max_message_length: int
    max_connect_data: int
    max_pending_connects: int
    connects_forwarded: int
    quota_refusals: int
    connects_refused: int
    status: bytes
    acl: AclSpec = field(default_factory=AclSpec)
    limits: PortLimits = field(default_factory=PortLimits)


@dataclass(frozen=True)
class HandoverState(Body):
    """One chunk of the old broker's state; fds: the listener (first chunk), then peers, then items."""

    TYPE: ClassVar[MessageType] = MessageType.HANDOVER_STATE
    listener: bool
    owns_socket_file: bool
    last: bool
    peers: tuple[HandoverPeer, ...] = field(default=())
    items: tuple[HandoverItem, ...] = field(default=())
    ports: tuple[HandoverPort, ...] = field(default=())


@dataclass(frozen=True)
class HandoverDone(Body):
    """The successor holds every fd: the old broker may close its copies and exit."""

    TYPE: ClassVar[MessageType] = MessageType.HANDOVER_DONE
    pid: int


@dataclass(frozen=True)
class PortList(Body):
    TYPE: ClassVar[MessageType] = MessageType.PORT_LIST
    ports: tuple[PortInfo, ...] = field(default=())


@dataclass(frozen=True)
class Shutdown(Body):
    TYPE: ClassVar[MessageType] = MessageType.SHUTDOWN
    reason: str


_NESTED: dict[str, type[Record]] = {
    "tuple[ClientInfo, ...]": ClientInfo,
    "tuple[PortInfo, ...]": PortInfo,
    "tuple[PeerReport, ...]": PeerReport,
    "tuple[PortStats, ...]": PortStats,
    "tuple[HandoverPeer, ...]": HandoverPeer,
    "tuple[HandoverItem, ...]": HandoverItem,
    "tuple[HandoverPort, ...]": HandoverPort,
    "tuple[UidUsageInfo, ...]": UidUsageInfo,
}
_NESTED_ONE: dict[str, type[Record]] = {
    "PortCounters": PortCounters,
    "AclSpec": AclSpec,
    "PortLimits": PortLimits,
    "FlowSpec": FlowSpec,
    "OwnerQuota": OwnerQuota,
    "BrokerQuota": BrokerQuota,
}

_BODIES: dict[MessageType, type[Body]] = {
    body.TYPE: body
    for body in (CreatePort, PortCreated, Connect, ConnectionRequestInfo, ConnectionReply,
                 ErrorReply, ListPorts, PortList, PortStatus, Shutdown, Peers, PeerList, Stats,
                 StatsList, Handover, HandoverState, HandoverDone)
}


def encode_body(body: Body) -> bytes:
    packed: bytes = msgpack.packb(body.to_map(), use_bin_type=True)
    return packed


def encoded_size(record: Record) -> int:
    """Bytes ``record`` takes encoded, inside a body or as one."""
    return len(msgpack.packb(record.to_map(), use_bin_type=True))


def decode_body(message_type: MessageType, data: bytes, expected: type[T]) -> T:
    """Decode ``data`` as the body ``expected``; anything else is a ProtocolError."""
    if _BODIES.get(message_type) is not expected:
        raise ProtocolError(f"expected a {expected.__name__} frame, got {message_type.name}")
    if len(data) > MAX_CONTROL_BODY:
        raise ProtocolError(f"{expected.__name__} body of {len(data)} bytes is too long")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=64 * 1024,
            max_bin_len=MAX_CONTROL_BODY, max_array_len=100_000, max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"undecodable {expected.__name__} body: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{expected.__name__} body is not a map")
    return expected.from_map(raw)
