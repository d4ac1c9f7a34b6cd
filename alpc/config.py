"""Process-wide settings and per-port attributes, both frozen and passed explicitly."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ._native import quick_region_size
from .errors import AccessDenied

__all__ = [
    "BROKER_SOCKET_NAME",
    "Config",
    "PortAttributes",
    "SECTION_BACKENDS",
    "default_runtime_dir",
    "default_section_backend",
    "ensure_runtime_dir",
]

BROKER_SOCKET_NAME = "broker.sock"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# "memfd": sealed memfd passed by SCM_RIGHTS (Linux); "posix": POSIX shared
# memory through posix_ipc, which cannot be sealed (non-Linux systems).
SECTION_BACKENDS = ("memfd", "posix")
_ON_LINUX = sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def default_section_backend() -> str:
    return "memfd" if _ON_LINUX else "posix"


def _check_sections(owner: str, max_message_length: int, section_size: int, max_section_bytes: int,
                    backend: str) -> None:
    """Shared validation of the section settings of PortAttributes and Config."""
    for name, value in (("max_message_length", max_message_length), ("section_size", section_size),
                        ("max_section_bytes", max_section_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
    if max_message_length > 0xFFFFFFFF:
        raise ValueError(f"{owner}.max_message_length must fit in 32 bits")
    if section_size < 4096 or max_section_bytes < section_size:
        raise ValueError(f"{owner}: need 4096 <= section_size <= max_section_bytes")
    if backend not in SECTION_BACKENDS:
        raise ValueError(f"{owner}.section_backend must be one of {SECTION_BACKENDS}, got {backend!r}")
    if backend == "memfd" and not _ON_LINUX:
        raise ValueError(f"{owner}.section_backend 'memfd' needs Linux")


def _check_quick(owner: str, slots: int, slot_size: int, spin_us: int) -> None:
    for name, value in (("quick_slots", slots), ("quick_slot_size", slot_size), ("quick_spin_us", spin_us)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if not quick_region_size(slots, slot_size):
        raise ValueError(f"{owner}: quick_slots must be a power of two up to 1024 and quick_slot_size "
                         f"a multiple of 64 in 64..65536, got {slots} and {slot_size}")
    if not 0 <= spin_us <= 1_000_000:
        raise ValueError(f"{owner}.quick_spin_us must be 0..1000000, got {spin_us!r}")


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

    Sections (both directions of every connection of this port):

    - ``inline_threshold``: messages longer than this travel through a shared
      section instead of the socket (announced to the client, which uses it too).
    - ``section_size``: the smallest pooled section; larger ones are made for
      larger messages.
    - ``max_section_bytes``: per connection and direction, the most section
      memory one side may lend the other (ALPC MaxTotalSectionSize); a sender
      that needs more waits for the receiver to release space.
    - ``max_port_section_bytes``: the most section memory this server lends over
      all its connections together.
    - ``secure_views``: every section message is a secure (write-sealed) view.
    - ``section_backend``: "memfd" (sealed, the default on Linux) or "posix".
    - ``allow_unsealed_sections``: map sections a client could truncate (POSIX
      shared memory); only for trusted clients, since a truncation would SIGBUS.
    - ``direct_memory``: read/write a client's granted buffers with
      process_vm_readv/writev; False forces the section fallback.

    Quick-LPC (``alpc.qlpc``), opt-in:

    - ``quick_lpc``: offer each client a pair of shared-memory rings for small
      requests and their replies (needs the C extension on both sides; a
      client that cannot or will not use them stays on the socket).
    - ``quick_slots`` / ``quick_slot_size``: ring depth (a power of two) and
      slot size (a multiple of 64, of which 32 bytes are the entry header);
      larger messages take the socket path.
    - ``quick_spin_us``: how long the server may spin waiting for a request
      while the client runs on another CPU (0: never spin).
    """

    max_message_length: int = GIB
    max_connect_data: int = 64 * KIB
    max_pending_connects: int = 128
    inline_threshold: int = 256
    section_size: int = 2 * MIB
    max_section_bytes: int = 2 * GIB
    max_port_section_bytes: int = 8 * GIB
    secure_views: bool = False
    section_backend: str = field(default_factory=default_section_backend)
    allow_unsealed_sections: bool = not _ON_LINUX
    direct_memory: bool = True
    quick_lpc: bool = False
    quick_slots: int = 8
    quick_slot_size: int = 512
    quick_spin_us: int = 50

    def __post_init__(self) -> None:
        _check_quick("PortAttributes", self.quick_slots, self.quick_slot_size, self.quick_spin_us)
        for name in ("max_connect_data", "max_pending_connects", "max_port_section_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PortAttributes.{name} must be a positive int, got {value!r}")
        if not isinstance(self.inline_threshold, int) or not 0 <= self.inline_threshold <= 16 * MIB:
            raise ValueError(f"PortAttributes.inline_threshold must be 0..16 MiB, got {self.inline_threshold!r}")
        _check_sections("PortAttributes", self.max_message_length, self.section_size, self.max_section_bytes,
                        self.section_backend)


@dataclass(frozen=True)
class Config:
    """Where the broker lives and the limits this process applies.

    The section settings mean what they mean in PortAttributes, for the
    connections this process makes as a client. ``quick_lpc`` accepts a
    server's Quick-LPC offer (when the C extension is in use);
    ``quick_spin_us`` bounds how long a request spins for its reply while the
    server runs on another CPU.
    """

    runtime_dir: Path = field(default_factory=default_runtime_dir)
    connect_timeout: float = 10.0
    max_message_length: int = GIB
    max_connect_data: int = 64 * KIB
    section_size: int = 2 * MIB
    max_section_bytes: int = 2 * GIB
    section_backend: str = field(default_factory=default_section_backend)
    allow_unsealed_sections: bool = not _ON_LINUX
    quick_lpc: bool = True
    quick_spin_us: int = 50

    def __post_init__(self) -> None:
        _check_quick("Config", 1, 64, self.quick_spin_us)
        _check_sections("Config", self.max_message_length, self.section_size, self.max_section_bytes,
                        self.section_backend)

    @property
    def broker_socket(self) -> Path:
        return self.runtime_dir / BROKER_SOCKET_NAME

    @classmethod
    def from_env(cls, runtime_dir: str | os.PathLike[str] | None = None) -> Config:
        if runtime_dir is None:
            return cls()
        return cls(runtime_dir=Path(runtime_dir))
