"""Quick-LPC: a connection's fast path over a pair of shared-memory rings.

NT's Quick LPC idea on Linux. Small requests and their replies travel through
two rings in one sealed memfd that both sides map, with futex wake-ups; the C
extension drives them with the GIL released (``csrc/qlpc.c``): one C call
sends a request and waits for its reply, one call replies and waits for the
next request. The connection's Unix socket stays open beside the rings: it
carries whatever the rings do not, and it is how a hang-up or a death is
seen (a watcher thread in C wakes a waiter blocked in the futex at once).

The rules that keep the two paths one ordered connection:

- The rings carry REQUESTs (client to server) and the REPLYs to them
  (server to client), nothing else. A body that fits a slot rides in it; a
  larger one (up to ``QuickRing.bulk_max``, 1 MiB, and the receiver's
  max_message_length) goes through its sender's bulk area in the same region,
  which holds one message at a time: the C side copies it in, the receiver
  copies it out into a new bytes object (``take_bulk``) and only then takes the
  entry, so the sender may write the next. ``create_view`` on a connection with
  rings lends the caller its side's bulk area (``lend``, a ``RingView``): the
  body is written there in place, the entry says so (``info.view``), and a
  receiver that makes a Message of it maps the peer's area read-only instead of
  copying (``take_view``), holding it until the view is released; the lean
  calls copy it as any bulk body. Every other message takes the socket, and so
  does a ring message when the ring (or the bulk area) is full,
  the body is larger still, or another thread is posting.
- A side posts to its ring only once the peer has read every socket write of
  its that carried a message (the peer publishes its count of bytes read), and
  a receiver takes its ring before dispatching socket bytes: the two paths
  never reorder one sender's messages. Writes of the runtime alone (releases,
  credits) may be overtaken (``sent(..., ordered=False)``).
- A client keeps one ring request in flight (concurrent requests from other
  threads take the socket), and a reply takes the ring only when its request
  did. Ring request ids are chosen in C with ``protocol.QUICK_ID_BIT`` set,
  which socket ids never have; a reply may still take the socket (too large,
  ring full), and the client's channel then claims it through
  ``quick_claims``. A server owes replies to the ring requests it hands out as
  Messages in its channel, exactly as to socket ones.
- A server waiting in poll() (``ConnectionPort.wait``) arms a doorbell: the
  first client post after that sends a QUICK_DOORBELL frame over the socket. The
  frame carries no message: ring posts need not wait for the peer to read it.

Identity: a socket message carries its writer's SCM_CREDENTIALS, a ring entry
nothing the kernel vouches for. So where a ring entry becomes a Message (a
server's ``receive()``, ``wait()`` and completion-port dispatch, a client's
``request()``), the C side asks the kernel for the peer process's current
credentials through its pidfd as it takes the entry (PIDFD_GET_INFO, Linux
6.13), and ``Message.sender`` / ``identity_changed`` come from them as on the
socket. Only the two connected processes can write the rings: each closes the
memfd once mapped, and the rings' mapping is MADV_DONTFORK (a forked child, say a
privilege-separated one, has none; the bulk areas mapped again for views hold
bodies only, and a child inherits those as it inherits sections). The lean calls (``call()``,
``serve_requests()``) expose no sender and skip the question. ``attested()``
says whether this kernel answers it; where it cannot, ring messages carry the
connection's identity.

Negotiation: a client with the C extension and ``Config.quick_lpc`` asks for
the rings in its Connect (``asked_by``); a port that offers them
(``offered_by``: by default where ``attested()``, within ``ring_budget()``,
and until the port's first wait(); ``quick_lpc=True`` always) sends them in
its connection reply (the memfd rides with it) and the client maps them. An
offer nobody asked for is closed, and the connection stays on the socket.
Without the C extension Quick-LPC is neither offered nor asked for:
``unavailable_reason()`` says why.

This module drives the rings for ``port.CommunicationPort``; it reaches into
the port's state (its channel, locks, reader flag, inbox and replies) and is
typed against it, so a change there shows up in mypy here.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import resource
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, cast

from . import _native
from ._native import (
    Q_BUSY,
    Q_CHECK,
    Q_CLOSED,
    Q_DOORBELL,
    Q_FULL,
    Q_INTR,
    Q_LARGE,
    Q_ORDER,
    Q_TIMEOUT,
    Q_TOO_LARGE,
    QUICK_ERRORS,
    QuickRing,
    quick_attest_probe,
    quick_region_size,
)
from .connection import answered_for_application
from .errors import AlpcError, ConnectionClosed, PeerGone, ProtocolError, SectionError, Timeout
from .logs import fields
from .protocol import MAX_ABANDONED, Message
from .section import RingView, View, check_peer_fd, map_placed, ring_memfd
from .security import PeerCred, identity_changed
from .transport import Buffer, close_fds, deadline_after, remaining
from .wire import MessageType

if TYPE_CHECKING:
    from .config import Config, PortAttributes
    from .port import CommunicationPort
    from .section import _Mapping

__all__ = ["QuickLink", "asked_by", "attested", "available", "hold_watcher", "offer", "offered_by",
           "release_watcher", "ring_budget", "unattested_reason", "unavailable_reason"]

log = logging.getLogger(__name__)

_REQUEST = MessageType.REQUEST
_REPLY = MessageType.REPLY
# Statuses after which the message did not go into the ring: send it over the socket.
_REFUSED = frozenset({Q_FULL, Q_ORDER, Q_TOO_LARGE, Q_BUSY, Q_CHECK, Q_CLOSED})
_DOORBELL_TIMEOUT = 1.0
# How long a ring caller waits for another thread's socket read before it looks at the ring again.
_READER_SLICE = 0.01
_monotonic_ns = time.monotonic_ns
_monotonic = time.monotonic
_UNLIMITED_RINGS = 1 << 30

Handler = Callable[[bytes], Buffer]


def unavailable_reason() -> str | None:
    """Why this process can neither offer nor use Quick-LPC, or None when it can."""
    return _native.QUICK_UNAVAILABLE


def available() -> bool:
    return _native.QUICK_UNAVAILABLE is None


@functools.cache
def unattested_reason() -> str | None:
    """Why the kernel cannot attest ring messages here (their sender is then the
    connection's identity), or None when it can. Probed once per process."""
    if _native.QUICK_UNAVAILABLE is not None:
        return _native.QUICK_UNAVAILABLE
    err = quick_attest_probe()
    if not err:
        return None
    if err in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
        return f"the kernel has no PIDFD_GET_INFO (Linux 6.13 or later): {os.strerror(err)}"
    return f"cannot ask the kernel for a process's credentials through a pidfd: {os.strerror(err or errno.EIO)}"


def attested() -> bool:
    """Does the kernel attest each ring message's sender here, as SCM_CREDENTIALS does a socket's?"""
    return unattested_reason() is None


def hold_watcher() -> bool:
    """A server port offering the rings keeps the C watcher thread for its whole life,
    so clients coming and going do not start and stop a thread each. True if held."""
    return available() and _native.quick_hold()


def release_watcher() -> None:
    _native.quick_unhold()


def offered_by(attributes: PortAttributes) -> bool:
    """Does a port with these attributes offer the rings to the clients that ask for them?"""
    if attributes.quick_lpc is None:
        # The default: only where a ring message's sender is attested as a socket message's is.
        return not attributes.refuse_identity_change and attested()
    return attributes.quick_lpc and available()


def ring_budget() -> int:
    """How many connections at once a port left at its defaults gives rings.

    Each costs its side two more fds (the watcher's copies of the socket and the pidfd):
    at most an eighth of this process's fd limit goes to them, so a server does not meet
    EMFILE at half the connections it took before the rings were the default.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_RINGS if soft == resource.RLIM_INFINITY else max(0, soft // 16)


def asked_by(config: Config | None) -> bool:
    """Does a client with this config ask for the rings (and map them when offered)?"""
    # (A side that refuses identity changes keeps to the socket, whose every message the kernel attests.)
    return config is not None and config.quick_lpc and not config.refuse_identity_change and available()


# Timeouts up to this many seconds take the call's inline path; longer ones (inf), negative
# and NaN ones go through deadline_after, which caps or refuses them as every wait does.
_INLINE_TIMEOUT_S = 86400.0


def _deadline_ns(timeout: float) -> int:
    """The monotonic deadline in ns of a timeout past the inline range (ValueError if bad)."""
    deadline = deadline_after(timeout)
    assert deadline is not None
    return int(deadline * 1e9)


def _serve_timeout_ns(timeout: float | None) -> int:
    """Each serving wait's timeout in ns (-1: none); a bad one is refused, a huge one capped."""
    deadline = deadline_after(timeout)
    return -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1e9))


def _timeout_ns(deadline: float | None) -> int:
    if deadline is None:
        return -1
    left = deadline - time.monotonic()
    return int(left * 1e9) if left > 0 else 0


def offer(slots: int, slot_size: int, spin_us: int, sock_fd: int, pidfd: int | None) -> tuple[QuickLink, int]:
    """Server: set up the rings of a new connection. Returns them and an fd of
    their memfd to pass with the connection reply; the caller closes that fd
    once it is sent (the rings stay mapped)."""
    size = quick_region_size(slots, slot_size)
    if not size:
        raise ValueError(f"invalid Quick-LPC geometry: {slots} slots of {slot_size} bytes")
    fd = ring_memfd(size)
    try:
        ring = QuickRing(fd, size, slots, slot_size, server=True, sock_fd=sock_fd, pidfd=pidfd,
                         spin_ns=spin_us * 1000)
    except BaseException:
        close_fds([fd])
        raise
    return QuickLink(ring, server=True, attesting=pidfd is not None and attested()), fd


class BulkAreas:
    """This side's Python mappings of the region's two bulk areas, for views: its own
    (writable: the views it lends) and the peer's (read-only: the views it receives).

    Made on first use (a connection that never sends or gets a view never maps them, and
    costs no memory for them), by the C side mapping the same pages again over an
    anonymous mapping of ours: no fd needed. Every view keeps its mapping alive."""

    __slots__ = ("_closed", "_own", "_peer", "_ring")

    def __init__(self, ring: QuickRing) -> None:
        self._ring = ring
        self._own: _Mapping | None = None
        self._peer: _Mapping | None = None
        self._closed = False

    def get(self, own: bool) -> _Mapping | None:
        """The mapping of this side's area (``own``) or the peer's; None once closed or if the
        system refuses one (the caller then takes a section, or copies)."""
        mapping = self._own if own else self._peer
        if mapping is not None:
            return mapping
        with _AREAS_LOCK:
            mapping = self._own if own else self._peer
            if mapping is None and not self._closed:
                try:
                    mapping = map_placed(self._ring.bulk_max, own, functools.partial(self._place, own))
                except OSError as exc:
                    log.warning("cannot map a Quick-LPC bulk area for views: %s", exc)
                    return None
                if own:
                    self._own = mapping
                else:
                    self._peer = mapping
            return mapping

    def _place(self, own: bool, address: int) -> None:
        status = self._ring.map_bulk(own, address)
        if status != 0:
            raise OSError(errno.EIO, f"status {status}")

    def close(self) -> None:
        with _AREAS_LOCK:
            self._closed = True
            mappings = (self._own, self._peer)
            self._own = self._peer = None
        for mapping in mappings:
            if mapping is not None:
                mapping.drop()


# Making or dropping any connection's bulk-area mappings (rare: once each per connection).
_AREAS_LOCK = threading.Lock()
# Loan numbers (1 to 2**31 - 1, the C side's range), unique within the process for 2**31 loans.
_LOANS = itertools.count()
_LOAN_LIMIT = 2**31 - 1


class QuickLink:
    """This side of one connection's Quick-LPC rings."""

    def __init__(self, ring: QuickRing, *, server: bool, attesting: bool = False) -> None:
        self.ring = ring
        self.areas = BulkAreas(ring)
        self.server = server
        # The kernel tells the peer's credentials for each entry taken as a Message (the
        # peer's pidfd is there and this kernel has PIDFD_GET_INFO).
        self.attesting = attesting
        # The credentials generation the C side last attested (ring.info.attested), and the
        # sender and identity change built for it: most messages repeat them, and then cost
        # one field read (one PeerCred, as the socket path keeps its last sender).
        self._sender_gen = 0  # (0: none yet; the C side's generations start at 1)
        self._sender: tuple[PeerCred, bool] | None = None
        self.payload_max = ring.payload_max
        # The largest body this side sends through the rings (slot or bulk area); the
        # port lowers it to the peer's max_message_length (``limit``).
        self.carry_max = ring.bulk_max
        self._call = ring.call
        self._call_attested = ring.call_attested
        self._unpack = ring.unpack
        self._post_reply = ring.post_reply
        self._reply_wait_attested = ring.reply_wait_attested
        self._ring_waiting = ring.waiting
        # Client: held from posting a ring request until its reply is unpacked. The reply
        # lands in the ring's one buffer, which the next call would overwrite: a thread
        # that finds it held (itself too: a signal handler's call) sends over the socket
        # instead, as when a call is in flight. An RLock for its owner, which tells whether a
        # signal handler raising as the acquire returned left the turn this thread's.
        self._calling = threading.RLock()
        # Client: ring requests given up on, whose replies may still come over the socket.
        self._late: dict[int, None] = {}
        # Server: ring traffic of the Message paths, which count in the port's
        # statistics already (a serving loop adds only the rest).
        self._counted = [0, 0, 0, 0]
        # Server: while serve() runs, the ring counts and _counted last folded into the port's
        # statistics (a status report folds too: it must not wait for serve() to return).
        self._serving_from: tuple[dict[str, int], list[int]] | None = None
        self._fold_lock = threading.Lock()
        # Server: the client maps the rings (a client that declined never does).
        self._attached = not server
        # Server: the client's last message came by the socket (too large for the ring, a
        # datagram): the next wait is on the socket, as a server without rings waits (its spin
        # yields the CPU to a client on the same one, where a futex wake per socket send would
        # switch to us for every message); a ring post meanwhile rings the socket's doorbell.
        self.by_socket = False
        # Server: armed for the reader's wait on the socket (disarm() once it returns).
        self.armed = False
        # create_view() lends the bulk area until a view lent there has to be copied into a
        # section because it was sent where the rings never go (a datagram, start_request, a
        # deadline, on_message): then sections, so such a producer does not copy every view,
        # until a view is sent where a lent one would have gone in place. (A ring that refused
        # one for the moment, full or behind socket bytes, changes nothing.)
        self.views_in_ring = True
        # Server: told after this side waited on or took from the ring, which ends an arm()
        # (the multiplexer then arms this ring again before it next sleeps in poll()).
        self.on_take: Callable[[], None] | None = None
        # Server: on_take was told since the last arm(): once is enough (a server that never
        # waits in the port's wait() would otherwise queue this ring once per request).
        self._take_told = False

    @classmethod
    def accept(cls, fd: int, slots: int, slot_size: int, spin_us: int, sock_fd: int,
               pidfd: int | None) -> QuickLink:
        """Client: map the rings the server offered (consumes ``fd``; ProtocolError if unsafe)."""
        try:
            size = quick_region_size(slots, slot_size)
            if not size:
                raise ProtocolError(f"the server offered Quick-LPC rings of an invalid geometry "
                                    f"({slots} slots of {slot_size} bytes)")
            # Sealed against shrinking (no SIGBUS) and not against our writes.
            check_peer_fd(fd, size, writable=True)
            ring = QuickRing(fd, size, slots, slot_size, server=False, sock_fd=sock_fd, pidfd=pidfd,
                             spin_ns=spin_us * 1000)
        finally:
            close_fds([fd])  # mapped now: a kept fd would let a forked child map the rings again
        return cls(ring, server=False, attesting=pidfd is not None and attested())

    def limit(self, send_limit: int, recv_limit: int) -> None:
        """The connection's message size limits: the peer's (what this side sends through the
        rings) and this side's own (a longer bulk entry from the peer is a protocol error)."""
        self.carry_max = max(0, min(self.ring.bulk_max, send_limit))
        self.ring.limit_bulk(recv_limit)

    def trim(self) -> None:
        """Give the pages of this side's bulk area back to the system, if no body waits in it
        (the peer trims its own: it alone knows when its area is free)."""
        status = self.ring.trim_bulk()
        if status not in (0, Q_FULL, Q_BUSY, Q_CLOSED):
            log.warning("cannot give a Quick-LPC bulk area's pages back (status %d)", status)

    def _settle(self, status: int, as_view: bool) -> int:
        """A wait's status, with a bulk entry (Q_LARGE) taken: its length then. ``as_view``: one
        its sender wrote in place is taken as a view (for a Message). (receive() and the serving
        loop test inline instead: a call per message on the hot path.)"""
        if status != Q_LARGE:
            return status
        return self._take_large() if as_view else self.ring.take_bulk()

    def _take_large(self) -> int:
        """After Q_LARGE, for a Message: a body written in place is mapped (a view), any other
        copied (and that one too, should its area not be mappable here)."""
        ring = self.ring
        return ring.take_view() if ring.info.view and self.areas.get(False) is not None else ring.take_bulk()

    def _peer_view(self, length: int) -> View:
        """The read-only view of the peer's area that take_view just took."""
        ring = self.ring
        mapping = self.areas.get(False)
        if mapping is None:  # (closed since the take, by another thread)
            ring.release_view()
            raise ConnectionClosed("the port is closed")
        view = View(mapping, 0, length, on_gone=ring.release_view)
        ring.info.taken = 0  # the View holds the area now: its release gives it back
        return view

    def _drop_unwrapped_view(self) -> None:
        """A signal handler raised after take_view held the peer's area and before a View held
        it (``info`` says: taken as a view, not handed on): give it back, or the peer's area
        stays held for ever (no view of the peer's, no large body of it, through the ring)."""
        info = self.ring.info
        if info.taken and info.bulk and info.view:
            info.taken = 0
            self.ring.release_view()

    def _body(self, length: int) -> bytes:
        """The payload of the entry the last wait took: from its slot, or the bulk copy."""
        ring = self.ring
        if not ring.info.bulk:
            return self._unpack(length)
        body = ring.bulk_body
        ring.bulk_body = None  # (up to 1 MiB: the Message holds it now, the ring need not)
        assert body is not None and len(body) == length
        return body

    def _message_body(self, message: Message, length: int) -> None:
        """Give ``message`` the body the last wait took: its bytes, or the read-only view of
        the peer's bulk area that ``take_view`` took (released, the area is the peer's again)."""
        ring = self.ring
        if ring.info.bulk and ring.info.view:
            message._data = None
            message.view = self._peer_view(length)
        else:
            message._data = self._body(length)

    # -- views in the bulk areas ----------------------------------------------------

    def lend(self, size: int) -> RingView | None:
        """``create_view(size)`` through this side's bulk area, or None when it cannot be now
        (in use, lent, too large for the rings or the peer, rings not in use): a section then."""
        if not (self.views_in_ring and 0 < size <= self.carry_max and self.active):
            return None
        mapping = self.areas.get(True)
        if mapping is None:
            return None
        ring = self.ring
        # Named before the call: should a signal handler raise as it returns, the loan is ended.
        loan = next(_LOANS) % _LOAN_LIMIT + 1
        try:
            if ring.lend_bulk(loan) != loan:
                return None
            return RingView(mapping, size, self, loan, ring.unlend_bulk)
        except SectionError:
            ring.unlend_bulk(loan)
            return None  # the port closed as it lent (its mapping is gone): a section says so
        except BaseException:
            ring.unlend_bulk(loan)
            raise

    def _post_view(self, view: RingView, post: Callable[[], int]) -> int:
        """Post a lent view in place with ``post`` (a C call given ``ring.in_place``): its status.
        Not taken, the view may go another way still."""
        view.claim()
        return self._post_claimed(view, post)

    def _post_claimed(self, view: RingView, post: Callable[[], int]) -> int:
        """``_post_view`` for a view claimed already. (Its loan ends only with its post in
        place: what that says holds even when a signal handler raised and the status is lost,
        and whatever another thread lends meanwhile. Should one raise before the view is
        settled here, its release ends the loan: see RingView._finished.)"""
        view.offered = True
        view.busy = True
        try:
            return post()
        finally:
            view.busy = False
            if self.ring.loan_in_force(view.loan):
                view.unclaim()
            else:
                view.posted()

    @property
    def active(self) -> bool:
        """Are the rings in use (on the server: has the client attached)?"""
        if not self._attached and self.ring.peer_attached():
            self._attached = True
        return self._attached

    def close(self) -> None:
        """Wake every waiter (they see the port closed) and unmap the rings (views keep
        their bulk area mapped until released)."""
        self.ring.close()
        self.areas.close()

    # -- socket bookkeeping (both sides) --------------------------------------------

    def sent(self, nbytes: int, ordered: bool = True) -> None:
        """``nbytes`` went out over the socket: with ``ordered`` (they carry a message), hold ring
        posts until the peer read them; the runtime's alone (releases, credits) may be overtaken."""
        self.ring.sent(nbytes, ordered)

    def settled(self) -> bool:
        """May socket bytes just read go straight to the inbox? Only with nothing in the ring
        they must not overtake (``drain`` first otherwise). A client's ring holds replies
        alone, which the call waiting for each takes. The caller is the port's reader."""
        return not self.server or self._ring_waiting() == 0

    def consumed(self, nbytes: int) -> None:
        """Socket bytes read and dispatched: let the peer use its ring again."""
        self.ring.consumed(nbytes)

    # -- client ---------------------------------------------------------------------

    def bind_call(self, port: CommunicationPort) -> Callable[..., bytes]:
        """``port.call`` for a client with rings: a single Python frame around the C call.

        The reply's body; anything the rings cannot take now (a large body,
        another call of ours in flight, a full ring, socket bytes the server
        has not read yet) goes through ``port.request``.
        """
        c_call = self._call
        unpack = self._unpack
        carry_max = self.carry_max
        slow = self._call_slow
        take_turn = self._calling.acquire
        end_turn = self._calling.release
        turn_owned = self._calling._is_owned  # type: ignore[attr-defined]
        interrupted = self._interrupted
        # Weak: the port holds this function, and must stay free to be collected.
        port_ref = weakref.ref(port)

        def call(data: bytes, timeout: float | None = None) -> bytes:
            # Datagrams queued by send(..., flush=False) go first: the socket path flushes them.
            port = port_ref()
            owned = True  # (until known: a signal before then must not end an outer frame's turn)
            try:
                owned = turn_owned()
                turn = (not owned and type(data) is bytes and len(data) <= carry_max
                        and not (port is not None and port._core.backlogged) and take_turn(False))
            except BaseException:
                if not owned and turn_owned():
                    end_turn()  # a signal handler raised as the turn was taken
                raise
            if turn:
                try:
                    if timeout is None:
                        deadline_ns = -1
                    elif 0 <= timeout <= _INLINE_TIMEOUT_S:  # one chained comparison: the usual case
                        deadline_ns = _monotonic_ns() + int(timeout * 1e9)
                    else:  # inf raised OverflowError here, NaN ValueError from int(), -1 waited not at all
                        deadline_ns = _deadline_ns(timeout)
                    status = c_call(data, len(data), deadline_ns)
                    if status >= 0:
                        return unpack(status)
                    got = slow(_alive(port_ref), status, deadline_ns)
                    if got is not None:
                        # (A ring reply is bytes here: slow() takes no views unless asked.)
                        return _socket_reply(got).data if isinstance(got, Message) else cast("bytes", got[0])
                except BaseException:
                    # A signal handler may raise as c_call returns, before slow() took over.
                    interrupted(port_ref())
                    raise
                finally:
                    end_turn()
            return _alive(port_ref).request(data, timeout).data

        return call

    def request(self, port: CommunicationPort, data: bytes | RingView, deadline: float | None) -> Message | None:
        """``call`` for ``request()``: the REPLY as a Message (a view lent by ``lend`` is posted
        in place; a reply the server wrote in place comes as a view)."""
        calling = self._calling
        owned = True  # (until known: a signal before then must not end an outer frame's turn)
        try:
            owned = calling._is_owned()  # type: ignore[attr-defined]
            turn = not owned and calling.acquire(False)
        except BaseException:
            if not owned and calling._is_owned():  # type: ignore[attr-defined]
                calling.release()  # a signal handler raised as the turn was taken
            raise
        if not turn:
            # Another ring call is not unpacked yet: take the socket (for a lent view, only for
            # now: see views_in_ring).
            if type(data) is RingView:
                data.offered = True
            return None
        try:
            deadline_ns = -1 if deadline is None else int(deadline * 1e9)
            if isinstance(data, bytes):
                status = self._call_attested(data, len(data), deadline_ns)
            else:
                status = self._post_view(data, functools.partial(
                    self._call_attested, self.ring.in_place, len(data), deadline_ns))
            info = self.ring.info
            if status >= 0:
                got: tuple[bytes | View, int, int] | Message | None = (self._unpack(status), info.sender_tid,
                                                                        info.callback_id)
            else:
                got = self._call_slow(port, status, deadline_ns, attest=True, as_view=True)
            # Read while the turn is ours: the next call reuses the ring's info.
            if type(got) is not tuple:
                sender, changed = port.peer, False
            else:
                cached = self._sender if info.attested == self._sender_gen else None
                sender, changed = cached if cached is not None else self._attested_sender(port)
        except BaseException:
            self._interrupted(port)
            raise
        finally:
            self._calling.release()
        if got is None:
            return None
        if isinstance(got, Message):
            return _socket_reply(got)  # it came over the socket: counted there, and with its fds, view and flags
        body, tid, request_id = got
        if isinstance(body, bytes):
            message = Message(_REPLY, 0, request_id, body, sender, sender.pid, tid)
        else:
            message = Message(_REPLY, 0, request_id, b"", sender, sender.pid, tid)
            message._data, message.view = None, body
        if changed:
            message.identity_changed = True  # (a keyword costs every message)
        message.port = port
        stats = port.stats
        stats.messages_in += 1
        stats.bytes_in += len(body)
        return message

    def _call_slow(self, port: CommunicationPort, status: int, deadline_ns: int, attest: bool = False,
                   as_view: bool = False) -> tuple[bytes | View, int, int] | Message | None:
        """Anything but a reply at once: (body, sender tid, request id) from the ring, the
        reply as a Message when it came over the socket, or None if the request was not sent.
        ``attest``: a reply from the ring is attested (``ring.info``); ``as_view``: one the
        server wrote in place comes as a read-only View of its bulk area, not copied."""
        ring = self.ring
        wait_reply = ring.wait_reply_attested if attest else ring.wait_reply
        if not ring.info.posted:
            if status in _REFUSED:
                return None
            self._raise_protocol_error(port, status)
        request_id = ring.in_flight()
        deadline = None if deadline_ns < 0 else deadline_ns / 1e9
        try:
            while True:
                if status == Q_LARGE:
                    status = self._settle(status, as_view)
                    if status == Q_BUSY:
                        status = wait_reply(deadline_ns)  # rewritten under us: only the peer's loss
                        continue
                if status >= 0:
                    info = ring.info
                    if info.bulk and info.view:
                        return self._peer_view(status), info.sender_tid, request_id
                    return self._body(status), info.sender_tid, request_id
                if status == Q_DOORBELL:
                    port._send(port._channel.doorbell, deadline_after(_DOORBELL_TIMEOUT), runtime=True)
                elif status == Q_CHECK or status == Q_BUSY:
                    found = _socket_round(port, request_id, deadline)
                    if found is not None:
                        ring.call_done()
                        return found
                elif status == Q_TIMEOUT:
                    raise Timeout("timed out waiting for the reply")
                elif status == Q_CLOSED:
                    port._raise_if_failed()
                    raise ConnectionClosed("the port is closed")
                elif status != Q_INTR:
                    self._raise_protocol_error(port, status)
                # (Q_INTR: a signal handler ran on the way back here, and did not raise.)
                status = wait_reply(deadline_ns)
        except Timeout:
            self._abandon(port, request_id)
            self._cancel(port, request_id)
            raise
        except BaseException as exc:
            self._drop_unwrapped_view()
            self._abandon(port, request_id)
            if not isinstance(exc, AlpcError):
                self._cancel(port, request_id)  # a signal handler's (Ctrl-C): cancelled as a timeout is
            raise

    def _interrupted(self, port: CommunicationPort | None) -> None:
        """An exception (a signal handler's) left the ring call in flight: abandon it, and
        cancel it at the server as a timeout does (nobody will wait for its reply)."""
        request_id = self.ring.in_flight()
        if request_id and port is not None:
            self._abandon(port, request_id)
            self._cancel(port, request_id)
        elif request_id:
            self.ring.call_done()

    def _abandon(self, port: CommunicationPort, request_id: int) -> None:
        """Give up on the call in flight; its reply is dropped on whichever path it comes."""
        self._late[request_id] = None
        if len(self._late) > MAX_ABANDONED:
            del self._late[next(iter(self._late))]
        self.ring.call_done()
        with port._cv_lock:
            port._replies.pop(request_id, None)

    def _cancel(self, port: CommunicationPort, request_id: int) -> None:
        """A ring request given up (timed out, or a signal handler raised): tell the server
        (CANCEL), as the socket path does, so its handler sees ``message.cancelled`` and its
        runtime answers for it."""
        try:
            port._send(lambda: port._channel.quick_cancel(request_id), deadline_after(_DOORBELL_TIMEOUT))
        except (Timeout, ConnectionClosed):
            pass  # the request is dropped here anyway; a dead or stuck peer will not answer it

    def drop_late(self, port: CommunicationPort, ids: list[int]) -> None:
        """Replies just filed for ring requests their callers gave up on meanwhile (claimed
        while still in flight, filed after the abandon): nobody will take them, drop them."""
        late = self._late
        if not late:
            return
        for request_id in ids:
            if request_id in late:
                del late[request_id]
                with port._cv_lock:
                    reply = port._replies.pop(request_id, None)
                if reply is not None:
                    reply.close_handles()

    def claims(self, request_id: int) -> bool:
        """A reply to a ring request came over the socket: deliver it (True) or drop it (False)."""
        if request_id == self.ring.in_flight():
            # The caller may sleep on the rings: wake it to look at the socket's replies.
            self.ring.kick()
            return True
        if request_id in self._late:
            del self._late[request_id]
            return False
        raise ProtocolError(f"reply to ring request {request_id}, which was never sent")

    # -- server ---------------------------------------------------------------------

    def before_read(self, port: CommunicationPort, deadline: float | None, block: bool) -> bool | None:
        """The reader's turn (the caller holds the port's reader role).

        Waits on the ring and the socket together (with ``block``), delivering
        ring requests to the port's inbox. Returns True when it delivered
        something (or the port failed), False on timeout, None when the socket
        needs reading now.
        """
        if not self.server or not self.active:
            return None
        if not block:
            port._dispatch(self.drain(port))
            return None
        if self.by_socket:
            waiting = self._arm(port)
            if waiting == 0:
                return None
            if waiting > 0:
                # Posted as we armed: the client may have rung the doorbell; its bytes are read
                # now rather than wake the next wait for nothing.
                port._dispatch(self.drain(port))
                port._read_socket(deadline, False)
                return True
        try:
            status = self._settle(self.ring.reply_wait_attested(0, b"", 0, _timeout_ns(deadline)), True)
            self._took()
            request = self._request(port, status) if status >= 0 else None
        except BaseException:
            self._rescued(port)
            raise
        if status >= 0:
            # Any more in the ring come with the next read, still before socket bytes.
            if request is not None:
                port._dispatch([request])
            return True
        if status == Q_TIMEOUT:
            return False
        if status == Q_CHECK:
            return None
        if status not in (Q_CLOSED, Q_BUSY, Q_INTR):
            self._protocol_error(port, status)
        return True

    def _arm(self, port: CommunicationPort) -> int:
        """Arm the doorbell before the reader waits on the socket: 0 when it may wait there,
        1 when requests wait in the ring already, < 0 when the ring says why neither (the
        ring's wait then reports it)."""
        waiting = self.ring.arm_poll()
        if waiting == 0:
            self.armed = True
        elif waiting > 0:
            self.ring.disarm_poll()  # taken from the ring now: a post must not ring for nothing
        return waiting

    def disarm(self) -> None:
        """The reader's wait on the socket is over: ring posts need no doorbell any more.
        That also ends a port's wait() arm of this ring, as a wait on the ring does: told."""
        self.armed = False
        self.ring.disarm_poll()
        self._took()

    def receive(self, port: CommunicationPort, deadline: float | None) -> Message | None:
        """Server ``receive()`` while nothing waits in the inbox: the next ring request,
        straight to the caller (not through the inbox), or None when the general path
        is to look (the socket has bytes, another thread reads, a signal, the port failed).
        Not called while ``by_socket``: the general path waits on the socket then.

        A ring request is older than any message in socket bytes not yet read
        (the C side posts only once the peer read every write that carried one),
        so with the inbox empty nothing can be overtaken.
        """
        core = port._core
        if core.releases_unannounced():
            port._flush_releases()  # (what _announce_releases does, once per message)
        if port._answers_owed or port._channel.dropped_requests:
            port._answer_dropped()  # a ring wait is a sleep too: what port._read sends before one
        with port._cv_lock:  # (the Condition's lock itself: its own __enter__ is Python)
            if port._reading or core.inbox or core.failure is not None or not (self._attached or self.active):
                return None
            port._reading = True
        try:
            try:
                if deadline is None:
                    timeout_ns = -1
                else:
                    left = deadline - _monotonic()
                    timeout_ns = int(left * 1e9) if left > 0 else 0
                status = self._reply_wait_attested(0, b"", 0, timeout_ns)
                if status == Q_LARGE:
                    status = self._take_large()
                if not self._take_told:
                    self._took()
                # (In the try: a signal handler raising before the request is handed on must not lose it.)
                message = self._request(port, status) if status >= 0 else None
            except BaseException:
                self._rescued(port)
                raise
            if status >= 0:
                if message is None:
                    return None  # the connection failed: the general path reports it
                message.port = port
                stats = port.stats
                stats.in_flight[message.id] = _monotonic()
                stats.messages_in += 1
                stats.bytes_in += status
                return message
            if status == Q_CHECK:
                # The socket stirred (a message too large for the ring, a hang-up): read what it
                # holds now, as the reader still, rather than wait on the ring again first.
                port._read_socket(deadline, False)
                with port._state:
                    return core.take_message()
            if status == Q_TIMEOUT:
                raise Timeout("timed out waiting for a message")
            if status in QUICK_ERRORS:
                self._protocol_error(port, status)
            return None
        finally:
            port._end_read()

    def drain(self, port: CommunicationPort) -> list[Message]:
        """Server: every request waiting in the ring, as Messages (before any socket bytes)."""
        if not self.server or not self.active:
            return []
        messages: list[Message] = []
        reply_wait = self.ring.reply_wait_attested
        while True:
            try:
                status = self._settle(reply_wait(0, b"", 0, 0), True)
                message = self._request(port, status) if status >= 0 else None
            except BaseException:
                port._dispatch(messages)
                self._rescued(port)
                raise
            if status < 0:
                self._took()
                if status in QUICK_ERRORS:
                    self._protocol_error(port, status)
                return messages
            if message is None:
                return messages
            messages.append(message)

    def _request(self, port: CommunicationPort, length: int) -> Message | None:
        self.by_socket = False
        info = self.ring.info
        # (Most messages repeat the last attested sender: one field read, no call.)
        cached = self._sender if info.attested == self._sender_gen else None
        sender, changed = cached if cached is not None else self._attested_sender(port)
        if info.bulk:
            message = Message(_REQUEST, info.message_id, 0, b"", sender, sender.pid, info.sender_tid)
            self._message_body(message, length)
        else:
            message = Message(_REQUEST, info.message_id, 0, self._unpack(length), sender, sender.pid, info.sender_tid)
        if changed:
            message.identity_changed = True  # (a keyword costs every message)
        try:
            with port._state:
                port._channel.quick_request_received(message.id, message)
        except ProtocolError as exc:
            # A reused id (or too many owed): drop the connection, as for the same lie on the socket.
            self._drop(port, f"protocol error: {exc}")
            return None
        self._counted[0] += 1
        self._counted[1] += length
        # Handed on: a signal that interrupts a later wait before its C call (which clears this)
        # must not have _rescue file this request a second time.
        info.taken = 0
        return message

    def _attested_sender(self, port: CommunicationPort) -> tuple[PeerCred, bool]:
        """Who wrote the entry the last call took, and whether that is another uid or gid than
        who connected: the kernel's word (``ring.info``) when the call attested it, else the
        connection's identity (a kernel that cannot say, or a lean call)."""
        info = self.ring.info
        generation = info.attested
        if not generation:
            return port.peer, False
        cached = self._sender
        if generation == self._sender_gen and cached is not None:
            return cached
        peer = port.peer
        pid, uid, gid = info.pid, info.uid, info.gid
        if pid == peer.pid and uid == peer.uid and gid == peer.gid:
            cached = (peer, False)
        else:
            sender = PeerCred(pid, uid, gid)
            cached = (sender, identity_changed(peer, sender))
        self._sender, self._sender_gen = cached, generation
        return cached

    def reply(self, port: CommunicationPort, request_id: int, data: bytes | RingView) -> bool:
        """Server: answer a ring request through the ring (a view lent by ``lend`` in place);
        False: send it over the socket."""
        core = port._core
        view = data if type(data) is RingView else None
        if view is not None:
            # Claimed before the reply stops being owed: a view another thread sends (or
            # releases) meanwhile leaves the reply owed, as a spent view does.
            try:
                view.claim()
            except SectionError:
                return False  # the socket path refuses it (SectionError), the reply still owed
        with port._state:
            # The channel alone says what is owed: a reply over the socket or a CANCEL ends that.
            # A dropped connection answers nothing more, on the ring neither: its reply() raises.
            owes, owed = (False, None) if core.failure is not None else port._channel.quick_replying(request_id)
        if not owes:
            if view is not None:
                view.unclaim()
            return False
        size = len(data)
        try:
            if isinstance(data, bytes):
                status = self._post_reply(request_id, data, size)
            else:
                status = self._post_claimed(data, functools.partial(self._post_reply, request_id,
                                                                    self.ring.in_place, size))
        except BaseException:
            # A signal handler raised as the post returned: a reply the ring refused is owed
            # still, as one over the socket is when nothing of it left.
            if self.ring.reply_posted() != request_id:
                with port._state:
                    port._channel.quick_reply_failed(request_id, owed)
            raise
        if status == 0 or status == Q_DOORBELL:
            counted = self._counted
            counted[2] += 1
            counted[3] += size
            if status == Q_DOORBELL:
                port._send(port._channel.doorbell, deadline_after(_DOORBELL_TIMEOUT), runtime=True)
            # Releases held back while this reply was owed ("the reply carries them") did not
            # go with it: the ring carries no socket frames.
            if core.releases_unannounced():
                port._flush_releases()
            return True
        with port._state:
            port._channel.quick_reply_failed(request_id, owed)
        if status not in _REFUSED:
            self._raise_protocol_error(port, status)
        return False

    def arm(self) -> bool:
        """Server: about to wait in poll(); True if requests already wait in the ring."""
        self._take_told = False  # a take from now on ends this arm: tell on_take again
        if not self.active:
            return False
        return self.ring.arm_poll() != 0

    def serve(self, port: CommunicationPort, handler: Handler, timeout: float | None) -> Message | None:
        """Server: answer requests with ``handler`` until another kind of message arrives.

        Returns that message (a datagram, a notice), or None when another
        thread reads this port (the caller then serves the slow way).
        """
        timeout_ns = _serve_timeout_ns(timeout)
        _announce_releases(port)
        with port._cv_lock:
            if port._reading or port._inbox or port._failure is not None:
                return None
            port._reading = True
        with self._fold_lock:
            self._serving_from = (self.ring.counts(), list(self._counted))
        try:
            return self._serve(port, handler, timeout_ns, timeout)
        finally:
            self._took()
            self.fold_served(port, done=True)
            port._end_read()

    def _took(self) -> None:
        if self.on_take is not None and not self._take_told:
            self._take_told = True
            self.on_take()

    def _serve(self, port: CommunicationPort, handler: Handler, timeout_ns: int,
               timeout: float | None) -> Message | None:
        # The hot loop: one C call per request (its reply and the wait for the
        # next), then the handler. Counting happens in C (fold_served).
        reply_wait = self.ring.reply_wait
        unpack = self._unpack
        info = self.ring.info
        carry_max = self.carry_max
        stats = port.stats
        reply_id = 0  # the request whose reply is the handler's and has not gone yet
        reply = b""
        # When the current wait began: a signal ends it early (Q_INTR), and what is left of
        # its timeout is waited then, not all of it again. Read only when there is a timeout.
        timed = timeout_ns > 0
        began = _monotonic_ns() if timed else 0
        wait_ns = timeout_ns
        try:
            while True:
                try:
                    status = reply_wait(reply_id, reply, len(reply), wait_ns)
                    if status == Q_LARGE:
                        status = self.ring.take_bulk()
                except BaseException:
                    self._rescue(port)
                    raise
                if status >= 0:
                    # Handed on: a signal before the next wait must not have _rescue file it again.
                    info.taken = 0
                    reply_id = info.message_id
                    try:
                        answer = handler(unpack(status) if not info.bulk else self._body(status))
                        reply = answer if type(answer) is bytes else bytes(answer)
                    except BaseException:
                        failed, reply_id = reply_id, 0
                        self._answer_failed(port, failed)
                        raise
                    if len(reply) > carry_max:
                        # Past the client's max_message_length (or the rings'): the socket path
                        # sends it or says why not (MessageTooLarge), as a reply() does.
                        too_large, reply_id = reply_id, 0
                        self._socket_reply(port, too_large, reply)
                    if timed:
                        began = _monotonic_ns()
                    continue
                if reply_id and not info.posted:
                    self._socket_reply(port, reply_id, reply)
                reply_id = 0
                if status == Q_INTR:
                    # A signal handler ran on the way back here, and did not raise: wait on.
                    wait_ns = max(0, timeout_ns - (_monotonic_ns() - began)) if timed else timeout_ns
                    continue
                arrived = stats.messages_in
                other = self._slow_status(port, status, handler, timeout)
                if other is not None:
                    return other
                if timed and stats.messages_in == arrived:
                    # Nothing came (a doorbell, the runtime's bytes, a reply the ring refused):
                    # the same wait for the next message goes on, with what is left of it.
                    wait_ns = max(0, timeout_ns - (_monotonic_ns() - began))
                else:
                    wait_ns = timeout_ns
                    if timed:
                        began = _monotonic_ns()
        except BaseException:
            if reply_id and self.ring.reply_posted() != reply_id:
                # The handler's reply, which no reply_wait posted (a signal handler raised on the
                # way, or as the ring refused it): the socket takes it, or its client waits in vain.
                self._socket_reply_anyway(port, reply_id, reply)
            raise

    def _rescued(self, port: CommunicationPort) -> None:
        """A signal handler raised as a ring wait returned (or before its request was handed
        on): ``_rescue`` what it took, and tell on_take, as a return does: the wait ended a
        wait()'s arm of this ring. Told last: a wait() arming while _rescue holds the ring's
        turn (attest) finds it taken and does not arm, and only a later tell re-queues it."""
        try:
            self._rescue(port)
        finally:
            self._took()

    def _rescue(self, port: CommunicationPort) -> None:
        """A signal handler raised (Ctrl-C) as a wait returned: CPython runs it as the C call
        returns, so a request the call took from the ring never reached Python. File it in the
        inbox, where the next read finds it: the ring moved past it, and it must not vanish."""
        info = self.ring.info
        if not info.taken:
            return
        info.taken = 0
        if port._channel.quick_request_known(info.message_id):
            # Handed to the channel already (the signal came after): its Message, lost with the
            # exception, is answered for as a dropped one is.
            return
        if self.attesting and not info.attested and self.ring.attest() != 0:
            # Its writer is gone (or the port closed): nobody will read the answer, and the
            # request cannot say who sent it. The next read reports the death.
            return
        request = self._request(port, info.length)
        if request is not None:
            port._dispatch([request])

    def fold_served(self, port: CommunicationPort, done: bool = False) -> None:
        """Add what a serving loop moved through the rings since the last fold to the port's
        statistics: when serve() returns (``done``), and for each status report while it runs
        (from the keeper's thread), or a server serving for hours would report no traffic."""
        with self._fold_lock:
            since = self._serving_from
            if since is None:
                return
            after, counted = self.ring.counts(), list(self._counted)
            self._serving_from = None if done else (after, counted)
        self._fold_counts(port, since, (after, counted))

    @staticmethod
    def _fold_counts(port: CommunicationPort, since: tuple[dict[str, int], list[int]],
                     until: tuple[dict[str, int], list[int]]) -> None:
        """Add the ring traffic between two points of a serving loop to the port's statistics
        (less what the Message paths counted there already)."""
        (before, counted_before), (after, counted) = since, until
        stats = port.stats
        names = ("messages_in", "bytes_in", "messages_out", "bytes_out")
        lean = [after[name] - before[name] - (counted[i] - counted_before[i]) for i, name in enumerate(names)]
        stats.messages_in += lean[0]
        stats.bytes_in += lean[1]
        stats.messages_out += lean[2]
        stats.bytes_out += lean[3]

    def _slow_status(self, port: CommunicationPort, status: int, handler: Handler,
                     timeout: float | None) -> Message | None:
        """What the serving loop does about anything but a request from the ring (or Q_INTR)."""
        if status == Q_DOORBELL:
            port._send(port._channel.doorbell, deadline_after(_DOORBELL_TIMEOUT), runtime=True)
        elif status == Q_CHECK:
            port._read(0.0, block=False)
            with port._cv_lock:
                port._notify_waiters()
            return self._answer_inbox(port, handler, timeout)
        elif status == Q_TIMEOUT:
            raise Timeout("no message arrived in time")
        elif status == Q_CLOSED:
            port._raise_if_failed()
            raise ConnectionClosed("the port is closed")
        elif status not in _REFUSED:
            self._protocol_error(port, status)
            return self._answer_inbox(port, handler, timeout)
        return None

    def _answer_failed(self, port: CommunicationPort, request_id: int) -> None:
        """The handler raised on a ring request: answer it empty (as the socket path does, see
        CommunicationPort.serve_requests), so its client is not left waiting out its timeout."""
        with port._state:
            port._channel.quick_request_received(request_id)
        port._answer_failed(Message(_REQUEST, request_id, 0, b"", port.peer))

    def _socket_reply(self, port: CommunicationPort, request_id: int, data: bytes) -> None:
        """A reply the ring would not take now: owe it in the channel and send it the usual way
        (should that raise, MessageTooLarge say, the request is answered as one dropped)."""
        request = Message(_REQUEST, request_id, 0, b"", port.peer)
        with port._state:
            port._channel.quick_request_received(request_id, request)
        port.reply(request, data)

    def _socket_reply_anyway(self, port: CommunicationPort, request_id: int, data: bytes) -> None:
        """``_socket_reply`` while another exception propagates: best effort, bounded."""
        try:
            self._socket_reply(port, request_id, data)
        except (AlpcError, ValueError) as exc:
            log.debug("a lean reply cut short could not go by the socket either: %s", exc)

    def _answer_inbox(self, port: CommunicationPort, handler: Handler, timeout: float | None) -> Message | None:
        """Requests that came the slow way are answered here too; anything else ends serving."""
        while True:
            with port._cv_lock:
                message = port._pop_inbox()
            if message is None:
                return None
            if message.type is not _REQUEST:
                return message
            port.reply(message, port._handled(handler, message), timeout)

    # -- both -----------------------------------------------------------------------

    def _protocol_error(self, port: CommunicationPort, status: int) -> str:
        """The peer broke the ring protocol: drop the connection as for a bad frame."""
        return self._drop(port, f"protocol error: {QUICK_ERRORS.get(status, f'Quick-LPC status {status}')}")

    def _drop(self, port: CommunicationPort, reason: str) -> str:
        port.stats.errors += 1
        peer = port.peer
        log.warning("protocol error from pid %d on its Quick-LPC rings, dropping the connection: %s",
                    peer.pid, reason, extra=fields(pid=peer.pid, uid=peer.uid, gid=peer.gid))
        self.ring.close()
        port._fail(PeerGone(reason), notice=reason if self.server else None)
        return reason

    def _raise_protocol_error(self, port: CommunicationPort, status: int) -> NoReturn:
        reason = self._protocol_error(port, status)
        port._raise_if_failed()
        raise PeerGone(reason)


def _announce_releases(port: CommunicationPort) -> None:
    """Send the releases no reply of ours will carry (a body released while a reply was owed,
    a view dropped unreleased): a ring reply carries none, and a ring wait is a sleep that
    port._read's flush before sleeping never sees, so the peer's section space stayed held."""
    if port._core.releases_unannounced():
        port._flush_releases()


def _socket_reply(reply: Message) -> Message:
    """A reply to a ring request that came over the socket, as ``take_reply`` hands it out:
    one the server's runtime sent in its application's place (it dropped the request
    unanswered) raises instead."""
    if reply.cancelled:
        raise answered_for_application(reply, reply.callback_id)
    return reply


def _alive(port_ref: weakref.ref[CommunicationPort]) -> CommunicationPort:
    port = port_ref()
    if port is None:
        raise ConnectionClosed("the port is gone")
    return port


def _socket_round(port: CommunicationPort, message_id: int, deadline: float | None) -> Message | None:
    """The socket stirred while a ring request waits: read it once, or let the
    thread reading it finish its round. Returns the reply if it came that way."""
    with port._cv_lock:
        found = port._replies.pop(message_id, None)
        if found is not None:
            return found
        port._raise_if_failed()
        if port._reading:
            # That reader may be waiting for a reply of its own for long, while ours
            # comes through the ring: back to the ring after a slice.
            left = remaining(deadline)
            if not port._cv.wait(_READER_SLICE if left is None else min(left, _READER_SLICE)):
                if left is not None and left <= _READER_SLICE:
                    raise Timeout("timed out waiting for the reply")
            return port._replies.pop(message_id, None)
        port._reading = True
    try:
        port._read(0.0, block=False)
    finally:
        port._end_read()
    with port._cv_lock:
        found = port._replies.pop(message_id, None)
        if found is None:
            port._raise_if_failed()
        return found

