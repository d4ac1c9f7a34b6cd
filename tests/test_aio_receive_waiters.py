"""asyncio receive() calls that time out or are cancelled leave nothing behind.

Each wait for the inbox registered a future in ``_inbox_waiters``, which only a message
arriving cleared: a ``receive(timeout)`` loop on an idle connection (a server polling for
its stop flag, a client waiting for rare pushes) grew it by one future per turn, for as
long as the connection stayed quiet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

TURNS = 50


def test_timed_out_and_cancelled_receives_leave_no_waiter(broker: alpc.Broker, config: alpc.Config,
                                                          spawn: Callable[..., Any]) -> None:
    name = "svc.state.aiowaiters"
    server = spawn("server", name)
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            for _ in range(TURNS):
                with pytest.raises(alpc.Timeout):
                    await comm.receive(timeout=0.001)
            for _ in range(TURNS):
                task = asyncio.ensure_future(comm.receive())
                await asyncio.sleep(0)  # handshake-free: one loop turn, so the receive is waiting when cancelled
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert len(comm._inbox_waiters) == 0
            # The connection still works, and a message still wakes a receive.
            waiting = asyncio.ensure_future(comm.receive(timeout=10))
            assert (await comm.request(b"push:hello", timeout=10)).data == b"pushed"
            assert (await waiting).data == b"hello"
            assert len(comm._inbox_waiters) == 0
        finally:
            await comm.close()

    asyncio.run(main())
    server.expect("ACCEPTED")
