"""A second ``AsyncCommunicationPort.serve()`` on a connection another serve() already serves is
refused at once (RuntimeError), on the stock loop and uvloop.

It took the dispatch over silently: the messages went to it, the first serve() never heard
the connection end (its end future is resolved by its own dispatcher only) and never
returned, not even after close(): a task awaiting it hung for good.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_second_serve_is_refused_and_the_first_ends(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                      spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.serve2.{loop}"

    async def main() -> None:
        port = await aio.create_port(name, config=config, timeout=10)
        try:
            pusher = spawn.argv([sys.executable, str(PEERS), "pusher", name, "--runtime-dir", str(runtime_dir),
                                 "--count", "5", "--wait"])
            comm = await (await port.listen(timeout=10)).accept()
            seen: list[bytes] = []
            first = asyncio.create_task(comm.serve(lambda message: seen.append(bytes(message.data))))
            await asyncio.sleep(0)  # handshake-free: one loop turn, so the first serve() runs
            second = asyncio.create_task(comm.serve(lambda message: None))
            await asyncio.sleep(0)  # handshake-free: one loop turn, so the second serve() runs
            pusher.send("")  # now that both serve() calls were made
            await in_thread(pusher.expect, "DONE")  # it sent its 5 and closed
            try:
                await asyncio.wait_for(first, 10)  # returns at the client's PORT_CLOSED (it hung)
            finally:
                await comm.close()
                second.cancel()
                await asyncio.gather(second, return_exceptions=True)
            assert second.done() and isinstance(second.exception(), RuntimeError), second
            assert seen == [str(i).encode() for i in range(5)]
        finally:
            await port.close()

    run_on(loop, main)
