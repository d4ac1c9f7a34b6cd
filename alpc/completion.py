"""The completion-port server loop: every client of a port, one loop, a pool that breathes.

Like an I/O completion port, one ``CompletionPort`` multiplexes every
communication port of a ``ConnectionPort`` (through the port's epoll set,
so thousands of clients cost nothing per wait) and hands each message to a
handler on a bounded pool: threads for a plain function, tasks on a private
event loop for a coroutine function. The pool grows while work waits and
every worker is busy, up to ``max_workers``, and shrinks back to
``min_workers`` once workers sit idle for ``idle_timeout`` (the completion
port's concurrency value). ``ordered=True`` keeps each client's requests in
order: one message per client is handled at a time.

A request its client cancels is flagged (``message.cancelled``, which a
sync handler polls) and an async handler's task is cancelled
(CancelledError); either way no reply goes out for it. A request whose
deadline passed before dispatch is never handed to a handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .connection import NOTICES
from .errors import ConnectionClosed, Timeout
from .protocol import Message
from .server import ConnectionPort, ConnectionRequest
from .transport import Buffer
from .wire import MessageType

__all__ = ["CompletionPort", "Handler"]

log = logging.getLogger(__name__)

# The reply to a request (None for a datagram); a coroutine function runs as a task.
Handler = Callable[[Message], "Buffer | Awaitable[Buffer | None] | None"]
# How often the loop looks up from an idle wait (to notice stop()).
_TICK = 0.2


class CompletionPort:
    """Serve every client of ``port`` with ``handler`` on a bounded, self-sizing pool."""

    def __init__(self, port: ConnectionPort, handler: Handler, *,
                 on_connect: Callable[[ConnectionRequest], bool] | None = None,
                 max_workers: int = 16, min_workers: int = 1, idle_timeout: float = 5.0,
                 ordered: bool = False) -> None:
        if max_workers < 1 or min_workers < 0 or min_workers > max_workers:
            raise ValueError("need 0 <= min_workers <= max_workers and max_workers >= 1")
        self.port = port
        self.handler = handler
        self.on_connect = on_connect
        self.max_workers = max_workers
        self.min_workers = min_workers
        self.idle_timeout = idle_timeout
        self.ordered = ordered
        self._async = inspect.iscoroutinefunction(handler)
        self._lock = threading.Lock()
        self._work: deque[Message] = deque()
        self._has_work = threading.Condition(self._lock)
        self._workers = 0
        self._idle = 0
        self._running = 0
        # ordered: clients with a message being handled, and what waits behind it.
        self._busy: dict[Any, deque[Message]] = {}
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._tasks: dict[tuple[Any, int], concurrent.futures.Future[Any]] = {}
        self.handled = 0

    # -- the loop ------------------------------------------------------------------

    def serve(self, timeout: float | None = None) -> None:
        """Run the loop in this thread until ``stop()``, or until nothing arrives for ``timeout``."""
        if self._async:
            self._start_loop()
        quiet_since = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    event = self.port.wait(timeout=_TICK)
                except Timeout:
                    if timeout is not None and time.monotonic() - quiet_since > timeout:
                        return
                    continue
                except ConnectionClosed:
                    return
                quiet_since = time.monotonic()
                if isinstance(event, ConnectionRequest):
                    self._connect(event)
                else:
                    self._dispatch(event)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask ``serve`` to return (within a fraction of a second)."""
        self._stopping.set()

    def _connect(self, request: ConnectionRequest) -> None:
        if self.on_connect is not None and not self.on_connect(request):
            request.reject("refused")
            return
        try:
            comm = request.accept()
        except ConnectionClosed:
            return
        comm._on_cancel = self._cancelled

    def _dispatch(self, message: Message) -> None:
        if message.type in NOTICES:
            return
        if self.ordered:
            with self._lock:
                queued = self._busy.get(message.port)
                if queued is not None:
                    queued.append(message)
                    return
                self._busy[message.port] = deque()
        self._submit(message)

    def _submit(self, message: Message) -> None:
        if self._async:
            self._submit_task(message)
            return
        with self._lock:
            self._work.append(message)
            if self._idle:
                self._has_work.notify()
            elif self._workers < self.max_workers:
                self._workers += 1
                threading.Thread(target=self._worker, name="alpc-completion", daemon=True).start()

    # -- threads for sync handlers ----------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._work:
                    if self._stopping.is_set():
                        self._workers -= 1
                        return
                    self._idle += 1
                    woken = self._has_work.wait(self.idle_timeout)
                    self._idle -= 1
                    if not woken and not self._work and self._workers > self.min_workers:
                        self._workers -= 1
                        return
                message = self._work.popleft()
                self._running += 1
            try:
                self._run(message)
            finally:
                with self._lock:
                    self._running -= 1

    def _run(self, message: Message) -> None:
        try:
            if not message.cancelled:
                result = self.handler(message)
                self._answer(message, result)  # type: ignore[arg-type]
        except Exception:
            log.exception("handler failed on %r", message)
            self._answer(message, b"")
        finally:
            self.handled += 1
            self._done(message)

    @staticmethod
    def _answer(message: Message, result: Buffer | None) -> None:
        if message.type is MessageType.REQUEST and not message.cancelled:
            try:
                message.reply(result if result is not None else b"")
            except ConnectionClosed:
                pass

    def _done(self, message: Message) -> None:
        if not self.ordered:
            return
        with self._lock:
            queued = self._busy.get(message.port)
            following = queued.popleft() if queued else None
            if following is None:
                self._busy.pop(message.port, None)
        if following is not None:
            self._submit(following)

    # -- tasks for async handlers -------------------------------------------------------

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread = threading.Thread(target=loop.run_forever, name="alpc-completion-loop", daemon=True)
        self._loop_thread.start()
        self._slots = threading.BoundedSemaphore(self.max_workers)

    def _submit_task(self, message: Message) -> None:
        assert self._loop is not None
        # A bounded number of tasks: the loop thread waits here while all are busy.
        while not self._slots.acquire(timeout=_TICK):
            if self._stopping.is_set():
                return
        future = asyncio.run_coroutine_threadsafe(self._run_async(message), self._loop)
        key = (message.port, message.id)
        if message.type is MessageType.REQUEST:
            with self._lock:
                self._tasks[key] = future
        future.add_done_callback(lambda _: self._task_done(key, message))

    async def _run_async(self, message: Message) -> None:
        if message.cancelled:
            return
        try:
            result = await self.handler(message)  # type: ignore[misc]
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("handler failed on %r", message)
            result = b""
        # Replies are written from the loop thread; the blocking port is thread-safe.
        self._answer(message, result)

    def _task_done(self, key: tuple[Any, int], message: Message) -> None:
        with self._lock:
            self._tasks.pop(key, None)
        self._slots.release()
        self.handled += 1
        self._done(message)

    def _cancelled(self, messages: list[Message]) -> None:
        """The client cancelled these (their ``cancelled`` flag is set): stop their tasks."""
        if not self._async:
            return
        for message in messages:
            with self._lock:
                future = self._tasks.pop((message.port, message.id), None)
            if future is not None:
                future.cancel()

    # -- figures and shutdown --------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Threads in the pool now (sync handlers)."""
        return self._workers

    def _shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            self._has_work.notify_all()
        if self._loop is not None:
            loop = self._loop
            for future in list(self._tasks.values()):
                future.cancel()
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(5.0)
            if not loop.is_running():
                loop.close()
            self._loop = None

    def __enter__(self) -> CompletionPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
