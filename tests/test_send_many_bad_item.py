"""``send_many`` with an item that is no body (a dict): the TypeError came after the small
items queued before it were thrown away, while earlier batches and large items had gone out.
Now the items before the bad one are sent (as one ``send`` each would have), in both drivers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"

pytestmark = pytest.mark.timeout(60)

BAD: Any = {"not": "a body"}


def _expect(server: Any, *bodies: bytes) -> None:
    for body in bodies:
        assert server.expect("DATAGRAM") == [str(len(body)), body.hex()]


def test_blocking_send_many_sends_the_items_before_a_bad_one(broker: alpc.Broker, config: alpc.Config,
                                                             spawn: Any, runtime_dir: Path) -> None:
    server = spawn.argv([sys.executable, str(PEERS), "echo", "svc.many", "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    with alpc.connect("svc.many", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        with pytest.raises(TypeError):
            comm.send_many([b"one", bytearray(b"two"), BAD, b"lost?"], timeout=5)
        comm.send_many([b"three"], timeout=5)
        _expect(server, b"one", b"two", b"three")  # unfixed: "three" came first


@pytest.mark.parametrize("loop", LOOPS)
def test_async_send_many_sends_the_items_before_a_bad_one(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                          spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.many.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "echo", name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            with pytest.raises(TypeError):
                await comm.send_many([b"one", bytearray(b"two"), BAD, b"lost?"], timeout=5)
            await comm.send_many([b"three"], timeout=5)
            await in_thread(_expect, server, b"one", b"two", b"three")
        finally:
            await comm.close()

    run_on(loop, main)
