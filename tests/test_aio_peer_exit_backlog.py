"""An asyncio port whose peer exits with more queued in the socket than one read takes gets it
all, then the peer's PORT_CLOSED (one read after the pidfd fired took 64 KiB, the rest was
lost and the close looked like a death). The test failed before.

The peers are this file run as a script (``python tests/test_aio_peer_exit_backlog.py ROLE NAME DIR ...``):
they print a line per step and wait for stdin lines where the test must control the order.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

HERE = os.path.abspath(__file__)


def _peer(spawn: Callable[..., Any], runtime_dir: Any, role: str, name: str, *args: str) -> Any:
    return spawn.argv([sys.executable, HERE, role, name, str(runtime_dir), *args])


# -- a peer that dies (exits) with more queued in the socket than one read takes ---------------------------

FLOOD_COUNT = 700
FLOOD_SIZE = 200  # inline (under the 256-byte threshold): every datagram's bytes sit in the socket


def test_messages_sent_before_the_peer_exits_are_all_delivered(broker: alpc.Broker, config: alpc.Config,
                                                                spawn: Callable[..., Any],
                                                                runtime_dir: Any) -> None:
    """A blocking client sends ~170 KB of small datagrams, closes and exits while the loop is not
    running. When the loop runs again, the socket and the peer's pidfd are both readable.
    aio's _on_pidfd reads the socket once (64 KiB) and then declares the connection lost and stops
    watching the socket: everything after the first 64-128 KiB is never delivered (and the server
    sees CLIENT_DIED instead of the PORT_CLOSED the client did send). The blocking driver reads the
    socket dry before it consults the pidfd (port.py _read_socket)."""
    name = "svc.review.flood"

    async def main() -> tuple[int, alpc.MessageType]:
        port = await aio.create_port(name, config=config)
        try:
            peer = _peer(spawn, runtime_dir, "flood", name, str(FLOOD_COUNT))
            request = await port.listen(timeout=10)
            comm = await request.accept()
            try:
                # The loop does not run from here until the peer has exited: everything it sent
                # waits in the socket, and its pidfd is readable, when the loop next polls.
                peer.expect("SENT")
                assert peer.proc.wait(10) == 0
                got = 0
                while True:
                    message = await comm.receive(timeout=10)
                    if message.type is not alpc.MessageType.DATAGRAM:
                        return got, message.type
                    assert message.size == FLOOD_SIZE
                    got += 1
            finally:
                await comm.close()
        finally:
            await port.close()

    got, last = asyncio.run(main())
    assert got == FLOOD_COUNT, f"only {got} of {FLOOD_COUNT} datagrams delivered, then {last.name}"
    assert last is alpc.MessageType.PORT_CLOSED


# -- peer programs -----------------------------------------------------------------------------------------


def _flood(name: str, runtime_dir: str, count: str) -> None:
    config = alpc.Config.from_env(runtime_dir)
    comm = alpc.connect(name, config=config, timeout=10)
    comm.send_many([bytes([65 + i % 26]) * FLOOD_SIZE for i in range(int(count))], timeout=10)
    comm.close()
    print("SENT", flush=True)


if __name__ == "__main__":
    role, peer_name, peer_dir, *rest = sys.argv[1:]
    {"flood": _flood}[role](peer_name, peer_dir, *rest)
