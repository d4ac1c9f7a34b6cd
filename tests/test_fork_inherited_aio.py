"""A forked child closing its copy of an asyncio connection: on a loop of its own, or none."""

from __future__ import annotations

import asyncio

import pytest
from test_fork_close import in_child  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc
import alpc.aio

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("queued", [False, True])
def test_a_child_closing_an_async_port_on_a_new_loop(broker: alpc.Broker, config: alpc.Config, spawn,  # type: ignore[no-untyped-def]
                                                      queued: bool) -> None:
    server = spawn("server", "fork.inherit.aio")
    server.expect("READY")

    async def main() -> None:
        comm = await alpc.aio.connect("fork.inherit.aio", config=config, timeout=5)
        try:
            # A task of the parent's waits for a message as the fork happens.
            waiting = asyncio.ensure_future(comm.receive(timeout=30))
            await asyncio.sleep(0)  # handshake-free: one loop turn, so the receive waits at the fork
            if queued:
                await comm.send(b"queued", flush=False)
            assert in_child(lambda: asyncio.run(comm.close(timeout=None)), timeout=10) == 0
            await comm.send(b"marker")  # after what the parent queued, if anything
            assert (await comm.request(b"after", timeout=5)).data == b"AFTER"
            if queued:
                assert server.expect("DATAGRAM") == ["queued"]
            assert server.expect("DATAGRAM") == ["marker"]  # "queued" once: the child's close sent nothing
            waiting.cancel()
        finally:
            await comm.close()

    asyncio.run(main())
    assert server.expect("PORT_CLOSED")[0]
