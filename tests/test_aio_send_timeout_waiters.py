"""A client that stops reading its replies against ``alpc.aio`` serve(): the reply that times out
waiting for room drops that client, with nothing thrown into the event loop's exception handler
(the timed-out wait for room raised InvalidStateError from asyncio.shield's callback)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

SLOW_PEERS = Path(__file__).resolve().parent / "slow_peers.py"


@pytest.mark.timeout(60)
def test_a_send_timeout_leaves_the_event_loop_clean(broker: alpc.Broker, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                                                    runtime_dir: Path) -> None:
    peer = [sys.executable, str(SLOW_PEERS)]
    server = spawn.argv([*peer, "aio", "svc.deaf", "--runtime-dir", str(runtime_dir), "--send-timeout", "1"])
    server.expect("READY")
    with alpc.connect("svc.deaf", config=config, timeout=5) as honest:
        deaf = spawn.argv([*peer, "deaf", "svc.deaf", "--runtime-dir", str(runtime_dir), "--count", "1000"])
        deaf.expect("FLOODED")
        assert honest.request(b"ping", timeout=2).data == b"PING"
        deaf.expect("DROPPED")
        # A round trip after the drop: the loop has run every callback the drop scheduled.
        assert honest.request(b"ping", timeout=2).data == b"PING"
        assert honest.request(b"errors", timeout=2).data == b"0", server.expect("LOOP_ERROR")
