"""The single exception tree of alpc.

Every exception also subclasses the builtin a caller would already catch, so
``except TimeoutError`` or ``except PermissionError`` keeps working.
"""

from __future__ import annotations

import concurrent.futures
import threading

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "AccessDenied",
    "ActivationError",
    "AlpcError",
    "BadArguments",
    "BrokerRunning",
    "BrokerUnavailable",
    "ConnectionClosed",
    "ConnectionRejected",
    "HandleNotAllowed",
    "InvalidName",
    "MarshalError",
    "MessageTooLarge",
    "NameInUse",
    "NativeBuildError",
    "PeerGone",
    "PortNotFound",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "RpcError",
    "SectionError",
    "Throttled",
    "Timeout",
    "Unanswered",
    "UnknownMethod",
    "VersionMismatch",
    "remote_error_class",
]


class AlpcError(Exception):
    """Base of every error raised by alpc."""


class InvalidName(AlpcError, ValueError):
    """A port name breaks the naming rules (length or characters)."""


class NameInUse(AlpcError, FileExistsError):
    """A live port already owns this name; alpc never takes a name over."""


class PortNotFound(AlpcError, FileNotFoundError):
    """No live port has this name."""


class AccessDenied(AlpcError, PermissionError):
    """The caller's kernel-verified identity is not allowed to do this."""


class HandleNotAllowed(AccessDenied):
    """A handle (fd) of a kind the receiving port does not accept, or more than it takes per message."""


class ConnectionRejected(AlpcError, ConnectionRefusedError):
    """The server refused the connection; ``reason`` is the server's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection rejected: {reason}")
        self.reason = reason


class Timeout(AlpcError, TimeoutError):
    """A wait ran out of time."""


class DeadlineExceeded(Timeout):
    """A request's (or an RPC call's) deadline passed before the server dispatched it."""


class Cancelled(AlpcError, concurrent.futures.CancelledError):
    """The request was cancelled (``PendingRequest.cancel()``) while a thread waited for its reply."""


class Unanswered(AlpcError, RuntimeError):
    """The server's application dropped the request without replying; its runtime answered for it."""


class BrokerUnavailable(AlpcError, ConnectionError):
    """The broker daemon is not running, not reachable, or shutting down."""


class BrokerRunning(AlpcError, FileExistsError):
    """Another broker already serves this runtime directory."""


class ConnectionClosed(AlpcError, ConnectionError):
    """The connection is closed; nothing more can be sent or received on it."""


class PeerGone(ConnectionClosed):
    """The peer closed its port or its process died; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolError(AlpcError, ConnectionAbortedError):
    """The peer sent bytes that break the wire protocol; its channel is closed."""


class MessageTooLarge(AlpcError, ValueError):
    """A message or connect payload is longer than the limit that applies to it."""


class QuotaExceeded(AlpcError, OSError):
    """A port or broker limit is exhausted (pending connects, connections, ...).

    ``limit`` names the limit (a ``quotas.Limit`` value such as
    ``"max_connections"``), or is "" when the cause has no configured limit.
    """

    def __init__(self, message: str = "", limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (str(self), self.limit)


class Throttled(QuotaExceeded, Timeout):
    """A send waited for a limit to free up (backpressure) until its timeout ran out.

    Both a QuotaExceeded (``limit`` says which) and a Timeout: code that
    already catches TimeoutError keeps working.
    """


class SectionError(AlpcError, ValueError):
    """A section, view or memory grant was used outside its bounds, after release, or wrongly."""


class NativeBuildError(AlpcError, ImportError):
    """The compiled extension does not match its sources: rebuild with ``make build``."""


class ActivationError(AlpcError, ValueError):
    """The service manager passed sockets alpc cannot serve on (count, family or type)."""
# -- RPC ----------------------------------------------------------------------------


class VersionMismatch(ConnectionRejected):
    """The server does not offer a compatible version of the interface (or RPC protocol)."""


class RpcError(AlpcError):
    """Base of the errors the RPC layer reports about a call."""


class UnknownMethod(RpcError, AttributeError):
    """The interface declares no such method, or the target object no longer exists."""


class BadArguments(RpcError, TypeError):
    """The arguments do not fit the method's signature."""


class MarshalError(RpcError, ValueError):
    """A value cannot be marshalled, or received bytes are not a well-formed RPC message."""


class RemoteError(RpcError, RuntimeError):
    """A handler raised; ``type_name``, ``remote_message`` and ``remote_traceback`` describe it.

    For a remote builtin exception the error also subclasses that builtin (see
    ``remote_error_class``), so ``except KeyError`` catches a remote KeyError.
    """

    def __init__(self, type_name: str, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = traceback

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.remote_message}" if self.remote_message else self.type_name
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # The mirrored classes are made at run time, so rebuild through the factory.
        return (_rebuild_remote_error, (self.type_name, self.remote_message, self.remote_traceback))


# Remote builtins that also subclass their local builtin. Only types whose
# constructor takes a plain message qualify (not UnicodeDecodeError, StopIteration, ...).
_MIRRORED_BUILTINS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        ArithmeticError, AssertionError, AttributeError, BlockingIOError, BrokenPipeError, ConnectionError,
        EOFError, FileExistsError, FileNotFoundError, FloatingPointError, IndexError, InterruptedError,
        IsADirectoryError, KeyError, LookupError, MemoryError, NotADirectoryError, NotImplementedError,
        OSError, OverflowError, PermissionError, ProcessLookupError, RecursionError, RuntimeError,
        TimeoutError, TypeError, ValueError, ZeroDivisionError,
    )
}
_remote_classes: dict[str, type[RemoteError]] = {}
_remote_classes_lock = threading.Lock()


def remote_error_class(type_name: str) -> type[RemoteError]:
    """The RemoteError class for a remote exception type name (cached)."""
    builtin = _MIRRORED_BUILTINS.get(type_name)
    if builtin is None:
        return RemoteError
    with _remote_classes_lock:
        cls = _remote_classes.get(type_name)
        if cls is None:
            cls = type(f"Remote{type_name}", (RemoteError, builtin), {"__module__": __name__})
            _remote_classes[type_name] = cls
        return cls


def _rebuild_remote_error(type_name: str, message: str, traceback: str | None) -> RemoteError:
    return remote_error_class(type_name)(type_name, message, traceback)
