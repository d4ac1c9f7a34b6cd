"""The server side of the blocking API: connection ports, connection requests, create_port().

A ``ConnectionPort`` owns a named port's link to the broker and every
communication port accepted on it. ``wait`` multiplexes all of them through
one epoll set kept for the port's lifetime (thousands of clients cost
nothing per wait) and a queue of the connections that have messages, served
round-robin.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import NoReturn, Protocol

from . import control, qlpc
from .config import Config, PortAttributes, attributes_or_default, config_or_default
from .connection import NOTICES
from .control import validate_port_name
from .errors import ConnectionClosed, MessageTooLarge, PeerGone, ProtocolError, QuotaExceeded, Timeout
from .exchange import control_frame
from .ledger import Budget
from .logs import LogLimiter, fields
from .port import _CLOSE_FLUSH_TIMEOUT, CommunicationPort
from .protocol import Channel, ConnectionPolicy, Message
from .quotas import FlowLimits, Limit
from .registration import Registration
from .section import ConnectionSections
from .security import PeerCred, kinds_from_mask, kinds_mask
from .stats import ConnectionStats, LiveConnection, PortStatistics, section_bytes_in_use
from .transport import (
    Poller,
    SpinBudget,
    Stream,
    close_fds,
    deadline_after,
    process_id,
    wait_readable,
    wait_readable_or_hangup,
)
from .wire import Frame

__all__ = ["CANNOT_ACCEPT", "ConnectionPort", "ConnectionRequest", "ForeignConnection", "create_port"]


class ForeignConnection(Protocol):
    """A connection another driver (aio) accepted on a port: counted toward its
    max_connections, reported to the broker with the port's own, and asked for its idle
    sections when another connection waits for the port's section budget."""

    stats: ConnectionStats
    _channel: Channel

    @property
    def peer(self) -> PeerCred: ...

    @property
    def queue_depth(self) -> int: ...

    def _give_back_idle_sections(self) -> None:
        """Called from any thread; must not wait."""

log = logging.getLogger(__name__)
# What a client hears when the server's accept of it failed (out of fds, say).
CANNOT_ACCEPT = "the server could not accept the connection"
# What a client hears when the server dropped its connection request unanswered.
DROPPED_UNANSWERED = "the server dropped the connection request unanswered"
# A hostile client reconnecting again and again must not flood the server's log.
_limited = LogLimiter(log)


class ConnectionRequest:
    """A client asking to connect; ``client`` is its kernel-verified identity.

    ``groups`` are its supplementary groups (SO_PEERGROUPS). The port's ACL
    has admitted it already (the broker checked, and this runtime again).
    """

    def __init__(self, port: ConnectionPort, stream: Stream, info: control.ConnectionRequestInfo,
                 client: PeerCred, groups: tuple[int, ...], peer_flow: FlowLimits) -> None:
        self._port = port
        self._stream: Stream | None = stream
        self.client = client
        self.groups = groups
        # Every read of the channel brings the sender's SCM_CREDENTIALS from now on.
        stream.set_passcred(True)
        try:
            self._pidfd = stream.peer_pidfd()
        except ProcessLookupError:
            self._pidfd = None  # gone already (a kernel without SO_PEERPIDFD): the socket's EOF tells
        self.data = info.data
        self.port_name = info.name
        self._client_max_message = info.max_message_length
        self._client_max_sections = info.max_section_bytes
        self._peer_flow = peer_flow
        self._peer_kinds = kinds_from_mask(info.flow.handle_kinds)
        self._quick_asked = info.quick

    def __repr__(self) -> str:
        return f"<ConnectionRequest to {self.port_name!r} from pid {self.client.pid} uid {self.client.uid}>"

    def _take_stream(self) -> Stream:
        stream = self._take_unanswered()
        if stream is None:
            # The port's close() answered it (a rejection): the port is closed under this
            # thread, as for any other call on it; else the application answered it already.
            self._port._check_open()
            raise ValueError("this connection request was already answered")
        return stream

    def _take_unanswered(self) -> Stream | None:
        """The request's socket, taken from it; None if another thread answered it first.

        Under the port's lock: the application's accept() or reject() and the port's close()
        may answer it at the same moment, and exactly one of them may take it."""
        with self._port._lock:
            stream, self._stream = self._stream, None
            if stream is not None:
                self._port._forget_request(self)
        return stream

    def accept(self, data: bytes = b"", timeout: float | None = 5.0) -> CommunicationPort:
        """Accept: the client's connect() returns with ``data`` as its accept_data."""
        stream, channel, pidfd, quick = self.accept_channel(data, timeout)
        return self._port._adopt(stream, channel, pidfd, quick)

    def accept_channel(self, data: bytes = b"", timeout: float | None = 5.0, *, quick_ok: bool = True
                       ) -> tuple[Stream, Channel, int | None, qlpc.QuickLink | None]:
        """Answer the client and build the channel; a driver (blocking or asyncio) adopts it.

        With ``quick_ok`` (the blocking driver) a port that offers Quick-LPC rings
        (``qlpc.offered_by``) offers them to a client that asked.
        """
        data = bytes(data)
        if len(data) > self._port.config.max_connect_data:
            raise MessageTooLarge(f"accept data of {len(data)} bytes exceeds {self._port.config.max_connect_data}")
        stream = self._take_stream()
        pidfd, self._pidfd = self._pidfd, None
        attributes = self._port.attributes
        local_flow = attributes.flow_limits()
        quick: qlpc.QuickLink | None = None
        try:
            quick, ring_fds = self._port._offer_rings(stream, pidfd, self._quick_asked) if quick_ok else (None, [])
            reply = control.ConnectionReply(accepted=True, data=data, reason="",
                                            max_message_length=attributes.max_message_length,
                                            inline_threshold=attributes.inline_threshold,
                                            max_section_bytes=attributes.max_section_bytes,
                                            secure_views=attributes.secure_views,
                                            flow=control.FlowSpec.of(local_flow, kinds_mask(attributes.handle_kinds)),
                                            quick_slots=attributes.quick_slots if quick else 0,
                                            quick_slot_size=attributes.quick_slot_size if quick else 0)
            try:
                stream.send(control_frame(reply, n_fds=len(ring_fds)), ring_fds, deadline=deadline_after(timeout))
            except (ConnectionClosed, Timeout):
                raise PeerGone(f"client pid {self.client.pid} went away before the accept") from None
            finally:
                # The client holds its own copy now (the rings stay mapped on our side).
                close_fds(ring_fds)
            sections = ConnectionSections.build(
                inline_threshold=attributes.inline_threshold,
                send_quota=min(attributes.max_section_bytes, max(self._client_max_sections, 0)),
                recv_quota=attributes.max_section_bytes, max_length=attributes.max_message_length,
                section_size=attributes.section_size, backend=attributes.section_backend,
                allow_unsealed=attributes.allow_unsealed_sections, secure=attributes.secure_views,
                budget=self._port._section_budget, direct_memory=attributes.direct_memory,
            )
            policy = ConnectionPolicy(local=local_flow, peer=self._peer_flow, accept_kinds=attributes.accept_kinds(),
                                      peer_kinds=self._peer_kinds,
                                      refuse_identity_change=attributes.refuse_identity_change)
            channel = Channel(self.client, send_limit=self._client_max_message,
                              recv_limit=attributes.max_message_length, local_pid=os.getpid(), sections=sections,
                              policy=policy)
            self._port._stats.connects_accepted += 1
            return stream, channel, pidfd, quick
        except BaseException:
            # Whatever failed (a send error other than the peer going, building the
            # channel), nobody else will close what this request took.
            if quick is not None:
                quick.close()
            stream.close()
            close_fds([pidfd] if pidfd is not None else [])
            raise

    def reject(self, reason: str = "rejected") -> None:
        """Refuse: the client's connect() raises ConnectionRejected carrying ``reason``."""
        self._refuse(self._take_stream(), reason)

    def _refuse(self, stream: Stream, reason: str) -> None:
        self._port._stats.connects_rejected += 1
        reply = control.ConnectionReply(accepted=False, data=b"", reason=str(reason)[:control.MAX_REJECT_REASON],
                                        max_message_length=0)
        try:
            stream.try_send(control_frame(reply))
        except ConnectionClosed:
            pass
        finally:
            stream.close()
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def close(self, reason: str = "the server closed the port") -> None:
        """Drop an unanswered request (the client's connect raises ConnectionRejected with ``reason``)."""
        stream = self._stream
        if stream is not None and stream.inherited:
            self._let_go()  # the parent's request: its answer is the parent's to give
            return
        # Taken, not checked then rejected: an accept() or reject() on another thread may
        # answer it meanwhile (ConnectionPort.close() runs this outside the port's lock), and
        # its answer stands; reject() would raise "already answered" out of the port's close().
        stream = self._take_unanswered()
        if stream is not None:
            self._refuse(stream, reason)

    def _let_go(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        self._close_pidfd()

    def __del__(self) -> None:
        # Dropped unanswered (an exception path, a forgotten variable): the client hears a
        # rejection now instead of waiting out its connect timeout, and the port (which holds
        # unanswered requests weakly) no longer counts it toward max_connections. A finalizer
        # may run on any thread, one holding the port's lock included: no lock, no wait, only
        # a non-blocking write and closes. A forked child's copy is the parent's to answer.
        stream = getattr(self, "_stream", None)  # None too when __init__ failed early
        if stream is None:
            return
        self._stream = None
        try:
            if not stream.inherited:
                self._port._stats.connects_rejected += 1
                reply = control.ConnectionReply(accepted=False, data=b"", reason=DROPPED_UNANSWERED,
                                                max_message_length=0)
                stream.try_send(control_frame(reply))
        except (ConnectionClosed, OSError):
            pass  # the client is gone already
        finally:
            stream.close()
            self._close_pidfd()


def create_port(
    name: str,
    attributes: PortAttributes | None = None,
    *,
    config: Config | None = None,
    timeout: float | None = None,
    reregister_timeout: float = 60.0,
    report_interval: float = 1.0,
) -> ConnectionPort:
    """Create a named connection port through the broker.

    Raises NameInUse if a live port has the name, InvalidName for a bad name,
    BrokerUnavailable if no broker runs. If the broker goes away later, the
    port registers its name again by itself, with backoff, for up to
    ``reregister_timeout`` seconds (0: never); established connections keep
    working meanwhile. ``report_interval`` is how often the port reports its
    figures to the broker (``alpc peers``, ``alpc stats``).
    """
    config = config_or_default(config)
    attributes = attributes_or_default(attributes)
    validate_port_name(name)
    timeout = config.connect_timeout if timeout is None else timeout
    link = Registration(name, attributes, config, reregister_timeout=reregister_timeout,
                        report_interval=report_interval)
    try:
        link.open(timeout)
        # Building the port can fail too (its epoll set and eventfd: EMFILE, ENOMEM): the
        # link's fds (its eventfds have no finalizer) and the name go back at once then.
        port = ConnectionPort(name, link, attributes, config)
    except BaseException:
        link.close()
        raise
    link.start(port._status, port._drain_registration)
    return port


class ConnectionPort:
    """A named server port: listen for connections and wait on every client at once.

    If the broker goes away, the port keeps serving its established
    connections and registers its name again when the broker is back. Should
    that fail (the timeout ran out, or another process took the name
    meanwhile), ``listen`` raises the error (BrokerUnavailable or NameInUse)
    and ``wait`` raises it once, then goes on delivering messages.
    """

    def __init__(self, name: str, link: Registration, attributes: PortAttributes, config: Config) -> None:
        self.name = name
        self.attributes = attributes
        self.config = config
        self._link = link
        self._lock = threading.RLock()
        self._requests: deque[ConnectionRequest] = deque()
        # Weakly: a request the application drops unanswered is rejected by its finalizer
        # rather than held (with its client waiting, and counted toward max_connections) for ever.
        self._unanswered: weakref.WeakSet[ConnectionRequest] = weakref.WeakSet()
        # Insertion-ordered set of the accepted connections.
        self._connections: dict[CommunicationPort, None] = {}
        # Connections another driver (aio) accepted on this port: counted by max_connections.
        self._foreign: set[ForeignConnection] = set()
        self._owners: dict[int, CommunicationPort] = {}
        self._poller = Poller()
        # Threads polling the set without the lock (_poll): close() must not free its number
        # under them (the next file opened would get it, and they would sleep on it), so the
        # last of them closes it; close() wakes them through this eventfd in the set (a port
        # that lost its registration for good has no link fd to wake them).
        self._pollers: list[None] = []  # append/pop are atomic: letting go takes no lock
        # Threads in wait() that armed the rings and have not left their poll() yet: a take from
        # an armed ring by another thread (a receive() on that connection) ends the arm under
        # them, and nothing else would wake them to arm it again (the client rings no doorbell
        # for an unarmed ring). That thread writes ``_rearm`` (in the set, made with the port
        # where it may offer rings: made later, it would look like a leaked fd), and they arm afresh.
        self._armed_by: set[int] = set()
        # Held across a write of _rearm and across its close (a leaf lock: nothing is taken
        # under it), so a write never lands on its number once another file has it.
        self._rearm_lock = threading.Lock()
        self._rearm: int | None = None
        woken = None
        try:
            woken = self._registered_eventfd()
            if attributes.quick_lpc is not False and qlpc.available():
                self._rearm = self._registered_eventfd()
        except BaseException:
            self._poller.close()
            if woken is not None:
                os.close(woken)
            raise
        self._woken = woken
        # How long wait() spins before it sleeps, from how soon events came lately.
        self._spin = SpinBudget()
        # Connections whose inbox got something since they were last served.
        self._ready: deque[CommunicationPort] = deque()
        # One message per connection at a time (an ordered CompletionPort, _take_turns): the
        # connections whose message is out. Their next messages stay in their inboxes, holding
        # their window slots, until _next_in_turn hands them to the thread whose turn it is.
        self._turns = False
        self._in_turn: set[CommunicationPort] = set()
        # The connection that brought the last two messages: the next wait reads its
        # socket in the same call that waits for everything else (one system call, as
        # a plain receive() has), betting that it speaks next.
        self._last_from: CommunicationPort | None = None
        self._hint: CommunicationPort | None = None
        self._stats = PortStatistics()
        self._error_reported = False
        self._closed = False
        self._pid = process_id()  # a child forked since holds copies of the port (close: _let_go)
        self._section_budget = Budget(attributes.max_port_section_bytes)
        # Quick-LPC: the watcher thread lives as long as a port offering the rings;
        # the connections with rings are looked at on every wait.
        # (A port left at its defaults holds it from its first ring connection on: an asyncio
        # port or a wait() loop never gives rings, and would keep a thread and two fds for nothing.)
        self._quick_held = attributes.quick_lpc is True and qlpc.hold_watcher()
        self._quick_comms: set[CommunicationPort] = set()
        # Set by the first wait(): a port left at its defaults offers rings no more (_offer_rings).
        self._multiplexed = False
        # Those whose ring may have left the armed state since wait() last armed it
        # (QuickLink.on_take): arming only these keeps a wait O(active), not O(clients).
        self._quick_unarmed: deque[weakref.ref[CommunicationPort]] = deque()

    def __repr__(self) -> str:
        return f"<ConnectionPort {self.name!r} with {len(self._connections)} clients>"

    @property
    def connections(self) -> list[CommunicationPort]:
        with self._lock:
            return list(self._connections)

    @property
    def rings_held(self) -> int:
        """How many of its connections have Quick-LPC rings."""
        with self._lock:
            return len(self._quick_comms)

    @property
    def registered(self) -> bool:
        """Whether the broker knows this port now (False during a broker restart)."""
        return self._link.live

    @property
    def registrations(self) -> int:
        """How many times the name was registered: 1, plus one per re-registration."""
        return self._link.registrations

    # -- connection requests ---------------------------------------------------

    def listen(self, timeout: float | None = None) -> ConnectionRequest:
        """Wait for the next connection request."""
        deadline = deadline_after(timeout)
        if process_id() != self._pid:
            self._refuse_child()
        while True:
            with self._lock:
                request = self._next_request()
                if request is not None:
                    return request
                # Held: a close() meanwhile must not free the number this thread polls.
                fds = self._link.hold_fds()
            try:
                fired = wait_readable(fds, deadline)
            finally:
                self._link.release_fds()
            if not fired:
                raise Timeout("no connection request arrived in time")
            with self._lock:
                self._read_registration()

    def _next_request(self) -> ConnectionRequest | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        error = self._link.error
        if error is not None:
            raise type(error)(*error.args)
        return None

    def _refuse_child(self) -> NoReturn:
        # Two processes reading one broker link split its frames (and the client fds they
        # carry) between them, and the broker drops the name when the creator exits anyway.
        raise ConnectionClosed(f"port {self.name!r} belongs to pid {self._pid}: a forked child cannot "
                               "serve it (create the port in the process that serves it)")

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"port {self.name!r} is closed")

    def _read_registration(self) -> None:
        # Caller holds _lock.
        if self._closed:
            return
        for frame in self._link.read():
            self._handle_registration_frame(frame)

    def _drain_registration(self) -> None:
        """The keeper saw the broker hang up: take what it sent before, and notice the EOF."""
        with self._lock:
            self._read_registration()

    def _handle_registration_frame(self, frame: Frame) -> None:
        try:
            info = control.decode_body(frame.type, frame.data, control.ConnectionRequestInfo)
            control.check_connect_limits(info)  # checked by the broker too; the client is not trusted
            peer_flow = info.flow.limits()
            stream = Stream.from_fd(frame.fds[0])
        except (ProtocolError, OSError) as exc:
            close_fds(frame.fds)
            log.error("bad connection request from the broker: %s", exc, extra=fields(port=self.name))
            return
        if wait_readable_or_hangup([], [stream.fileno()], 0.0):
            # The client already gave up (timeout or death); nobody to answer. (Bytes it
            # wrote right behind its CONNECT are not a hang-up: they are the channel's.)
            stream.close()
            return
        try:
            client, groups = stream.peer_cred(), stream.peer_groups()
        except OSError:
            stream.close()
            return
        refusal = self._refusal(client, groups)
        if refusal is not None:
            self._turn_away(stream, client, *refusal)
            return
        request = ConnectionRequest(self, stream, info, client, groups, peer_flow)
        self._unanswered.add(request)
        self._requests.append(request)

    def _refusal(self, client: PeerCred, groups: tuple[int, ...]) -> tuple[str, str, str] | None:
        """Why this runtime refuses a client before the application sees it: (code, message, limit).

        The broker checked the ACL already; checking again here, against the
        kernel's identity of the very socket we were handed, keeps the port
        closed even to a broker that erred.
        """
        decision = self.attributes.acl.check(client, groups, os.geteuid())
        if not decision.allowed:
            self._stats.connects_rejected += 1
            return control.ErrorCode.ACCESS_DENIED, f"access to port {self.name!r} denied: {decision.reason}", ""
        held = len(self._connections) + len(self._foreign) + len(self._unanswered)
        if held >= self.attributes.max_connections:
            self._stats.connects_rejected += 1
            self._stats.quota_refusals += 1
            return (control.ErrorCode.BUSY, f"port {self.name!r} has {held} connections, its max_connections",
                    Limit.MAX_CONNECTIONS)
        return None

    def _turn_away(self, stream: Stream, client: PeerCred, code: str, message: str, limit: str) -> None:
        _limited.log(logging.WARNING, ("refused", code, client.uid), f"refused pid {client.pid} uid {client.uid}: "
                     f"{message}", extra=fields(port=self.name, pid=client.pid, uid=client.uid))
        try:
            stream.try_send(control_frame(control.ErrorReply(code=code, message=message, limit=limit)))
        except ConnectionClosed:
            pass
        stream.close()

    def _forget_request(self, request: ConnectionRequest) -> None:
        with self._lock:
            self._unanswered.discard(request)

    def _hold_foreign(self, connection: ForeignConnection) -> None:
        """Another driver (aio) accepted ``connection`` here: it counts toward max_connections
        and appears in the port's reports (``alpc peers``, ``alpc stats``)."""
        with self._lock:
            self._foreign.add(connection)
        self._link.report_soon()

    def _drop_foreign(self, connection: ForeignConnection) -> None:
        with self._lock:
            if connection in self._foreign:
                self._foreign.discard(connection)
                self._stats.retire(connection.stats)
        self._link.report_soon()

    # -- communication ports ----------------------------------------------------

    def _adopt(self, stream: Stream, channel: Channel, pidfd: int | None,
               quick: qlpc.QuickLink | None = None) -> CommunicationPort:
        comm = CommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=True, on_gone=self._forget,
                                 send_timeout=self.attributes.send_timeout, quick=quick)
        comm._on_ready = self._ready.append  # the port sets comm._queued first (once, not per message)
        comm._on_budget_blocked = self._budget_blocked
        try:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._hold(comm, quick)
        except BaseException:
            # Watching its fds failed (epoll_ctl: ENOSPC past max_user_watches, ENOMEM): nobody
            # would ever read or close it, and its client, told it was accepted, would wait on
            # it. Closing tells the client and takes it out of every table (_forget).
            comm.close()
            raise
        if closed:
            # close() ran while this accept was writing its reply: it could not close this one.
            comm.close()
            raise ConnectionClosed(f"port {self.name!r} is closed")
        self._link.report_soon()
        return comm

    def _budget_blocked(self, asker: CommunicationPort | ForeignConnection) -> None:
        """``asker``'s send waits for the port's section budget: the other connections, of
        either driver (they share the budget), give back their idle pooled sections (nothing
        else would ever free that part of it)."""
        with self._lock:
            others: list[CommunicationPort | ForeignConnection] = [*self._connections, *self._foreign]
        for comm in others:
            if comm is not asker:
                comm._give_back_idle_sections()

    def _hold(self, comm: CommunicationPort, quick: qlpc.QuickLink | None) -> None:
        """Count ``comm`` among the port's connections and watch its fds (caller holds _lock)."""
        self._connections[comm] = None
        if quick is not None:
            self._quick_comms.add(comm)
            mark = functools.partial(self._quick_unarmed_by, weakref.ref(comm))
            quick.on_take = mark
            self._quick_unarmed.append(weakref.ref(comm))
        for fd in comm.wait_fds():
            self._owners[fd] = comm
            self._poller.register(fd)

    def _forget(self, comm: CommunicationPort) -> None:
        # Called before the comm closes its fds, so a reused fd number never meets a stale entry.
        with self._lock:
            if self._last_from is comm:
                self._last_from = None
            if self._hint is comm:
                self._hint = None  # its fds leave the set below
            if comm in self._quick_comms:
                self._quick_comms.discard(comm)
                self._drop_unarmed(comm)
            self._in_turn.discard(comm)
            if comm._queued and not comm.has_ready_message():
                # Nothing left to take: only a wait() would ever pop it.
                comm._queued = False
                try:
                    self._ready.remove(comm)
                except ValueError:
                    pass  # a wait() popped it meanwhile
            if comm in self._connections:
                del self._connections[comm]
                self._stats.retire(comm.stats)
            for fd in comm._fds():
                if self._owners.get(fd) is comm:
                    del self._owners[fd]
                    self._poller.unregister(fd)
        self._link.report_soon()

    def _drop_unarmed(self, comm: CommunicationPort) -> None:
        """Take ``comm`` (and references to connections gone) out of ``_quick_unarmed`` (caller
        holds _lock): only wait() pops it, and a server that never calls it would keep an entry
        per connection it ever had. Rotated in place, not rebuilt: a ring's ``on_take`` appends
        from any thread without the lock, and a mark lost would leave its ring never armed."""
        pending = self._quick_unarmed
        for _ in range(len(pending)):
            ref = pending.popleft()
            held = ref()
            if held is not None and held is not comm:
                pending.append(ref)

    def _status(self) -> control.PortStatus:
        """The report the keeper sends the broker: every client and the port's counters."""
        with self._lock:
            for comm in self._quick_comms:
                if comm._quick is not None:
                    comm._quick.fold_served(comm)  # what a serve_requests() loop answered so far
            connections: list[CommunicationPort | ForeignConnection] = [*self._connections, *self._foreign]
            live = [LiveConnection(comm.peer, comm.stats, comm.queue_depth,
                                   section_bytes_in_use(comm._channel.sections)) for comm in connections]
            return self._stats.report(live)

    def wait(self, timeout: float | None = None) -> ConnectionRequest | Message:
        """The next event on this port: a connection request, or a message from any client.

        Messages carry ``message.port``, the communication port to answer on.
        Client death and close arrive as CLIENT_DIED / PORT_CLOSED messages.
        """
        deadline = deadline_after(timeout)
        if process_id() != self._pid:
            self._refuse_child()
        # A multiplexing server from now on: see _offer_rings.
        self._multiplexed = True
        me = threading.get_ident()
        while True:
            with self._lock:
                ready = self._next_event()
                armed = ready is None and bool(self._quick_comms)
                if armed:
                    self._armed_by.add(me)  # (with the arming: see _quick_unarmed_by)
                hot = self._quick_armed() if armed else []
            if isinstance(ready, Message):
                # A datagram's credit once due, answers to expired requests, the socket after a notice.
                ready.port._after_take()
            if ready is not None:
                return ready
            try:
                polled = self._poll(0.0 if hot else deadline)
            except BaseException:
                # Armed with requests waiting, and off the arm queue: unpumped, no doorbell would
                # ever tell of them (their clients wait for those replies). The next wait pumps them.
                self._quick_unarmed.extend(weakref.ref(comm) for comm in hot)
                raise
            finally:
                if armed:
                    self._armed_by.discard(me)
            for comm in hot:
                comm.pump()
            if not polled and not hot:
                raise Timeout("nothing arrived on the port in time")

    def _offer_rings(self, stream: Stream, pidfd: int | None, asked: bool) -> tuple[qlpc.QuickLink | None, list[int]]:
        """Quick-LPC: the rings to offer with an accept (and the fd to pass), if this port offers
        them and the client asked for them.

        A port left at its defaults offers them within qlpc.ring_budget(), to a client whose pidfd
        it holds (nothing to attest its ring messages with otherwise), and only until it is first
        used with wait(): a multiplexing server sleeps in poll() on the sockets, so every ring post
        to it would need a doorbell frame on the socket too (more work than the socket alone: an
        RPC round trip took 1.6x as long), while a thread blocked on one connection takes ring
        requests straight from the futex."""
        attributes = self.attributes
        if not asked or not qlpc.offered_by(attributes):
            return None, []
        if attributes.quick_lpc is None and (pidfd is None or self._multiplexed
                                             or self.rings_held >= qlpc.ring_budget()):
            return None, []
        try:
            self._keep_quick_watcher()
            quick, fd = qlpc.offer(attributes.quick_slots, attributes.quick_slot_size, attributes.quick_spin_us,
                                   stream.fileno(), pidfd)
        except (QuotaExceeded, OSError) as exc:
            log.warning("cannot offer Quick-LPC rings, the connection uses its socket: %s", exc)
            return None, []
        return quick, [fd]

    def _keep_quick_watcher(self) -> None:
        """From its first ring connection on, a port keeps the C watcher thread, so clients
        coming and going do not start and stop a thread each (close() lets it go)."""
        with self._lock:
            if not self._quick_held and not self._closed:
                self._quick_held = qlpc.hold_watcher()

    def _registered_eventfd(self) -> int:
        """A new eventfd in the port's set (closed again if the set refuses it)."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._poller.register(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _quick_unarmed_by(self, comm: weakref.ref[CommunicationPort]) -> None:
        """QuickLink.on_take: ``comm``'s ring left the armed state (any thread). A wait() of
        another thread that armed it sleeps in poll() deaf to it now: wake it to arm it again."""
        self._quick_unarmed.append(comm)
        armed_by = self._armed_by
        if armed_by and (len(armed_by) > 1 or threading.get_ident() not in armed_by):
            with self._rearm_lock:
                if self._rearm is not None:  # (None once the port freed its set)
                    try:
                        os.eventfd_write(self._rearm, 1)
                    except OSError as exc:  # (a counter at its limit: the waiter wakes anyway)
                        log.debug("cannot wake a port's wait() to arm its rings again: %s", exc)

    def _quick_armed(self) -> list[CommunicationPort]:
        """Quick-LPC: have every client whose ring is not armed ring its doorbell from now on;
        those whose ring already holds requests. A ring stays armed until the client rings or
        this side takes from it, which puts it back in ``_quick_unarmed``."""
        pending = self._quick_unarmed
        hot: list[CommunicationPort] = []
        while pending:
            comm = pending.popleft()()
            if comm is not None and comm in self._quick_comms and comm._quick is not None and comm._quick.arm():
                hot.append(comm)
        return hot

    def _poll(self, deadline: float | None) -> bool:
        """Wait for the broker link or any connection, and read what came; False on timeout."""
        with self._lock:
            self._check_open()
            link = self._link.hold_fds()  # a close() meanwhile must not free the number polled
            self._pollers.append(None)  # nor the set's
        try:
            return self._wait_and_read(link, deadline)
        finally:
            self._link.release_fds()
            self._pollers.pop()
            if self._closed and not self._pollers:
                with self._lock:
                    if not self._pollers:
                        self._free_poller()

    def _wait_and_read(self, link: list[int], deadline: float | None) -> bool:
        # The link's fd changes across broker restarts, so it is watched beside
        # the epoll set rather than kept in it.
        spin = self._spin.next() if deadline is None or deadline > time.monotonic() else 0
        started = time.monotonic_ns()
        link_fd = link[0] if link else -1
        hint = self._hint
        read_hint = False
        if hint is not None:
            try:
                read, watched = hint.read_first(self._poller.fileno(), link_fd, deadline, spin)
            except OSError:
                read, watched = None, True  # it closed meanwhile: the set says what happened
            if read is None:
                if not watched:
                    with self._lock:  # another thread reads it: the set watches it again
                        if self._hint is hint:
                            self._set_hint(None)
                # else the set fired: it is looked at below, and answers at once
            else:
                self._spin_waited(started, read)
                if not (read and watched):
                    return read
                # Something else is ready too: take it now, without waiting.
                read_hint, deadline, spin = True, 0.0, 0
        try:
            got = self._poller.wait(link_fd, deadline, spin)
        except (OSError, ValueError):
            with self._lock:
                self._check_open()  # close() ran while this thread waited
            raise
        if not read_hint:
            self._spin_waited(started, got is not None)
        if got is None:
            return read_hint
        ready, link_fired = got
        if link_fired:
            with self._lock:
                self._read_registration()
        owners = self._owners
        in_turn = self._in_turn
        for fd in ready:
            owner = owners.get(fd)
            if owner is not None:
                owner.pump()
                if in_turn and owner in in_turn and owner._core.failure is not None:
                    self._park(owner)
            elif fd == self._rearm:
                try:
                    os.eventfd_read(fd)  # (the wait() loop arms the rings again)
                except BlockingIOError:
                    pass  # another waiter took it
        return True

    def _park(self, comm: CommunicationPort) -> None:
        """``comm`` ended while its turn is out: its notice waits in its inbox for the turn's
        thread, and its fds (at EOF, a dead peer's pidfd) would wake every wait() meanwhile, which
        then never timed out. They leave the set; the notice's take releases the connection, or
        the turns end (_take_turns) and a wait() hands the notice out."""
        with self._lock:
            if comm not in self._in_turn:
                return
            if self._hint is comm:
                self._set_hint(None)
            for fd in comm._fds():
                if self._owners.get(fd) is comm:
                    del self._owners[fd]
                    self._poller.unregister(fd)

    def _set_hint(self, comm: CommunicationPort | None) -> None:
        """The connection whose socket the next waits read directly (caller holds _lock).

        Its socket leaves the epoll set meanwhile (its pidfd stays), so that the
        set firing means another connection or notice is ready."""
        old = self._hint
        if comm is old:
            return
        self._hint = comm
        if old is not None and old in self._connections:
            try:
                self._poller.register(old.fileno())
            except OSError:
                pass  # closing: _forget takes it out of every table
        if comm is not None:
            self._poller.unregister(comm.fileno())

    def _spin_waited(self, started: int, arrived: bool) -> None:
        if arrived:
            self._spin.waited((time.monotonic_ns() - started) // 1000)
        else:
            self._spin.us = 0  # nothing came before the deadline: an idle port

    def _next_event(self) -> ConnectionRequest | Message | None:
        self._check_open()
        if self._requests:
            return self._requests.popleft()
        error = self._link.error
        if error is not None and not self._error_reported:
            self._error_reported = True
            raise type(error)(*error.args)
        ready = self._ready
        in_turn = self._in_turn
        while ready:
            comm = ready.popleft()
            comm._queued = False  # before the take: a message filed from now on queues it again
            if in_turn and comm in in_turn:
                continue  # its turn's thread takes what came (_next_in_turn)
            message = comm.next_ready_message()
            if message is None:
                continue
            if self._turns and message.type not in NOTICES:
                in_turn.add(comm)
            if comm.has_ready_message() and not comm._queued:
                comm._queued = True
                ready.append(comm)  # round-robin: one message per connection per turn
            self._set_hint(comm if comm is self._last_from and comm._quick is None else None)
            self._last_from = comm
            return message
        return None

    def _take_turns(self, on: bool) -> None:
        """From now on (``on``), wait() hands out one message per connection at a time: the
        next only once ``_next_in_turn`` found none left. Off, every connection whose turn was
        out is served by wait() again."""
        with self._lock:
            self._turns = on
            if on:
                return
            for comm in self._in_turn:
                if comm.has_ready_message() and not comm._queued:
                    comm._queued = True
                    self._ready.append(comm)
            self._in_turn.clear()

    def _next_in_turn(self, comm: CommunicationPort, others_waiting: bool = False) -> Message | None:
        """The next message of ``comm``, whose turn the caller holds (wait() gave it one of its
        messages); None, and its turn ends, when it has none left. As after wait(), the caller
        calls ``comm._after_take()`` (credits, answers to expired requests, a notice's release).

        A message waits for its turn in its connection's inbox, not in a queue of the caller's:
        taken by wait(), a datagram gave its window slot back, and a client sending faster than
        its messages were handled grew that queue without bound.

        The turn ends too while another connection's message (or a connection request) waits
        for wait(), or, ``others_waiting``, for the caller's thread or slot: ``comm``'s next
        messages go to the back of the round-robin. The inbox fills while a message is handled
        (other threads' waits read every socket), so a client that kept sending kept the
        thread, and with every thread so held nobody else was served."""
        with self._lock:
            if others_waiting or self._others_ready(comm):
                self._in_turn.discard(comm)
                if comm.has_ready_message() and not comm._queued:
                    comm._queued = True
                    self._ready.append(comm)
                return None
            message = comm.next_ready_message()
            if message is None:
                self._in_turn.discard(comm)
            return message

    def _others_ready(self, comm: CommunicationPort) -> bool:
        """A connection request, or a message of a connection other than ``comm`` whose turn is
        not out, waits for wait() to hand it out (caller holds _lock)."""
        if self._requests:
            return True
        if not self._ready:
            return False
        in_turn = self._in_turn
        # A copy (one C call): pumps append to _ready without the lock, and a deque iterated
        # meanwhile raises RuntimeError.
        return any(other is not comm and other not in in_turn for other in list(self._ready))

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Close every connection and give the name back to the broker."""
        if process_id() != self._pid:
            self._let_go()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            requests = list(self._unanswered)
            connections = list(self._connections)
        # The link first: its keeper must not keep watching a port that no longer reads it.
        self._link.close()
        for request in requests:
            request.close()
        # One wait for room for their notices between them (see CommunicationPort._close): each
        # its own second, deaf clients made this close() last a second apiece.
        farewell = deadline_after(_CLOSE_FLUSH_TIMEOUT)
        for comm in connections:
            comm._close(farewell)
        with self._lock:  # a waiter looks at the set only under the lock, after checking _closed
            # The last waiter to leave frees the set and the eventfd once it finds the port
            # closed (the link's hang-up above woke it): their numbers may be another file's now.
            if not self._poller.closed:
                os.eventfd_write(self._woken, 1)  # a thread polling the set wakes, finds the port closed
            if not self._pollers:
                self._free_poller()
        if self._quick_held:
            self._quick_held = False
            qlpc.release_watcher()

    def _let_go(self) -> None:
        """close() in a forked child: drop this process's copies of the fds, touch nothing shared.

        The broker link, the epoll set, the eventfd and every connection's socket are the
        parent's open files too: a shutdown there unregisters the parent's name, an epoll
        unregister stops its wait() seeing a client, a PORT_CLOSED ends the client's connection,
        and an eventfd write (never drained) makes its wait() spin past its timeout. No lock: a
        parent's thread that held one at the fork is not here to release it.
        """
        if self._closed:
            return
        self._closed = True
        self._link.let_go()
        for request in list(self._unanswered):
            request.close()
        for comm in list(self._connections):
            comm.close()  # a forked copy: closes its fds only
        self._pollers.clear()  # the parent's threads polling it are not in this process
        self._free_poller()
        self._quick_held = False  # the child has no watcher to release (qlpc.c after_fork_child)

    def _free_poller(self) -> None:
        # Caller holds _lock; the port is closed and nobody polls the set.
        if not self._poller.closed:
            self._poller.close()
            os.close(self._woken)
            with self._rearm_lock:
                rearm, self._rearm = self._rearm, None
                if rearm is not None:
                    os.close(rearm)

    def __del__(self) -> None:
        # Dropped without close(): the keeper (which holds the port weakly) closes the broker
        # link on its own thread, which gives the name back; its connections and queued
        # requests are collected with it (their finalizers tell their clients). Left here: the
        # epoll set and eventfd (no thread can be polling them: it would hold the port) and the
        # Quick-LPC watcher. Nothing that waits: a finalizer may run on any thread.
        if getattr(self, "_closed", True) or process_id() != self._pid:
            return  # closed, __init__ failed early, or a forked child's copy (the parent's fds)
        self._closed = True
        try:
            self._free_poller()
        finally:
            if getattr(self, "_quick_held", False):
                self._quick_held = False
                qlpc.release_watcher()

    def __enter__(self) -> ConnectionPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
