"""The completion-port server loop: every client of a port, one loop, a pool that breathes.

Like an I/O completion port, one ``CompletionPort`` multiplexes every
communication port of a ``ConnectionPort`` (through the port's epoll set,
so thousands of clients cost nothing per wait) and runs a handler for each
message on a bounded pool: threads for a plain function (leader/followers:
the thread that takes a message runs it, another takes over the wait),
tasks on a private event loop for a coroutine function. The pool grows
while every thread is busy in a handler, up to ``max_workers`` (the
completion port's concurrency value), and shrinks back to ``min_workers``
once threads sit idle for ``idle_timeout``. ``ordered=True`` keeps each client's requests in
order: one message per client is handled at a time, and the others wait in the client's own
inbox, holding their slots in its window (``max_queued_datagrams``, ``max_pending_requests``), so
a client that sends faster than its messages are handled waits rather than queues without bound.

A request its client cancels is flagged (``message.cancelled``, which a
sync handler polls) and an async handler's task is cancelled
(CancelledError); either way no reply goes out for it. A request whose
deadline passed before dispatch (or while it waited its turn: ``ordered``, or
a free slot for its task), or whose client is gone (died, closed) by its
turn, is never handed to a handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .connection import NOTICES, check_callables
from .errors import AlpcError, ConnectionClosed, Timeout
from .protocol import Message
from .server import CANNOT_ACCEPT, ConnectionPort, ConnectionRequest
from .transport import Buffer, deadline_after
from .wire import MessageType

__all__ = ["CompletionPort", "Handler"]

log = logging.getLogger(__name__)

# The reply to a request (None for a datagram); a coroutine function runs as a task.
Handler = Callable[[Message], "Buffer | Awaitable[Buffer | None] | None"]
# How often the loop looks up from an idle wait (to notice stop()).
_TICK = 0.2
_T = TypeVar("_T")
# How often a pool whose every worker is busy reads its clients' sockets (without taking a
# message), so that a cancel still reaches the handler it is for.
_WATCH_EVERY = 0.02
# How long serve() waits, in all, for its pool threads (in handlers) when it stops: one
# bound for the whole pool, or N stuck handlers would hold serve() N times as long.
_JOIN_TIMEOUT = 5.0
# What a handler's (or on_connect's) failure may be, as for an RPC handler: SystemExit too. A
# handler's sys.exit() (argparse's answer to a bad option) ended its pool thread, serve() itself,
# or the private event loop, with its request unanswered and its client's turn (ordered) never
# given back. KeyboardInterrupt still propagates.
_HANDLER_ERRORS = (Exception, SystemExit)


class _Writers(concurrent.futures.Executor):
    """Daemon threads for the replies of async handlers that may wait for a client's socket.

    A ThreadPoolExecutor's threads are joined when the interpreter exits: a process ending
    while one waited on a client that stopped reading waited its send_timeout (and another one
    for every deaf client beyond the pool's size). Every other thread of a completion port is
    a daemon thread already. Each job takes an idle thread or starts one, up to ``size`` (as
    many as the loop has task slots), so no reply waits behind one that is blocked.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        # shutdown() let the threads go: a job now is a late reply (serve() gave up joining a
        # loop a handler still blocked), on a thread of its own that ends with it.
        self._closed = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        with self._lock:
            if self._closed:
                # Not a pool thread: none would be told to leave again, and it waited for ever.
                threading.Thread(target=job, name="alpc-completion-reply", daemon=True).start()
                return future
            if self._idle:
                self._idle -= 1  # that thread is this job's
            elif self._threads < self._size:
                self._threads += 1
                self._start()
        self._jobs.put(job)
        return future

    def _start(self) -> None:
        """One more thread (counted by the caller, under _lock). One that cannot start (out of
        threads for a moment) is not counted: kept, its count left the pool waiting for good on
        threads that never ran once size starts had failed. With none running, the job fails."""
        try:
            threading.Thread(target=self._work, name="alpc-completion-reply", daemon=True).start()
        except RuntimeError:
            self._threads -= 1
            if not self._threads:
                raise

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            del job  # its result and arguments go now, not with the next job
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Let the threads go once the jobs queued before this are done (never waits)."""
        with self._lock:
            threads, self._threads, self._idle = self._threads, 0, 0
            self._closed = True
        for _ in range(threads):
            self._jobs.put(None)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The private loop's thread: run it until _settle stops it, then close it. Closed here, not
    by serve()'s shutdown: a handler blocking the loop outlives that shutdown's join, and the
    loop it left running kept its epoll fd and self-pipe open for good."""
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _settle(timeout: float) -> None:
    """On the private loop at shutdown: let its tasks (their handlers cancelled) end, for
    ``timeout`` seconds at most, then stop the loop."""
    try:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
    finally:
        asyncio.get_running_loop().stop()


class _Exited(Exception):
    """A SystemExit out of an awaitable _resolve runs on the private loop, carried to the
    thread that waits for it (where it fails that call only)."""

    def __init__(self, exit: SystemExit) -> None:
        super().__init__(exit)
        self.exit = exit


def _expired(message: Message) -> bool:
    """A request whose deadline passed while it waited in the pool: the runtime drops such a
    request it has not handed out yet, and a handler's reply could only come after the client
    gave up on it (and one that never waits would get a reply past its deadline)."""
    deadline = message.deadline
    return deadline is not None and message.type is MessageType.REQUEST and deadline <= time.monotonic()


class CompletionPort:
    """Serve every client of ``port`` with ``handler`` on a bounded, self-sizing pool."""

    def __init__(self, port: ConnectionPort, handler: Handler, *,
                 on_connect: Callable[[ConnectionRequest], bool | Awaitable[bool]] | None = None,
                 max_workers: int = 16, min_workers: int = 1, idle_timeout: float = 5.0,
                 ordered: bool = False) -> None:
        for name, count in (("max_workers", max_workers), ("min_workers", min_workers)):
            if type(count) is not int:
                raise TypeError(f"{name} must be an int, got {count!r}")
        if max_workers < 1 or min_workers < 0 or min_workers > max_workers:
            raise ValueError("need 0 <= min_workers <= max_workers and max_workers >= 1")
        # NaN compared false, so extra threads retired at once; inf (never shrink) is fine.
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) or not idle_timeout >= 0:
            raise ValueError(f"idle_timeout must be a number of seconds >= 0, got {idle_timeout!r}")
        if not isinstance(port, ConnectionPort):  # else serve() failed with an AttributeError
            raise TypeError(f"port must be an alpc.ConnectionPort, not {type(port).__name__}")
        check_callables(handler=handler, on_connect=on_connect)
        self.port = port
        self.handler = handler
        self.on_connect = on_connect
        self.max_workers = max_workers
        self.min_workers = min_workers
        self.idle_timeout = idle_timeout
        self.ordered = ordered
        self._async = inspect.iscoroutinefunction(handler)
        self._lock = threading.Lock()
        # Held by the one thread waiting on the port (the leader).
        self._leader = threading.Lock()
        self._workers = 0
        self._followers = 0
        self._running = 0
        # Reads the port while every pool thread is in a handler (_watch): started once, woken
        # by _saturated.
        self._watcher: threading.Thread | None = None
        self._saturated = threading.Event()
        self._quiet_limit: float | None = None
        self._last_event = 0.0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # Dispatching threads waiting for an async handler's slot (see _submit_task).
        self._slot_wanted = 0
        # Threads of the last serve() still in a handler when it returned (see _rearm).
        self._left_behind: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._tasks: dict[tuple[Any, int], concurrent.futures.Future[Any]] = {}
        # The running handler tasks, by (port, message id); used on the loop thread only.
        self._handler_tasks: dict[tuple[Any, int], asyncio.Task[Any]] = {}
        # Clients a pool thread is writing a reply to, and the replies queued behind it.
        self._writing: dict[Any, deque[tuple[Message, Buffer | None]]] = {}
        self.handled = 0

    # -- the loop ------------------------------------------------------------------
    #
    # Sync handlers run leader/followers, as an I/O completion port releases its
    # threads: one thread at a time (the leader) waits on the port; the thread
    # that gets an event hands the wait to the next (spawning one if nobody is
    # waiting and the pool may grow) and runs the handler itself. No message
    # changes threads, so a lone request costs no hand-off. Async handlers are
    # handed to a private event loop instead.

    def serve(self, timeout: float | None = None) -> None:
        """Run the loop (this thread is one of the pool) until ``stop()``, or until nothing
        arrives for ``timeout`` seconds. Once it has returned, ``serve()`` may run again."""
        deadline_after(timeout)  # a negative or NaN timeout is refused now (ValueError), as every wait's
        if self._left_behind:
            if any(thread.is_alive() for thread in self._left_behind):
                raise RuntimeError("a handler of this CompletionPort's previous serve() still runs: "
                                   "it cannot serve again until it returns")
            self._rearm(self._left_behind)
        if self._async:
            self._start_loop()
        if self.ordered:
            self.port._take_turns(True)  # a client's next message waits until _next_for takes it
        self._quiet_limit = timeout
        self._last_event = time.monotonic()
        with self._lock:
            self._workers += 1
        try:
            self._lead(main=True)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask ``serve`` (and every pool thread) to return, within a fraction of a second."""
        self._stopping.set()

    def _pool_thread(self) -> None:
        """A spawned pool thread: it leaves the count as it ends, whether it retired (_retire
        took it off then) or the pool stopped, so ``workers`` never counts an ended thread."""
        retired = False
        try:
            retired = self._lead(main=False)
        finally:
            if not retired:
                with self._lock:
                    self._workers -= 1

    def _lead(self, main: bool) -> bool:
        """Lead and follow until the pool stops (False) or, for a spawned thread, until it
        retires (True: _retire has taken it off the count)."""
        idle_since = time.monotonic()
        while not self._stopping.is_set():
            with self._lock:
                self._followers += 1
            try:
                leading = self._leader.acquire(timeout=_TICK)
            finally:
                with self._lock:
                    self._followers -= 1
            if not leading:
                if not main and self._retire(idle_since):
                    return True
                continue
            try:
                event = self._next_event(main)
            finally:
                self._leader.release()
            if event is None:
                if not main and self._retire(idle_since):
                    return True
                continue
            self._promote()
            if isinstance(event, ConnectionRequest):
                if self._async and self.on_connect is not None:
                    # The loop's only reader runs on_connect: the watcher reads meanwhile, or a
                    # running task's cancel waited for a slow on_connect to return.
                    with self._lock:
                        self._watch_saturated()
                self._connect(event)
            else:
                self._dispatch(event)
            idle_since = time.monotonic()
        return False

    def _next_event(self, main: bool) -> ConnectionRequest | Message | None:
        try:
            event = self.port.wait(timeout=_TICK)
        except Timeout:
            quiet = self._quiet_limit
            if main and quiet is not None and time.monotonic() - self._last_event > quiet:
                self._stopping.set()
            return None
        except ConnectionClosed:
            self._stopping.set()
            return None
        except AlpcError as exc:
            # The port lost its name (the broker stayed away, or another took it): wait()
            # says so once and goes on delivering, and established clients are still ours.
            log.warning("port %r: %s; serving its established clients on", self.port.name, exc)
            return None
        self._last_event = time.monotonic()
        return event

    def _promote(self) -> None:
        """Someone must wait on the port while this thread handles: spawn one if nobody will."""
        with self._lock:
            if self._followers or self._async:
                return
            if self._workers >= self.max_workers:
                self._watch_saturated()
                return
            self._workers += 1
        thread = threading.Thread(target=self._pool_thread, name="alpc-completion", daemon=True)
        with self._lock:
            # Ended threads go; one another _promote made and has not started yet is not ended
            # (is_alive() is False until start()): dropped, stop() would neither join it nor
            # leave it behind, and a second serve() would run beside its handler.
            self._threads = [t for t in self._threads if t.is_alive() or t.ident is None] + [thread]
        try:
            thread.start()
        except RuntimeError:
            # Out of threads for a moment: the pool does not grow now, as at max_workers. Raised,
            # it ended serve() (or this pool thread) with its event unhandled, left the count
            # up for a thread that never ran, and serve()'s join of that thread raised too.
            with self._lock:
                self._workers -= 1
                self._threads = [t for t in self._threads if t is not thread]
                self._watch_saturated()

    def _watch_saturated(self) -> None:
        """This thread goes into a handler and none is left to wait on the port (caller holds
        _lock): the watcher reads it meanwhile."""
        if self._watcher is None:
            watcher = threading.Thread(target=self._watch, name="alpc-completion-watch", daemon=True)
            try:
                watcher.start()
            except RuntimeError:
                return  # out of threads for a moment: the next thread out of a handler reads the port
            self._watcher = watcher
            self._threads.append(watcher)  # joined by _shutdown, as the pool is
        if not self._saturated.is_set():
            self._saturated.set()

    def _watch(self) -> None:
        """While every pool thread is in a handler nobody reads the port, and a client's CANCEL
        waits in its socket: a handler polling ``message.cancelled`` never saw it (a pool of
        one, always). Read what came now and then (taking nothing), as a waiting leader would,
        until a thread waits on the port again."""
        saturated = self._saturated
        while not self._stopping.is_set():
            if not saturated.wait(_TICK) or self._stopping.wait(_WATCH_EVERY):
                continue
            with self._lock:
                if self._followers or self._leader.locked():
                    saturated.clear()  # a thread waits on the port (or will): it reads
                    continue
            self._read_waiting()

    def _read_waiting(self) -> None:
        """Read, without waiting and without taking a message, whatever the clients sent (their
        CANCELs flag the messages being handled); nothing if a thread waits on the port."""
        if not self._leader.acquire(blocking=False):
            return
        try:
            self.port._poll(0.0)
        except (AlpcError, OSError, ValueError):
            pass  # the port is closing: serve() hears it on its own wait
        finally:
            self._leader.release()

    def _retire(self, idle_since: float) -> bool:
        """An extra thread idle for idle_timeout leaves (the pool shrinks to min_workers), but
        not the last one that would wait on the port: with every other thread in a handler,
        nobody read it (no cancel reached those handlers, and no other client was served
        although the pool may grow), and the watcher only starts when the pool is full."""
        if time.monotonic() - idle_since < self.idle_timeout and not self._stopping.is_set():
            return False
        with self._lock:
            if self._stopping.is_set():
                return False  # the loop ends on the stop flag; _pool_thread takes it off the count
            waited_on = self._followers > 0 or self._leader.locked()
            if self._workers > max(self.min_workers, 1) and waited_on:
                self._workers -= 1
                return True
        return False

    def _connect(self, request: ConnectionRequest) -> None:
        if not self._welcome(request):
            request.close("refused")
            return
        try:
            comm = request.accept()
        except ConnectionClosed:
            return
        except (AlpcError, OSError) as exc:
            # That client only (out of fds, say): the accept closed what it took, and the
            # loop goes on serving everyone else.
            log.warning("cannot accept %r: %s", request, exc)
            request.close(CANNOT_ACCEPT)
            return
        comm._on_cancel = self._cancelled

    def _welcome(self, request: ConnectionRequest) -> bool:
        """on_connect's verdict; one that raises is logged, as a handler's failure is, and
        refuses only that client: any pool thread may run it, and an exception out of
        _lead would end that thread (or serve()) with the client never answered."""
        if self.on_connect is None:
            return True
        try:
            verdict = self.on_connect(request)
            if inspect.isawaitable(verdict):
                # An async on_connect's truth was the coroutine's: every client was let in.
                verdict = self._resolve(verdict)
            return bool(verdict)
        except _HANDLER_ERRORS:
            log.exception("on_connect failed on %r", request)
            return False

    def _dispatch(self, message: Message) -> None:
        if message.type in NOTICES:
            return
        if self._async:
            self._submit_task(message)
            return
        current: Message | None = message
        while current is not None:
            self._run(current)
            current = self._next_for(current, self._after_take)

    def _run(self, message: Message) -> None:
        self._running += 1
        try:
            if self._unwanted(message):
                return
            if _expired(message):
                message.port._expire(message)
                return
            try:
                result = self.handler(message)
                if inspect.isawaitable(result):
                    result = self._resolve(result)
            except _HANDLER_ERRORS:
                log.exception("handler failed on %r", message)
                result = b""
            self._reply(message, result)
        finally:
            self._running -= 1
            self.handled += 1

    @staticmethod
    def _unwanted(message: Message) -> bool:
        """A request cancelled, or whose client is gone (died, or its connection dropped) by
        its turn: no reply can reach anyone, so no handler runs for it. Otherwise a client
        that queued costly requests and died would keep a pool thread (ordered) or slot busy
        for every one of them."""
        comm = message.port
        return message.cancelled or (message.type is MessageType.REQUEST and comm is not None and comm.closed)

    def _resolve(self, awaitable: Awaitable[_T]) -> _T:
        """A plain callable's awaitable (a lambda around an async def, an object with an
        ``async def __call__``: ``Handler`` allows both) runs on the private loop while this
        thread waits for it, as a handler's own turn; not awaited, its reply would be empty."""
        with self._lock:
            if self._loop is None:
                self._start_loop()
        assert self._loop is not None

        async def run() -> _T:
            try:
                return await awaitable
            except SystemExit as exc:
                # Out of a task asyncio re-raises it from run_forever: the private loop ended
                # and this thread waited for good. It goes to this thread, as a failure.
                raise _Exited(exc) from None

        try:
            return asyncio.run_coroutine_threadsafe(run(), self._loop).result()
        except _Exited as exited:
            raise exited.exit from None

    @staticmethod
    def _answer(message: Message, result: Buffer | None) -> None:
        if message.type is MessageType.REQUEST and not message.cancelled:
            try:
                message.reply(result if result is not None else b"")
            except ConnectionClosed:
                pass

    def _next_for(self, message: Message, after_take: Callable[[Any], object]) -> Message | None:
        """ordered: the client's next message, which waited behind ``message`` in its inbox, if
        any (else its turn ends; so it does while others wait: see ConnectionPort._next_in_turn,
        and _submit_task for the async slot). ``after_take`` does what wait() does after a
        take: the credit for a datagram taken, the release after a notice."""
        if not self.ordered:
            return None
        comm = message.port
        while (following := self.port._next_in_turn(comm, self._slot_wanted > 0)) is not None:
            after_take(comm)
            if following.type not in NOTICES:
                return following
        return None

    @staticmethod
    def _after_take(comm: Any) -> None:
        """``comm._after_take()``; a failure is logged, as a handler's is: raised here it would end
        this worker, and every later turn of that client with it."""
        try:
            comm._after_take()
        except Exception:
            log.exception("cannot send what is owed to %r after a take", comm)

    # -- tasks for async handlers -------------------------------------------------------

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        # The replies' writers (_run_async): one per slot, so none waits behind a blocked one.
        self._writers = _Writers(self.max_workers)
        self._loop = loop
        self._loop_thread = threading.Thread(target=_run_loop, args=(loop,), name="alpc-completion-loop",
                                             daemon=True)
        self._loop_thread.start()
        self._slots = threading.BoundedSemaphore(self.max_workers)

    def _submit_task(self, message: Message) -> None:
        # A bounded number of tasks: the dispatching thread waits here while all are busy.
        if not self._slots.acquire(blocking=False):
            # ordered: a task that ends while this waits hands its slot over, not its client's
            # next message (_task_done), or a client that kept sending kept the slot for good.
            with self._lock:
                self._slot_wanted += 1
            try:
                while not self._slots.acquire(timeout=_WATCH_EVERY):
                    if self._stopping.is_set():
                        return
                    # This thread is the port's only reader: a cancel must still reach a running task.
                    self._read_waiting()
            finally:
                with self._lock:
                    self._slot_wanted -= 1
        self._start_task(message)

    def _start_task(self, message: Message) -> None:
        """Run ``message``'s handler as a task, in a slot the caller holds (released by _task_done)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._run_async(message), self._loop)
        key = (message.port, message.id)
        if message.type is MessageType.REQUEST:
            with self._lock:
                self._tasks[key] = future
        future.add_done_callback(lambda _: self._task_done(key, message))

    async def _run_async(self, message: Message) -> None:
        if self._unwanted(message):
            return
        if _expired(message):
            # Its answer may wait for the client's socket: not on the loop thread (see below).
            await asyncio.get_running_loop().run_in_executor(self._writers, message.port._expire, message)
            return
        # The task itself is what a cancel cancels (_cancel_task): its slot stays taken
        # until the handler has really returned.
        key = (message.port, message.id)
        if message.type is MessageType.REQUEST:
            self._handler_tasks[key] = asyncio.current_task()  # type: ignore[assignment]
        try:
            result = await self.handler(message)  # type: ignore[misc]
        except asyncio.CancelledError:
            return
        except _HANDLER_ERRORS:
            log.exception("handler failed on %r", message)
            result = b""
        finally:
            self._handler_tasks.pop(key, None)
        if message.type is not MessageType.REQUEST or message.cancelled:
            return
        # A reply may wait for its client's socket or section space up to send_timeout, and on
        # the loop thread that wait would stop every other client's handler: one that cannot
        # wait is written here, any other by a pool thread (the blocking port is thread-safe),
        # its slot taken meanwhile. The hop to a thread cost ~45 us a round trip on one CPU.
        try:
            if message.port.reply_at_once(message, result if result is not None else b""):
                return
        except ConnectionClosed:
            return
        except Exception:
            log.exception("handler failed on %r", message)
            result = b""
        await asyncio.get_running_loop().run_in_executor(self._writers, self._reply, message, result)

    def _reply(self, message: Message, result: Buffer | None) -> None:
        """Answer with ``result``, by one pool thread per client at a time: a reply to a client
        another thread is writing to queues behind it, in order, and this thread goes back to
        the pool. A client that stops reading holds a writer up to ``send_timeout``; without
        the queue every worker took one of its requests and waited too, and nobody else was
        served meanwhile."""
        comm = message.port
        with self._lock:
            queued = self._writing.get(comm)
            if queued is not None:
                queued.append((message, result))
                return
            self._writing[comm] = queued = deque()
        current: tuple[Message, Buffer | None] | None = (message, result)
        while current is not None:
            self._reply_one(*current)
            with self._lock:
                current = queued.popleft() if queued else None
                if current is None:
                    del self._writing[comm]

    def _reply_one(self, message: Message, result: Buffer | None) -> None:
        """Answer with ``result``; one the port refuses is logged and an empty reply goes, so the
        client is not left waiting. If even that fails it is only logged: an exception here
        would end this worker (serve() itself, or every later turn of an ordered client)."""
        try:
            self._answer(message, result)
        except Exception:
            log.exception("cannot reply to %r with the handler's result", message)
            try:
                self._answer(message, b"")
            except Exception:
                log.exception("cannot reply to %r at all", message)

    def _task_done(self, key: tuple[Any, int], message: Message) -> None:
        with self._lock:
            self._tasks.pop(key, None)
        self.handled += 1
        # On the loop thread, which must never wait for a client's socket: what a take owes
        # (a credit) is written by a writer thread.
        following = None if self._stopping.is_set() else self._next_for(
            message, lambda comm: self._writers.submit(self._after_take, comm))
        if following is not None:
            # The client's next message takes this slot over: this may be the loop
            # thread, which must never wait for a slot (only its own tasks free one).
            self._start_task(following)
        else:
            self._slots.release()

    def _cancelled(self, messages: list[Message]) -> None:
        """The client cancelled these (their ``cancelled`` flag is set): stop their tasks."""
        loop = self._loop
        if not self._async or loop is None:
            return
        for message in messages:
            # Not the concurrent future: cancelling it would complete it (and free the
            # slot, and start the client's next message) while the handler still runs.
            try:
                loop.call_soon_threadsafe(self._cancel_task, (message.port, message.id))
            except RuntimeError:
                return  # the loop is closed: serve() has returned

    def _cancel_task(self, key: tuple[Any, int]) -> None:
        """On the loop: cancel the handler's task (one not started yet sees message.cancelled)."""
        task = self._handler_tasks.get(key)
        if task is not None:
            task.cancel()

    # -- figures and shutdown --------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Threads in the pool now (sync handlers; the one running ``serve`` included)."""
        return self._workers

    def _shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            self._workers -= 1
            threads = list(self._threads)
        # The pool leaves the port before serve() returns, so the caller may close it.
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._loop is not None:
            loop = self._loop
            for future in list(self._tasks.values()):
                future.cancel()
            # Not loop.stop() at once: it stopped the loop before the cancelled tasks took their
            # CancelledError, and they were left pending on a closed loop, their cleanup unrun.
            settle = max(0.0, deadline - time.monotonic())
            asyncio.run_coroutine_threadsafe(_settle(settle), loop)
            if self._loop_thread is not None:
                self._loop_thread.join(settle + 5.0)  # it closes the loop (_run_loop)
            self._writers.shutdown()
            self._loop = None
        if self.ordered:
            self.port._take_turns(False)  # what waits for a turn goes to the next wait() again
        self._rearm(threads)

    def _rearm(self, threads: list[threading.Thread]) -> None:
        """serve() has returned: make the next one serve, not return at once on the last stop.
        Not while a thread of this one is still in a handler: it would go back to leading the
        pool (serve() refuses to run until it has returned)."""
        loop_thread = self._loop_thread
        alive = [thread for thread in [*threads, *([loop_thread] if loop_thread else [])] if thread.is_alive()]
        self._left_behind = alive
        if alive:
            return
        with self._lock:
            self._threads = []
            self._watcher = None
            self._followers = 0
        self._saturated.clear()
        self._loop_thread = None
        self._stopping.clear()

    def __enter__(self) -> CompletionPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
