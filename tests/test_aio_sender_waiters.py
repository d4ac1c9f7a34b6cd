"""asyncio sends that time out or are cancelled while waiting for the peer's flow window or for
section space leave no future behind.

Each wait registered a future in ``_window_waiters`` / ``_space_waiters``, which only a read
cleared: against a peer that sends nothing (it does not read, so it never credits), every
timed-out or cancelled send left one behind, and one section wait left one per re-check
(every 2..100 ms, every 50 ms when the port's budget is short), for as long as the peer
stayed quiet.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on, until

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"
TURNS = 30

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("loop", LOOPS)
def test_timed_out_and_cancelled_sends_leave_no_waiter(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                       spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.waiters.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "deaf", name, "--runtime-dir", str(runtime_dir),
                         "--datagrams", "4", "--section", "4096"])
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            # The peer's datagram window: 4, then every send waits for a credit that never comes.
            for _ in range(4):
                await comm.send(b"d")
            for _ in range(TURNS):
                with pytest.raises(alpc.Throttled):
                    await comm.send(b"d", timeout=0.001)
            before = len(comm._window_waiters)
            task = asyncio.ensure_future(comm.send(b"d"))
            await until(lambda: len(comm._window_waiters) > before, "the send to wait for the window")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(comm._window_waiters) == 0
            # Section space: one view holds the whole section budget; the next waits.
            held = await comm.create_view(4096, timeout=5)
            try:
                for _ in range(3):
                    with pytest.raises(alpc.Throttled):
                        await comm.create_view(4096, timeout=0.3)
                before = len(comm._space_waiters)
                task = asyncio.ensure_future(comm.create_view(4096))
                await until(lambda: len(comm._space_waiters) > before, "the view to wait for space")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert len(comm._space_waiters) == 0
            finally:
                held.release()
        finally:
            server.send("")
            await comm.close()

    run_on(loop, main)
