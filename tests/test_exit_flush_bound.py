"""A process that ends normally sends the datagrams its ports still queue, in one bound.

The exit hook (connection._flush_at_exit) gave every connection with queued datagrams 1 s
of its own to find room: a process with N peers that stopped reading took N seconds to exit
(hundreds of connections: minutes), in both drivers. One bound now covers them all, and a
peer that reads still gets its datagrams.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "exit_peers.py"
DEAF = 8

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("driver", ["blocking", "aio"])
def test_exit_with_many_deaf_peers_is_bounded_once(driver: str, broker: alpc.Broker, config: alpc.Config,
                                                   spawn: Any, runtime_dir: Path) -> None:
    name = f"zz.exit.deaf.{driver}"
    with alpc.create_port(name, config=config) as port:
        client = spawn.argv([sys.executable, str(PEERS), "deaf", name, "--runtime-dir", str(runtime_dir),
                             "--deaf", str(DEAF), *(["--aio"] if driver == "aio" else [])])
        # The peer connects one at a time: each accept lets its next connect through.
        servers = [port.listen(timeout=20).accept() for _ in range(DEAF + 1)]
        try:
            client.expect("QUEUED")
            started = time.monotonic()
            code = client.proc.wait(60)
            took = time.monotonic() - started
            live = servers[-1]
            first = live.receive(timeout=10)
            notice = live.receive(timeout=10)
        finally:
            for server in servers:
                server.close()
    assert code == 0
    assert client.expect_stderr("", timeout=1) == ""  # no traceback, no "Exception ignored"
    # Unfixed: 1 s for each deaf peer (8 s and more); the bound is 1 s for all of them.
    assert took < DEAF / 2, f"exit took {took:.1f}s with {DEAF} deaf peers"
    assert (first.type, bytes(first.data)) == (alpc.MessageType.DATAGRAM, b"live")
    assert notice.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED)
