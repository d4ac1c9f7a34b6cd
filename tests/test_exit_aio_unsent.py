"""An asyncio program that ends with a send cancelled mid-wait still delivers it, and what it queued.

A send cancelled while its frame waits for room in the socket "still goes out whole", and a
process that ends without closing its port sends the datagrams it queued (the exit hook).
When both met (``asyncio.run()`` returning cancels a send still waiting for a reader a little
behind), the exit hook skipped the connection: the cancelled send's frame and the queued
datagrams were lost, and the peer heard CLIENT_DIED.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "exit_peers.py"

pytestmark = pytest.mark.timeout(60)


def test_exit_writes_a_cancelled_send_and_the_queued_datagrams(broker: alpc.Broker, config: alpc.Config,
                                                               spawn: Any, runtime_dir: Path) -> None:
    name = "zz.exit.cut-short"
    with alpc.create_port(name, config=config) as port:
        client = spawn.argv([sys.executable, str(PEERS), "cut-short", name, "--runtime-dir", str(runtime_dir)])
        with port.listen(timeout=20).accept() as server:
            (sent,) = client.expect("QUEUED")
            for _ in range(int(sent)):  # a reader behind: it catches up once the loop is gone
                assert bytes(server.receive(timeout=10).data) == b"x" * 200
            client.send("exit")
            assert client.proc.wait(30) == 0
            got = []
            while True:
                message = server.receive(timeout=10)
                if message.type is not alpc.MessageType.DATAGRAM:
                    notice = message.type
                    break
                if bytes(message.data) != b"x" * 200:
                    got.append(bytes(message.data))
    # Unfixed: [] and CLIENT_DIED (the connection was never closed, and its last frame was cut).
    assert got == [b"last", b"queued"]
    assert notice in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED)
    assert client.expect_stderr("", timeout=1) == ""
