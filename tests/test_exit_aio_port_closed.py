"""A process that exits normally while a daemon thread's event loop holds an open asyncio port.

README (Notices): the server receives PORT_CLOSED when a client's process exits normally with the
port still open, whichever thread held it; the exit hook sends the notice after its queued
datagrams. The blocking driver's hook (CommunicationPort.flush_at_exit) does since this morning;
the asyncio driver's (AsyncCommunicationPort.flush_at_exit) only wrote what was queued, and the
loop's frame that holds the port is never collected: the server saw the socket's EOF as a death
(CLIENT_DIED) although the process ended in order. The client is a real process
(tests/aio_exit_peers.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "aio_exit_peers.py"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("queue", [False, True], ids=["idle", "queued-datagram"])
def test_normal_exit_with_a_daemon_loops_asyncio_port_is_port_closed(
        broker, config, spawn, runtime_dir: Path, queue: bool) -> None:  # type: ignore[no-untyped-def]
    name = f"aio.exit.{'queued' if queue else 'idle'}"
    with alpc.create_port(name, config=config) as port:
        client = spawn.argv([sys.executable, str(PEERS), "aio-exit-holding", name, "--runtime-dir",
                             str(runtime_dir), *(["--queue"] if queue else [])])
        comm = port.listen(timeout=20).accept()
        with comm:
            client.expect("CONNECTED")
            client.send("exit")
            assert client.proc.wait(20) == 0
            if queue:
                first = comm.receive(timeout=10)
                assert (first.type, first.data) == (alpc.MessageType.DATAGRAM, b"queued")
            notice = comm.receive(timeout=10)
            assert notice.type is alpc.MessageType.PORT_CLOSED, (notice.type, notice.reason)
