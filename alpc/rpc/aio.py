"""RPC on the asyncio API: async proxies, and a server that runs each call as a task.

The same Interface declarations, codec, dispatch core and admission as the
blocking side; only the I/O differs. ``alpc.aio`` drives every connection from
the event loop's readiness callbacks (no thread per connection, uvloop works).

Cancelling the task that awaits a proxy call cancels the call at the server
(CANCEL): an async handler gets CancelledError there, a plain one can poll
``current_call().cancelled``, and no reply comes back for it. Nested callbacks
work here too: a client serves the calls its peer makes back into the objects
it passed while its own call waits, each as a task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from .. import aio as _aio
from ..config import Config, PortAttributes, attributes_or_default, config_or_default
from ..errors import MessageTooLarge, PeerGone
from ..protocol import Message, Payload, payload_parts
from ..server import CANNOT_ACCEPT
from ..wire import MessageType
from .client import ClientBase, check_server, client_hello, rejections
from .codec import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits, check_options
from .dispatch import ObjectTable
from .endpoint import ONEWAY_BACKLOG, EndpointBase, call_deadline, check_timeout, make_proxy, time_left, with_timeout
from .faults import ErrorCode
from .hello import Hello
from .interface import Interface
from .server import Admission

__all__ = ["AsyncClient", "AsyncEndpoint", "Server", "connect"]

log = logging.getLogger("alpc.rpc")

T = TypeVar("T", bound=Interface)


class AsyncEndpoint(EndpointBase):
    """Calls and serving for one connection of an asyncio program. Use it from its loop only."""

    def __init__(self, comm: _aio.AsyncCommunicationPort, objects: ObjectTable, *,
                 limits: Limits = DEFAULT_LIMITS, inline_threshold: int = INLINE_THRESHOLD,
                 send_tracebacks: bool = False, call_timeout: float | None = None,
                 oneway_backlog: int = ONEWAY_BACKLOG) -> None:
        super().__init__(objects, comm.peer, limits=limits, inline_threshold=inline_threshold,
                         send_tracebacks=send_tracebacks, call_timeout=call_timeout)
        self.comm = comm
        # One-way calls run one at a time, in the order received (as on the blocking server):
        # each is its own task, and a coroutine one awaiting let the next overtake or overlap it.
        # The lock's waiters go in the order they came, and each task takes it before it first
        # awaits, so in the order the messages were read.
        self._oneways = asyncio.Lock()
        # One-way calls taken from the connection and not yet ended, and how many may be: past
        # that the reader leaves the client's messages in its window (``admit``), so its sends
        # wait, rather than its calls piling up here up to max_tasks.
        self._oneways_taken = 0
        self._oneway_backlog = oneway_backlog

    async def call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None) -> Any:
        """A two-way call. Cancelling the awaiting task cancels it at the server."""
        deadline = call_deadline(timeout)
        wait = time_left(deadline, method)
        payload, exported = self.codec.encode_call(object_id, method, args, kwargs, deadline)
        try:
            reply = await self.comm.request(payload, wait)
        finally:
            if exported:
                self.objects.release(exported)
        return self.codec.result(reply.data)

    async def notify(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     timeout: float | None) -> None:
        """A one-way call: a datagram, no reply, errors stay on the peer's side."""
        payload, wait = self.oneway_call(object_id, method, args, kwargs, timeout)
        await self.comm.send(payload, wait)

    async def handle(self, message: Message) -> Payload | None:
        """Run one received call (a handler for ``AsyncCommunicationPort.serve``); its reply."""
        if message.type is not MessageType.REQUEST:
            await self._run_oneway(message)
            return None
        prepared = self.dispatcher.prepare(message.data, expects_reply=True, message=message)
        if isinstance(prepared, bytes):  # refused before it ran
            return prepared
        payload = await self.dispatcher.run_async(prepared)
        return None if payload is None else self._fitting(payload)

    def admit(self, message: Message) -> bool:
        """``AsyncCommunicationPort.serve``'s admit: a one-way call is taken while fewer than
        the backlog are (running or waiting their turn); past that, the client's messages
        wait in its window until one of those ends."""
        if message.type is MessageType.REQUEST:
            return True
        if self._oneways_taken >= self._oneway_backlog:
            return False
        self._oneways_taken += 1  # serve() starts its task now: _run_oneway gives it back
        return True

    async def _run_oneway(self, message: Message) -> None:
        # Checked at its turn, not on arrival (as on the blocking server): a call whose deadline
        # passed while it waited is dropped (and logged), not run for a caller long gone.
        try:
            async with self._oneways:
                prepared = self.dispatcher.prepare(message.data, expects_reply=False, message=message)
                if not isinstance(prepared, bytes):  # else refused, and logged
                    await self.dispatcher.run_async(prepared)
        finally:
            self._oneways_taken -= 1

    def _fitting(self, payload: Payload) -> Payload:
        # Checked before the reply is handed over: the port would raise, and the caller wait for ever.
        size = len(payload) if isinstance(payload, bytes) else payload_parts(payload)[1]
        try:
            self.comm.check_length(size)
        except MessageTooLarge as exc:
            return self.codec.encode_error(ErrorCode.TOO_LARGE, "MessageTooLarge", str(exc))
        return payload


class AsyncClient(ClientBase[T]):
    """A connection to an RPC server from an asyncio program; ``proxy`` makes the calls.

    ``proxy`` has the interface's methods, each returning an awaitable (typed
    Any: the interface declares the blocking signatures). Close when done.
    """

    def __init__(self, interface: type[T], endpoint: AsyncEndpoint, server_hello: Hello,
                 call_timeout: float | None) -> None:
        super().__init__(interface, endpoint.comm, server_hello)
        self._endpoint = endpoint
        self.proxy: Any = make_proxy(interface, endpoint, 0, call_timeout)
        # Serves the calls the server makes back into objects passed to it.
        self._serving = asyncio.create_task(endpoint.comm.serve(endpoint.handle))

    def with_timeout(self, timeout: float | None) -> Any:
        """A proxy whose calls time out after ``timeout`` seconds (the server sees the deadline)."""
        return with_timeout(self.proxy, timeout)

    async def close(self) -> None:
        self._serving.cancel()
        await self._endpoint.comm.close()
        await asyncio.gather(self._serving, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    interface: type[T],
    name: str,
    *,
    timeout: float | None = None,
    call_timeout: float | None = None,
    config: Config | None = None,
    limits: Limits = DEFAULT_LIMITS,
    inline_threshold: int = INLINE_THRESHOLD,
    send_tracebacks: bool = False,
) -> AsyncClient[T]:
    """Connect to the port ``name`` serving ``interface``; as ``rpc.connect``, awaited."""
    check_options(limits, inline_threshold)  # before connecting, as rpc.connect
    check_timeout(call_timeout, "call_timeout")
    hello = client_hello(interface)
    with rejections():
        comm = await _aio.connect(name, hello, timeout=timeout, config=config)
    try:
        server_hello = check_server(interface, name, comm.accept_data)
    except BaseException:
        await comm.close()
        raise
    endpoint = AsyncEndpoint(comm, ObjectTable(), limits=limits, inline_threshold=inline_threshold,
                             send_tracebacks=send_tracebacks, call_timeout=call_timeout)
    client = AsyncClient(interface, endpoint, server_hello, call_timeout)
    # One turn of the loop: serve() installs its dispatcher before the first call goes out. Else
    # the one-way callbacks the server sends ahead of that call's reply could be read with the
    # reply before serve() ran, dispatched after the reply woke the call, and refused as the
    # callback was released (seen with uvloop, ~1 new client in 20 under load).
    await asyncio.sleep(0)
    return client


class Server:
    """Serves Interface objects on the named port ``name`` from the running event loop.

    Every call runs as a task: an ``async def`` handler is awaited, a plain one
    runs on the loop itself (keep it short, or hand the work to an executor).
    ``max_tasks`` bounds the calls running at once per client. A client's one-way
    calls run one at a time, in order; while as many are taken (running or
    waiting their turn) as the port's ``max_queued_datagrams`` (1024 at most),
    that client's next messages stay unread, so its sends wait for room in its
    window. ``await
    start()`` returns once the port exists; ``serve_forever()`` runs until
    ``stop()``. Use as ``async with``.
    """

    def __init__(
        self,
        name: str,
        *objects: Interface,
        attributes: PortAttributes | None = None,
        config: Config | None = None,
        limits: Limits = DEFAULT_LIMITS,
        inline_threshold: int = INLINE_THRESHOLD,
        send_tracebacks: bool = False,
        max_tasks: int = 1024,
    ) -> None:
        if type(max_tasks) is not int or max_tasks < 1:
            raise ValueError(f"max_tasks must be an int >= 1, got {max_tasks!r}")
        # Now: each accepted client's endpoint needs them, and the accept loop ended on a refusal.
        check_options(limits, inline_threshold)
        self.name = name
        self._admission = Admission(objects)
        # Checked now, not when start() makes the port.
        self._attributes = None if attributes is None else attributes_or_default(attributes)
        self._config = None if config is None else config_or_default(config)
        self._options: dict[str, Any] = {"limits": limits, "inline_threshold": inline_threshold,
                                         "send_tracebacks": send_tracebacks}
        self._max_tasks = max_tasks
        # A client's one-way calls waiting in server memory, as on the blocking server: no more
        # than the port lets it have waiting in its window.
        self._options["oneway_backlog"] = min(ONEWAY_BACKLOG,
                                            attributes_or_default(self._attributes).max_queued_datagrams)
        self._port: _aio.AsyncConnectionPort | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: dict[AsyncEndpoint, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<rpc.aio.Server {self.name!r} serving {', '.join(self._admission.describe())}>"

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> Server:
        """Create the port and start accepting. Raises NameInUse, BrokerUnavailable..."""
        if self._port is not None:
            raise RuntimeError("the server was already started (a Server starts once)")
        self._port = await _aio.create_port(self.name, self._attributes, config=self._config)
        self._accepting = asyncio.create_task(self._accept(self._port))
        return self

    async def serve_forever(self) -> None:
        """Start (if needed) and run until ``stop()``."""
        if self._port is None:
            await self.start()
        assert self._accepting is not None
        await asyncio.gather(self._accepting, return_exceptions=True)

    async def stop(self) -> None:
        """Stop accepting, cancel the calls running, close every connection and the port."""
        tasks = [task for task in (self._accepting, *self._connections.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._port is not None:
            await self._port.close()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, port: _aio.AsyncConnectionPort) -> None:
        while True:
            request = await port.listen()
            admitted = self._admission.admit(request.data)
            if isinstance(admitted, str):
                log.info("rejected pid %d: %s", request.client.pid, admitted)
                request.reject(admitted)
                continue
            choice, table = admitted
            try:
                comm = await request.accept(self._admission.accept_data(choice))
            except PeerGone:
                continue
            except Exception:
                # As the blocking server does: one failed admission (no fds left, a send
                # error) must not end admissions for good while the port stays registered.
                log.exception("could not accept pid %d", request.client.pid)
                request.close(CANNOT_ACCEPT)  # answered now, not left to wait out its connect timeout
                continue
            endpoint = AsyncEndpoint(comm, table, **self._options)
            self._connections[endpoint] = asyncio.create_task(self._serve(endpoint))

    async def _serve(self, endpoint: AsyncEndpoint) -> None:
        try:
            await endpoint.comm.serve(endpoint.handle, max_tasks=self._max_tasks, admit=endpoint.admit)
        finally:
            self._connections.pop(endpoint, None)
            await endpoint.comm.close()
