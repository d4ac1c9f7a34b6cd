"""A process that exits normally (sys.exit) while a daemon thread holds an open port.

The exit hook (connection._flush_at_exit) wrote the port's queued datagrams but never told the
peer the port was closing: the daemon thread's frame is never collected, so no finalizer ran
either, and the peer saw the socket's EOF as a death (CLIENT_DIED, "the peer process died"),
although the process ended in order. The same port held by a module global got PORT_CLOSED
(its finalizer runs at interpreter shutdown). A normal exit now says PORT_CLOSED either way, and
for an asyncio port a daemon thread's loop holds too (its exit hook only wrote what was queued).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "lifecycle_peers.py"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
@pytest.mark.parametrize("queue", [False, True], ids=["idle", "queued-datagram"])
def test_normal_exit_with_a_daemon_threads_port_is_port_closed(broker, config, spawn, runtime_dir: Path,
                                                                queue: bool, driver: str) -> None:  # type: ignore[no-untyped-def]
    name = f"lifecycle.exit.{driver}.{'queued' if queue else 'idle'}"
    with alpc.create_port(name, config=config) as port:
        client = spawn.argv([sys.executable, str(PEERS), "exit-holding", name, "--runtime-dir", str(runtime_dir),
                             *(["--queue"] if queue else []), *(["--asyncio"] if driver == "asyncio" else [])])
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
