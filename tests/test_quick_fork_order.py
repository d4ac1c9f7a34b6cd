"""A forked child's socket messages on an inherited ring connection must not let its parent's
ring requests overtake the parent's own socket messages.

A side posts to its ring only once the peer has read every socket byte this side sent (the peer
publishes how many it read). A child forked after connecting has no mapping of the rings, and
its requests on the inherited port take the shared socket: the peer read those bytes too, and
counted them, so the parent's next ring post passed the check while the parent's own socket
bytes before it were still unread. Real processes: the server is tests/qlpc_peers.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import alpc
from alpc import _native

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))]

QLPC_PEERS = Path(__file__).resolve().parent / "qlpc_peers.py"


def child_request(comm: alpc.CommunicationPort) -> int:
    """A small request from a forked child over the inherited port; the child's exit code."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = 0 if comm.request(b"child", timeout=10).data == b"CHILD" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_childs_request_does_not_let_the_parents_ring_request_overtake_its_datagram(
        broker: alpc.Broker, config: alpc.Config, spawn, runtime_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(QLPC_PEERS), "server", "qfork.order", "--runtime-dir",
                         str(runtime_dir), "--mode", "receive"])
    server.expect("READY")
    with alpc.connect("qfork.order", config=config, timeout=10) as comm:
        assert comm.quick
        for _ in range(5):
            assert comm.call(b"warm", timeout=5) == b"WARM"
        assert child_request(comm) == 0
        # Hold the server's reader, so nothing is read between the datagram and the request.
        comm.send(b"hold")
        server.expect("HOLDING")
        comm.send(b"first")
        with pytest.raises(alpc.Timeout):
            comm.call(b"second", timeout=0.2)  # the server reads nothing until told
        server.send("go")
        seen = comm.request(b"order", timeout=5).data.decode().split()
    assert "D:first" in seen
    if "second" in seen:
        assert seen.index("D:first") < seen.index("second"), seen
