"""ACLs by group for clients in many supplementary groups (the tests run as root; peers drop
to uid 65534 with more groups than CPython's getsockopt buffer, 1024 bytes or 256 gids, holds
after the 64 the first read asks for).

SO_PEERGROUPS is the kernel's list, however long: a client in 300 groups is admitted by
the one ``allow_gids`` names and refused by the one ``deny_gids`` names, by the broker
(connects and inspection) as by the server's runtime. And when the broker cannot read a
peer's groups at all (SO_PEERGROUPS fails), a port whose ACL denies a group must not take that
failure for "in no group".
"""

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
# More than the 256 gids a 1024-byte getsockopt buffer (CPython's most) holds; GROUP comes last.
MANY_GROUPS = ",".join(str(gid) for gid in [*range(20000, 20299), GROUP])

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers as another uid with many groups"),
]


@pytest.fixture
def shared_broker(runtime_dir: Path):  # type: ignore[no-untyped-def]
    with alpc.Broker(runtime_dir, shared=True) as running:
        yield running


@pytest.fixture
def role(spawn, runtime_dir: Path) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    def start(kind: str, name: str, *options: str):  # type: ignore[no-untyped-def]
        return spawn.argv([sys.executable, str(HOSTILE_PEERS), kind, name, "--runtime-dir", str(runtime_dir),
                           *options])
    return start


def test_a_client_in_many_groups_is_admitted_by_its_allowed_group(shared_broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.manygroups", "--allow-gid", str(GROUP))
    server.expect("READY")
    member = role("client", "svc.manygroups", "--as-user", str(NOBODY), "--groups", MANY_GROUPS)
    ready = member.expect("")
    assert ready[0] == "READY", ready
    accepted = server.expect("ACCEPTED")
    assert accepted[1] == str(NOBODY) and str(GROUP) in accepted[2].split(",")
    member.send("request echo:member")
    assert member.expect("REPLY") == ["MEMBER"]


def test_a_client_in_many_groups_is_refused_by_its_denied_group(shared_broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.manydeny", "--everyone", "--deny-gid", str(GROUP))
    server.expect("READY")
    denied = role("client", "svc.manydeny", "--as-user", str(NOBODY), "--groups", MANY_GROUPS)
    refused = denied.expect("")
    assert refused[:1] == ["REFUSED"] and refused[1] == "AccessDenied", refused
    assert f"group_{GROUP}_is_denied" in refused[3], refused


def test_a_denied_group_hides_the_port_from_a_viewer_in_many_groups(shared_broker: alpc.Broker, role, spawn,  # type: ignore[no-untyped-def]
                                                                   runtime_dir: Path) -> None:
    server = role("server", "svc.hidden", "--everyone", "--deny-gid", str(GROUP))
    server.expect("READY")
    visible = role("server", "svc.visible", "--everyone")
    visible.expect("READY")
    viewer = spawn.argv([sys.executable, str(SEC_PEERS), "ports", str(runtime_dir), str(NOBODY), MANY_GROUPS])
    assert viewer.expect("PORTS") == ["svc.visible"]


# -- groups the broker cannot read -----------------------------------------------------------


@pytest.fixture
def blind_broker(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[alpc.Broker]:
    """A broker (in this process; servers and clients are other processes) whose SO_PEERGROUPS fails."""
    def peer_groups(self: Stream) -> tuple[int, ...]:
        raise OSError(errno.ENOMEM, "injected: SO_PEERGROUPS failed")

    monkeypatch.setattr(Stream, "peer_groups", peer_groups)
    with alpc.Broker(runtime_dir, shared=True) as running:
        yield running


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
