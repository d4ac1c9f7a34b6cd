"""Process-wide settings and per-port attributes, both frozen and passed explicitly."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AccessDenied

__all__ = [
    "BROKER_SOCKET_NAME",
    "Config",
    "PortAttributes",
    "default_runtime_dir",
    "ensure_runtime_dir",
]

BROKER_SOCKET_NAME = "broker.sock"

KIB = 1024
MIB = 1024 * KIB


def default_runtime_dir() -> Path:
    """``$ALPC_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/alpc``, else ``/tmp/alpc-$UID``."""
    explicit = os.environ.get("ALPC_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "alpc"
    return Path(f"/tmp/alpc-{os.getuid()}")


def ensure_runtime_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory, or check that an existing one is safe.

    A runtime directory someone else owns, or that others can enter, would let
    them replace the broker socket; refuse it rather than trust it.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise AccessDenied(f"runtime dir {path} is not a directory")
    if info.st_uid != os.getuid():
        raise AccessDenied(f"runtime dir {path} is owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & 0o077:
        raise AccessDenied(f"runtime dir {path} is accessible to others (mode {info.st_mode & 0o777:o})")
    return path


@dataclass(frozen=True)
class PortAttributes:
    """Limits a server sets on its connection port (ALPC_PORT_ATTRIBUTES).

    ``max_message_length`` bounds what the port accepts from a client and is
    announced to the client, which refuses to send anything larger.
    """

    max_message_length: int = 64 * MIB
    max_connect_data: int = 64 * KIB
    max_pending_connects: int = 128

    def __post_init__(self) -> None:
        for name in ("max_message_length", "max_connect_data", "max_pending_connects"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PortAttributes.{name} must be a positive int, got {value!r}")
        if self.max_message_length > 0xFFFFFFFF:
            raise ValueError("PortAttributes.max_message_length must fit in 32 bits")


@dataclass(frozen=True)
class Config:
    """Where the broker lives and the limits this process applies."""

    runtime_dir: Path = field(default_factory=default_runtime_dir)
    connect_timeout: float = 10.0
    max_message_length: int = 64 * MIB
    max_connect_data: int = 64 * KIB

    @property
    def broker_socket(self) -> Path:
        return self.runtime_dir / BROKER_SOCKET_NAME

    @classmethod
    def from_env(cls, runtime_dir: str | os.PathLike[str] | None = None) -> Config:
        if runtime_dir is None:
            return cls()
        return cls(runtime_dir=Path(runtime_dir))
