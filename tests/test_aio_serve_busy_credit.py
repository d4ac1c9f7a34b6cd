"""A busy client against ``alpc.aio`` serve(): datagrams past ``max_tasks`` wait, and the
credits returned for them stay exact, so a client sending at a high rate keeps its connection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

SLOW_PEERS = Path(__file__).resolve().parent / "slow_peers.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_tasks", [1, 1024])
def test_datagrams_past_max_tasks_are_credited_once(broker: alpc.Broker, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                                                    runtime_dir: Path, max_tasks: int) -> None:
    server = spawn.argv([sys.executable, str(SLOW_PEERS), "aio", "svc.busy", "--runtime-dir", str(runtime_dir),
                         "--max-tasks", str(max_tasks)])
    server.expect("READY")
    with alpc.connect("svc.busy", config=config, timeout=5) as busy:
        # More than the default window of 1024 in all, in batches the server reads many at a
        # time: a datagram put back at max_tasks was credited again when it was taken again, and
        # a CREDIT returning more than was sent dropped this client (ProtocolError -> PeerGone).
        for _ in range(4):
            busy.send_many([b"d"] * 1000, timeout=10)
        assert busy.request(b"count", timeout=10).data == b"4000"
