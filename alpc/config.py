"""Process-wide settings and per-port attributes, both frozen and passed explicitly."""

from __future__ import annotations

import functools
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ._native import quick_region_size
from .errors import AccessDenied
from .quotas import MAX_LIMIT, FlowLimits, flow_limits
from .security import HandleKind, PortAcl

__all__ = [
    "BROKER_SOCKET_NAME",
    "Config",
    "MAX_CONNECT_DATA",
    "PortAttributes",
    "SECTION_BACKENDS",
    "attributes_or_default",
    "config_or_default",
    "default_runtime_dir",
    "default_section_backend",
    "ensure_runtime_dir",
]

BROKER_SOCKET_NAME = "broker.sock"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
# The most connect (and accept) data a port or client may allow: the broker reads no request
# longer than 1 MiB (broker.MAX_REQUEST), and drops a longer one without a word, which the
# client could only take for a broker that went away.
MAX_CONNECT_DATA = 512 * KIB

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
        _check_count(owner, name, value)
    if max_message_length > 0xFFFFFFFF:
        raise ValueError(f"{owner}.max_message_length must fit in 32 bits")
    if section_size < 4096 or max_section_bytes < section_size:
        raise ValueError(f"{owner}: need 4096 <= section_size <= max_section_bytes")
    if backend not in SECTION_BACKENDS:
        raise ValueError(f"{owner}.section_backend must be one of {SECTION_BACKENDS}, got {backend!r}")
    if backend == "memfd" and not _ON_LINUX:
        raise ValueError(f"{owner}.section_backend 'memfd' needs Linux")


def _check_count(owner: str, name: str, value: object) -> None:
    """A positive int limit; bool is refused (the broker's decoder does) and so is one past 64 bits."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{owner}.{name} must be a positive int up to {MAX_LIMIT}, got {value!r}")


def _check_connect_data(owner: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CONNECT_DATA:
        raise ValueError(f"{owner}.max_connect_data must be an int in 1..{MAX_CONNECT_DATA}, got {value!r}")


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


def ensure_runtime_dir(path: Path, shared: bool = False) -> Path:
    """Create ``path`` as the broker's directory, or check that an existing one is safe.

    Private (the default): 0700, so no other user can even reach the socket.
    Shared: 0755, so every user can reach the broker (whose port ACLs then keep
    them out of each port) but none can create or replace anything in it.
    A directory someone else owns, or that others may write to, would let them
    replace the broker socket; refuse it rather than trust it.
    """
    mode = 0o755 if shared else 0o700
    try:
        path.mkdir(mode=mode, parents=True)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise AccessDenied(f"runtime dir {path} is not a directory")
    if info.st_uid != os.getuid():
        raise AccessDenied(f"runtime dir {path} is owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & 0o022:
        raise AccessDenied(f"runtime dir {path} is writable by others (mode {info.st_mode & 0o777:o})")
    if not shared and info.st_mode & 0o077:
        raise AccessDenied(f"runtime dir {path} is accessible to others (mode {info.st_mode & 0o777:o}); "
                           "a broker for several users runs with --shared")
    if shared and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)  # our own private dir, opened up because the operator asked for --shared
    return path


def _kinds(owner: str, kinds: object) -> frozenset[str]:
    """``handle_kinds`` as a frozenset: None or an int said only "not iterable", and a str was
    taken letter by letter ("unknown kind 'f'")."""
    if isinstance(kinds, (str, bytes)) or not isinstance(kinds, Iterable):
        raise ValueError(f"{owner}.handle_kinds must be a set of HandleKind values, not {kinds!r}")
    try:
        return frozenset(kinds)
    except TypeError:
        raise ValueError(f"{owner}.handle_kinds must hold HandleKind values, not {kinds!r}") from None


def _check_flags(owner: str, settings: object, names: tuple[str, ...]) -> None:
    """A yes/no setting must be a bool: "no" or 0.0 read as a truthy or falsy choice nobody made."""
    for name in names:
        value = getattr(settings, name)
        if type(value) is not bool:
            raise ValueError(f"{owner}.{name} must be a bool, got {value!r}")


def _check_handles(owner: str, kinds: frozenset[str], max_per_message: int, max_inflight: int) -> None:
    for kind in kinds:
        if kind not in HandleKind.__members__.values():
            raise ValueError(f"{owner}.handle_kinds: unknown kind {kind!r}; "
                             f"known: {', '.join(k.value for k in HandleKind)}")
    FlowLimits(max_handles_per_message=max_per_message, max_inflight_handles=max_inflight)


# Cached: every connection's policy holds its set (a new frozenset was 216 bytes a side).
@functools.lru_cache(maxsize=64)
def _accept_kinds(kinds: frozenset[str]) -> frozenset[HandleKind]:
    return frozenset(HandleKind(kind) for kind in kinds)


def _flow(owner: str, pending: int, datagrams: int, kinds: frozenset[str], per_message: int,
          inflight: int) -> FlowLimits:
    """The flow limits a side announces; fds are taken only when some kind is allowed."""
    try:
        return flow_limits(pending, datagrams, per_message if kinds else 0, inflight)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None


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

    Security (see the README's Security section):

    - ``acl``: who may connect (checked by the broker, and again by the
      server's runtime, before the application sees a request); by default
      the port owner's uid only.
    - ``max_connections``: connections at once; more are refused (QuotaExceeded).
    - ``max_pending_requests``: per client, requests awaiting our reply; the
      client's next request waits for a reply (backpressure).
    - ``max_queued_datagrams``: per client, datagrams the application has not
      taken yet; the client's next datagram waits.
    - ``handle_kinds``: the kinds of fd a message may bring (``HandleKind``
      values: "file", "socket", "memfd", "pipe", ...); others are closed on
      arrival. None by default: handle passing is opt-in.
    - ``max_handles_per_message`` / ``max_inflight_handles``: fds per
      message, and per client not yet taken by the application (its sends wait).
    - ``send_timeout``: how long a send to a client that does not read may
      block when the caller gave no timeout; a reply that cannot go out in
      that time drops the connection (the client stopped reading its replies).
    - ``refuse_identity_change``: drop a connection whose messages come from
      another uid/gid than connected, instead of flagging them.

    Quick-LPC (``alpc.qlpc``):

    - ``quick_lpc``: offer each client a pair of shared-memory rings for small
      requests and their replies (needs the C extension on both sides; a
      client that cannot or will not use them stays on the socket). None (the
      default): offer them where the kernel attests each ring message's sender
      (``qlpc.attested()``) and the port does not refuse identity changes;
      True: offer them wherever the C extension runs; False: never.
    - ``quick_slots`` / ``quick_slot_size``: ring depth (a power of two) and
      slot size (a multiple of 64, of which 32 bytes are the entry header);
      larger messages take the socket path.
    - ``quick_spin_us``: how long the server may spin waiting for a request
      while the client runs on another CPU (0: never spin); at most twice the
      client's usual pace, which includes requests too large for the ring (a
      1 MiB body is ~100-150 us of copying before it is sent: the socket
      path's own spin covers that too).
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
    acl: PortAcl = field(default_factory=PortAcl)
    max_connections: int = 4096
    max_pending_requests: int = 1024
    max_queued_datagrams: int = 1024
    handle_kinds: frozenset[str] = frozenset()
    max_handles_per_message: int = 16
    max_inflight_handles: int = 64
    send_timeout: float = 5.0
    refuse_identity_change: bool = False
    quick_lpc: bool | None = None
    quick_slots: int = 8
    quick_slot_size: int = 512
    quick_spin_us: int = 200

    def __post_init__(self) -> None:
        _check_quick("PortAttributes", self.quick_slots, self.quick_slot_size, self.quick_spin_us)
        object.__setattr__(self, "handle_kinds", _kinds("PortAttributes", self.handle_kinds))
        _check_flags("PortAttributes", self, ("secure_views", "allow_unsealed_sections", "direct_memory",
                                              "refuse_identity_change"))
        if self.quick_lpc is not None and type(self.quick_lpc) is not bool:
            raise ValueError(f"PortAttributes.quick_lpc must be a bool or None, got {self.quick_lpc!r}")
        if not isinstance(self.acl, PortAcl):
            raise ValueError(f"PortAttributes.acl must be a PortAcl, got {self.acl!r}")
        if (not isinstance(self.send_timeout, (int, float)) or isinstance(self.send_timeout, bool)
                or not 0 < self.send_timeout < 86400):
            raise ValueError(f"PortAttributes.send_timeout must be a positive number of seconds, "
                             f"got {self.send_timeout!r}")
        _check_handles("PortAttributes", self.handle_kinds, self.max_handles_per_message, self.max_inflight_handles)
        self.flow_limits()
        if self.quick_lpc is True and self.refuse_identity_change:
            raise ValueError("PortAttributes: Quick-LPC ring messages carry no SCM_CREDENTIALS, so a port that "
                             "refuses identity changes cannot offer them (quick_lpc with refuse_identity_change)")
        _check_connect_data("PortAttributes", self.max_connect_data)
        for name in ("max_pending_connects", "max_port_section_bytes", "max_connections"):
            _check_count("PortAttributes", name, getattr(self, name))
        if not isinstance(self.inline_threshold, int) or not 0 <= self.inline_threshold <= 16 * MIB:
            raise ValueError(f"PortAttributes.inline_threshold must be 0..16 MiB, got {self.inline_threshold!r}")
        _check_sections("PortAttributes", self.max_message_length, self.section_size, self.max_section_bytes,
                        self.section_backend)

    def flow_limits(self) -> FlowLimits:
        """What this port announces to each client it accepts."""
        return _flow("PortAttributes", self.max_pending_requests, self.max_queued_datagrams, self.handle_kinds,
                     self.max_handles_per_message, self.max_inflight_handles)

    def accept_kinds(self) -> frozenset[HandleKind]:
        return _accept_kinds(self.handle_kinds)


@dataclass(frozen=True)
class Config:
    """Where the broker lives and the limits this process applies.

    The section, flow, handle and identity settings mean what they mean in
    PortAttributes, for the connections this process makes as a client.
    ``quick_lpc`` accepts a server's Quick-LPC offer (when the C extension is
    in use); ``quick_spin_us`` bounds how long a request spins for its reply
    while the server runs on another CPU.
    """

    runtime_dir: Path = field(default_factory=default_runtime_dir)
    connect_timeout: float = 10.0
    max_message_length: int = GIB
    max_connect_data: int = 64 * KIB
    section_size: int = 2 * MIB
    max_section_bytes: int = 2 * GIB
    section_backend: str = field(default_factory=default_section_backend)
    allow_unsealed_sections: bool = not _ON_LINUX
    max_pending_requests: int = 1024
    max_queued_datagrams: int = 1024
    handle_kinds: frozenset[str] = frozenset()
    max_handles_per_message: int = 16
    max_inflight_handles: int = 64
    refuse_identity_change: bool = False
    quick_lpc: bool = True
    quick_spin_us: int = 50

    def __post_init__(self) -> None:
        # A str is the obvious thing to pass; every path join below needs a Path.
        object.__setattr__(self, "runtime_dir", Path(self.runtime_dir))
        object.__setattr__(self, "handle_kinds", _kinds("Config", self.handle_kinds))
        _check_flags("Config", self, ("allow_unsealed_sections", "refuse_identity_change", "quick_lpc"))
        _check_quick("Config", 1, 64, self.quick_spin_us)
        # Used only when connect() is called without a timeout: checked here, not deep in the first
        # connect (None, like a None timeout, waits without limit).
        timeout = self.connect_timeout
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not timeout >= 0):
            raise ValueError(f"Config.connect_timeout must be a number of seconds >= 0, got {self.connect_timeout!r}")
        _check_connect_data("Config", self.max_connect_data)
        _check_sections("Config", self.max_message_length, self.section_size, self.max_section_bytes,
                        self.section_backend)
        _check_handles("Config", self.handle_kinds, self.max_handles_per_message, self.max_inflight_handles)
        self.flow_limits()

    def flow_limits(self) -> FlowLimits:
        return _flow("Config", self.max_pending_requests, self.max_queued_datagrams, self.handle_kinds,
                     self.max_handles_per_message, self.max_inflight_handles)

    def accept_kinds(self) -> frozenset[HandleKind]:
        return _accept_kinds(self.handle_kinds)

    @property
    def broker_socket(self) -> Path:
        return self.runtime_dir / BROKER_SOCKET_NAME

    @classmethod
    def from_env(cls, runtime_dir: str | os.PathLike[str] | None = None) -> Config:
        if runtime_dir is None:
            return cls()
        return cls(runtime_dir=Path(runtime_dir))


def config_or_default(config: object) -> Config:
    """``config``, or the environment's when None; TypeError for anything else (a runtime dir
    given as the config failed deep inside with AttributeError, and a falsy one was ignored)."""
    if config is None:
        return Config.from_env()
    if not isinstance(config, Config):
        raise TypeError(f"config must be an alpc.Config (or None), not {type(config).__name__}")
    return config


def attributes_or_default(attributes: object) -> PortAttributes:
    """``attributes``, or the defaults when None; TypeError for anything else (a dict of settings
    failed with AttributeError, and an empty one was silently taken for the defaults)."""
    if attributes is None:
        return PortAttributes()
    if not isinstance(attributes, PortAttributes):
        raise TypeError(f"attributes must be an alpc.PortAttributes (or None), not {type(attributes).__name__}")
    return attributes
