"""The asyncio API: the same ports, awaited, over the same sans-IO core as the blocking API.

A communication port here is driven by the event loop's readiness callbacks
(``loop.add_reader`` on its socket and on the peer's pidfd, ``add_writer``
only while a write waits for buffer space): no thread per connection. Every
decision comes from ``connection.Connection``, exactly as for
``port.CommunicationPort``; this module only moves bytes and resolves
futures. The one-off handshakes (registering a name, the connect exchange, an accept)
run in the loop's default executor. Works with any asyncio loop, uvloop
included.

Cancelling a task awaiting ``request`` cancels the request at the server
(CANCEL); a handler run by ``AsyncConnectionPort.serve`` gets CancelledError
when its client cancels. Memory grants are served by the blocking API only.
The security policy is the core's, as for the blocking API: every read's
SCM_CREDENTIALS, handles (``fds=``), flow-control windows (a send waits for
the peer's window, Throttled on timeout), a server's ``send_timeout``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

from . import port, server
from .config import Config, PortAttributes
from .connection import (
    BUDGET_RECHECK,
    FILED_ERROR,
    FILED_INBOX,
    NOTICES,
    SPACE_REASK,
    Body,
    Connection,
    body_size,
    check_callables,
    check_max_messages,
    copy_body,
    owned_body,
    reply_lost,
)
from .errors import (
    AlpcError,
    Cancelled,
    ConnectionClosed,
    DeadlineExceeded,
    PeerGone,
    QuotaExceeded,
    Throttled,
    Timeout,
)
from .protocol import Channel, Frames, Message
from .protocol import Payload as WirePayload
from .quotas import Limit, WindowClosed
from .section import SectionView, check_size, sweep_stale_names
from .security import PeerCred
from .transport import Stream, close_fds, deadline_after, finalize_unclosed, remaining, wait_readable
from .wire import MessageType

__all__ = [
    "Accept",
    "AsyncCommunicationPort",
    "AsyncConnectionPort",
    "AsyncConnectionRequest",
    "Handler",
    "connect",
    "create_port",
]

log = logging.getLogger(__name__)

# What request/send/reply take (connection.Body): one buffer, parts, or a filled view.
Payload = Body
# A handler of ``serve``: the reply to a request (None for a datagram), sync or async.
Handler = Callable[[Message], "Awaitable[Payload | None] | Payload | None"]
# serve()'s ``accept``: whether to take a client, sync or async.
Accept = Callable[["AsyncConnectionRequest"], "Awaitable[bool] | bool"]


async def _within(waiter: asyncio.Future[Any], deadline: float | None, what: str) -> Any:
    """Await ``waiter`` until ``deadline``; cheaper than asyncio.wait_for (no wrapper, one timer)."""
    if deadline is None:
        return await waiter
    left = remaining(deadline)
    if not left:
        if waiter.done():
            return waiter.result()
        waiter.cancel()  # as _expire would have: its done-callbacks (a reader's removal) run
        raise Timeout(f"timed out waiting for {what}")
    timer = asyncio.get_running_loop().call_later(left, _expire, waiter, what)
    try:
        return await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[Any], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(Timeout(f"timed out waiting for {what}"))


def _discard(waiters: list[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
    """Forget a sender's waiter that timed out or was cancelled: only a read clears the list,
    and against a peer that sends nothing every such wait (each budget re-check) left one."""
    if waiter in waiters:
        waiters.remove(waiter)


def _on_loop(loop: asyncio.AbstractEventLoop, what: str, owner: object) -> None:
    """RuntimeError unless called on ``loop``, the one ``owner`` was made on (in its thread).

    A port's state is its loop's alone (no locks): from another loop or thread a send went out
    racing the loop's reader and writer, and a request reached the server before the wait for
    its reply failed on asyncio's "attached to a different loop", the call's fate unknown.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not loop:
        raise RuntimeError(f"{what} on {owner!r} from another event loop or thread: "
                           "an asyncio port is used from the loop it was made on only")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running on this thread; None if none (a forked child may drive close() by
    hand: its copy of the parent's loop must not run)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _follow(source: asyncio.Future[None]) -> asyncio.Future[None]:
    """A future of this waiter's own, done when ``source`` (shared by every waiting sender) is.

    ``_within`` times a wait out by setting an exception on what it awaits: on ``source`` that
    would fail every other waiter; on an ``asyncio.shield`` of it, the shield's callback then
    raised InvalidStateError into the loop's exception handler once ``source`` completed.
    """
    waiter: asyncio.Future[None] = source.get_loop().create_future()

    def done(_: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    source.add_done_callback(done)
    return waiter


def check_max_tasks(max_tasks: object) -> None:
    """serve()'s bound, checked before a message is taken: 0 dispatched none (every request hung
    to its own timeout, silently) and a non-int failed in the socket's readiness callback."""
    if type(max_tasks) is not int or max_tasks < 1:
        raise ValueError(f"max_tasks must be an int >= 1, got {max_tasks!r}")


class AsyncCommunicationPort:
    """One end of an established connection, for asyncio. Use it from its loop only."""

    def __init__(self, stream: Stream, channel: Channel, *, peer_pidfd: int | None, is_server: bool,
                 accept_data: bytes = b"", send_timeout: float | None = None,
                 on_gone: Callable[[AsyncCommunicationPort], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stream = stream
        self._channel = channel
        self._core = core = Connection(channel, is_server=is_server)
        core.owner = self
        core.on_releases_due = self._releases_due
        core.on_releases_dropped = self._releases_dropped
        core.on_request_dropped = self._request_dropped
        # An _answer_dropped is scheduled on the loop and has not run yet.
        self._answer_scheduled = False
        self._pidfd = peer_pidfd
        self._is_server = is_server
        self.accept_data = accept_data
        # A server bounds every send (its caller's None included), as the blocking API does.
        self._send_timeout = send_timeout
        self._on_gone = on_gone
        self._max_fds_per_read = 1 + channel.policy.local.max_handles_per_message
        self.stats = core.stats
        # Futures of tasks waiting: per request id, for the inbox, for section
        # space, for the peer's flow window (woken by every read).
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._inbox_waiters: list[asyncio.Future[None]] = []
        self._space_waiters: list[asyncio.Future[None]] = []
        self._window_waiters: list[asyncio.Future[None]] = []
        # Bytes a write could not hand to the kernel yet; later writes queue behind.
        self._unsent: deque[memoryview] = deque()
        self._drained: asyncio.Future[None] | None = None
        # Handler tasks of requests in flight (serve()), cancelled when the client cancels.
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        # Every handler task serve() started (datagrams' too), cancelled when the connection ends.
        self._handlers: set[asyncio.Task[Any]] = set()
        # serve(): messages go straight from the reader callback to this, no task switch.
        self._dispatch: Callable[[Message], bool] | None = None
        # serve(): resolved when the connection ends (a notice, or an end that brings none:
        # a client side's, or this side's own close()).
        self._serving: asyncio.Future[None] | None = None
        self._released = False
        # close() is flushing: a write that times out now ends the connection as this side's
        # close, not as the peer's fault (see _drain).
        self._closing = False
        # A server's: asked by a send short of the port's section budget, has the port's other
        # connections give back their idle sections (idle, they never come back by themselves).
        self._on_budget_blocked: Callable[[AsyncCommunicationPort], None] | None = None
        try:
            self._loop.add_reader(stream.fileno(), self._on_readable)
            if peer_pidfd is not None:
                self._loop.add_reader(peer_pidfd, self._on_pidfd)
        except BaseException:
            # The loop cannot watch them (epoll_ctl: ENOSPC past max_user_watches, ENOMEM):
            # nobody would ever read or close them, and the peer would wait on them.
            self._loop.remove_reader(stream.fileno())
            _drop_channel((stream, channel, peer_pidfd))
            # Released here: __del__ must not close these fd numbers again (by then another
            # file may have them).
            self._released = True
            raise

    # -- identity -------------------------------------------------------------------

    @property
    def peer(self) -> PeerCred:
        return self._channel.peer

    @property
    def server(self) -> PeerCred:
        return self._channel.peer

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._core.inbox)

    @property
    def client(self) -> PeerCred:
        return self._channel.peer

    @property
    def peer_pidfd(self) -> int | None:
        """A pidfd of the peer process, owned by this port; None if none."""
        return self._pidfd

    @property
    def closed(self) -> bool:
        return self._core.failure is not None

    def __repr__(self) -> str:
        side = "server" if self._is_server else "client"
        return f"<AsyncCommunicationPort {side} side, peer pid {self.peer.pid}, {'closed' if self.closed else 'open'}>"

    def _own_loop(self, what: str) -> None:
        _on_loop(self._loop, what, self)

    # -- sending ------------------------------------------------------------------------

    async def request(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
                      deadline: float | None = None, fds: Sequence[int] = ()) -> Message:
        """Send a request and await its reply. Cancelling the awaiting task cancels the request
        at the server; ``deadline`` (``time.monotonic()``) travels with it; ``fds`` are passed
        along. While the peer holds ``max_pending_requests`` of ours, this waits for a reply
        first (Throttled when ``timeout`` runs out meanwhile)."""
        self._own_loop("request()")
        wait_until = deadline_after(self._send_timeout if timeout is None else timeout)
        if deadline is not None and (wait_until is None or deadline < wait_until):
            wait_until = deadline
        core = self._core
        size = body_size(data)
        if fds:
            core.check_handles(fds)
        if isinstance(data, SectionView) or size > core.inline_threshold:
            message_id = await self._sending(lambda: self._send_section(
                MessageType.REQUEST, data, wait_until, secure, deadline_attr=deadline, fds=fds), wait_until)
        else:
            body = owned_body(data)
            message_id = await self._sending(lambda: self._send_request(body, deadline, wait_until, fds), wait_until)
        self.stats.sent(size)
        try:
            return await self._wait(lambda: core.take_reply(message_id), message_id, wait_until, "the reply")
        except Timeout as exc:
            self._give_up(message_id)
            if deadline is not None and wait_until == deadline:
                raise DeadlineExceeded(f"request {message_id} ran past its deadline") from exc
            raise
        except asyncio.CancelledError:
            self._give_up(message_id)
            raise
        except Cancelled:
            raise
        except BaseException:
            core.abandon(message_id)
            raise

    def _give_up(self, message_id: int) -> None:
        """The caller stopped waiting: cancel the request, or, when its reply came already
        (filed while the task was about to resume), drop that reply and close its fds, as
        the blocking driver's ``_await_reply`` does; nobody else will take it."""
        if not self.cancel(message_id):
            self._core.abandon(message_id)
        self._core.forget_cancelled(message_id)

    async def _send_request(self, body: WirePayload, deadline: float | None, wait_until: float | None,
                            fds: Sequence[int]) -> int:
        core = self._core
        if fds and self._unsent:
            await self._drain(wait_until)  # before the request exists: see _write
        message_id, frames = core.request(body, None, deadline, fds)
        try:
            await self._write(frames, wait_until, fds)
        except asyncio.CancelledError:
            # _write queued the bytes before its first await (they go out): cancel it at the server.
            self._give_up(message_id)
            raise
        except BaseException:
            # Its bytes were handed to the kernel or queued (they go out), or the
            # connection is gone: never unsent here, its late reply is dropped.
            core.abandon(message_id)
            raise
        return message_id

    async def _sending(self, send: Callable[[], Awaitable[Any]], deadline: float | None) -> Any:
        """Await ``send()``; while the peer's flow window is closed, wait for it and try again."""
        while True:
            try:
                return await send()
            except WindowClosed as closed:
                if closed.limit is Limit.MAX_HANDLES_PER_MESSAGE:
                    raise QuotaExceeded("more fds than the peer takes in one message", limit=closed.limit) from None
                await self._await_window(closed, deadline)

    async def _await_window(self, closed: WindowClosed, deadline: float | None) -> None:
        """Wait until a reply or a credit frees something the peer counts (or raise Throttled)."""
        core = self._core
        if core.backlogged:
            # Datagrams queued by send(flush=False) hold their slots already: the peer credits
            # them only once they reach it, so waiting for that with them unsent waits for ever.
            await self._write([], deadline)
        before = core.window_counts()
        while not any(now < was for now, was in zip(core.window_counts(), before, strict=True)):
            core.check_open()
            waiter = self._loop.create_future()
            self._window_waiters.append(waiter)
            try:
                await _within(waiter, deadline, f"the peer to free its {closed.limit}")
            except Timeout:
                raise Throttled(f"waited for the peer to free its {closed.limit} until the timeout ({closed})",
                                limit=closed.limit) from None
            finally:
                _discard(self._window_waiters, waiter)

    def cancel(self, message_id: int) -> bool:
        """Cancel request ``message_id`` at the server; False if it is not in flight."""
        self._own_loop("cancel()")
        frames = self._core.cancel(message_id)
        self._wake_id(message_id)
        if frames:
            self._post(frames)
        return bool(frames)

    async def send(self, data: Payload = b"", timeout: float | None = None, *, secure: bool = False,
                   flush: bool = True, fds: Sequence[int] = ()) -> None:
        """Send a datagram; ``flush=False`` queues a small one for the next write (batching);
        ``fds`` are passed along (such a datagram is written at once). Waits while the peer's
        datagram window is full (Throttled when ``timeout`` runs out meanwhile)."""
        self._own_loop("send()")
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        core = self._core
        size = body_size(data)
        if fds:
            core.check_handles(fds)

        async def send() -> None:
            if isinstance(data, SectionView) or size > core.inline_threshold:
                await self._send_section(MessageType.DATAGRAM, data, deadline, secure, fds=fds)
                return
            if fds and self._unsent:
                await self._drain(deadline)  # before the datagram takes its slot: see _write
            frames = core.datagram(owned_body(data), fds)
            if flush or fds:
                await self._write(frames, deadline, fds)
            elif core.queue(frames):
                await self._write([], deadline)

        await self._sending(send, deadline)
        self.stats.sent(size)

    async def send_many(self, items: Iterable[Payload], timeout: float | None = None) -> None:
        """Send datagrams in order, in as few system calls as possible (small ones are framed
        together; large ones, views and bodies in parts go as ``send`` sends them)."""
        self._own_loop("send_many()")
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        threshold = self._core.inline_threshold
        small: list[bytes] = []
        for item in items:
            # Measured in bytes, as the blocking API does: len() counts a buffer's items (a 2-D
            # array's rows), so a large one went inline and the peer dropped the connection
            # over it; and a body in parts is sent, not made bytes() of (a list of ints).
            if not (type(item) is bytes and len(item) <= threshold):
                try:
                    size = body_size(item)
                except TypeError:
                    # Not a body: the items before it go out, as one send() each would have sent them
                    # (those of earlier batches and large ones already did), and it raises then.
                    await self._send_small(small, deadline)
                    raise
                if isinstance(item, SectionView) or size > threshold or not isinstance(
                        item, (bytes, bytearray, memoryview)):
                    await self._send_small(small, deadline)
                    await self.send(item, remaining(deadline))
                    continue
                item = bytes(item)
            small.append(item)
        await self._send_small(small, deadline)

    async def _send_small(self, items: list[bytes], deadline: float | None) -> None:
        """Write ``items`` in as few writes as the peer's datagram window allows."""
        while items:
            async def batch() -> int:
                frames, count = self._core.datagrams(items)
                await self._write(frames, deadline)
                return count

            count: int = await self._sending(batch, deadline)
            self.stats.messages_out += count
            self.stats.bytes_out += sum(len(item) for item in items[:count])
            del items[:count]

    async def flush(self, timeout: float | None = None) -> None:
        """Write every datagram queued with ``flush=False``."""
        self._own_loop("flush()")
        # A bad timeout is refused even with nothing queued; none is a server's send_timeout,
        # as for any send (a deaf client would hold this thread for ever otherwise).
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        if self._core.owed or self._unsent:
            await self._write([], deadline)

    async def reply(self, message: Message, data: Payload = b"", timeout: float | None = None, *,
                    secure: bool = False, fds: Sequence[int] = ()) -> None:
        """Answer ``message``, a request received on this port (nothing is sent if it was cancelled).

        On a server, a reply that cannot be written within ``send_timeout`` (or
        ``timeout``) means the client stopped reading (or the port's section
        budget held it up): its connection is dropped (a CLIENT_DIED notice
        follows) and Throttled raised.
        """
        self._own_loop("reply()")
        if message.type is not MessageType.REQUEST:
            raise ValueError(f"only a REQUEST can be replied to, not {message.type.name}")
        core = self._core
        # Checked first, as the blocking reply does: a bad timeout or body is refused even for
        # a request its client cancelled meanwhile (it passed silently only then).
        deadline = deadline_after(self._send_timeout if timeout is None else timeout)
        size = body_size(data)
        if not core.wants_reply(message):
            if isinstance(data, SectionView):
                data.release()
            return
        if fds:
            core.check_handles(fds)
        try:
            if isinstance(data, SectionView) or size > core.inline_threshold:
                await self._send_section(MessageType.REPLY, data, deadline, secure, callback_id=message.id, fds=fds)
            else:
                if fds and self._unsent:
                    await self._drain(deadline)  # before the reply is built (and R answered): see _write
                    if not core.wants_reply(message):
                        return
                await self._write(core.reply(message, owned_body(data), fds), deadline, fds)
        except Timeout as exc:
            if not self._is_server:
                raise
            self._reply_timed_out(exc)
        self.stats.replied(message.id, size)

    def _reply_timed_out(self, exc: Timeout) -> None:
        """As the blocking driver's: a timed-out write dropped the connection already (what
        was queued cannot be taken back); a reply that found no section space in time drops
        it here, saying why (see reply_lost): the client would wait for it forever."""
        reason, limit = reply_lost(exc)
        core = self._core
        if core.failure is None:
            self.stats.errors += 1
            core.fail(PeerGone(f"{reason}; its connection was dropped"), notice=reason)
            self._wake_all()
        raise Throttled(f"the reply could not be written in time: {reason}, and its connection was dropped",
                        limit=limit) from None

    async def ping(self, timeout: float | None = None) -> None:
        self._own_loop("ping()")
        deadline = deadline_after(timeout)
        core = self._core
        message_id, frames = core.ping()
        await self._write(frames, deadline)
        try:
            await self._wait(lambda: core.take_reply(message_id), message_id, deadline, "the pong")
        except BaseException:
            core.abandon(message_id)
            raise

    # -- sections ---------------------------------------------------------------------------

    async def create_view(self, size: int, *, secure: bool = False, timeout: float | None = None) -> SectionView:
        """Writable space in this connection's section, to fill and send with no copy."""
        self._own_loop("create_view()")
        check_size("a view", size)
        return await self._reserve(size, secure, deadline_after(timeout))

    async def trim_sections(self, timeout: float | None = None) -> None:
        self._own_loop("trim_sections()")
        deadline = deadline_after(timeout)  # a bad timeout is refused before anything is unmapped
        await self._write(self._core.trim(), deadline)

    async def _reserve(self, size: int, secure: bool, deadline: float | None) -> SectionView:
        core = self._core
        view = core.reserve(size, secure)
        if view is not None:
            return view
        await self._write(core.space_wanted(), deadline)
        reask, most = SPACE_REASK
        while True:
            view = core.reserve(size, secure)
            if view is not None:
                return view
            core.check_open()
            if core.budget_blocked and self._on_budget_blocked is not None:
                self._on_budget_blocked(self)
                view = core.reserve(size, secure)  # a give-back on this thread freed it at once
                if view is not None:
                    return view
            waiter = self._loop.create_future()
            self._space_waiters.append(waiter)
            # Space freed by other connections of a port-wide budget comes without a read here.
            window = deadline_after(BUDGET_RECHECK if core.budget_blocked else reask)
            if deadline is not None and window is not None:
                window = min(window, deadline)
            try:
                await _within(waiter, window, "space in the connection's sections")
            except Timeout:
                _discard(self._space_waiters, waiter)
                if window == deadline or remaining(deadline) == 0:
                    limit = Limit.MAX_PORT_SECTION_BYTES if core.budget_blocked else Limit.MAX_SECTION_BYTES
                    raise Throttled(f"no section space freed up before the timeout ({limit})", limit=limit) from None
                if not core.budget_blocked:
                    await self._write(core.space_wanted(), deadline)  # see SPACE_REASK
                    reask = min(reask * 2, most)
            except asyncio.CancelledError:
                _discard(self._space_waiters, waiter)
                raise

    def _give_back_idle_sections(self) -> None:
        """Another connection of this port waits for the port's section budget: unmap our idle
        sections on this port's loop (from any thread, never waiting; see _trim_idle)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._trim_idle()
            return
        try:
            self._loop.call_soon_threadsafe(self._trim_idle)
        except RuntimeError:
            pass  # the loop is closed, and this connection with it

    def _trim_idle(self) -> None:
        """Unmap the idle sections (their bytes are the budget's again at once); the
        SECTION_CLOSE goes out now or, with a peer not reading, queues behind what waits."""
        core = self._core
        if core.failure is not None:
            return
        core.trim()
        if core.owed:
            frames, _ = core.take_owed()
            self._post(frames)

    async def _send_section(self, kind: MessageType, data: Payload, deadline: float | None, secure: bool, *,
                            callback_id: int = 0, deadline_attr: float | None = None,
                            fds: Sequence[int] = ()) -> int:
        core = self._core
        if isinstance(data, SectionView):
            data.check_secure(secure)
            view, explicit = data, True
        else:
            size = body_size(data)
            self._channel.check_length(size)
            view, explicit = await self._reserve(size, secure, deadline), False
            try:
                copy_body(view.memory, data)
            except BaseException:
                view.release()
                raise
        try:
            if self._unsent:
                await self._drain(deadline)  # the frame may carry fds: see _write
            message_id, frames, passed = core.section_message(kind, view, as_view=explicit, callback_id=callback_id,
                                                              deadline=deadline_attr, fds=fds)
        except BaseException:
            if not explicit:
                view.release()
            raise
        written = False
        try:
            await self._write(frames, deadline, passed)
            written = True
        except asyncio.CancelledError:
            # _write handed the frames to the kernel or queued them before its first await
            # (the queue was drained above, so no fds wait): they go out, and the range
            # stays the peer's until it releases it.
            written = True
            if kind is MessageType.REQUEST and message_id:
                self._give_up(message_id)  # its frame goes out: the CANCEL follows it
            raise
        except BaseException:
            written = self._stream.broken
            if kind is MessageType.REQUEST and message_id:
                core.abandon(message_id)
            raise
        finally:
            core.section_sent(view, written)
        return message_id

    # -- writing ----------------------------------------------------------------------------

    async def _write(self, frames: Frames, deadline: float | None, fds: Sequence[int] = ()) -> None:
        """Hand ``frames`` (after whatever the core owes the peer) to the kernel, waiting for room.

        Unless fds must wait for the queue to drain first (callers that number
        a message drain before numbering it), the frames are handed over or
        queued before the first await: once this is called, they go out (or
        the connection ends).
        """
        core = self._core
        core.check_open()
        if fds and self._unsent:
            await self._drain(deadline)  # fds ride with the first byte of their own sendmsg
        if core.owed:
            # Taken after the last await: a cancel cannot drop them (their token is not kept).
            owed, _ = core.take_owed()
            frames = owed + frames
        if not self._unsent:
            try:
                written = self._stream.try_send(frames, fds or ())
            except ConnectionClosed as hung_up:
                self._hung_up()
                core.check_open()
                raise PeerGone("the peer's socket is closed") from hung_up
            views = [memoryview(frame).cast("B") for frame in frames if len(frame)]
            rest = _advance(views, written)
            if not rest:
                return
            self._unsent.extend(rest)
        else:
            self._unsent.extend(memoryview(frame).cast("B") for frame in frames if len(frame))
        await self._drain(deadline)

    def _post(self, frames: Frames) -> None:
        """Write runtime frames without awaiting (from callbacks); what does not fit queues."""
        if self._core.failure is not None or not frames:
            return
        if self._unsent:
            self._unsent.extend(memoryview(frame).cast("B") for frame in frames if len(frame))
            self._want_writable()
            return
        try:
            written = self._stream.try_send(frames)
        except ConnectionClosed:
            self._hung_up()
            return
        rest = _advance([memoryview(frame).cast("B") for frame in frames if len(frame)], written)
        if rest:
            self._unsent.extend(rest)
            self._want_writable()

    async def _drain(self, deadline: float | None) -> None:
        while self._unsent:
            self._core.check_open()
            if self._drained is None or self._drained.done():
                self._drained = self._loop.create_future()
            self._want_writable()
            try:
                await _within(_follow(self._drained), deadline, "room in the socket")
            except Timeout:
                # Part of a frame may be out: the stream cannot be trusted any more.
                self._stream.broken = True
                self.stats.errors += 1
                if self._closing:
                    # close()'s own flush gave up: the other calls on this port hear that this side
                    # closed it (PeerGone would have an application reconnect), as the blocking API's do.
                    self._core.fail(ConnectionClosed("the port is closed (its last writes timed out: the peer "
                                                     "was not reading)"))
                else:
                    self._core.fail(PeerGone("the peer stopped reading: a send timed out mid-frame; the "
                                             "connection was dropped"),
                                    notice="the peer stopped reading (a send timed out mid-frame)")
                self._wake_all()
                raise

    def _want_writable(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        self._loop.add_writer(self._stream.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        unsent = self._unsent
        try:
            while unsent:
                written = self._stream.try_send(list(unsent)[:512])
                if not written:
                    return
                rest = _advance(list(unsent), written)
                unsent.clear()
                unsent.extend(rest)
        except ConnectionClosed:
            unsent.clear()
            self._hung_up()
        self._loop.remove_writer(self._stream.fileno())
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _releases_due(self) -> None:
        # A received view was released, maybe on another thread (its garbage collection).
        try:
            self._loop.call_soon_threadsafe(self._flush_releases)
        except RuntimeError:
            pass  # the loop is closed, so nothing writes: the release itself is done all the same

    def _releases_dropped(self) -> None:
        # A received body or view was collected unreleased (its finalizer, any thread): it only
        # queued its range. A task may drop it long after its handler ended, while serve() or
        # receive() waits for nothing but the peer, which waits for that space: say so soon.
        try:
            self._loop.call_soon_threadsafe(self._flush_unannounced)
        except RuntimeError:
            pass  # the loop is closed, and this connection with it

    def _request_dropped(self) -> None:
        # A request handed out was dropped unanswered (its reference's callback: any thread, any
        # moment, inside the loop's own code too): its answer is written on the loop, soon.
        if self._answer_scheduled:
            return  # the one scheduled answers every request dropped before it runs
        self._answer_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._answer_dropped)
        except RuntimeError:
            pass  # the loop is closed, and this connection with it

    def _answer_dropped(self) -> None:
        """On the loop: the UNANSWERED replies to requests dropped unanswered (what does not fit queues)."""
        self._answer_scheduled = False  # first: a drop from now on schedules another
        self._post(self._core.answer_dropped())

    def _flush_unannounced(self) -> None:
        if self._core.releases_unannounced():
            self._flush_releases()

    def _flush_releases(self) -> None:
        """Releases and the credit owed, as a write of their own (what does not fit queues)."""
        frames, _ = self._core.release_frames()
        self._post(frames)

    def _after_take(self) -> None:
        """The application took messages: answers to expired requests (with the releases no
        reply will carry now), credits once due."""
        core = self._core
        frames = core.take_automatic()
        if core.credit_due or core.releases_unannounced():
            # A request that expired in the inbox gets no reply to carry the release of its
            # body (copied out on arrival): it goes just before the runtime's answer.
            releases, _ = core.release_frames()
            frames = releases + frames
        self._post(frames)

    # -- reading ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        got = self._stream.recv_fds(self._max_fds_per_read)
        if got is None:
            return
        data, fds, sender, truncated = got
        if not data:
            close_fds(fds)
            self._lost("the peer process died or dropped the connection")
            return
        core = self._core
        if not fds and not truncated:
            filed = core.receive_one(data, sender)
            if filed:
                if filed == FILED_ERROR:
                    log.warning("protocol error from pid %s, dropping the connection: %s", self.peer.pid, core.error)
                    self._ended()
                    return
                if filed == FILED_INBOX:
                    self._wake_inbox()
                else:
                    self._wake_replies()
                # As after any read: a reply frees a slot of the peer's window, a RELEASE riding
                # before the frame section space, and nothing else wakes those senders (a
                # window waiter has no timer of its own).
                self._wake_senders()
                return
        batch = core.receive(data, fds, sender, truncated)
        if batch.error is not None:
            if batch.peer_fault:
                log.warning("protocol error from pid %s, dropping the connection: %s", self.peer.pid, batch.error)
            else:  # this process ran out of fds: not the peer's doing
                log.warning("connection with pid %s: %s", self.peer.pid, batch.error)
            self._ended()
            return
        frames, _ = core.outgoing(batch)
        self._post(frames)
        wake = core.route(batch)
        if wake.inbox:
            # Before the replies: what the peer sent ahead of a reply (one-way callbacks into
            # objects passed with the request) is dispatched first, while those objects exist.
            self._wake_inbox()
        for message_id in wake.ids:
            self._wake_id(message_id)
        if wake.cancelled:
            for message in core.take_cancelled():
                task = self._tasks.pop(message.id, None)
                if task is not None:
                    task.cancel()
        if wake.failed:
            self._wake_all()
        self._wake_senders()

    def _wake_senders(self) -> None:
        """After a read: senders waiting for section space or the flow window look again."""
        for waiters in (self._space_waiters, self._window_waiters):
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            waiters.clear()

    def _on_pidfd(self) -> None:
        if self._pidfd is not None and wait_readable([self._pidfd], 0.0):
            self._loop.remove_reader(self._pidfd)  # (it stays readable: once is enough)
            self._read_after_exit()

    def _read_after_exit(self) -> None:
        """The peer's process exited: whatever it sent before is read first (a read per turn of
        the loop, as the socket's reader does), its PORT_CLOSED included, and only then does the
        connection end as died. (One read took 64 KiB: a backlog behind it was lost.)"""
        if self._released or self._core.failure is not None:
            return  # ended meanwhile (a PORT_CLOSED, a close())
        if self._stream.unread():
            self._on_readable()
            self._loop.call_soon(self._read_after_exit)
            return
        self._lost("the peer process exited")

    def _hung_up(self) -> None:
        """A write found the peer's socket closed.

        While bytes it sent before are unread (its PORT_CLOSED, if it closed cleanly), the
        socket's reader takes them and ends the connection, as closed or as died; with none,
        it ends now.
        """
        if not self._stream.unread():
            self._lost("the peer's socket is closed")

    def _lost(self, reason: str) -> None:
        if self._core.connection_lost(reason):
            self._ended()

    def _ended(self) -> None:
        self._unwatch()
        self._wake_all()

    def _unwatch(self) -> None:
        if not self._released:
            self._loop.remove_reader(self._stream.fileno())
            if self._pidfd is not None:
                self._loop.remove_reader(self._pidfd)

    def _wake_id(self, message_id: int) -> None:
        waiter = self._waiting.pop(message_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_replies(self) -> None:
        for message_id in [i for i in self._waiting if i in self._core.replies]:
            self._wake_id(message_id)

    def _wake_inbox(self) -> None:
        if self._dispatch is not None:
            self._feed()
            return
        waiters, self._inbox_waiters = self._inbox_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake_all(self) -> None:
        for message_id in list(self._waiting):
            self._wake_id(message_id)
        self._wake_inbox()
        self._wake_senders()
        if self._drained is not None and not self._drained.done():
            # A send waiting for room in the socket: the connection ended, it must not wait
            # out its own timeout for a writer callback that will never come.
            self._drained.set_result(None)

    def _feed(self) -> None:
        """serve(): hand every waiting message to the dispatcher while it takes them."""
        dispatch = self._dispatch
        core = self._core
        while dispatch is not None and core.inbox:
            message = core.take_message()
            if message is None:
                break
            if not dispatch(message):
                core.put_back(message)  # at its limit: fed again (and credited) when a handler ends
                break
        self._after_take()
        serving = self._serving
        if serving is not None and core.failure is not None and not core.inbox and not serving.done():
            # Ended with no notice left to dispatch (a client gets none; close() drops it).
            serving.set_result(None)

    async def _wait(self, take: Callable[[], Message | None], message_id: int | None, deadline: float | None,
                    what: str) -> Message:
        core = self._core
        polled = False
        while True:
            found = take()
            if found is not None:
                return found
            core.check_open()
            if core.releases_unannounced():
                self._flush_releases()
                continue  # that write may have found the peer gone and ended the connection
            if not polled and deadline is not None and not remaining(deadline):
                # A poll (timeout=0) or the time is up: what the socket holds already counts, as
                # in the blocking API (the loop's reader may not have run since it came); once.
                polled = True
                if self._poll_socket():
                    continue
            waiter = self._loop.create_future()
            if message_id is None:
                self._inbox_waiters.append(waiter)
            else:
                self._waiting[message_id] = waiter
            try:
                await _within(waiter, deadline, what)
            finally:
                if message_id is not None:
                    if self._waiting.get(message_id) is waiter:
                        del self._waiting[message_id]
                elif waiter in self._inbox_waiters:
                    # Timed out or cancelled: only a message would clear it, and a receive(timeout)
                    # loop on a quiet connection would leave one behind per turn.
                    self._inbox_waiters.remove(waiter)

    def _poll_socket(self) -> bool:
        """Read what the socket holds now, as the loop's reader would; False if it held nothing."""
        if self._released or self._stream.closed or not wait_readable([self._stream.fileno()], 0.0):
            return False
        self._on_readable()
        return True

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> Message:
        """The next request or datagram (a server also gets PORT_CLOSED / CLIENT_DIED once)."""
        self._own_loop("receive()")
        message = await self._wait(self._core.take_message, None, deadline_after(timeout), "a message")
        self._after_take()
        if self._core.finalize_wanted:
            self._finalize()
        return message

    async def receive_many(self, max_messages: int = 1024, timeout: float | None = None) -> list[Message]:
        """Every message waiting, in order (at least one, at most ``max_messages``)."""
        self._own_loop("receive_many()")
        check_max_messages(max_messages)
        first = await self._wait(self._core.take_message, None, deadline_after(timeout), "a message")
        batch = [first]
        if first.type not in NOTICES:
            self._core.take_messages(batch, max_messages)
        self._after_take()
        if self._core.finalize_wanted:
            self._finalize()
        return batch

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                message = await self.receive()
            except ConnectionClosed:
                return
            last = message.type in NOTICES
            yield message
            # Not held while the next one is awaited: a body the caller dropped gives its
            # range back now (a sender waiting for that space would send nothing more).
            del message
            if last:
                return

    # -- serving --------------------------------------------------------------------------------

    async def serve(self, handler: Handler, *, max_tasks: int = 1024,
                    admit: Callable[[Message], bool] | None = None) -> None:
        """Answer every request and datagram with ``handler`` until the peer goes away.

        Each message runs as a task started from the socket's readiness
        callback (at most ``max_tasks`` at once, those an earlier serve() of
        this port left running included); a request the peer cancels
        has its task cancelled. Requests this side makes meanwhile get their
        replies as usual, so a client may serve its peer's nested calls this way.

        ``admit(message)``, when given, is asked before each request or datagram
        is taken: False leaves it, and what came after it, unread in the inbox
        (holding its slot of the peer's window, so the peer's sends wait for
        room); it is asked again when a running handler ends or more arrives.
        It runs on the loop and must not block; if it raises, serve() ends with
        that exception, the message left in the inbox.
        """
        self._own_loop("serve()")
        check_callables(handler=handler, admit=admit)
        check_max_tasks(max_tasks)
        if self._dispatch is not None:
            # A second one took over the dispatch: the first never heard the connection end
            # and never returned (close() included), its task awaited forever.
            raise RuntimeError(f"serve() already runs on {self!r}: one serve() takes every message")
        ended: asyncio.Future[None] = self._loop.create_future()
        # The handler tasks running count against max_tasks, those an earlier serve() started
        # included (a cancelled serve() leaves its tasks running): a count of this serve()'s
        # own let the two together run past max_tasks.
        handlers = self._handlers

        def finished(task: asyncio.Task[None], message_id: int) -> None:
            handlers.discard(task)
            if self._tasks.get(message_id) is task:
                del self._tasks[message_id]
            self._feed()
            # The message is gone with its task (this callback does not hold it): a body it
            # dropped unreleased only queued its range, and serve() never sleeps in _wait,
            # where such releases are flushed; a sender waiting for that space hears now.
            if self._core.releases_unannounced():
                self._flush_releases()
            if self._dispatch is None:
                self._release_after_notice()

        def admitted(message: Message) -> bool:
            assert admit is not None
            try:
                return admit(message)
            except Exception as exc:
                # Raised out of the readiness callback, it lost the message it was asked about:
                # that stays in the inbox, and serve() ends with the error.
                if not ended.done():
                    ended.set_exception(exc)
                return False

        def dispatch(message: Message) -> bool:
            if message.type in NOTICES:
                if not ended.done():
                    ended.set_result(None)
                return True
            if len(handlers) >= max_tasks or (admit is not None and not admitted(message)):
                return False
            task = self._loop.create_task(_handle(self, message, handler))
            handlers.add(task)
            message_id = message.id
            if message.type is MessageType.REQUEST:
                self._tasks[message_id] = task
            task.add_done_callback(lambda done: finished(done, message_id))
            return True

        self._dispatch = dispatch
        self._serving = ended
        try:
            self._feed()
            await ended
        finally:
            if self._dispatch is dispatch:
                self._dispatch = None
            if self._serving is ended:
                self._serving = None
        self._release_after_notice()

    def _release_after_notice(self) -> None:
        """serve() dispatched the notice that ended a server's connection: release it (its
        socket, pidfd, and its place in the port's clients and max_connections), as receive()
        does on taking one, once no handler serve() started still runs (one may still use a
        body the client sent before it left)."""
        if self._is_server and self._core.finalize_wanted and not self._handlers:
            self._finalize()

    def check_length(self, size: int) -> None:
        """MessageTooLarge if a message of ``size`` bytes exceeds what the peer accepts.

        A size that is no byte count is the caller's mistake, not a fitting message: -1 passed
        silently and "x" raised the comparison's untyped TypeError."""
        if type(size) is not int:
            raise TypeError(f"a message size is an int (bytes), not {type(size).__name__}")
        if size < 0:
            raise ValueError(f"a message size is >= 0 bytes, not {size}")
        self._channel.check_length(size)

    # -- closing ---------------------------------------------------------------------------------

    async def close(self, timeout: float | None = 1.0) -> None:
        """Flush what is queued, tell the peer (PORT_CLOSED) and release the connection.

        On the port's loop; or on any loop once the port's loop no longer runs (it ended: the
        only way to let go of such a port), flushing with a blocking write then. While the
        port's loop runs on another thread, RuntimeError (its futures, readers and writer are
        that loop's alone): ``asyncio.run_coroutine_threadsafe(port.close(), its_loop)``.
        Cancelled while it flushes, it still closes (what was not written is lost). On the
        port's loop it then waits (``timeout`` at most) for the handler tasks of ``serve()`` it
        cancelled to end, so none still runs once it returns.
        """
        off_loop = _running_loop() is not self._loop
        # (A forked child's copy of a loop that ran at the fork says it runs: it never will.)
        if off_loop and self._loop.is_running() and not self._stream.inherited:
            self._own_loop("close()")
        self._closing = True
        deadline: float | None = None
        try:
            deadline = deadline_after(timeout)
            # Not in a forked child: bytes the parent's loop has still to write are the parent's.
            if self._core.failure is None and (self._core.owed or self._unsent) and not self._stream.inherited:
                if off_loop:
                    self._flush_without_loop(timeout)
                else:
                    try:
                        await self._write([], deadline)
                    except (Timeout, ConnectionClosed):
                        pass
            if not off_loop and not self._stream.inherited:
                await self._room_for_notice(deadline)
        finally:
            # Cancelled mid-flush too: an open connection nobody closes would hold its fds and
            # leave the peer waiting.
            self._end(wake=not self._loop.is_closed())
        if not off_loop:
            await self._cancelled_handlers_ended(remaining(deadline))

    async def _cancelled_handlers_ended(self, timeout: float | None) -> None:
        """close(): the handler tasks _finalize cancelled run their cleanup (a handler's
        ``except CancelledError`` or ``finally``) now, not after close() returned."""
        current = asyncio.current_task()
        pending = [task for task in (*self._tasks.values(), *self._handlers)
                   if not task.done() and task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def _room_for_notice(self, deadline: float | None) -> None:
        """close(): wait (until ``deadline`` at most) for room for PORT_CLOSED in a socket the
        sends just before filled. _end()'s non-blocking write found none and dropped it: the
        peer, a little behind, read the end of the stream with nothing before it, a death for
        an orderly close."""
        if self._unsent or self._core.failure is not None or self._stream.send_room() > 0:
            return
        self._want_writable()  # nothing unsent: the socket's next writable turn resolves _drained
        drained = self._drained
        assert drained is not None
        try:
            await _within(_follow(drained), deadline, "room in the socket")
        except Timeout:
            pass  # _end() tries once all the same

    def _flush_without_loop(self, timeout: float | None) -> None:
        """close() after the port's loop stopped: nothing turns that loop to write what it
        queued, so one blocking write of its own, ``timeout`` at most (as flush_at_exit)."""
        owed, _ = self._core.take_owed()
        unsent = list(self._unsent)
        self._unsent.clear()
        try:
            self._stream.send([*unsent, *owed], deadline=deadline_after(timeout))
        except (Timeout, ConnectionClosed):
            # A cut frame left the stream broken: no PORT_CLOSED follows it. So may the loop's
            # own unsent bytes, which can start inside a frame it wrote in part, when this
            # write gave up before any of them left.
            if unsent:
                self._stream.broken = True

    def _end(self, wake: bool) -> None:
        """close()'s end: PORT_CLOSED (unless it would land inside a frame), then release."""
        notice = self._core.close()
        stream = self._stream
        if notice and not self._unsent and not stream.broken and not stream.inherited:  # forked: see _finalize
            try:
                stream.try_send(notice)
            except ConnectionClosed:
                pass
        if wake:  # a closed loop's futures cannot be resolved (nothing awaits them any more)
            self._wake_all()
        self._finalize()

    def _finalize(self) -> None:
        if self._released:
            return
        # A forked child's copy shares the socket and the loop's epoll set with the parent,
        # whose connection this still is: close our fds, but neither unwatch nor shut it down.
        inherited = self._stream.inherited
        if not inherited:
            self._unwatch()
            self._loop.remove_writer(self._stream.fileno())
        self._released = True
        self._stream.shutdown()
        self._stream.close()
        self._core.release_resources()
        if self._on_gone is not None and not inherited:
            self._on_gone(self)
        for task in [*self._tasks.values(), *self._handlers]:
            task.cancel()
        if self._core.peer_died or (self._pidfd is not None and wait_readable([self._pidfd], 0.0)):
            sweep_stale_names(self.peer.pid)  # as CommunicationPort._maybe_finalize
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    def __del__(self) -> None:
        # Never closed, and collected: its loop let go of it (the loop ended, or it never
        # watched it). The raw pidfd would stay open for the process's life; the peer hears
        # PORT_CLOSED if the socket is still open. No loop call (the loop may be closed) and
        # nothing that waits: one non-blocking write, then closes.
        if getattr(self, "_released", True):
            return  # closed already, or __init__ failed before there was anything to release
        self._released = True
        # With bytes still queued for the loop, a notice now would land inside a frame.
        farewell = self._core.close if not self._unsent else list
        finalize_unclosed(self._stream, farewell, [self._core.release_resources, self._close_pidfd])

    def flush_at_exit(self, timeout: float) -> None:
        """The process ends normally (see connection._flush_at_exit): no loop turns any more, so
        one write of its own, waiting ``timeout`` at most for room: the bytes the loop had still
        to write first (a send cancelled meanwhile goes out whole, asyncio.run() cancels what
        still waits), then the datagrams queued here. Not while a loop on another thread runs:
        its own write may be under way.

        Then PORT_CLOSED, as close() does (and the blocking driver's hook): a normal exit is no
        death, and a port a daemon thread's loop still held (its frame never collected, so no
        finalizer runs) showed its peer CLIENT_DIED. The socket stays as it is: the exit closes it."""
        if self._unsent and self._loop.is_running():
            return
        core, stream = self._core, self._stream
        if self._unsent or core.backlogged:
            owed, _ = core.take_owed()
            unsent = list(self._unsent)
            self._unsent.clear()
            stream.send([*unsent, *owed], deadline=deadline_after(timeout))
        if stream.inherited:
            return
        owed = core.take_owed()[0] if core.owed and core.failure is None else []
        notice = core.close()
        if notice and not stream.broken:
            try:
                stream.try_send(owed + notice)
            except ConnectionClosed:
                pass

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            close_fds([self._pidfd])
            self._pidfd = None

    async def __aenter__(self) -> AsyncCommunicationPort:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _advance(views: list[memoryview], written: int) -> list[memoryview]:
    while written and views:
        head = views[0]
        if written >= len(head):
            written -= len(head)
            views.pop(0)
        else:
            views[0] = head[written:]
            written = 0
    return views


# -- connecting ------------------------------------------------------------------------------------


async def connect(name: str, data: bytes = b"", *, timeout: float | None = None,
                  config: Config | None = None, server_uid: int | None = None) -> AsyncCommunicationPort:
    """Connect to the named port (the handshake runs in the default executor); ``server_uid``
    pins the server's uid, as for ``port.connect``."""
    loop = asyncio.get_running_loop()
    handshake = _Abortable()
    # The asyncio driver does not drive Quick-LPC rings: it declines them.
    job = loop.run_in_executor(
        None, lambda: port.open_channel(name, data, timeout=timeout, config=config, quick_ok=False,
                                        server_uid=server_uid, on_stream=handshake.attach))
    stream, channel, pidfd, accept_data, _ = await _unless_cancelled(job, _drop_channel, handshake.abort)
    return AsyncCommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=False, accept_data=accept_data)


class _Abortable:
    """A handshake on an executor thread that the loop may end: abort() shuts its stream down,
    so the thread's blocked read sees EOF now. Otherwise a cancelled connect went on waiting for
    the server's answer up to its timeout, and asyncio.run() (which waits for the default
    executor) with it, the server holding a request nobody would take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._aborted = False

    def attach(self, stream: Stream) -> None:
        with self._lock:
            self._stream = stream
            if self._aborted:
                stream.shutdown()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._stream is not None:
                self._stream.shutdown()


async def _unless_cancelled(job: asyncio.Future[Any], undo: Callable[[Any], None],
                            abort: Callable[[], None] | None = None) -> Any:
    """Await an executor job; if the caller is cancelled meanwhile, ``abort`` it (when it can
    be cut short) and ``undo`` what the job made once it is done (nobody else will)."""
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        if abort is not None:
            abort()
        def finished(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                undo(done.result())
        job.add_done_callback(finished)
        raise


def _drop_channel(opened: tuple[Any, ...]) -> None:
    """A channel made but never handed out (its caller was cancelled, or the loop cannot watch
    it). Its peer holds a connection already (an accept's reply went out): it hears PORT_CLOSED,
    as from a close(), not a hang-up that reads as a crash (rpc.aio.Server.stop() mid-accept).
    One non-blocking write of one small frame: nothing waits here."""
    stream, channel, pidfd = opened[:3]  # open_channel's result, or accept_channel's
    try:
        stream.try_send(channel.close_notice())
    except (ConnectionClosed, OSError):
        pass  # the peer is gone: it hears nothing either way
    channel.release_resources()
    stream.shutdown()
    stream.close()
    if pidfd is not None:
        close_fds([pidfd])


# -- serving ---------------------------------------------------------------------------------------


class AsyncConnectionRequest:
    """A client asking to connect; ``client`` is its kernel-verified identity."""

    def __init__(self, request: server.ConnectionRequest, port: server.ConnectionPort,
                 owner: AsyncConnectionPort | None = None) -> None:
        self._request = request
        self._port = port
        self._owner = owner
        self.client = request.client
        self.groups = request.groups
        self.data = request.data

    async def accept(self, data: bytes = b"", timeout: float | None = 5.0) -> AsyncCommunicationPort:
        # In the default executor: the reply is a blocking write that waits (up to ``timeout``)
        # while accept data larger than the socket's buffer meets a client not reading yet.
        job = asyncio.get_running_loop().run_in_executor(
            None, lambda: self._request.accept_channel(data, timeout, quick_ok=False))
        opened = await _unless_cancelled(job, _drop_channel)
        inner = self._port
        owner = self._owner
        stream, channel, pidfd, _ = opened

        def gone(comm: AsyncCommunicationPort) -> None:
            inner._drop_foreign(comm)
            if owner is not None:
                owner._accepted.discard(comm)

        comm = AsyncCommunicationPort(stream, channel, peer_pidfd=pidfd, is_server=True,
                                      send_timeout=inner.attributes.send_timeout, on_gone=gone)
        comm._on_budget_blocked = inner._budget_blocked
        if inner._closed or (owner is not None and owner._closing):
            # The port closed while the accept ran (its close() would never close this one), or
            # it is closing (close() closed the connections accepted so far, and the blocking
            # port's close() in an executor thread may not have begun): closed as the port
            # closes its own, so the client hears PORT_CLOSED, not a hang-up.
            await comm.close()
            raise ConnectionClosed(f"port {inner.name!r} is closed")
        inner._hold_foreign(comm)  # it counts toward the port's max_connections
        if owner is not None:
            owner._accepted.add(comm)  # closed with the port, as the blocking port closes its own
        return comm

    def reject(self, reason: str = "rejected") -> None:
        self._request.reject(reason)

    def close(self, reason: str = "the server closed the port") -> None:
        """Drop an unanswered request (the client's connect raises ConnectionRejected with ``reason``)."""
        self._request.close(reason)

    def __repr__(self) -> str:
        return f"<AsyncConnectionRequest from pid {self.client.pid} uid {self.client.uid}>"


class AsyncConnectionPort:
    """A named server port for asyncio: ``listen`` for clients, or ``serve`` them all with a handler."""

    def __init__(self, inner: server.ConnectionPort) -> None:
        self._port = inner
        self.name = inner.name
        self._loop = asyncio.get_running_loop()
        self._comms: set[AsyncCommunicationPort] = set()
        # Every connection accepted through this port (serve() or listen()/accept()), still open.
        self._accepted: set[AsyncCommunicationPort] = set()
        # What listen() awaits on the broker link, for close() to end.
        self._listening: set[asyncio.Future[None]] = set()
        # close() began: an accept() finishing from now on would come after its snapshot of _accepted.
        self._closing = False

    async def listen(self, timeout: float | None = None) -> AsyncConnectionRequest:
        """The next connection request, waiting on the broker link through the loop."""
        _on_loop(self._loop, "listen()", self)
        deadline = deadline_after(timeout)
        inner = self._port
        while True:
            with inner._lock:
                request = inner._next_request()
                if request is None and deadline is not None and not remaining(deadline):
                    # A poll (timeout=0) or the time is up: nothing else reads an asyncio port's
                    # link, so what the broker wrote there already is read before Timeout.
                    inner._read_registration()
                    request = inner._next_request()
                if request is not None:
                    return AsyncConnectionRequest(request, inner, self)
                # Held while the loop watches them: aclose() runs close() in an executor thread,
                # which must not free a number the loop still watches (the next file opened
                # would get it, and listen's reader would replace that file's, then remove it).
                fds = inner._link.hold_fds()
            try:
                await _within(self._readable(fds), deadline, "a connection request")
            finally:
                for fd in fds:  # now, not in a done-callback run after the numbers are let go
                    self._loop.remove_reader(fd)
                inner._link.release_fds()
            with inner._lock:
                inner._read_registration()

    def _readable(self, fds: list[int]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()

        def fired() -> None:
            for fd in fds:
                self._loop.remove_reader(fd)
            if not future.done():
                future.set_result(None)

        for fd in fds:
            self._loop.add_reader(fd, fired)
        self._listening.add(future)
        future.add_done_callback(self._listening.discard)
        return future

    async def serve(self, handler: Handler, *, accept: Accept | None = None,
                    max_tasks: int = 1024, timeout: float | None = None) -> None:
        """Accept clients (``accept``, sync or async, may refuse one: an ``accept`` that raises
        refuses that client) and answer every message with ``handler``.

        Each message runs as a task started from the socket's readiness
        callback (at most ``max_tasks`` at once per client); a request its
        client cancels has its task cancelled. Returns when no client
        connects within ``timeout`` while none is connected.
        """
        # Before a client is accepted, not in each one's serve().
        check_callables(handler=handler, accept=accept)
        check_max_tasks(max_tasks)
        clients: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    request = await self.listen(None if self._comms else timeout)
                except Timeout:
                    if not self._comms:
                        return
                    continue
                if not await _welcome(accept, request):
                    request.reject("refused")
                    continue
                try:
                    comm = await request.accept()
                except ConnectionClosed:
                    continue  # the client went away before its accept: the others go on
                except (AlpcError, OSError) as exc:
                    # That client only (out of fds, say), as CompletionPort: the others go on.
                    log.warning("cannot accept %r: %s", request, exc)
                    request.close(server.CANNOT_ACCEPT)
                    continue
                self._comms.add(comm)
                task = asyncio.create_task(self._serve_one(comm, handler, max_tasks))
                clients.add(task)
                task.add_done_callback(clients.discard)
        finally:
            for task in clients:
                task.cancel()

    async def _serve_one(self, comm: AsyncCommunicationPort, handler: Handler, max_tasks: int) -> None:
        try:
            await comm.serve(handler, max_tasks=max_tasks)
        finally:
            self._comms.discard(comm)
            await comm.close()

    async def close(self) -> None:
        """Close every connection accepted here, then the port; as AsyncCommunicationPort.close,
        on the port's loop, or on any loop once that one no longer runs."""
        if self._loop.is_running():
            _on_loop(self._loop, "close()", self)
        self._closing = True
        try:
            # serve()'s connections too (accept() records every one); at once, not one after the
            # other: each may take its flush timeout with a client that stopped reading.
            await asyncio.gather(*(comm.close() for comm in list(self._accepted)))
        finally:
            # Cancelled meanwhile too (each connection's close() ends it even so): the name would
            # stay registered, with nobody left to answer its clients. The running loop's
            # executor: the port's loop may have ended; once started, the job finishes anyway.
            await asyncio.get_running_loop().run_in_executor(None, self._port.close)
            # A listen() awaiting the link: a closed fd leaves the selector without an event, so
            # wake it here; it finds the port closed (ConnectionClosed), where it slept on before.
            for future in list(self._listening):
                if not future.done():
                    future.set_result(None)

    async def __aenter__(self) -> AsyncConnectionPort:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _welcome(accept: Accept | None, request: AsyncConnectionRequest) -> bool:
    """``accept``'s verdict, as CompletionPort's on_connect's: awaited if it is a coroutine (its
    truth was the coroutine's, so an async accept let every client in), and one that raises
    refuses only that client (it ended serve(), every client dropped, this one never answered)."""
    if accept is None:
        return True
    try:
        verdict = accept(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)
    except Exception:
        log.exception("accept failed on %r", request)
        return False


async def _handle(comm: AsyncCommunicationPort, message: Message, handler: Handler) -> None:
    try:
        result = handler(message)
        if inspect.isawaitable(result):
            result = await result
    except asyncio.CancelledError:
        return  # the client cancelled: the runtime already answered for us
    except Exception:
        log.exception("handler failed on %r", message)
        result = b""
    if message.type is MessageType.REQUEST and not message.cancelled and not comm.closed:
        try:
            await comm.reply(message, result if result is not None else b"")
        except ConnectionClosed:
            pass


async def create_port(name: str, attributes: PortAttributes | None = None, *, config: Config | None = None,
                      timeout: float | None = None, reregister_timeout: float = 60.0) -> AsyncConnectionPort:
    """Create a named connection port (registration runs in the default executor)."""
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, lambda: server.create_port(
        name, attributes, config=config, timeout=timeout, reregister_timeout=reregister_timeout))
    inner = await _unless_cancelled(job, lambda made: made.close())
    return AsyncConnectionPort(inner)

