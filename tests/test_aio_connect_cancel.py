"""aio.connect cancelled while its handshake waits for the server's answer.

The handshake runs in the default executor and nothing ended it on cancel: the thread kept
waiting for the server's answer up to the connect's timeout, and asyncio.run() (which waits
for the default executor before it returns) waited with it; the server meanwhile held a
request whose client had long given up. A cancel must end the handshake at once.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from async_steps import in_thread

from alpc import aio

PEERS = Path(__file__).resolve().parent / "lifecycle_peers.py"

# Far below the connect's own timeout: an unfixed run is failed by the elapsed-time check.
CONNECT_TIMEOUT = 40.0
PROMPT = 10.0

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
def test_cancelled_aio_connect_returns_promptly(broker, config, spawn, runtime_dir: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    name = f"lifecycle.connect.{how}"
    server = spawn.argv([sys.executable, str(PEERS), "hold-request", name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")

    async def main() -> None:
        connecting = aio.connect(name, config=config, timeout=CONNECT_TIMEOUT)
        if how == "cancel":
            task = asyncio.create_task(connecting)
            await in_thread(server.expect, "REQUEST")  # the server holds our request unanswered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            task = asyncio.create_task(asyncio.wait_for(connecting, CONNECT_TIMEOUT))
            await in_thread(server.expect, "REQUEST")
            # wait_for's own cancel of its inner task: what its timeout does.
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    started = time.monotonic()
    asyncio.run(main())  # waits for the default executor: for the handshake thread too
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT, f"asyncio.run() returned {elapsed:.1f} s after a cancelled connect"
    # The server's accept finds the client gone: nothing is left half-open for it.
    server.send("accept")
    assert server.expect("GONE") == ["PeerGone"]
