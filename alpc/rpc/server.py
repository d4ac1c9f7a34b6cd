"""The blocking RPC server: serve interface objects on a named port to many clients at once.

A bounded pool of threads takes turns at ``ConnectionPort.wait()`` (leader and
followers): one thread waits, and when an event arrives it hands the wait to
the next thread and runs the call itself, so a call is served on the thread
that received it, with no hand-off on the latency path. The loop holds no RPC
logic: connections are admitted by ``Admission`` and calls run by each
connection's ``Endpoint`` / ``Dispatcher``, so a completion-port or asyncio
loop can reuse both.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

from .. import server as _server
from ..config import Config, PortAttributes, attributes_or_default, config_or_default
from ..errors import AlpcError, ConnectionClosed, MarshalError, PeerGone, Timeout
from ..port import CommunicationPort
from ..protocol import Message
from ..server import ConnectionPort, ConnectionRequest
from ..transport import process_id
from ..wire import MessageType
from .client import INCOMPATIBLE
from .codec import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits, check_options
from .dispatch import ObjectTable
from .endpoint import ONEWAY_BACKLOG, Endpoint, check_timeout
from .hello import RPC_VERSION, decode_hello, encode_hello
from .interface import Interface, interface_methods, version_compatible
from .turns import Turns

__all__ = ["Admission", "Server"]

log = logging.getLogger("alpc.rpc")

_REQUEST = MessageType.REQUEST
_DATAGRAM = MessageType.DATAGRAM
# How long a worker waits for an event before it looks whether the server stops; stop() waits
# up to that long for it.
_MAX_POLL_INTERVAL = 60.0


class Admission:
    """Decides which interface object a connecting client gets, from its connect data (no I/O)."""

    def __init__(self, objects: Iterable[Interface]) -> None:
        self._objects: dict[str, Interface] = {}
        for obj in objects:
            if not isinstance(obj, Interface):
                raise TypeError(f"only Interface objects can be served, not {obj!r}")
            name = type(obj).__alpc_name__
            if name in self._objects:
                raise ValueError(f"two objects serve interface {name!r}")
            self._objects[name] = obj
        if not self._objects:
            raise ValueError("a server needs at least one Interface object")
        for obj in self._objects.values():
            ObjectTable(obj)  # a rule naming an unknown group: ValueError now, not at every connect

    def choose(self, connect_data: bytes) -> Interface | str:
        """The object to serve, or the reason to reject the client."""
        try:
            hello = decode_hello(connect_data)
        except MarshalError as exc:
            return f"not an alpc RPC client: {exc}"
        if hello.rpc != RPC_VERSION:
            return f"{INCOMPATIBLE} RPC protocol version {hello.rpc}; this server speaks {RPC_VERSION}"
        obj = self._objects.get(hello.interface)
        if obj is None:
            return f"interface {hello.interface[:128]!r} is not served here (serving: {', '.join(self.describe())})"
        version = type(obj).__alpc_version__
        if not version_compatible(hello.version, version):
            return (f"{INCOMPATIBLE} interface version: the client wants {hello.interface} "
                    f"{hello.version[0]}.{hello.version[1]}, the server has {version[0]}.{version[1]} "
                    f"(same major version and a server minor at least the client's are needed)")
        return obj

    def admit(self, connect_data: bytes) -> tuple[Interface, ObjectTable] | str:
        """The object to serve and the table the client calls it through, or the reason to reject it."""
        choice = self.choose(connect_data)
        if isinstance(choice, str):
            return choice
        try:
            # The table resolves the methods' group names: one deleted since the server started
            # is refused here, before the accept, not on a connection nobody would serve.
            return choice, ObjectTable(choice)
        except ValueError as exc:
            return f"the server cannot check its access rules: {exc}"

    def refuse_coroutines(self) -> None:
        """TypeError if a method is a coroutine function: a blocking server cannot await it."""
        for obj in self._objects.values():
            for name in interface_methods(obj) or {}:
                if inspect.iscoroutinefunction(getattr(obj, name)):
                    raise TypeError(f"{type(obj).__qualname__}.{name} is async: serve it with rpc.aio.Server")

    @staticmethod
    def accept_data(obj: Interface) -> bytes:
        """What the server tells a client it admitted: the interface it gets, and its version."""
        return encode_hello(type(obj).__alpc_name__, type(obj).__alpc_version__)

    def describe(self) -> list[str]:
        return [f"{name} {type(obj).__alpc_version__[0]}.{type(obj).__alpc_version__[1]}"
                for name, obj in sorted(self._objects.items())]


class Server:
    """Serves Interface objects on the named port ``name``.

    ``workers`` bounds how many calls run at once (and so how many threads
    exist); ``takeover_after`` is how long one call may run before another
    worker takes over waiting for events (0: hand over on every event).
    ``start()`` returns at once, for embedding in a program that does other
    work; ``serve_forever()`` blocks. Use as a context manager to start and
    stop it.
    """

    def __init__(
        self,
        name: str,
        *objects: Interface,
        workers: int = 4,
        attributes: PortAttributes | None = None,
        config: Config | None = None,
        limits: Limits = DEFAULT_LIMITS,
        inline_threshold: int = INLINE_THRESHOLD,
        send_tracebacks: bool = False,
        reply_timeout: float = 5.0,
        takeover_after: float = 0.005,
        poll_interval: float = 0.1,
    ) -> None:
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        # Each checked now: start() would fail after making the port (workers), the workers
        # die or spin (poll_interval), or every accepted client's calls go unanswered (codec options).
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) \
                or not 0 < poll_interval <= _MAX_POLL_INTERVAL:
            raise ValueError(f"poll_interval must be a number of seconds in (0, {_MAX_POLL_INTERVAL}], "
                             f"got {poll_interval!r}")
        check_options(limits, inline_threshold)
        # Every reply is written with it: a negative or NaN one failed each reply in its worker,
        # so every client's every call went unanswered to its own timeout.
        check_timeout(reply_timeout, "reply_timeout")
        self.name = name
        self._admission = Admission(objects)
        self._admission.refuse_coroutines()
        self._workers = workers
        # Checked now, not when start() makes the port.
        self._attributes = None if attributes is None else attributes_or_default(attributes)
        self._config = None if config is None else config_or_default(config)
        # A client's one-way calls queued in server memory: no more than the port lets it have
        # waiting in its window (a port with a small max_queued_datagrams means a small queue).
        backlog = min(ONEWAY_BACKLOG, attributes_or_default(attributes).max_queued_datagrams)
        # Endpoints whose queued one-way calls a handler's KeyboardInterrupt (or another
        # BaseException that is no Exception) left behind as it went on up: the next worker pass
        # runs them (see _resume_stranded).
        self._stranded: deque[Endpoint] = deque()
        self._make_endpoint = functools.partial(Endpoint, limits=limits, inline_threshold=inline_threshold,
                                                send_tracebacks=send_tracebacks, reply_timeout=reply_timeout,
                                                oneway_backlog=backlog, on_stranded=self._stranded.append)
        self._poll_interval = poll_interval
        self._port: ConnectionPort | None = None
        self._endpoints: dict[CommunicationPort, Endpoint] = {}
        self._endpoints_lock = threading.Lock()
        self._turns = Turns(takeover_after=takeover_after)
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()
        self._threads: list[threading.Thread] = []
        # The process that started it: a child forked since holds a copy (stop: _let_go).
        self._pid = process_id()

    def __repr__(self) -> str:
        return f"<rpc.Server {self.name!r} serving {', '.join(self._admission.describe())}>"

    @property
    def connections(self) -> int:
        with self._endpoints_lock:
            return len(self._endpoints)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Server:
        """Create the port and start the worker threads. Raises NameInUse, BrokerUnavailable..."""
        with self._lifecycle:
            if self._port is not None or self._stopping.is_set():
                raise RuntimeError("the server was already started or stopped (a Server starts once)")
            self._pid = process_id()
            self._port = _server.create_port(self.name, self._attributes, config=self._config)
            for index in range(self._workers):
                thread = threading.Thread(target=self._work, name=f"alpc-rpc-{self.name}-{index}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def serve_forever(self, timeout: float | None = None) -> None:
        """Start (if needed) and block until ``stop()`` is called or ``timeout`` passes."""
        check_timeout(timeout, "timeout")  # Event.wait took a negative or NaN one for "return now"
        if self._port is None:
            self.start()
        self._stopping.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking events, let running calls finish (up to ``timeout``), close every connection."""
        check_timeout(timeout, "timeout")  # before anything stops: NaN waited for no running call
        if process_id() != self._pid:
            self._let_go()
            return
        self._stopping.set()
        self._turns.stop()
        deadline = time.monotonic() + timeout
        with self._lifecycle:  # a start() on another thread finishes first
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(max(0.0, deadline - time.monotonic()))
            if self._port is not None:
                self._port.close()
        with self._endpoints_lock:
            self._endpoints.clear()

    def _let_go(self) -> None:
        """stop() in a forked child: close the copies of the port's fds, nothing else.

        The worker threads are the parent's (none runs here), and so are the port and its
        connections. No lock: a worker that held one at the fork is not here to let go of it.
        """
        self._stopping.set()  # the child's serve_forever() returns
        if self._port is not None:
            self._port.close()  # a forked copy: closes its fds only
        self._endpoints.clear()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop ------------------------------------------------------------------

    def _work(self) -> None:
        port = self._port
        assert port is not None
        turns = self._turns
        shared = self._workers > 1  # a lone worker has nobody to hand the wait to
        while turns.lead():
            while True:
                if turns.stopping:
                    turns.resign()
                    return
                if self._stranded and self._resume_stranded(turns, shared):
                    break  # another worker took over the wait while those calls ran
                try:
                    event = port.wait(timeout=self._poll_interval)
                except Timeout:
                    continue
                except ConnectionClosed:
                    turns.resign()
                    return
                if shared:
                    # A one-way call takes its place in its client's order now, while no other
                    # worker can take over the wait and receive the call sent after it.
                    oneways = (self._queue_oneway(event)
                               if type(event) is Message and event.type is _DATAGRAM else None)
                    turns.busy()
                else:
                    oneways = None
                try:
                    if oneways is not None:
                        oneways.run_oneways()
                    else:
                        self._handle(event)
                except Exception:
                    log.exception("unexpected error while handling %r", event)
                if shared and not turns.done():
                    break  # another worker took over the wait while this call ran

    def _resume_stranded(self, turns: Turns, shared: bool) -> bool:
        """Run one client's stranded one-way calls (see Endpoint._strand); True if this worker
        no longer leads once they ran."""
        try:
            endpoint = self._stranded.popleft()
        except IndexError:  # another worker took it
            return False
        if shared:
            turns.busy()
        try:
            endpoint.run_oneways()
        except Exception:
            log.exception("unexpected error while running the one-way calls of pid %d", endpoint.comm.peer.pid)
        return shared and not turns.done()

    def _handle(self, event: ConnectionRequest | Message) -> None:
        if isinstance(event, ConnectionRequest):
            self._admit(event)
            return
        if event.type is _REQUEST or event.type is _DATAGRAM:
            endpoint = self._endpoint_of(event)
            if endpoint is not None:
                endpoint.serve(event)
            return
        with self._endpoints_lock:
            self._endpoints.pop(event.port, None)

    def _queue_oneway(self, event: Message) -> Endpoint | None:
        """The endpoint that queued ``event``, a one-way call, to run in order; else None."""
        endpoint = self._endpoint_of(event)
        if endpoint is not None:
            endpoint.queue_oneway(event)
        return endpoint

    def _admit(self, request: ConnectionRequest) -> None:
        admitted = self._admission.admit(request.data)
        if isinstance(admitted, str):
            log.info("rejected pid %d: %s", request.client.pid, admitted)
            request.reject(admitted)
            return
        choice, table = admitted
        accept_data = self._admission.accept_data(choice)
        with self._endpoints_lock:
            # Held across accept so a first call cannot arrive before its endpoint exists.
            try:
                comm = request.accept(accept_data)
            except PeerGone:
                return
            except (AlpcError, OSError) as exc:
                # That client only (out of fds, say): it is answered now, not left to wait
                # out its connect timeout, and the workers go on serving.
                log.warning("cannot accept pid %d: %s", request.client.pid, exc)
                request.close(_server.CANNOT_ACCEPT)
                return
            self._endpoints[comm] = self._make_endpoint(comm, table, on_drop=self._drop)

    def _drop(self, endpoint: Endpoint) -> None:
        with self._endpoints_lock:
            self._endpoints.pop(endpoint.comm, None)

    def _endpoint_of(self, message: Message) -> Endpoint | None:
        return self._endpoints.get(message.port) or self._endpoint_for(message.port)

    def _endpoint_for(self, comm: CommunicationPort) -> Endpoint | None:
        # A message can beat its endpoint into the table while _admit holds the lock.
        with self._endpoints_lock:
            return self._endpoints.get(comm)
