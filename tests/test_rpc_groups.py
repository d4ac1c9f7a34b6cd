"""README, Identity and access: ``@rpc.method(require_group=...)`` admits callers by group and
"others get AccessDenied". A rule naming a group the group database does not know must fail
at once where the server is made (bad input, a typed error naming it), and a group that
disappears while the server runs must cost a connecting client an answer (a rejection saying
why), never an accepted connection nobody serves, on which every call waits forever."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc import rpc

pytestmark = pytest.mark.timeout(60)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rpc_group_peers import Guarded  # noqa: E402

PEERS = str(Path(__file__).resolve().parent / "rpc_group_peers.py")
MISSING_GROUP = "no-such-group-alpc-groups"


class Typo(rpc.Interface, name="test.groups.typo", version=(1, 0)):
    @rpc.method
    def ping(self) -> str: ...

    @rpc.method(require_group=MISSING_GROUP)
    def admins_only(self) -> str: ...


class TypoImpl(Typo):
    def ping(self) -> str:
        return "pong"

    def admins_only(self) -> str:
        return "admin"


def test_blocking_server_refuses_a_rule_naming_an_unknown_group(broker: alpc.Broker, config: alpc.Config) -> None:
    # Was accepted, and then every connect was accepted by the broker and the server's runtime
    # but never served: the server's table of methods failed after the accept.
    with pytest.raises(ValueError, match=MISSING_GROUP):
        rpc.Server("test.groups.typo", TypoImpl(), config=config)
    assert alpc.list_ports(config) == ()


def test_async_server_refuses_a_rule_naming_an_unknown_group(broker: alpc.Broker, config: alpc.Config) -> None:
    with pytest.raises(ValueError, match=MISSING_GROUP):
        rpc.aio.Server("test.groups.typo", TypoImpl(), config=config)
    assert alpc.list_ports(config) == ()


@pytest.mark.parametrize("role", ["server", "async-server"])
def test_a_group_gone_since_the_start_rejects_the_client_and_serving_goes_on(
        broker: alpc.Broker, config: alpc.Config, runtime_dir: Path, spawn: Any, role: str) -> None:
    name = f"test.groups.{role}"
    server = spawn.argv([sys.executable, PEERS, role, name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    for _ in range(2):  # the first failure must not end admissions (the asyncio server's accept loop)
        with pytest.raises(alpc.ConnectionRejected, match="no group named"):
            client = rpc.connect(Guarded, name, timeout=10, call_timeout=10, config=config)
            client.close()  # reached only on the unfixed code: leave nothing open
    assert server.proc.poll() is None
