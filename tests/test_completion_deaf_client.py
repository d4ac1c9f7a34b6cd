"""A client that stops reading its replies against ``alpc.CompletionPort``: its replies wait
for room (up to ``send_timeout``) on one pool thread at most, so every other client is still
answered at once meanwhile, rather than after every worker waited out the timeout on it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import alpc

SLOW_PEERS = Path(__file__).resolve().parent / "slow_peers.py"
SEND_TIMEOUT = 2.0


@pytest.mark.timeout(60)
def test_a_deaf_client_does_not_hold_every_worker(broker: alpc.Broker, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                                                  runtime_dir: Path) -> None:
    peer = [sys.executable, str(SLOW_PEERS)]
    server = spawn.argv([*peer, "completion", "svc.deaf", "--runtime-dir", str(runtime_dir),
                         "--max-workers", "4", "--send-timeout", str(SEND_TIMEOUT)])
    server.expect("READY")
    with alpc.connect("svc.deaf", config=config, timeout=5) as honest:
        assert honest.request(b"warm", timeout=5).data == b"WARM"
        # 1000 requests whose replies (never read) fill its socket: a worker blocks on them.
        deaf = spawn.argv([*peer, "deaf", "svc.deaf", "--runtime-dir", str(runtime_dir), "--count", "1000"])
        deaf.expect("FLOODED")
        # While the deaf client's replies wait out send_timeout, the honest client's round
        # trips stay short (before: every worker took one of its requests and blocked too).
        end = time.monotonic() + SEND_TIMEOUT + 1.0
        served = 0
        while time.monotonic() < end:
            assert honest.request(b"ping", timeout=1.0).data == b"PING"
            served += 1
        assert served > 0
        deaf.expect("DROPPED")
        assert honest.request(b"after", timeout=5).data == b"AFTER"
