"""Pure identity policy: who a peer is, as the kernel reported it. No sockets here."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PeerCred"]


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
