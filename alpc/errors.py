"""The single exception tree of alpc.

Every exception also subclasses the builtin a caller would already catch, so
``except TimeoutError`` or ``except PermissionError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ActivationError",
    "AlpcError",
    "BrokerRunning",
    "BrokerUnavailable",
    "ConnectionClosed",
    "ConnectionRejected",
    "HandleNotAllowed",
    "InvalidName",
    "MessageTooLarge",
    "NameInUse",
    "NativeBuildError",
    "PeerGone",
    "PortNotFound",
    "ProtocolError",
    "QuotaExceeded",
    "SectionError",
    "Throttled",
    "Timeout",
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
