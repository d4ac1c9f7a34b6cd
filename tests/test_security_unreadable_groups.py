"""The broker when it cannot read a peer's supplementary groups (SO_PEERGROUPS fails): a port
whose ACL denies a group must not take that failure for "in no group" (the tests run as root;
peers drop to uid 65534 in the denied group)."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import alpc
from alpc.transport import Stream

HOSTILE_PEERS = Path(__file__).resolve().parent / "hostile" / "hostile_peers.py"
SEC_PEERS = Path(__file__).resolve().parent / "security_peers.py"
NOBODY = 65534
GROUP = 4242

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers as another uid in other groups"),
]


@pytest.fixture
def blind_broker(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[alpc.Broker]:
    """A broker (in this process; servers and clients are other processes) whose SO_PEERGROUPS fails."""
    def peer_groups(self: Stream) -> tuple[int, ...]:
        raise OSError(errno.ENOMEM, "injected: SO_PEERGROUPS failed")

    monkeypatch.setattr(Stream, "peer_groups", peer_groups)
    with alpc.Broker(runtime_dir, shared=True) as running:
        yield running


@pytest.fixture
def role(spawn, runtime_dir: Path) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    def start(kind: str, name: str, *options: str):  # type: ignore[no-untyped-def]
        return spawn.argv([sys.executable, str(HOSTILE_PEERS), kind, name, "--runtime-dir", str(runtime_dir),
                           *options])
    return start


def test_unknown_groups_do_not_pass_a_denied_group_at_connect(blind_broker: alpc.Broker, role,  # type: ignore[no-untyped-def]
                                                              config: alpc.Config) -> None:
    server = role("server", "svc.deny", "--everyone", "--deny-gid", str(GROUP))
    server.expect("READY")
    denied = role("client", "svc.deny", "--as-user", str(NOBODY), "--groups", str(GROUP))
    refused = denied.expect("")
    assert refused[:2] == ["REFUSED", "AccessDenied"], refused
    # Refused by the broker itself, not passed on for the server's runtime to catch.
    assert alpc.port_stats("svc.deny", config).ports[0].connects_refused == 1


def test_unknown_groups_do_not_reveal_a_port_denied_to_a_group(blind_broker: alpc.Broker, role, spawn,  # type: ignore[no-untyped-def]
                                                               runtime_dir: Path) -> None:
    server = role("server", "svc.hidden", "--everyone", "--deny-gid", str(GROUP))
    server.expect("READY")
    visible = role("server", "svc.visible", "--everyone")
    visible.expect("READY")
    viewer = spawn.argv([sys.executable, str(SEC_PEERS), "ports", str(runtime_dir), str(NOBODY), str(GROUP)])
    assert viewer.expect("PORTS") == ["svc.visible"]
