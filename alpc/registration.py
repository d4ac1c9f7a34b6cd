"""A server port's link to the broker: register, report figures, and re-register after a restart.

The link's socket carries connection requests (read by the application's
``listen``/``wait`` under the port's lock) and, the other way, the port's
periodic status reports. A keeper thread per port sends those reports, notices
a broker that went away even while the application never calls ``wait``, and
then registers the name again with backoff until the user's
``reregister_timeout`` runs out. The link's fd number never changes (a new
socket is dup2'ed over the old one), so a thread polling it never sees it
closed or reused; close() leaves closing the fds to the last thread that holds
them (``hold_fds``) for a poll. Lock order: the port's lock, then this link's lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

from . import control
from .config import Config, PortAttributes
from .errors import AlpcError, BrokerUnavailable, ConnectionClosed, NameInUse, ProtocolError, Timeout
from .exchange import control_frame, refusal_after_hangup
from .logs import fields
from .retry import Backoff
from .transport import (
    Stream,
    close_fds,
    deadline_after,
    remaining,
    wait_readable,
    wait_readable_or_hangup,
)
from .wire import Frame, FrameDecoder, FrameLimits, MessageType

__all__ = ["ATTEMPT_TIMEOUT", "MIN_REPORT_GAP", "Registration", "port_limits"]

T = TypeVar("T")
log = logging.getLogger(__name__)

REGISTRATION_LIMITS = FrameLimits(
    allowed_types=frozenset({MessageType.PORT_CREATED, MessageType.ERROR,
                             MessageType.CONNECTION_REQUEST, MessageType.SHUTDOWN}),
    max_data=control.MAX_CONTROL_BODY,
    max_fds=1,
)
# One attempt to reach a restarted broker is short, so close() never waits long for it.
ATTEMPT_TIMEOUT = 2.0
# Membership changes are reported this soon at the earliest; counters every report_interval.
MIN_REPORT_GAP = 0.05
REPORT_SEND_TIMEOUT = 5.0
_TRANSIENT = (BrokerUnavailable, Timeout, ProtocolError, ConnectionClosed)


def port_limits(attributes: PortAttributes) -> control.PortLimits:
    """Every limit of the port, for the broker to show (``alpc ports --json``)."""
    flow = attributes.flow_limits()
    return control.PortLimits(
        max_message_length=attributes.max_message_length, max_connect_data=attributes.max_connect_data,
        max_pending_connects=attributes.max_pending_connects, max_connections=attributes.max_connections,
        max_pending_requests=flow.max_pending_requests, max_queued_datagrams=flow.max_queued_datagrams,
        max_handles_per_message=flow.max_handles_per_message, max_inflight_handles=flow.max_inflight_handles,
        handle_kinds=tuple(sorted(attributes.handle_kinds)), max_section_bytes=attributes.max_section_bytes,
        max_port_section_bytes=attributes.max_port_section_bytes,
        send_timeout_ms=int(attributes.send_timeout * 1000),
        refuse_identity_change=attributes.refuse_identity_change,
    )


class _Stopped(Exception):
    """The port closed while the keeper was re-registering."""


def _weakly(method: Callable[[], T], on_gone: Callable[[object], None] | None = None) -> Callable[[], T | None]:
    """Call a bound ``method`` through a weak reference to its object: None once it is gone
    (``on_gone`` runs then, as a weakref callback)."""
    ref = weakref.WeakMethod(method, on_gone)

    def call() -> T | None:
        bound = ref()
        return None if bound is None else bound()
    return call


def _signal(eventfd: int) -> None:
    os.eventfd_write(eventfd, 1)


def _drain(eventfd: int) -> None:
    try:
        os.eventfd_read(eventfd)
    except BlockingIOError:
        pass


class Registration:
    """The registration of one named port with the broker."""

    def __init__(self, name: str, attributes: PortAttributes, config: Config, *,
                 reregister_timeout: float, report_interval: float) -> None:
        if not reregister_timeout >= 0:
            raise ValueError(f"reregister_timeout must be >= 0, got {reregister_timeout!r}")
        if not report_interval > 0:
            raise ValueError(f"report_interval must be > 0, got {report_interval!r}")
        self.name = name
        self._attributes = attributes
        self._config = config
        self.reregister_timeout = reregister_timeout
        self.report_interval = report_interval
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._decoder = FrameDecoder(REGISTRATION_LIMITS)
        self._live = False
        self.error: AlpcError | None = None
        self.registrations = 0
        # _wake tells the port's waiters that a gap ended; _poke wakes the keeper.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poke = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._closed = False
        # Threads about to poll our fds without the lock (hold_fds): close() must not free
        # the numbers under them (the next file opened would get one, and they would sleep on
        # it), so the last of them closes the fds instead.
        # One entry per holder: list append/pop are atomic, so letting go takes no lock.
        self._holders: list[None] = []
        self._freed = False
        self._dirty = False
        self._reregister_until = 0.0
        # The gap began with us hanging up on a live broker, which may not have
        # seen that yet and still hold the name for us.
        self._gap_by_us = False
        self._last_report = 0.0
        self._last_counters: control.PortCounters | None = None
        self._thread: threading.Thread | None = None
        # The port's own methods, called through weak references (see start): None once it is gone.
        self._snapshot: Callable[[], control.PortStatus | None] | None = None
        self._on_hangup: Callable[[], None] | None = None
        # The port was collected unclosed: the keeper closes the link itself (see _port_gone).
        self._orphaned = False

    @property
    def live(self) -> bool:
        return self._live

    # -- the exchange with the broker ---------------------------------------------

    def open(self, timeout: float | None) -> None:
        """The first registration; raises NameInUse, BrokerUnavailable, Timeout, ..."""
        stream, decoder = self._register(deadline_after(timeout), interruptible=False)
        with self._lock:
            self._stream, self._decoder, self._live = stream, decoder, True
            self.registrations = 1

    def _register(self, deadline: float | None, *, interruptible: bool) -> tuple[Stream, FrameDecoder]:
        stream = Stream.connect(self._config.broker_socket, remaining(deadline))
        decoder = FrameDecoder(REGISTRATION_LIMITS)
        try:
            request = control.CreatePort(
                name=self.name, max_message_length=self._attributes.max_message_length,
                max_connect_data=self._attributes.max_connect_data,
                max_pending_connects=self._attributes.max_pending_connects,
                acl=control.AclSpec.of(self._attributes.acl), limits=port_limits(self._attributes),
            )
            try:
                stream.send(control_frame(request), deadline=deadline)
            except ConnectionClosed:
                raise refusal_after_hangup(stream) or BrokerUnavailable(
                    "the broker went away while creating the port") from None
            frame = self._await_reply(stream, decoder, deadline, interruptible)
            if frame is None:
                raise BrokerUnavailable("the broker closed the connection while creating the port")
            if frame.type is MessageType.ERROR:
                raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
            if frame.type is MessageType.SHUTDOWN:
                raise BrokerUnavailable("the broker is shutting down")
            control.decode_body(frame.type, frame.data, control.PortCreated)
        except BaseException:
            decoder.close_fds()
            stream.close()
            raise
        return stream, decoder

    def _await_reply(self, stream: Stream, decoder: FrameDecoder, deadline: float | None,
                     interruptible: bool) -> Frame | None:
        # Read exactly one frame: connection requests may follow at once, and they
        # belong to the application's reads.
        watch = [stream.fileno(), self._poke] if interruptible else [stream.fileno()]
        while True:
            fired = wait_readable(watch, deadline)
            if not fired:
                raise Timeout("timed out waiting for the broker to create the port")
            if self._poke in fired:
                _drain(self._poke)
                if self._stopping:
                    raise _Stopped
            if stream.fileno() not in fired:
                continue
            got = stream.recv_with_ancillary(decoder.wanted(), max_fds=1)
            if got is None:
                continue
            if not got.data:
                return None
            frames = decoder.feed(got.data, got.fds)
            if frames:
                return frames[0]

    # -- what the port's waiters use (called with the port's lock held) ------------

    def wait_fds(self) -> list[int]:
        """The fd to poll: the link while registered, the wake-up during a gap, none once lost for good."""
        with self._lock:
            return self._wait_fds()

    def _wait_fds(self) -> list[int]:
        # Caller holds the lock.
        if self._live and self._stream is not None:
            return [self._stream.fileno()]
        if self.error is None and not self._closed:
            return [self._wake]
        return []

    def hold_fds(self) -> list[int]:
        """``wait_fds()``, kept open until ``release_fds()`` even if the port closes meanwhile."""
        with self._lock:
            self._holders.append(None)
            return self._wait_fds()

    def release_fds(self) -> None:
        # No lock unless closed: this runs after every poll of a port's wait().
        self._holders.pop()
        if self._closed and not self._holders:
            with self._lock:
                if not self._holders:
                    self._free()

    def read(self) -> list[Frame]:
        """Every connection request the broker sent so far; notices the broker going away."""
        requests: list[Frame] = []
        with self._lock:
            while self._live and self._stream is not None:
                got = self._stream.recv_with_ancillary(max_fds=16)
                if got is None:
                    break
                if not got.data:
                    self._lose("the broker went away")
                    break
                try:
                    frames = self._decoder.feed(got.data, got.fds)
                except ProtocolError as exc:
                    log.error("protocol error from the broker: %s", exc, extra=fields(port=self.name))
                    self._lose(f"the broker sent a malformed frame: {exc}", by_us=True)
                    break
                for frame in frames:
                    self._sort(frame, requests)
        return requests

    def _sort(self, frame: Frame, requests: list[Frame]) -> None:
        if frame.type is MessageType.CONNECTION_REQUEST and len(frame.fds) == 1 and self._live:
            requests.append(frame)
            return
        close_fds(frame.fds)
        if frame.type is MessageType.SHUTDOWN:
            self._lose("the broker shut down")
        elif self._live:
            log.error("unexpected %s frame from the broker", frame.type.name, extra=fields(port=self.name))

    def _lose(self, reason: str, by_us: bool = False) -> None:
        """The registration is gone (caller holds the lock): start a gap, or give up."""
        self._live = False
        self._gap_by_us = by_us
        self._decoder.close_fds()
        self._decoder = FrameDecoder(REGISTRATION_LIMITS)
        if self._stream is not None:
            self._stream.shutdown()  # a live broker must free the name before we ask again
        _drain(self._wake)
        if self._stopping:
            return
        if self.reregister_timeout > 0:
            self._reregister_until = time.monotonic() + self.reregister_timeout
            log.warning("port %r lost its registration (%s); registering again for up to %gs",
                        self.name, reason, self.reregister_timeout, extra=fields(port=self.name))
            _signal(self._poke)
        else:
            self._give_up(BrokerUnavailable(f"{reason}; established connections still work"))

    def _give_up(self, error: AlpcError) -> None:
        # Caller holds the lock.
        self.error = error
        log.error("port %r is no longer registered: %s", self.name, error, extra=fields(port=self.name))
        _signal(self._wake)

    # -- the keeper thread ---------------------------------------------------------

    def start(self, snapshot: Callable[[], control.PortStatus], on_hangup: Callable[[], None]) -> None:
        """Start reporting ``snapshot()`` and watching the link; ``on_hangup`` drains it under the port's lock.

        Both are the port's bound methods, held weakly: a port the application drops without
        close() must not be kept alive for ever by its own keeper (its name registered, its
        clients forwarded to nobody); once it is collected, the keeper closes the link.
        """
        self._snapshot = _weakly(snapshot, self._port_gone)
        self._on_hangup = _weakly(on_hangup)
        self._dirty = True
        self._thread = threading.Thread(target=self._run, name=f"alpc-port-{self.name}", daemon=True)
        self._thread.start()

    def report_soon(self) -> None:
        """Clients came or went: report within MIN_REPORT_GAP rather than at the next interval."""
        with self._lock:
            if self._closed or self._stopping or self._dirty:
                # Already due within MIN_REPORT_GAP: waking the keeper again per
                # connect (a thread switch and a GIL hand-over) would only cost.
                return
            self._dirty = True
            _signal(self._poke)

    def _port_gone(self, _: object) -> None:
        """The port was collected (a weakref callback: any thread, any moment; no lock, no wait).

        Unclosed, its link must go (the broker then drops the name): the keeper closes it. A
        closed port's link is closed already, and a forked child's copy is the parent's.
        """
        if self._stopping or self._thread is None or not self._thread.is_alive():
            return
        self._orphaned = True
        self._stopping = True
        _signal(self._poke)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    in_gap = not self._live and self.error is None
                if in_gap:
                    self._reregister()
                else:
                    self._watch()
        except Exception:  # the keeper must never die silently
            log.exception("the keeper of port %r failed", self.name, extra=fields(port=self.name))
        finally:
            if self._orphaned:
                self.close()  # on this thread: nothing to join

    def _watch(self) -> None:
        with self._lock:
            live = self._live and self._stream is not None
            stream_fd = self._stream.fileno() if live and self._stream is not None else -1
            due = self._last_report + (MIN_REPORT_GAP if self._dirty else self.report_interval)
        hangup = [stream_fd] if live else []
        # Lost for good: nothing to do but wait for close(), still with a deadline.
        deadline = due if live else time.monotonic() + self.report_interval
        fired = wait_readable_or_hangup([self._poke], hangup, deadline)
        if self._poke in fired:
            _drain(self._poke)
        if self._stopping:
            return
        if live and stream_fd in fired and self._on_hangup is not None:
            self._on_hangup()
        self._maybe_report()

    def _maybe_report(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._live or self._snapshot is None:
                return
            gap = now - self._last_report
            if gap < (MIN_REPORT_GAP if self._dirty else self.report_interval):
                return
            # Cleared before the snapshot: a change after it makes the port dirty
            # (and pokes the keeper) again rather than going unreported.
            dirty, self._dirty = self._dirty, False
        status = self._snapshot()
        if status is None:
            return  # the port is gone: the keeper closes the link
        self._last_report = now
        if not dirty and not status.peers_total and status.counters == self._last_counters:
            return  # nothing moved; stay quiet
        with self._lock:
            if not self._live or self._stream is None:
                return  # the next registration reports everything (_install marks it dirty)
            stream = self._stream
        # Sent without the lock: listen() and wait() take it, and keep their own timeouts.
        # Only this thread writes the link, and only it replaces the socket (_install).
        try:
            stream.send(control_frame(status), deadline=deadline_after(REPORT_SEND_TIMEOUT))
        except ConnectionClosed:
            return  # the reader sees the EOF and starts the gap
        except Timeout:
            with self._lock:
                if stream.broken and self._live and self._stream is stream:
                    self._lose("a status report could not be sent", by_us=True)
            return
        self._last_counters = status.counters

    def _reregister(self) -> None:
        backoff = Backoff(initial=0.02, maximum=0.5)
        started = time.monotonic()
        while True:
            left = self._reregister_until - time.monotonic()
            if left <= 0:
                with self._lock:
                    if not self._stopping:
                        self._give_up(BrokerUnavailable(
                            f"the broker did not come back within {self.reregister_timeout:g}s; "
                            "established connections still work"))
                return
            try:
                stream, decoder = self._register(deadline_after(min(ATTEMPT_TIMEOUT, left)), interruptible=True)
            except _Stopped:
                return
            except NameInUse as exc:
                if self._gap_by_us and time.monotonic() - started < ATTEMPT_TIMEOUT:
                    # Most likely still our own old registration: the broker has yet to see our EOF.
                    if self._pause(backoff.next_delay()):
                        return
                    continue
                with self._lock:
                    if not self._stopping:
                        self._give_up(NameInUse(f"port {self.name!r} was taken while the broker was away: {exc}"))
                return
            except _TRANSIENT:
                if self._pause(min(backoff.next_delay(), max(0.0, left))):
                    return
                continue
            except AlpcError as exc:
                with self._lock:
                    if not self._stopping:
                        self._give_up(exc)
                return
            if self._install(stream, decoder):
                log.info("port %r registered again after %.2fs", self.name, time.monotonic() - started,
                         extra=fields(port=self.name))
            return

    def _install(self, stream: Stream, decoder: FrameDecoder) -> bool:
        with self._lock:
            if self._stopping or self._stream is None:
                decoder.close_fds()
                stream.close()
                return False
            self._stream.replace_with(stream)
            self._decoder = decoder
            self._live = True
            self._dirty = True
            self.registrations += 1
            _signal(self._wake)
        return True

    def _pause(self, delay: float) -> bool:
        """Sleep for the backoff unless the port closes first; True if it did."""
        if wait_readable([self._poke], deadline_after(delay)):
            _drain(self._poke)
        return self._stopping

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._stopping = True
            _signal(self._poke)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(ATTEMPT_TIMEOUT + REPORT_SEND_TIMEOUT + 1.0)
        with self._lock:
            self._closed = True
            self._live = False
            # Wake a listen()/wait() of another thread polling the link (or, in a gap, the
            # wake-up): closing an fd wakes no poll, so it would sleep out its whole timeout.
            # A waiter about to poll (hold_fds) finds them readable, then frees them.
            _signal(self._wake)
            if self._stream is not None:
                self._stream.shutdown()
            if not self._holders:
                self._free()

    def let_go(self) -> None:
        """close() in a forked child: close this process's copies of the fds and nothing else.

        The link's socket and eventfds are the parent's too: a shutdown would end its
        registration (the broker drops the name), a signal would wake its keeper. No lock:
        the parent's keeper may have held it at the fork, and it is not here to let go.
        """
        self._stopping = self._closed = True
        self._live = False
        self._holders.clear()
        self._free()

    def _free(self) -> None:
        # Caller holds the lock; the port is closed and nobody polls our fds.
        if self._freed:
            return
        self._freed = True
        if self._stream is not None:
            self._stream.close()
        self._decoder.close_fds()
        os.close(self._wake)
        os.close(self._poke)
