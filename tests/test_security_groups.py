"""ACLs by group for clients in many supplementary groups (the tests run as root; peers drop
to uid 65534 with more groups than CPython's getsockopt buffer, 1024 bytes or 256 gids, holds
after the 64 the first read asks for).

SO_PEERGROUPS is the kernel's list, however long: a client in 300 groups is admitted by
the one ``allow_gids`` names and refused by the one ``deny_gids`` names, by the broker
(connects and inspection) as by the server's runtime.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import alpc

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
