"""A client that stops reading its replies against ``rpc.Server``: its replies wait for room
(up to ``reply_timeout``) on one worker at most, so every other client's calls are still
answered meanwhile, rather than after every worker waited out the timeout on it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import alpc
from alpc import rpc

TESTS = Path(__file__).resolve().parent
REPLY_TIMEOUT = 2.0


@pytest.mark.timeout(60)
def test_a_deaf_client_does_not_hold_every_rpc_worker(broker: alpc.Broker, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                                                      runtime_dir: Path) -> None:
    from rpc_peers import Store

    server = spawn.argv([sys.executable, str(TESTS / "rpc_peers.py"), "server", "svc.rpcdeaf", "--runtime-dir",
                         str(runtime_dir), "--workers", "4", "--reply-timeout", str(REPLY_TIMEOUT)])
    server.expect("READY")
    with rpc.connect(Store, "svc.rpcdeaf", config=config, timeout=5, call_timeout=5) as honest:
        assert honest.proxy.echo("warm") == [["warm"], {}]
        deaf = spawn.argv([sys.executable, str(TESTS / "slow_peers.py"), "deaf", "svc.rpcdeaf", "--runtime-dir",
                           str(runtime_dir), "--count", "1000", "--rpc"])
        deaf.expect("FLOODED")
        quick = honest.with_timeout(1.0)
        end = time.monotonic() + REPLY_TIMEOUT + 1.0
        while time.monotonic() < end:
            assert quick.echo("ping") == [["ping"], {}]
        deaf.expect("DROPPED")
        assert honest.proxy.echo("after") == [["after"], {}]
