"""Graceful broker restart: the running broker hands its sockets and state to a successor.

The successor (``alpc broker --replace``) connects to the running broker and
sends HANDOVER. The old broker stops serving, sends its listening socket, every
peer's socket (servers' registrations included) with the bytes it had half
read or not yet written, and its port table, in HANDOVER_STATE chunks of at
most ``FDS_PER_CHUNK`` fds (the kernel passes at most 253 per message). The
successor answers HANDOVER_DONE once it holds every fd; only then does the
old broker close its copies (silently: no peer sees an EOF, since the
successor holds the same sockets), release the runtime dir lock and hang up.
Until then nothing in the old broker changed, so a failed handover leaves it
serving as before. Connects made meanwhile wait in the listen backlog.

Identity is never taken from the state: the successor reads SO_PEERCRED from
each socket it receives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import control
from .config import Config
from .errors import AlpcError, BrokerUnavailable, ProtocolError
from .exchange import control_frame, read_frame
from .transport import Listener, Stream, close_fds, deadline_after, wait_readable
from .wire import FrameDecoder, FrameLimits, MessageType

__all__ = [
    "FDS_PER_CHUNK",
    "HANDOVER_TIMEOUT",
    "BrokerState",
    "ItemState",
    "PeerState",
    "PortState",
    "ROLES",
    "await_done",
    "receive_state",
    "request_handover",
    "send_state",
]

FDS_PER_CHUNK = 200
BYTES_PER_CHUNK = 4 * 1024 * 1024
HANDOVER_TIMEOUT = 10.0
ROLES = ("new", "server", "query")

_STATE_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.HANDOVER_STATE, MessageType.ERROR}),
    max_data=control.MAX_CONTROL_BODY, max_fds=FDS_PER_CHUNK + 1,
)
_DONE_LIMITS = FrameLimits(allowed_types=frozenset({MessageType.HANDOVER_DONE}), max_data=1024)


@dataclass
class ItemState:
    """Bytes queued for a peer; ``handoff`` is a client socket that still has to ride with them."""

    data: bytes
    handoff: Stream | None = None


@dataclass
class PeerState:
    stream: Stream
    role: str
    inbound: bytes = b""
    close_when_flushed: bool = False
    outbox: list[ItemState] = field(default_factory=list)


@dataclass
class PortState:
    name: str
    owner: int  # index into BrokerState.peers
    request: control.CreatePort
    connects_forwarded: int = 0
    quota_refusals: int = 0
    connects_refused: int = 0
    status: control.PortStatus | None = None


@dataclass
class BrokerState:
    listener: Listener
    peers: list[PeerState] = field(default_factory=list)
    ports: list[PortState] = field(default_factory=list)

    def close(self) -> None:
        """Close every fd of a state that will not be served (a failed handover, successor side)."""
        self.listener.close(unlink=False)
        for peer in self.peers:
            peer.stream.close()
            for item in peer.outbox:
                if item.handoff is not None:
                    item.handoff.close()


# -- the old broker's side -------------------------------------------------------------


class _Chunk:
    def __init__(self, with_listener: bool) -> None:
        self.listener = with_listener
        self.fds: list[int] = []
        self.peers: list[control.HandoverPeer] = []
        self.items: list[control.HandoverItem] = []
        self.item_fds: list[int] = []
        self.ports: list[control.HandoverPort] = []
        self.size = 0

    def full(self) -> bool:
        return len(self.fds) + len(self.item_fds) >= FDS_PER_CHUNK or self.size >= BYTES_PER_CHUNK


def _chunks(state: BrokerState) -> list[_Chunk]:
    chunks = [_Chunk(with_listener=True)]
    chunks[0].fds.append(state.listener.fileno())

    def current() -> _Chunk:
        if chunks[-1].full():
            chunks.append(_Chunk(with_listener=False))
        return chunks[-1]

    for index, peer in enumerate(state.peers):
        chunk = current()
        chunk.fds.append(peer.stream.fileno())
        chunk.peers.append(control.HandoverPeer(id=index, role=peer.role, inbound=peer.inbound,
                                                close_when_flushed=peer.close_when_flushed))
        chunk.size += len(peer.inbound)
        for item in peer.outbox:
            chunk = current()
            chunk.items.append(control.HandoverItem(peer=index, data=item.data, with_fd=item.handoff is not None))
            if item.handoff is not None:
                chunk.item_fds.append(item.handoff.fileno())
            chunk.size += len(item.data)
    for port in state.ports:
        chunk = current()
        status = control.encode_body(port.status) if port.status is not None else b""
        chunk.ports.append(control.HandoverPort(
            name=port.name, owner=port.owner, max_message_length=port.request.max_message_length,
            max_connect_data=port.request.max_connect_data,
            max_pending_connects=port.request.max_pending_connects,
            connects_forwarded=port.connects_forwarded, quota_refusals=port.quota_refusals,
            connects_refused=port.connects_refused, status=status, acl=port.request.acl,
            limits=port.request.limits))
        chunk.size += len(status) + 64
    return chunks


def send_state(stream: Stream, state: BrokerState, owns_socket_file: bool, deadline: float | None) -> None:
    """Send ``state`` in chunks; nothing of it is closed here."""
    chunks = _chunks(state)
    for number, chunk in enumerate(chunks):
        body = control.HandoverState(
            listener=chunk.listener, owns_socket_file=owns_socket_file, last=number == len(chunks) - 1,
            peers=tuple(chunk.peers), items=tuple(chunk.items), ports=tuple(chunk.ports))
        fds = chunk.fds + chunk.item_fds
        stream.send(control_frame(body, n_fds=len(fds)), fds=fds, deadline=deadline)


def await_done(stream: Stream, deadline: float | None) -> bool:
    """True once the successor confirmed it holds everything."""
    frame, _ = read_frame(stream, FrameDecoder(_DONE_LIMITS), deadline, "the successor's confirmation")
    if frame is None:
        return False
    control.decode_body(frame.type, frame.data, control.HandoverDone)
    return True


# -- the successor's side ------------------------------------------------------------------


def request_handover(config: Config, timeout: float = HANDOVER_TIMEOUT) -> BrokerState | None:
    """Take over the broker running on ``config``'s socket; None if none runs.

    On return the old broker has released the runtime dir lock and left its loop.
    """
    deadline = deadline_after(timeout)
    try:
        stream = Stream.connect(config.broker_socket, timeout)
    except BrokerUnavailable:
        return None
    try:
        stream.send(control_frame(control.Handover(pid=os.getpid())), deadline=deadline)
        state = receive_state(stream, deadline)
        try:
            stream.send(control_frame(control.HandoverDone(pid=os.getpid())), deadline=deadline)
            # The old broker hangs up after releasing its lock.
            if not wait_readable([stream.fileno()], deadline) or stream.recv(1) != b"":
                raise BrokerUnavailable("the old broker did not let go of the runtime dir in time")
        except BaseException:
            state.close()
            raise
    finally:
        stream.close()
    return state


def receive_state(stream: Stream, deadline: float | None) -> BrokerState:
    """Read every chunk; on any failure every fd received so far is closed."""
    decoder = FrameDecoder(_STATE_LIMITS)
    received: list[int] = []
    try:
        return _assemble(stream, decoder, deadline, received)
    except BaseException:
        decoder.close_fds()
        close_fds(received)
        raise


def _assemble(stream: Stream, decoder: FrameDecoder, deadline: float | None, received: list[int]) -> BrokerState:
    listener_fd = -1
    peers: dict[int, tuple[int, control.HandoverPeer]] = {}
    items: list[tuple[control.HandoverItem, int]] = []
    ports: list[control.HandoverPort] = []
    owns_file = False
    while True:
        frame, _ = read_frame(stream, decoder, deadline, "the broker's state", max_fds=FDS_PER_CHUNK + 1)
        if frame is None:
            raise BrokerUnavailable("the old broker went away during the handover")
        fds = list(frame.fds)
        received.extend(fds)
        if frame.type is MessageType.ERROR:
            raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
        chunk = control.decode_body(frame.type, frame.data, control.HandoverState)
        wanted = int(chunk.listener) + len(chunk.peers) + sum(item.with_fd for item in chunk.items)
        if len(fds) != wanted:
            raise ProtocolError(f"a handover chunk announced {wanted} fds but carried {len(fds)}")
        if chunk.listener:
            if listener_fd >= 0:
                raise ProtocolError("two listening sockets in one handover")
            listener_fd = fds.pop(0)
            owns_file = chunk.owns_socket_file
        for peer in chunk.peers:
            if peer.id in peers or peer.role not in ROLES:
                raise ProtocolError(f"bad handover peer {peer.id} ({peer.role!r})")
            peers[peer.id] = (fds.pop(0), peer)
        for item in chunk.items:
            items.append((item, fds.pop(0) if item.with_fd else -1))
        ports.extend(chunk.ports)
        if chunk.last:
            break
    if listener_fd < 0:
        raise ProtocolError("the handover carried no listening socket")
    return _build(listener_fd, owns_file, peers, items, ports)


def _build(listener_fd: int, owns_file: bool, peers: dict[int, tuple[int, control.HandoverPeer]],
           items: list[tuple[control.HandoverItem, int]], ports: list[control.HandoverPort]) -> BrokerState:
    for item, _ in items:
        if item.peer not in peers:
            raise ProtocolError(f"a handover item names unknown peer {item.peer}")
    if len({port.name for port in ports}) != len(ports) or len({port.owner for port in ports}) != len(ports):
        raise ProtocolError("a handover names a port, or a port's owner, twice")
    for port in ports:
        if port.owner not in peers or peers[port.owner][1].role != "server":
            raise ProtocolError(f"handover port {port.name!r} names a bad owner")
    order = sorted(peers)
    index = {peer_id: position for position, peer_id in enumerate(order)}
    wrapped: list[Stream] = []
    try:
        for peer_id in order:
            wrapped.append(Stream.from_fd(peers[peer_id][0]))
        handoffs: dict[int, Stream] = {}
        for _, fd in items:
            if fd >= 0:
                handoffs[fd] = Stream.from_fd(fd)
                wrapped.append(handoffs[fd])
        listener = Listener.from_fd(listener_fd)
    except BaseException:
        for stream in wrapped:  # the caller closes the raw fds, once
            stream.detach()
        raise
    listener.owns_file = owns_file and listener.path is not None
    state = BrokerState(listener)
    for position, peer_id in enumerate(order):
        info = peers[peer_id][1]
        state.peers.append(PeerState(wrapped[position], info.role, info.inbound, info.close_when_flushed))
    for item, fd in items:
        state.peers[index[item.peer]].outbox.append(ItemState(item.data, handoffs.get(fd)))
    for port in ports:
        status = None
        if port.status:
            try:
                status = control.decode_body(MessageType.PORT_STATUS, port.status, control.PortStatus)
            except AlpcError:
                status = None
        request = control.CreatePort(name=port.name, max_message_length=port.max_message_length,
                                     max_connect_data=port.max_connect_data,
                                     max_pending_connects=port.max_pending_connects, acl=port.acl,
                                     limits=port.limits)
        state.ports.append(PortState(port.name, index[port.owner], request, port.connects_forwarded,
                                     port.quota_refusals, port.connects_refused, status))
    return state
