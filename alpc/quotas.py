"""Sans-IO quota accounting: connection flow control and the broker's per-uid quotas.

Every queue a peer can fill is bounded by something the receiver announced:

- requests awaiting a reply by ``max_pending_requests``;
- datagrams not yet taken by the application by ``max_queued_datagrams``
  (a credit window: the receiver returns credits as its application takes
  them, in CREDIT frames);
- fds in messages not yet taken (or replied to) by ``max_inflight_handles``.

A sender that reaches a limit waits (backpressure, up to its caller's
timeout) until replies or credits come back; a peer that goes past what was
announced to it is breaking the protocol, and its connection is dropped.
Replies, notices and the runtime's own frames are never counted, so room
for them is always there. No sockets here; the drivers do the waiting.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import StrEnum

from .errors import ProtocolError

__all__ = [
    "BROKER_DEFAULTS",
    "CREDIT",
    "BrokerLimits",
    "Flow",
    "FlowLimits",
    "Limit",
    "MAX_LIMIT",
    "UidUsage",
    "WindowClosed",
    "decode_credit",
    "encode_credit",
    "flow_limits",
]


class Limit(StrEnum):
    """The name of every limit alpc enforces; ``QuotaExceeded.limit`` holds one."""

    MAX_MESSAGE_LENGTH = "max_message_length"
    MAX_CONNECT_DATA = "max_connect_data"
    MAX_PENDING_CONNECTS = "max_pending_connects"
    MAX_CONNECTIONS = "max_connections"
    MAX_PENDING_REQUESTS = "max_pending_requests"
    MAX_QUEUED_DATAGRAMS = "max_queued_datagrams"
    MAX_HANDLES_PER_MESSAGE = "max_handles_per_message"
    MAX_INFLIGHT_HANDLES = "max_inflight_handles"
    MAX_SECTION_BYTES = "max_section_bytes"
    MAX_PORT_SECTION_BYTES = "max_port_section_bytes"
    SEND_TIMEOUT = "send_timeout"
    MAX_CONNECTIONS_PER_UID = "max_connections_per_uid"
    MAX_PORTS_PER_UID = "max_ports_per_uid"


# The largest count or byte limit a setting may hold: the broker and the runtime send
# limits as msgpack ints, which stop at 64 bits (a larger one failed every answer).
MAX_LIMIT = 2**63 - 1

# The protocol's own ceilings on what a side may announce. Requests stay below
# protocol.MAX_ABANDONED, so a late reply to an abandoned request is always recognised.
_MAX_REQUESTS = 65536
_MAX_WINDOW = 1 << 20
_MAX_HANDLES = 253  # SCM_MAX_FD, less the section fd a frame may also carry
CREDIT = struct.Struct("<II")


class WindowClosed(Exception):
    """Internal: the send must wait until ``limit`` frees up (the driver waits, then retries)."""

    def __init__(self, limit: Limit, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit


@dataclass(frozen=True)
class FlowLimits:
    """What one side of a connection takes from the other (announced in the handshake)."""

    max_pending_requests: int = 1024
    max_queued_datagrams: int = 1024
    max_handles_per_message: int = 0
    max_inflight_handles: int = 64

    def __post_init__(self) -> None:
        for name, low, high in (("max_pending_requests", 1, _MAX_REQUESTS), ("max_queued_datagrams", 1, _MAX_WINDOW),
                                ("max_handles_per_message", 0, _MAX_HANDLES),
                                ("max_inflight_handles", 0, _MAX_WINDOW)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} of {value!r} is outside {low}..{high}")


# typed: True or 1.0 must still reach FlowLimits' own check, not a cached 1.
@functools.lru_cache(maxsize=64, typed=True)
def flow_limits(max_pending_requests: int, max_queued_datagrams: int, max_handles_per_message: int,
                max_inflight_handles: int) -> FlowLimits:
    """FlowLimits, one (frozen) object for equal values: every connection holds both sides'."""
    return FlowLimits(max_pending_requests, max_queued_datagrams, max_handles_per_message, max_inflight_handles)


def encode_credit(datagrams: int, handles: int) -> bytes:
    return CREDIT.pack(datagrams, handles)


def decode_credit(data: bytes) -> tuple[int, int]:
    if len(data) != CREDIT.size:
        raise ProtocolError(f"CREDIT body of {len(data)} bytes; expected {CREDIT.size}")
    datagrams, handles = CREDIT.unpack(data)
    return datagrams, handles


class Flow:
    """Flow control of one connection, both directions: what we may send, what the peer may.

    ``local`` is what this side announced (and enforces on the peer), ``peer``
    what the peer announced (and this side respects when sending).
    """

    __slots__ = ("_credit_due_at", "_datagrams_out", "_handles_out", "_max_requests", "_owed", "_owed_handles",
                 "_recv_datagrams", "_recv_handles", "_request_handles_in", "_request_handles_out", "_requests_in",
                 "_requests_out", "credit_due", "local", "peer")

    def __init__(self, local: FlowLimits, peer: FlowLimits) -> None:
        self.local = local
        self.peer = peer
        # Sending side.
        self._requests_out: set[int] = set()
        self._request_handles_out: dict[int, int] = {}
        self._datagrams_out = 0
        self._handles_out = 0
        # Receiving side.
        self._requests_in = 0
        self._request_handles_in: dict[int, int] = {}
        self._recv_datagrams = 0
        self._recv_handles = 0
        self._owed = 0
        self._owed_handles = 0
        self._credit_due_at = max(1, local.max_queued_datagrams // 4)
        # Should a CREDIT frame go out now? (Soon enough that a waiting sender never
        # stalls: a quarter of the window, or any fds.) Kept current, read per message.
        self.credit_due = False
        self._max_requests = peer.max_pending_requests

    # -- sending -------------------------------------------------------------------------

    def check_request(self, handles: int = 0) -> None:
        """Raise WindowClosed if a request (with ``handles`` fds) must wait."""
        if len(self._requests_out) >= self.peer.max_pending_requests:
            raise WindowClosed(Limit.MAX_PENDING_REQUESTS,
                               f"{len(self._requests_out)} requests await replies, the peer's max_pending_requests")
        if handles:
            self._check_handles(handles)

    def check_datagram(self, handles: int = 0) -> None:
        if self._datagrams_out >= self.peer.max_queued_datagrams:
            raise WindowClosed(Limit.MAX_QUEUED_DATAGRAMS,
                               f"{self._datagrams_out} datagrams not yet taken by the peer (max_queued_datagrams)")
        if handles:
            self._check_handles(handles)

    def _check_handles(self, handles: int) -> None:
        if handles > self.peer.max_handles_per_message:
            raise WindowClosed(Limit.MAX_HANDLES_PER_MESSAGE, "never fits")  # the driver checks this first
        if self._handles_out + handles > self.peer.max_inflight_handles:
            raise WindowClosed(Limit.MAX_INFLIGHT_HANDLES,
                               f"{self._handles_out} fds not yet taken by the peer (max_inflight_handles)")

    def sent_request(self, request_id: int, handles: int = 0) -> None:
        self._requests_out.add(request_id)
        if handles:
            self._request_handles_out[request_id] = handles
            self._handles_out += handles

    def take_request(self, request_id: int, handles: int = 0) -> None:
        """check_request, then sent_request: the one call of the small-message path."""
        if handles or len(self._requests_out) >= self._max_requests:
            self.check_request(handles)
            self.sent_request(request_id, handles)
        else:
            self._requests_out.add(request_id)

    def sent_datagram(self, handles: int = 0) -> None:
        self._datagrams_out += 1
        self._handles_out += handles

    def take_datagram(self, handles: int = 0) -> None:
        self.check_datagram(handles)
        self.sent_datagram(handles)

    def datagram_room(self) -> int:
        """How many more datagrams (without fds) the peer's window takes now."""
        return max(0, self.peer.max_queued_datagrams - self._datagrams_out)

    def sent_datagrams(self, count: int) -> None:
        """``count`` datagrams without fds went out (a batch, within ``datagram_room``)."""
        self._datagrams_out += count

    def unsent_datagrams(self, count: int, handles: int = 0) -> None:
        """``count`` datagrams counted by take_datagram/sent_datagrams never left: they hold no slot."""
        self._datagrams_out -= count
        self._handles_out -= handles

    def unsent_request(self, request_id: int) -> None:
        """The request's frames never left (nothing written): it holds no slot."""
        self.reply_received(request_id)

    def reply_received(self, request_id: int) -> None:
        if request_id in self._requests_out:
            self._requests_out.discard(request_id)
            self._handles_out -= self._request_handles_out.pop(request_id, 0)

    def credit_received(self, datagrams: int, handles: int) -> None:
        if datagrams > self._datagrams_out or handles > self._handles_out - sum(self._request_handles_out.values()):
            raise ProtocolError(f"CREDIT returns {datagrams} datagrams and {handles} fds, more than were sent")
        self._datagrams_out -= datagrams
        self._handles_out -= handles

    @property
    def requests_out(self) -> int:
        return len(self._requests_out)

    @property
    def datagrams_out(self) -> int:
        return self._datagrams_out

    @property
    def handles_out(self) -> int:
        return self._handles_out

    # -- receiving -----------------------------------------------------------------------

    def _take_handles(self, handles: int) -> None:
        if self._recv_handles + handles > self.local.max_inflight_handles:
            raise ProtocolError(f"the peer sent {self._recv_handles + handles} fds not yet taken, "
                                f"past the max_inflight_handles of {self.local.max_inflight_handles}")
        self._recv_handles += handles

    def received_request(self, request_id: int, handles: int = 0) -> None:
        if self._requests_in >= self.local.max_pending_requests:
            raise ProtocolError(f"more than the announced max_pending_requests of {self.local.max_pending_requests} "
                                "requests awaiting a reply")
        if handles:
            self._take_handles(handles)
            self._request_handles_in[request_id] = handles
        self._requests_in += 1

    def replied(self, request_id: int) -> None:
        """We answered (or will never answer: the connection ends) request ``request_id``."""
        self._requests_in -= 1
        self._recv_handles -= self._request_handles_in.pop(request_id, 0)

    def reply_unsent(self, request_id: int, handles: int = 0) -> None:
        """Our reply to ``request_id`` never left (nothing written): the request is owed again."""
        self._requests_in += 1
        if handles:
            self._request_handles_in[request_id] = handles
            self._recv_handles += handles

    def received_datagram(self, handles: int = 0) -> None:
        if self._recv_datagrams >= self.local.max_queued_datagrams:
            raise ProtocolError(f"more than the announced max_queued_datagrams of {self.local.max_queued_datagrams} "
                                "datagrams not yet taken")
        if handles:
            self._take_handles(handles)
        self._recv_datagrams += 1

    def incoming_room(self) -> int:
        """How many more datagrams (without fds) the peer may send before it breaks our window."""
        return self.local.max_queued_datagrams - self._recv_datagrams

    def received_datagrams(self, count: int) -> None:
        """``count`` datagrams without fds arrived; the caller checked ``datagram_room`` first."""
        self._recv_datagrams += count

    def consumed_datagrams(self, count: int) -> None:
        """The application took ``count`` datagrams without fds from the queue."""
        self._owed += count
        self.credit_due = self._owed >= self._credit_due_at or self._owed_handles > 0

    def consumed_datagram(self, handles: int = 0) -> None:
        """The application took a datagram (carrying ``handles`` fds) from the queue."""
        self._owed += 1
        self._owed_handles += handles
        self.credit_due = self._owed >= self._credit_due_at or self._owed_handles > 0

    def unconsumed_datagram(self, handles: int = 0) -> None:
        """A datagram counted by ``consumed_datagram`` went back to the queue untaken: its slot
        is not free after all (else it is credited again when taken again, and the peer, told
        of more than it sent, drops the connection)."""
        self._owed -= 1
        self._owed_handles -= handles
        self.credit_due = self._owed >= self._credit_due_at or self._owed_handles > 0

    @property
    def credit_owed(self) -> bool:
        return self._owed > 0

    def take_credit(self) -> tuple[int, int]:
        """The credit to send now (datagrams, fds); call ``restore_credit`` if it could not be sent."""
        credit = (self._owed, self._owed_handles)
        self._recv_datagrams -= self._owed
        self._recv_handles -= self._owed_handles
        self._owed = self._owed_handles = 0
        self.credit_due = False
        return credit

    def restore_credit(self, credit: tuple[int, int]) -> None:
        datagrams, handles = credit
        self._recv_datagrams += datagrams
        self._recv_handles += handles
        self._owed += datagrams
        self._owed_handles += handles
        self.credit_due = self._owed >= self._credit_due_at or self._owed_handles > 0


@dataclass(frozen=True)
class BrokerLimits:
    """Per-uid quotas the broker enforces, so one user cannot exhaust it for the others.

    ``max_connections_per_uid`` counts the sockets of that uid the broker
    holds at once (servers' registrations, connects not yet handed to a
    server, queries); ``max_ports_per_uid`` the ports that uid owns.
    """

    max_connections_per_uid: int = 1024
    max_ports_per_uid: int = 256

    def __post_init__(self) -> None:
        for name in ("max_connections_per_uid", "max_ports_per_uid"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= MAX_LIMIT:
                raise ValueError(f"BrokerLimits.{name} must be a positive int up to {MAX_LIMIT}, got {value!r}")


BROKER_DEFAULTS = BrokerLimits()


class UidUsage:
    """How much of the broker each uid holds: sockets and ports."""

    def __init__(self, limits: BrokerLimits) -> None:
        self.limits = limits
        self._connections: dict[int, int] = {}
        self._ports: dict[int, int] = {}

    def connections(self, uid: int) -> int:
        return self._connections.get(uid, 0)

    def ports(self, uid: int) -> int:
        return self._ports.get(uid, 0)

    def may_connect(self, uid: int) -> bool:
        return self.connections(uid) < self.limits.max_connections_per_uid

    def may_create_port(self, uid: int) -> bool:
        return self.ports(uid) < self.limits.max_ports_per_uid

    def add_connection(self, uid: int) -> None:
        self._connections[uid] = self.connections(uid) + 1

    def remove_connection(self, uid: int) -> None:
        left = self.connections(uid) - 1
        if left > 0:
            self._connections[uid] = left
        else:
            self._connections.pop(uid, None)

    def add_port(self, uid: int) -> None:
        self._ports[uid] = self.ports(uid) + 1

    def remove_port(self, uid: int) -> None:
        left = self.ports(uid) - 1
        if left > 0:
            self._ports[uid] = left
        else:
            self._ports.pop(uid, None)

    def uids(self) -> list[int]:
        return sorted(set(self._connections) | set(self._ports))
