"""One RPC connection, either side: calls out through proxies and serves the calls that come in.

Client and server are symmetric here: each side has an ObjectTable of what it
lets the peer call (the served object on a server, callback objects passed as
arguments on either side) and makes calls on the peer's objects. While a call
waits for its reply, the calls the peer makes back (nested callbacks) are
served on the waiting thread, through ``CommunicationPort.request(on_message=)``.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..errors import ConnectionClosed, DeadlineExceeded, MarshalError, MessageTooLarge, Timeout, UnknownMethod
from ..port import CommunicationPort, PendingRequest
from ..protocol import Message, Payload
from ..security import PeerCred
from ..transport import deadline_after
from ..wire import MessageType
from .codec import DEFAULT_LIMITS, INLINE_THRESHOLD, Codec, Limits, ObjectRef
from .dispatch import CALL_INFO, Dispatcher, ObjectTable
from .faults import ErrorCode
from .interface import Interface

__all__ = [
    "Endpoint",
    "EndpointBase",
    "PendingCall",
    "Proxy",
    "RemoteObject",
    "call_deadline",
    "check_timeout",
    "make_proxy",
    "start_call",
    "time_left",
    "with_timeout",
]

log = logging.getLogger("alpc.rpc")

P = TypeVar("P")

# One-way calls of one connection that may wait for their turn before the thread that receives
# one more waits with it (see run_oneways); as many as a client may queue by default (rpc.Server
# takes the port's max_queued_datagrams when that is smaller).
ONEWAY_BACKLOG = 1024


class EndpointBase:
    """What both drivers' endpoints share: the codec, the dispatcher and the objects exported.

    The blocking ``Endpoint`` and the asyncio one (``rpc.aio``) add only the
    I/O: how a call is sent and waited for, and how a received one is run.
    """

    def __init__(self, objects: ObjectTable, caller: PeerCred, *, limits: Limits, inline_threshold: int,
                 send_tracebacks: bool, call_timeout: float | None) -> None:
        self.objects = objects
        self.codec = Codec(limits=limits, inline_threshold=inline_threshold,
                           export=objects.export, import_object=self._import, release=objects.release)
        self.dispatcher = Dispatcher(self.codec, objects, caller=caller, send_tracebacks=send_tracebacks)
        self.call_timeout = call_timeout

    def _import(self, ref: ObjectRef) -> RemoteObject:
        lease = _Lease(self, ref.object_id)
        self.dispatcher.passed(lease)
        return RemoteObject(lease, ref, self.call_timeout)

    def call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float | None) -> Any:
        """A two-way call: its result (or, from an asyncio endpoint, an awaitable of it)."""
        raise NotImplementedError

    def notify(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None) -> Any:
        """A one-way call (from an asyncio endpoint, an awaitable)."""
        raise NotImplementedError

    def oneway_call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    timeout: float | None) -> tuple[Payload, float | None]:
        """The payload of a one-way call and how long its send may wait."""
        deadline = call_deadline(timeout)
        payload, exported = self.codec.encode_call(object_id, method, args, kwargs, deadline)
        if exported:
            self.objects.release(exported)
            raise MarshalError(f"{method} is one-way: nobody would serve the objects passed to it")
        return payload, time_left(deadline, method)


class Endpoint(EndpointBase):
    """Calls and serving for one established connection."""

    def __init__(
        self,
        comm: CommunicationPort,
        objects: ObjectTable,
        *,
        limits: Limits = DEFAULT_LIMITS,
        inline_threshold: int = INLINE_THRESHOLD,
        send_tracebacks: bool = False,
        reply_timeout: float = 5.0,
        call_timeout: float | None = None,
        on_drop: Callable[[Endpoint], None] | None = None,
        oneway_backlog: int = ONEWAY_BACKLOG,
        on_stranded: Callable[[Endpoint], None] | None = None,
    ) -> None:
        super().__init__(objects, comm.peer, limits=limits, inline_threshold=inline_threshold,
                         send_tracebacks=send_tracebacks, call_timeout=call_timeout)
        self.comm = comm
        self._on_drop = on_drop
        self.reply_timeout = reply_timeout
        # Bound once: these run on every call.
        self._serve = self.serve
        self._handle = self.dispatcher.handle
        self._encode_call = self.codec.encode_call
        self._result = self.codec.result
        self._request = comm.request
        self._reply = comm.reply
        # Replies waiting for the thread that writes (see _answer), and its token.
        self._backlog: deque[tuple[Message, Payload]] = deque()
        self._writer = threading.Lock()
        # One-way calls waiting for the thread that runs them (see run_oneways), its token, and
        # which thread holds it.
        self._oneways: deque[Message] = deque()
        self._oneway_runner = threading.Lock()
        self._oneway_thread: int | None = None
        self._oneway_backlog = oneway_backlog
        # Calls left queued by a handler whose BaseException (no Exception) went on up past
        # run_oneways: the next pass runs them (see _strand).
        self._stranded = False
        self._on_stranded = on_stranded

    # -- calling out -------------------------------------------------------------

    def call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float | None) -> Any:
        """A two-way call; serves the peer's nested calls while it waits."""
        if timeout is None and CALL_INFO.get() is None:
            deadline = wait = None
        else:
            deadline = call_deadline(timeout)
            wait = time_left(deadline, method)
        payload, exported = self._encode_call(object_id, method, args, kwargs, deadline)
        try:
            reply = self._request(payload, wait, on_message=self._serve)
        finally:
            if exported:
                self.objects.release(exported)
        return self._result(reply.data)

    def notify(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None) -> None:
        """A one-way call: a datagram, no reply, errors stay on the peer's side."""
        payload, wait = self.oneway_call(object_id, method, args, kwargs, timeout)
        self.comm.send(payload, wait)

    def start_call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None) -> PendingCall:
        """A two-way call sent without waiting: any thread may cancel it (``rpc.start_call``).

        Its reply is waited for with ``PendingRequest.result``, which serves no
        nested calls, so callback objects cannot be passed this way.
        """
        deadline = call_deadline(timeout)
        wait = time_left(deadline, method)
        payload, exported = self._encode_call(object_id, method, args, kwargs, deadline)
        if exported:
            self.objects.release(exported)
            raise MarshalError(f"a started call of {method} cannot pass objects: nobody would serve their calls "
                               "while it waits (make a plain call to pass callbacks)")
        pending = self.comm.start_request(payload, wait, deadline=deadline)
        return PendingCall(self, pending, method)

    # -- serving -----------------------------------------------------------------

    def serve(self, message: Message) -> None:
        """Run one received call (REQUEST or DATAGRAM) and reply to a REQUEST."""
        kind = message.type
        if kind is not _REQUEST:
            if kind is MessageType.DATAGRAM:
                self._oneways.append(message)
                self.run_oneways()
            return
        if self._stranded:
            self.run_oneways()
        payload = self._handle(message.data, message=message)
        assert payload is not None
        self._answer(message, payload)

    def queue_oneway(self, message: Message) -> None:
        """Take a received one-way call's place in its client's order; ``run_oneways`` runs it.

        A server whose workers take turns at the port queues each one-way call as the worker
        receives it, before another worker can receive the next one.
        """
        self._oneways.append(message)

    def run_oneways(self) -> None:
        """Run the queued one-way calls one at a time, in the order received, by one thread at
        a time: the client sent them without waiting, so one taken by another worker while an
        earlier one still ran overtook or overlapped it. A thread that finds another running
        them goes back to serving (a client's slow one-way calls hold one worker, not all),
        unless more than ``oneway_backlog`` wait: then it waits its turn, so a client that
        sends faster than its calls run is held back rather than queued without bound.

        As ``_answer`` does, whoever holds the token looks again after letting it go, so a
        call queued just before that is never stranded; nor by a handler raising what is no
        Exception (KeyboardInterrupt): that goes on up, and the calls behind it wait for the
        next pass (see _strand), not for a one-way call this client may never send.
        """
        oneways = self._oneways
        runner = self._oneway_runner
        me = threading.get_ident()
        while oneways:
            # Never waiting for itself: a call this thread serves while it runs one (nested).
            if not runner.acquire(len(oneways) > self._oneway_backlog and self._oneway_thread != me):
                return
            self._oneway_thread = me
            self._stranded = False
            drained = False
            try:
                self._drain_oneways(oneways)
                drained = True
            finally:
                self._oneway_thread = None
                runner.release()
                if not drained:
                    self._strand()

    def _drain_oneways(self, oneways: deque[Message]) -> None:
        while oneways:
            message = oneways.popleft()
            try:
                self._handle(message.data, expects_reply=False)
            except Exception:  # logged here: the calls queued behind it still run
                log.exception("unexpected error while running one-way call %r", message)

    def _strand(self) -> None:
        """A BaseException left run_oneways with calls queued behind it: the next serve() runs
        them, and a server's next worker pass (``on_stranded``) without waiting for one."""
        if self._oneways:
            self._stranded = True
            if self._on_stranded is not None:
                self._on_stranded(self)

    def _answer(self, message: Message, payload: Payload) -> None:
        """Reply, by one thread at a time: a reply while another thread writes one waits in the
        backlog, in order, for that thread, and this one goes back to serving. A client that
        stops reading holds a writer up to ``reply_timeout``; without the backlog every worker
        took one of its calls and waited too, and no other client was answered meanwhile.

        No lock is waited for: whoever holds the token drains the backlog, and looks again
        after letting the token go, so a reply appended just before that is never stranded.
        """
        backlog = self._backlog
        backlog.append((message, payload))
        writer = self._writer
        while backlog and writer.acquire(False):
            try:
                while backlog:
                    self._write_reply(*backlog.popleft())
            finally:
                writer.release()

    def _write_reply(self, message: Message, payload: Payload) -> None:
        try:
            try:
                self._reply(message, payload, self.reply_timeout)
            except MessageTooLarge as exc:
                self.comm.reply(message, self.codec.encode_error(ErrorCode.TOO_LARGE, "MessageTooLarge", str(exc)),
                                self.reply_timeout)
        except Timeout:
            log.warning("pid %d does not read its replies; closing the connection", self.comm.peer.pid)
            self.comm.close()
            if self._on_drop is not None:
                self._on_drop(self)  # no notice will come for a connection we closed ourselves
        except ConnectionClosed:
            pass  # the caller went away; its notice reaches whoever waits on the port


_REQUEST = MessageType.REQUEST


def call_deadline(timeout: float | None) -> float | None:
    """Our own deadline, or the one of the call we are serving if that ends sooner."""
    deadline = deadline_after(timeout)
    info = CALL_INFO.get()
    inherited = None if info is None else info[3]
    if inherited is not None and (deadline is None or inherited < deadline):
        deadline = inherited
    return deadline


def time_left(deadline: float | None, method: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"the deadline for {method} passed before the call was sent")
    return left


# -- proxies ------------------------------------------------------------------------


class Proxy:
    """Base of every proxy: calls go to object ``_object_id`` on the peer."""

    __slots__ = ("_endpoint", "_object_id", "_timeout")

    def __init__(self, endpoint: EndpointBase, object_id: int, timeout: float | None) -> None:
        self._endpoint = endpoint
        self._object_id = object_id
        self._timeout = timeout

    def _copy(self, timeout: float | None) -> Proxy:
        clone = object.__new__(type(self))
        Proxy.__init__(clone, self._endpoint, self._object_id, timeout)
        return clone


def _caller(name: str, oneway: bool) -> Callable[..., Any]:
    # Whatever the endpoint returns is the call's outcome: a result for a
    # blocking endpoint, an awaitable for an asyncio one; so one proxy class
    # per interface serves both drivers.
    # ``self`` is positional-only: any keyword, ``self=`` included, is the remote method's to judge.
    if oneway:
        def call(self: Proxy, /, *args: Any, **kwargs: Any) -> Any:
            return self._endpoint.notify(self._object_id, name, args, kwargs, self._timeout)
    else:
        def call(self: Proxy, /, *args: Any, **kwargs: Any) -> Any:
            return self._endpoint.call(self._object_id, name, args, kwargs, self._timeout)
    call.__name__ = call.__qualname__ = name
    call.__alpc_oneway__ = oneway  # type: ignore[attr-defined]
    return call


_proxy_classes: dict[type[Interface], type[Proxy]] = {}


def proxy_class(interface: type[Interface]) -> type[Proxy]:
    """A Proxy subclass with one method per declared method, built once per interface."""
    cls = _proxy_classes.get(interface)
    if cls is None:
        namespace: dict[str, Any] = {"__slots__": ()}
        for name, spec in interface.__alpc_methods__.items():
            namespace[name] = _caller(name, spec.oneway)
        cls = _proxy_classes.setdefault(interface, type(f"{interface.__name__}Proxy", (Proxy,), namespace))
    return cls


def make_proxy(interface: type[P], endpoint: EndpointBase, object_id: int, timeout: float | None) -> P:
    if not (isinstance(interface, type) and issubclass(interface, Interface)):
        raise TypeError(f"an RPC interface is an Interface subclass, not {interface!r}")
    spec: type[Interface] = interface
    return cast(P, proxy_class(spec)(endpoint, object_id, timeout))


class _Lease(EndpointBase):
    """The endpoint as the objects a peer passed in one call see it: until that call returns.

    Every copy of such an object (``with_timeout``) shares the lease. Once expired, a call
    fails at once with UnknownMethod, as the peer would answer it: the peer no longer serves
    the object, and a blocking peer does not even read its connection between its own calls,
    so a call sent there would wait for nobody.
    """

    def __init__(self, endpoint: EndpointBase, object_id: int) -> None:  # a view: no codec of its own
        self.endpoint: EndpointBase | None = endpoint
        self.object_id = object_id

    def expire(self) -> None:
        self.endpoint = None

    def live(self) -> EndpointBase:
        endpoint = self.endpoint
        if endpoint is None:
            raise UnknownMethod(f"object {self.object_id} the peer passed is gone: a callback is only valid "
                                "during its call")
        return endpoint

    def call(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float | None) -> Any:
        return self.live().call(object_id, method, args, kwargs, timeout)

    def notify(self, object_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None) -> Any:
        return self.live().notify(object_id, method, args, kwargs, timeout)


class RemoteObject(Proxy):
    """An object the peer passed us (a callback): valid until the call that passed it returns.

    Its methods are the ones the peer declared; call it like the local object,
    or like a function if it is an ``alpc.rpc.callback``.
    """

    __slots__ = ("_ref",)

    def __init__(self, endpoint: EndpointBase, ref: ObjectRef, timeout: float | None) -> None:
        super().__init__(endpoint, ref.object_id, timeout)
        self._ref = ref

    def _copy(self, timeout: float | None) -> Proxy:
        return RemoteObject(self._endpoint, self._ref, timeout)

    @property
    def interface(self) -> str:
        return self._ref.interface

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        oneway = self._ref.methods.get(name)
        if oneway is None:
            raise AttributeError(f"remote {self._ref.interface!r} object has no method {name!r}")
        return types.MethodType(_caller(name, oneway), self)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("call")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<RemoteObject {self._ref.interface!r} id {self._ref.object_id}>"


class PendingCall:
    """A call in flight (``start_call``): wait for its result, or cancel it from any thread."""

    def __init__(self, endpoint: Endpoint, pending: PendingRequest, method: str) -> None:
        self._endpoint = endpoint
        self._pending = pending
        self.method = method

    def result(self, timeout: float | None = None) -> Any:
        """The call's result; Cancelled once it was cancelled, Timeout (and the call is then
        cancelled at the server) when ``timeout`` or the call's own deadline passes first."""
        return self._endpoint.codec.result(self._pending.result(timeout).data)

    def cancel(self) -> bool:
        """Cancel the call at the server: False if its reply already came or it was cancelled."""
        return self._pending.cancel()

    def __repr__(self) -> str:
        return f"<rpc.PendingCall {self.method} id {self._pending.id}>"


def start_call(method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> PendingCall:
    """Start ``method(*args, **kwargs)``, a method of a blocking proxy, without waiting for it.

    ``start_call(client.proxy.resize, image)`` sends the call and returns a
    PendingCall: ``result()`` waits for it and any thread may ``cancel()`` it;
    the handler then sees ``current_call().cancelled`` and its reply is dropped.
    """
    proxy = getattr(method, "__self__", None)
    endpoint = proxy._endpoint if isinstance(proxy, Proxy) else None
    if isinstance(endpoint, _Lease):
        endpoint = endpoint.live()
    if not isinstance(endpoint, Endpoint):
        raise TypeError(f"start_call takes a method of a blocking RPC proxy (client.proxy.name), not {method!r}")
    if getattr(method, "__alpc_oneway__", False):
        raise TypeError(f"{method.__name__} is one-way: there is nothing to wait for or cancel")
    assert proxy is not None
    return endpoint.start_call(proxy._object_id, method.__name__, args, kwargs, proxy._timeout)


def with_timeout(proxy: P, timeout: float | None) -> P:
    """The same proxy with another per-call timeout (the deadline the server sees)."""
    if not isinstance(proxy, Proxy):
        raise TypeError(f"not an RPC proxy: {proxy!r}")
    return cast(P, proxy._copy(check_timeout(timeout, "timeout")))


def check_timeout(timeout: float | None, what: str) -> float | None:
    """``timeout`` if it is None or a number >= 0; ValueError now rather than at every call."""
    # `not >= 0`, not `< 0`: NaN compares false both ways and would pass.
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise ValueError(f"{what} must be a number >= 0 or None, got {timeout!r}")
    return timeout
