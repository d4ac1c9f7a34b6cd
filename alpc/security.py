"""Pure identity policy: who a peer is, as the kernel reported it, and what it may do. No sockets here.

- ``PortAcl`` decides who may connect to a port (uid, primary gid and
  supplementary groups, all as the kernel reports them), and so who may
  inspect it (``may_inspect``).
- ``identity_changed`` tells whether a message's sender is no longer who
  connected (a setuid() since), so the port can flag or refuse it.
- ``HandleKind`` / ``kinds_mask`` name the kinds of fd a port accepts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "HANDLE_KINDS",
    "MAX_ACL_ENTRIES",
    "ROOT_UID",
    "AclDecision",
    "HandleKind",
    "PeerCred",
    "PortAcl",
    "identity_changed",
    "kinds_from_mask",
    "kinds_mask",
    "may_inspect",
    "may_see_settings",
    "may_replace_broker",
]

ROOT_UID = 0
# An ACL is checked on every connect; thousands of entries mean a group is wanted.
MAX_ACL_ENTRIES = 4096
_ID_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class PeerCred:
    """A peer's identity as verified by the kernel (SO_PEERCRED / SCM_CREDENTIALS).

    Never built from a message body: only the transport fills it in.
    """

    pid: int
    uid: int
    gid: int

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


def identity_changed(connected: PeerCred, sender: PeerCred) -> bool:
    """Is ``sender`` (one message's credentials) another uid or gid than who connected?

    A different pid alone is not a change: a forked child of the same user
    may speak on an inherited connection. Authorisation is by uid/gid.
    """
    return sender.uid != connected.uid or sender.gid != connected.gid


class AclDecision(NamedTuple):
    allowed: bool
    reason: str


def _ids(owner: str, values: Iterable[int]) -> frozenset[int]:
    # Named here: frozenset() of None, an int or a list of lists said only "not iterable" or
    # "unhashable", and a str was taken char by char.
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"PortAcl.{owner} must be a set of uids/gids (ints), not {values!r}")
    try:
        ids = frozenset(values)
    except TypeError:
        raise ValueError(f"PortAcl.{owner} must hold uids/gids (ints), not {values!r}") from None
    if len(ids) > MAX_ACL_ENTRIES:
        raise ValueError(f"PortAcl.{owner} has {len(ids)} entries, more than {MAX_ACL_ENTRIES}")
    for value in ids:
        if type(value) is not int or not 0 <= value <= _ID_MAX:
            raise ValueError(f"PortAcl.{owner} holds {value!r}, not a uid/gid")
    return ids


@dataclass(frozen=True)
class PortAcl:
    """Who may connect to a port (ALPC's port security descriptor, by uid and gid).

    The port's owner (the uid of the process that created it, as the broker
    sees it) is always allowed. Root is allowed only with ``allow_root``;
    everyone with ``allow_everyone``. ``allow_gids`` match the client's primary
    gid or any of its supplementary groups (SO_PEERGROUPS). A ``deny_*`` entry
    wins over every allow, the owner's included.
    """

    allow_uids: frozenset[int] = field(default_factory=frozenset)
    allow_gids: frozenset[int] = field(default_factory=frozenset)
    deny_uids: frozenset[int] = field(default_factory=frozenset)
    deny_gids: frozenset[int] = field(default_factory=frozenset)
    allow_root: bool = False
    allow_everyone: bool = False

    def __post_init__(self) -> None:
        for name in ("allow_uids", "allow_gids", "deny_uids", "deny_gids"):
            object.__setattr__(self, name, _ids(name, getattr(self, name)))
        for name in ("allow_root", "allow_everyone"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"PortAcl.{name} must be a bool")

    def check(self, client: PeerCred, groups: Iterable[int] | None, owner_uid: int) -> AclDecision:
        """May ``client`` (kernel-verified, with its supplementary ``groups``) connect?

        ``groups`` None: they could not be read. A client in no group and one in a denied
        group then look alike, so a port that denies groups refuses it.
        """
        all_gids = {client.gid, *(groups or ())}
        if client.uid in self.deny_uids:
            return AclDecision(False, f"uid {client.uid} is denied by the port's ACL")
        denied_groups = all_gids & self.deny_gids
        if denied_groups:
            return AclDecision(False, f"group {min(denied_groups)} is denied by the port's ACL")
        if groups is None and self.deny_gids:
            return AclDecision(False, "the client's supplementary groups could not be read and the port's ACL "
                                      "denies groups")
        if client.uid == owner_uid:
            return AclDecision(True, "the port's owner")
        if client.uid == ROOT_UID and self.allow_root:
            return AclDecision(True, "root, allowed by the port's ACL")
        if self.allow_everyone:
            return AclDecision(True, "the port admits everyone")
        if client.uid in self.allow_uids:
            return AclDecision(True, f"uid {client.uid} is allowed")
        allowed_groups = all_gids & self.allow_gids
        if allowed_groups:
            return AclDecision(True, f"group {min(allowed_groups)} is allowed")
        return AclDecision(False, f"uid {client.uid} is not in the ACL of a port owned by uid {owner_uid}")

    def describe(self) -> dict[str, object]:
        """The ACL as plain data (``alpc ports --json``)."""
        return {
            "allow_uids": sorted(self.allow_uids), "allow_gids": sorted(self.allow_gids),
            "deny_uids": sorted(self.deny_uids), "deny_gids": sorted(self.deny_gids),
            "allow_root": self.allow_root, "allow_everyone": self.allow_everyone,
        }


def may_inspect(viewer: PeerCred, groups: Iterable[int] | None, owner_uid: int, acl: PortAcl) -> AclDecision:
    """May ``viewer`` (with its supplementary ``groups``) see a port's clients and figures?

    Whoever the port's ACL admits as a client, by the very decision the broker
    makes for a connect; also the owner's uid (even if its own ACL denies it)
    and root (even without ``allow_root``), who can see the server process anyway.
    """
    if viewer.uid == ROOT_UID:
        return AclDecision(True, "root")
    if viewer.uid == owner_uid:
        return AclDecision(True, "the port's owner")
    return acl.check(viewer, groups, owner_uid)


def may_see_settings(viewer: PeerCred, owner_uid: int) -> bool:
    """May ``viewer`` see a port's ACL and its owner's quota usage? Only the owner's uid and root.

    An ACL names the uids and groups a service trusts: the clients it admits
    need not learn who else is on the list.
    """
    return viewer.uid == ROOT_UID or viewer.uid == owner_uid


def may_replace_broker(requester: PeerCred, broker_uid: int) -> bool:
    """May ``requester`` take over the broker's socket and every connection it holds?

    Only a process of the broker's own uid: the successor inherits all of it.
    """
    return requester.uid == broker_uid


class HandleKind(StrEnum):
    """What an fd passed in a message is, decided by the receiver (never by the sender's word)."""

    FILE = "file"            # a regular file
    DIRECTORY = "directory"
    PATH = "path"            # an O_PATH fd: names a file without opening it
    SOCKET = "socket"
    PIPE = "pipe"            # a pipe or FIFO
    MEMFD = "memfd"
    DEVICE = "device"        # a character or block device
    EVENTFD = "eventfd"
    PIDFD = "pidfd"
    TIMERFD = "timerfd"
    SIGNALFD = "signalfd"
    EPOLL = "epoll"
    INOTIFY = "inotify"
    OTHER = "other"          # any other anonymous inode


# Wire order of the kinds in an announced bitmask; append only.
HANDLE_KINDS: tuple[HandleKind, ...] = tuple(HandleKind)


def kinds_mask(kinds: Iterable[str]) -> int:
    """The bitmask announcing ``kinds`` to a peer; ValueError for an unknown kind."""
    mask = 0
    for kind in kinds:
        mask |= 1 << HANDLE_KINDS.index(HandleKind(kind))
    return mask


# Cached: called for every connection, with the same mask nearly always.
@functools.lru_cache(maxsize=64)
def kinds_from_mask(mask: int) -> frozenset[HandleKind]:
    """The kinds of an announced bitmask (unknown bits, from a newer peer, are ignored)."""
    return frozenset(kind for bit, kind in enumerate(HANDLE_KINDS) if mask >> bit & 1)
