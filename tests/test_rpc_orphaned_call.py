"""A blocking handler polling current_call().cancelled learns that its caller went away.

The caller closing its connection (or dying) mid-call means nobody waits for the reply,
as a cancel does: the asyncio server cancels such a handler's task, and a blocking
handler that polls ``cancelled`` must stop too, not run its job out on a worker.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from rpc_deadline_peers import Relay

import alpc
from alpc import rpc

PEERS = str(Path(__file__).resolve().parent / "rpc_deadline_peers.py")
NAME = "svc.rpcx-orphan"


def start_server(spawn: Any, runtime_dir: Path, workers: str) -> Any:
    server = spawn.argv([sys.executable, PEERS, "server", NAME, "--runtime-dir", str(runtime_dir),
                         "--workers", workers])
    server.expect("READY")
    return server


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "4"])
@pytest.mark.parametrize("size", [0, 70_000])
def test_a_client_closing_mid_call_cancels_a_polling_handler(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, workers: str, size: int) -> None:
    server = start_server(spawn, runtime_dir, workers)
    client = rpc.connect(Relay, NAME, config=config, timeout=10)
    failed: list[BaseException] = []

    def call() -> None:
        try:
            client.proxy.spin("closed", b"c" * size)
        except alpc.AlpcError as exc:
            failed.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert server.expect("SPINNING") == ["closed"]
    client.close()
    caller.join(10)
    assert not caller.is_alive() and isinstance(failed[0], alpc.ConnectionClosed)
    # The handler polls the flag: it stops now, not after its own 30 s give-up.
    assert server.expect("CANCELLED", timeout=10) == ["closed"]
    with rpc.connect(Relay, NAME, config=config, timeout=10) as other:
        assert other.proxy.size(b"x" * size) == size


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_client_killed_mid_call_cancels_a_polling_handler(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, workers: str) -> None:
    server = start_server(spawn, runtime_dir, workers)
    client = spawn.argv([sys.executable, PEERS, "spin-client", NAME, "--runtime-dir", str(runtime_dir),
                         "--size", "70000"])
    client.expect("CALLING")
    assert server.expect("SPINNING") == ["orphan"]
    client.kill()
    assert server.expect("CANCELLED", timeout=10) == ["orphan"]
    with rpc.connect(Relay, NAME, config=config, timeout=10) as other:
        assert other.proxy.size(b"x" * 10) == 10
