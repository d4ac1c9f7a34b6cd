"""Pure identity policy: who a peer is, as the kernel reported it, and what it may do. No sockets here."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ROOT_UID", "PeerCred", "may_inspect", "may_replace_broker"]

ROOT_UID = 0


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


def may_inspect(viewer: PeerCred, owner: PeerCred) -> bool:
    """May ``viewer`` see the clients and figures of a port that ``owner`` serves?

    Client pids and traffic figures tell a lot about a service, so only the
    port's owner uid and root see them. Port ACLs will widen this here, in one place.
    """
    return viewer.uid == ROOT_UID or viewer.uid == owner.uid


def may_replace_broker(requester: PeerCred, broker_uid: int) -> bool:
    """May ``requester`` take over the broker's socket and every connection it holds?

    Only a process of the broker's own uid: the successor inherits all of it.
    """
    return requester.uid == broker_uid
