"""The I/O-free dispatch core: exported objects, access checks, deadlines, the call context.

A driver (the blocking server and client today, an asyncio server later) hands
it the data of each received call and sends whatever it returns. Running a
call is split into ``prepare`` (decode, look up, check) and ``complete`` /
``fail`` (encode the outcome), so an async driver can await the handler in
between; ``handle`` does all three for a synchronous handler.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, NamedTuple, Protocol

from ..errors import MarshalError, RemoteError, Timeout
from ..protocol import Message, Payload
from ..security import PeerCred
from .codec import Call, Codec, ObjectRef
from .faults import ErrorCode, exception_type_name, typed_error_code
from .interface import Interface, MethodSpec, ResolvedAccess, interface_methods

__all__ = [
    "CALL_INFO",
    "Binding",
    "CallContext",
    "CallInfo",
    "Dispatcher",
    "Exported",
    "Lease",
    "ObjectTable",
    "Prepared",
    "current_call",
    "current_deadline",
]

log = logging.getLogger("alpc.rpc")


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it is running (``current_call()``).

    ``caller`` is the kernel-verified identity of the peer; ``deadline`` is on
    the CLOCK_MONOTONIC clock shared by the processes of one machine;
    ``message`` is the alpc Message that carried the call (None when a driver
    gave none).
    """

    caller: PeerCred
    interface: str
    method: str
    deadline: float | None
    oneway: bool
    message: Message | None = None

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled this call (or timed out waiting for it, or went away).

        A synchronous handler polls this and stops early; its reply is dropped
        either way. An async handler gets CancelledError as well. Polling reads
        the connection without blocking when no other thread is reading it,
        so the flag turns up even on a server with one worker.
        """
        message = self.message
        if message is None:
            return False
        if not message.cancelled:
            port = message.port
            pump = getattr(port, "pump", None)  # a blocking port; the asyncio loop reads by itself
            if pump is not None:
                pump()
            # A caller that closed its connection (or died) waits for no reply either: the
            # asyncio server cancels such a handler's task, and a polling one stops as well.
            return message.cancelled or bool(getattr(port, "closed", False))
        return True

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (never negative); None if it set none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


# The running call as a plain tuple (caller, interface, method, deadline, oneway,
# the message that carried it): cheaper to make per call than a CallContext,
# which is built only when asked for.
CallInfo = tuple[PeerCred, str, str, float | None, bool, "Message | None"]
CALL_INFO: ContextVar[CallInfo | None] = ContextVar("alpc_rpc_call", default=None)


def current_call() -> CallContext:
    """The context of the RPC call this handler runs; LookupError outside one."""
    info = CALL_INFO.get()
    if info is None:
        raise LookupError("not inside an RPC call")
    return CallContext(*info)


def current_deadline() -> float | None:
    info = CALL_INFO.get()
    return None if info is None else info[3]


# -- exported objects ---------------------------------------------------------------


class Binding(NamedTuple):
    """One callable method of one exported object, with its arity precomputed."""

    spec: MethodSpec
    fn: Callable[..., Any]
    access: ResolvedAccess | None
    # A call with no kwargs and fast_min <= len(args) <= fast_max binds for sure;
    # anything else is checked by ``check`` (TypeError when the arguments do not fit).
    fast_min: int
    fast_max: int
    check: Callable[..., object] | None


# How a method's arguments are checked: its arity and a binder, or None when unknown.
Arity = tuple[int, int, "Callable[..., object] | None"]


@lru_cache(maxsize=1024)
def _method_arity(function: Callable[..., Any]) -> Arity:
    """The arity of a plain method, cached per function (every export of a class shares it)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return 1, 0, None
    return _arity(signature, bound=True)


def _arity(signature: inspect.Signature, *, bound: bool = False) -> Arity:
    """``bound``: ``signature`` includes the self (or cls) the call fills in itself."""
    params = list(signature.parameters.values())
    kinds = inspect.Parameter
    check: Callable[..., object] = signature.bind
    if bound and params and params[0].kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
        # Checked with a stand-in for self rather than without it: a keyword naming it is then
        # refused as the call itself would refuse it, not swallowed by a **kwargs.
        params = params[1:]
        check = partial(signature.bind, None)
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    if any(p.kind is kinds.KEYWORD_ONLY and p.default is p.empty for p in params):
        return 1, 0, check  # never fast: a required keyword-only argument
    if any(p.kind is kinds.VAR_POSITIONAL for p in params):
        return required, sys.maxsize, check
    return required, len(positional), check


class Exported:
    """An object in an ObjectTable, with its method table built once."""

    __slots__ = ("bindings", "interface", "obj", "ref", "refs")

    def __init__(self, object_id: int, obj: Interface) -> None:
        specs = interface_methods(obj) or {}
        self.obj = obj
        self.interface = type(obj).__alpc_name__
        self.bindings = {name: _bind(obj, spec) for name, spec in specs.items()}
        self.ref = ObjectRef(object_id, self.interface, {name: spec.oneway for name, spec in specs.items()})
        self.refs = 0


def _bind(obj: Interface, spec: MethodSpec) -> Binding:
    bound = getattr(obj, spec.name)
    declared = inspect.getattr_static(type(obj), spec.name, None)
    if inspect.isfunction(declared) and spec.name not in getattr(obj, "__dict__", {}):
        fast_min, fast_max, check = _method_arity(declared)
    else:  # a staticmethod, classmethod, callable object or per-instance attribute
        try:
            if inspect.ismethod(bound):  # a classmethod: its cls, like a method's self
                fast_min, fast_max, check = _arity(inspect.signature(bound.__func__), bound=True)
            else:
                fast_min, fast_max, check = _arity(inspect.signature(bound))
        except (TypeError, ValueError):  # a C function (max, a builtin method): no signature to read
            fast_min, fast_max, check = _declared_arity(type(obj), spec.name)
    access = spec.access.resolve() if spec.access is not None else None
    return Binding(spec, bound, access, fast_min, fast_max, check)


def _declared_arity(cls: type, name: str) -> Arity:
    """The arity of the interface's own declaration of ``name``, for an implementation whose
    signature cannot be read: arguments it does not take are then BadArguments, as for any
    other method, not the TypeError the C function raises (a RemoteError at the caller)."""
    for klass in cls.__mro__:
        declared = klass.__dict__.get(name)
        if declared is not None and inspect.isfunction(declared) and hasattr(declared, "__alpc_rpc__"):
            return _method_arity(declared)
    return 1, 0, None


class ObjectTable:
    """The objects one side of a connection lets the other call, by object id.

    Id 0 is the object a server serves; objects passed as call arguments get
    ids from 1 and stay exported while a call that carries them is running.
    """

    def __init__(self, served: Interface | None = None) -> None:
        self._lock = threading.Lock()
        self._objects: dict[int, Exported] = {}
        self._ids: dict[int, int] = {}  # id(obj) -> object id, for exported arguments
        self._next_id = 1
        if served is not None:
            self._objects[0] = Exported(0, served)
        # The table's own dict.get: looked up on every call.
        self.lookup: Callable[[int], Exported | None] = self._objects.get

    def get(self, object_id: int) -> Exported | None:
        return self._objects.get(object_id)

    def export(self, obj: object) -> ObjectRef | None:
        """Export ``obj`` for the duration of one call; None if it is not an interface object."""
        if not isinstance(obj, Interface):
            return None
        with self._lock:
            object_id = self._ids.get(id(obj))
            if object_id is None:
                object_id = self._allocate()
                entry = Exported(object_id, obj)
                self._objects[object_id] = entry
                self._ids[id(obj)] = object_id
            else:
                entry = self._objects[object_id]
            entry.refs += 1
            return entry.ref

    def _allocate(self) -> int:
        while self._next_id in self._objects:
            self._next_id = self._next_id % 0xFFFFFFFF + 1
        object_id = self._next_id
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return object_id

    def release(self, object_ids: list[int]) -> None:
        with self._lock:
            for object_id in object_ids:
                entry = self._objects.get(object_id)
                if entry is None or object_id == 0:
                    continue
                entry.refs -= 1
                if entry.refs <= 0:
                    del self._objects[object_id]
                    del self._ids[id(entry.obj)]

    def __len__(self) -> int:
        return len(self._objects)


# -- dispatch -------------------------------------------------------------------------


class Lease(Protocol):
    """What a peer's object passed in a call is used through: valid until that call returns."""

    def expire(self) -> None: ...


# The leases of the objects one call passed (None: it passed none).
Leases = list[Lease] | None

# A call that passed every check, ready to run: (handler, args, kwargs, call info, leases).
Prepared = tuple[Callable[..., Any], list[Any], dict[str, Any], CallInfo, Leases]


class _Refused(Exception):
    """Internal: a call refused before it ran, with the error to send back."""

    def __init__(self, code: str, type_name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.type_name = type_name
        self.message = message


_NO_KWARGS: dict[str, Any] = {}

# What a handler's failure may be. SystemExit too: a handler's sys.exit() (argparse's answer to an
# option it does not know) would otherwise end the worker thread, or the asyncio server's loop,
# with the call unanswered. KeyboardInterrupt and CancelledError still propagate.
_HANDLER_ERRORS = (Exception, SystemExit)


class Dispatcher:
    """Runs received calls against an ObjectTable and encodes their outcome."""

    def __init__(self, codec: Codec, objects: ObjectTable, *, caller: PeerCred, send_tracebacks: bool = False) -> None:
        self._codec = codec
        self._objects = objects
        self._caller = caller
        self._send_tracebacks = send_tracebacks
        self._allowed: dict[ResolvedAccess, bool] = {}
        # The leases of the objects passed by the call this thread is decoding (see passed()).
        self._decoding = threading.local()
        # Bound once: the per-call path below is the RPC layer's whole server-side cost.
        self._decode_call = codec.decode_call
        self._encode_result = codec.encode_result
        self._lookup = objects.lookup

    def handle(self, data: bytes, *, expects_reply: bool = True, message: Message | None = None) -> Payload | None:
        """Decode, check, run and encode one call; None when no reply is to be sent.

        ``message``, the one that carried the call, lets the handler see a cancel.

        The common call (positional arguments that fit, no access rule, deadline
        not passed) runs inline here; everything else goes through prepare/run.
        """
        decoding = self._decoding  # _decode_leasing, inline: this is the per-call path
        leases: list[Lease] = []
        decoding.leases = leases
        try:
            call = self._decode_call(data)
        except MarshalError as exc:
            refusal = self._refusal(_Refused(ErrorCode.MARSHAL, "MarshalError", str(exc)), expects_reply)
            return refusal if expects_reply else None
        finally:
            decoding.leases = None
        object_id, name, args, kwargs, deadline = call
        entry = self._lookup(object_id)
        binding = None if entry is None else entry.bindings.get(name)
        # A call that passed objects takes the general path, which expires them when it returns.
        if (binding is None or binding.access is not None or kwargs or leases
                or not binding.fast_min <= len(args) <= binding.fast_max
                or (deadline is not None and time.monotonic() >= deadline)):
            try:
                prepared = self._prepare_checked(entry, binding, call, expects_reply, message, leases)
            except _Refused as refusal:
                _expire(leases)
                # Logged for a one-way call too (prepare() does): the log is all anyone hears of
                # it, as of one that expired while it waited its turn.
                reply = self._refusal(refusal, expects_reply)
                return reply if expects_reply else None
            return self.run(prepared)
        assert entry is not None
        token = CALL_INFO.set((self._caller, entry.interface, name, deadline, not expects_reply, message))
        try:
            result = binding.fn(*args)
        except _HANDLER_ERRORS as exc:
            if expects_reply:
                return self.fail(exc, deadline)
            self._log_oneway(entry.interface, name, exc)
            return None
        finally:
            CALL_INFO.reset(token)
        if not expects_reply:
            return None
        try:
            return self._encode_result(result)
        except Exception as exc:  # not only MarshalError: packing runs the result's own code (__str__...)
            return self._unmarshallable(exc)

    def prepare(self, data: bytes, *, expects_reply: bool = True, message: Message | None = None) -> Prepared | bytes:
        """The call ready to run, or the error reply refusing it (for drivers that run calls themselves)."""
        leases: list[Lease] = []
        try:
            call = self._decode_leasing(data, leases)
        except MarshalError as exc:
            return self._refusal(_Refused(ErrorCode.MARSHAL, "MarshalError", str(exc)), expects_reply)
        object_id, name, _, _, _ = call
        entry = self._lookup(object_id)
        binding = None if entry is None else entry.bindings.get(name)
        try:
            return self._prepare_checked(entry, binding, call, expects_reply, message, leases)
        except _Refused as refusal:
            _expire(leases)
            return self._refusal(refusal, expects_reply)

    def _decode_leasing(self, data: bytes, leases: list[Lease]) -> Call:
        """decode_call, collecting in ``leases`` the objects the call passes (see passed())."""
        decoding = self._decoding
        decoding.leases = leases
        try:
            return self._decode_call(data)
        finally:
            decoding.leases = None

    def passed(self, lease: Lease) -> None:
        """The import hook's report of an object the peer passed: valid while its call runs.

        The call being decoded on this thread gets the lease and expires it when it returns.
        Outside a call's decoding (a reply holding one, which no well-behaved peer sends)
        there is no call to make it valid at all.
        """
        leases: Leases = getattr(self._decoding, "leases", None)
        if leases is None:
            lease.expire()
        else:
            leases.append(lease)

    def _log_oneway(self, interface: str, name: str, exc: BaseException) -> None:
        log.warning("one-way call %s.%s from pid %d raised %s: %s", interface, name, self._caller.pid,
                    type(exc).__name__, exc)

    def _refusal(self, refusal: _Refused, expects_reply: bool = True) -> bytes:
        log.debug("refused a %s from pid %d: %s", "call" if expects_reply else "one-way call", self._caller.pid,
                  refusal.message)
        return self._codec.encode_error(refusal.code, refusal.type_name, refusal.message)

    def _prepare_checked(self, entry: Exported | None, binding: Binding | None, call: Call,
                         expects_reply: bool, message: Message | None, leases: Leases) -> Prepared:
        object_id, name, args, kwargs, deadline = call
        if entry is None:
            raise _Refused(ErrorCode.UNKNOWN_METHOD, "UnknownMethod",
                           f"no object {object_id} on this connection (a callback is only valid during its call)")
        if binding is None:
            raise _Refused(ErrorCode.UNKNOWN_METHOD, "UnknownMethod",
                           f"interface {entry.interface!r} has no method {name[:100]!r}")
        if leases and not expects_reply:
            # As the caller's own side refuses to send it: a one-way caller waits for nothing,
            # so nobody serves those objects, and a call into one would wait out its timeout.
            raise _Refused(ErrorCode.MARSHAL, "MarshalError",
                           f"{entry.interface}.{name} is one-way: nobody would serve the objects passed to it")
        if binding.access is not None and not self._allows(binding.access):
            raise _Refused(ErrorCode.ACCESS_DENIED, "AccessDenied",
                           f"uid {self._caller.uid} gid {self._caller.gid} may not call {entry.interface}.{name}")
        if deadline is not None and time.monotonic() >= deadline:
            raise _Refused(ErrorCode.DEADLINE, "DeadlineExceeded",
                           f"the deadline of {entry.interface}.{name} passed before it started")
        kwargs = self._check_arguments(binding, args, kwargs, f"{entry.interface}.{name}")
        return (binding.fn, args, kwargs, (self._caller, entry.interface, name, deadline, not expects_reply, message),
                leases or None)

    def _allows(self, access: ResolvedAccess) -> bool:
        # The caller's identity is fixed for the connection, so decide once per rule.
        allowed = self._allowed.get(access)
        if allowed is None:
            allowed = self._allowed[access] = access.allows(self._caller)
        return allowed

    def _check_arguments(self, binding: Binding, args: list[Any], kwargs: dict[Any, Any] | None,
                         where: str) -> dict[str, Any]:
        kwargs = kwargs or _NO_KWARGS
        for key in kwargs:
            if type(key) is not str:
                raise _Refused(ErrorCode.BAD_ARGUMENTS, "BadArguments", "keyword argument names must be strings")
        if binding.check is not None:
            try:
                binding.check(*args, **kwargs)
            except TypeError as exc:
                raise _Refused(ErrorCode.BAD_ARGUMENTS, "BadArguments", f"{where}: {exc}") from None
        return kwargs

    def run(self, prepared: Prepared) -> Payload | None:
        """Run a prepared synchronous call; its reply, or None for a one-way call."""
        fn, args, kwargs, info, leases = prepared
        token = CALL_INFO.set(info)
        try:
            result = fn(*args, **kwargs)
        except _HANDLER_ERRORS as exc:
            return self._raised(info, exc)
        finally:
            CALL_INFO.reset(token)
            _expire(leases)
        return None if info[4] else self.complete(result)

    async def run_async(self, prepared: Prepared) -> Payload | None:
        """``run`` for an asyncio driver: a coroutine handler is awaited (a plain one runs inline).

        CancelledError (the caller cancelled) propagates: no reply is due then.
        """
        fn, args, kwargs, info, leases = prepared
        token = CALL_INFO.set(info)
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except _HANDLER_ERRORS as exc:
            return self._raised(info, exc)
        finally:
            CALL_INFO.reset(token)
            _expire(leases)
        return None if info[4] else self.complete(result)

    def _raised(self, info: CallInfo, exc: BaseException) -> Payload | None:
        if not info[4]:
            return self.fail(exc, info[3])
        self._log_oneway(info[1], info[2], exc)
        return None

    def complete(self, result: Any) -> Payload:
        """The reply for a call that returned ``result``."""
        try:
            return self._codec.encode_result(result)
        except Exception as exc:  # not only MarshalError: packing runs the result's own code (__str__...)
            return self._unmarshallable(exc)

    def _unmarshallable(self, exc: Exception) -> Payload:
        return self._codec.encode_error(ErrorCode.MARSHAL, "MarshalError",
                                        _printable(f"cannot marshal the result: {_describe(exc)}"))

    def fail(self, exc: BaseException, deadline: float | None = None) -> Payload:
        """The reply for a call whose handler raised ``exc``; ``deadline`` is the call's."""
        code = typed_error_code(exc)
        if code == ErrorCode.REMOTE and _deadline_ran_out(exc, deadline):
            code = ErrorCode.DEADLINE
        tb = _format_traceback(exc) if self._send_tracebacks else None
        # A RemoteError relayed (a nested call's, let through): its own message, as the codec
        # sends an exception value's. Its str() adds the type and the remote traceback, which
        # this server may not be sending.
        message = exc.remote_message if isinstance(exc, RemoteError) else _describe(exc)
        type_name = exception_type_name(exc)
        try:
            return self._codec.encode_error(code, type_name, message, tb)
        except MarshalError:
            # Text msgpack cannot encode as UTF-8 (lone surrogates, as os.fsdecode makes for
            # an undecodable file name): the caller must get the error all the same.
            return self._codec.encode_error(code, _printable(type_name), _printable(message),
                                            None if tb is None else _printable(tb))


def _deadline_ran_out(exc: BaseException, deadline: float | None) -> bool:
    """A Timeout raised once the call's deadline passed: the caller's time ran out.

    A nested call inherits that deadline, and its Timeout is then the caller's own
    (DeadlineExceeded at the caller), not a failure of the handler (a RemoteError,
    which ``except alpc.Timeout`` would not catch).
    """
    return isinstance(exc, Timeout) and deadline is not None and time.monotonic() >= deadline


def _expire(leases: Leases) -> None:
    """The call that passed these objects returned: the peer no longer serves them."""
    if leases:
        for lease in leases:
            lease.expire()


def _format_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:  # the exception's own code (a __notes__ property...) runs while it is formatted
        return f"<the traceback of a {type(exc).__name__} could not be formatted>"


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not take the server down
        return f"<unprintable {type(exc).__name__}>"


def _printable(text: str) -> str:
    """``text`` with whatever UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
