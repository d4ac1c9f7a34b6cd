"""How errors cross the wire: the code of an ERROR reply and the exception each side sees."""

from __future__ import annotations

from ..errors import (
    AccessDenied,
    BadArguments,
    DeadlineExceeded,
    MarshalError,
    MessageTooLarge,
    RemoteError,
    UnknownMethod,
    remote_error_class,
)

__all__ = ["ErrorCode", "error_for", "exception_type_name", "typed_error_code"]


class ErrorCode:
    """The ``code`` of an ERROR reply; the caller raises the matching alpc error."""

    REMOTE = "remote"
    UNKNOWN_METHOD = "unknown_method"
    BAD_ARGUMENTS = "bad_arguments"
    MARSHAL = "marshal"
    ACCESS_DENIED = "access_denied"
    DEADLINE = "deadline"
    TOO_LARGE = "too_large"


# Errors that keep their own type across the wire, also when a handler raises them on purpose.
_TYPED_ERRORS: dict[str, type[Exception]] = {
    ErrorCode.ACCESS_DENIED: AccessDenied,
    ErrorCode.DEADLINE: DeadlineExceeded,
    ErrorCode.BAD_ARGUMENTS: BadArguments,
    ErrorCode.UNKNOWN_METHOD: UnknownMethod,
    ErrorCode.MARSHAL: MarshalError,
    ErrorCode.TOO_LARGE: MessageTooLarge,
}


def typed_error_code(exc: BaseException) -> str:
    """The code to send for a handler's exception."""
    for code, cls in _TYPED_ERRORS.items():
        if isinstance(exc, cls):
            return code
    return ErrorCode.REMOTE


def error_for(code: str, type_name: str, message: str, tb: str | None) -> Exception:
    """The local exception for an ERROR reply."""
    if code == ErrorCode.REMOTE:
        return remote_error_class(type_name)(type_name, message, tb)
    cls = _TYPED_ERRORS.get(code)
    if cls is None:
        return remote_error_class(type_name)(type_name, f"[{code}] {message}", tb)
    return cls(f"remote: {message}")


def exception_type_name(exc: BaseException) -> str:
    """Builtins by bare name (so the peer can mirror them), others fully qualified."""
    if isinstance(exc, RemoteError):
        return exc.type_name
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
